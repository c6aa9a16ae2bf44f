"""Whether a package is installed at the version vcompress pins: an error blames the installation only when it is
absent or off its pin, and otherwise says what really failed."""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement


def installed(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pin(dist: str) -> Requirement | None:
    """vcompress's requirement on `dist` (from its installed metadata, extras included), or None."""
    want = _canonical(dist)
    for line in metadata.requires("vcompress") or []:
        requirement = Requirement(line)
        if _canonical(requirement.name) == want:
            return requirement
    return None


def off_pin(dist: str) -> str | None:
    """Why the installed `dist` is not the pinned one (absent, or another version), or None when it is."""
    version = installed(dist)
    if version is None:
        return f"{dist} is not installed"
    requirement = pin(dist)
    if requirement is not None and requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        return f"{dist} {version} is installed but vcompress pins {dist}{requirement.specifier}"
    return None


def import_failure(error: ImportError, dists: tuple[str, ...], how: str) -> str:
    """One line for an ImportError of a feature that needs `dists`: install them (`how`) only when one is absent or
    off its pin; otherwise the import failed for another reason, which is named."""
    wrong = [why for dist in dists if (why := off_pin(dist))]
    if wrong:
        return f"{'; '.join(wrong)}; install the pinned versions with {how}"
    versions = ", ".join(f"{dist} {installed(dist)}" for dist in dists)
    return f"importing it failed although {versions} (the pinned versions) are installed: {error}"


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
