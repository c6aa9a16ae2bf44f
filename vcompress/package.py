"""Release bundles: a validated run's exported model, ready for a mobile build, as one deterministic zip.

Layout of bundle.zip (entries sorted, timestamps 1980-01-01, mode 0644, deflate):
    manifest.json          sha256 + size of every other file, versions, signature, verdict summary
    model/...              the export folder (model files, its manifest.json, tokenizer, generation config, chat template)
    profile.yaml           the profile the run was validated against
    verdict.json           the run's verdict
    recipes/<stage>.yaml   the recipe.yaml of every stage folder of the run
`verify` checks a bundle before anyone unpacks it: every hash, the manifest schema, and no entry
outside the root, no symlink, nothing unlisted, nothing missing.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import stat
import zipfile
import zlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vcompress import __version__
from vcompress.core import export_manifest
from vcompress.core.artifact import RunLayout, read_json
from vcompress.core.errors import CheckFailed, InputError
from vcompress.core.profiles import parse_profile
from vcompress.history import run_id_of

BUNDLE_SCHEMA = "vcompress-bundle/1"
BUNDLE_INDEX = "manifest.json"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: no build time leaks into the bytes
FILE_MODE = stat.S_IFREG | 0o644
STAGE_FILES = ("recipe.yaml", "metrics.json")  # bookkeeping of the export stage, bundled under recipes/
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CHUNK = 1 << 20


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class RunInfo(Strict):
    run_id: str
    vcompress: str | None
    git_commit: str | None
    started: str | None
    finished: str | None
    seed: int | None


class ModelInfo(Strict):
    label: str | None
    spec: str | None
    hash: str | None  # sha256 of the source model's weights


class ProfileInfo(Strict):
    name: str
    sha256: str | None
    file: str


class Signature(Strict):
    inputs: list | dict
    outputs: list | dict


class ValidatedWith(Strict):
    versions: dict[str, str]  # runtime versions from run.json
    device: str | None
    backend: str | None


class VerdictInfo(Strict):
    passed: bool
    allow_failed: bool  # packaged although the verdict failed (--allow-failed)
    failed_checks: list[str]
    file: str


class BundleIndex(Strict):
    bundle: Literal["vcompress-bundle/1"]
    vcompress: str  # the version that packaged it
    format: str = Field(min_length=1)  # a registered exporter's name, as the export's manifest.json says
    run: RunInfo
    model: ModelInfo
    profile: ProfileInfo
    signature: Signature
    validated_with: ValidatedWith
    tokenizer: list[str]
    chat_template: str | None
    generation_config: str | None
    verdict: VerdictInfo
    files: list[FileEntry]


# --- collecting a run's files ------------------------------------------------------------


def _stage_folders(run_dir: Path) -> list[Path]:
    return [run_dir / s["folder"] for s in RunLayout(run_dir).read_run()["stages"] if (run_dir / s["folder"]).is_dir()]


def _export_format(export: Path | None) -> str | None:
    """The format an export folder's manifest names (None: no finished export)."""
    if export is None or not (export / export_manifest.MANIFEST).is_file():
        return None
    manifest = read_json(export / export_manifest.MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), str):
        raise InputError(f"{export / export_manifest.MANIFEST} names no format; re-run the export stage")
    return manifest["format"]


def _profile_text(run_dir: Path, profile: dict) -> str:
    """The profile YAML the run used: a copy in the run, the path it was given or the built-in one, if
    its hash matches run.json; else run.json's copy of the profile's data."""
    name, want = profile.get("name"), profile.get("sha256")
    candidates = [run_dir / "profile.yaml"] + ([Path(profile["path"]).expanduser()] if profile.get("path") else [])
    texts = [p.read_text() for p in candidates if p.is_file()]
    resource = importlib.resources.files("vcompress.profiles") / f"{name}.yaml"
    if name and resource.is_file():
        texts.append(resource.read_text())
    for text in texts:
        if not want or want in _profile_hashes(text):
            return text
    if profile.get("data"):
        return yaml.safe_dump(profile["data"], sort_keys=False)
    raise InputError(
        f"cannot find the profile {name or '?'} that run {run_dir} was validated with (no file matches run.json's sha256); "
        f"put the YAML the run used at {run_dir / 'profile.yaml'}"
    )


def _profile_hashes(text: str) -> set[str]:
    """sha256 of the YAML text, and of its parsed profile as sorted JSON (what `vcompress run` records)."""
    hashes = {hashlib.sha256(text.encode()).hexdigest()}
    try:
        data = parse_profile(text, "profile").model_dump(mode="json")
    except InputError:
        return hashes
    return hashes | {hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()}


def _signature(export: Path) -> dict:
    manifest = read_json(export / export_manifest.MANIFEST)
    for holder in (manifest, manifest.get("signature") or {}, manifest.get("io") or {}):
        if holder.get("inputs") and holder.get("outputs"):
            return {"inputs": holder["inputs"], "outputs": holder["outputs"]}
    raise InputError(
        f"{export / export_manifest.MANIFEST} has no inputs/outputs signature; re-run the export stage with this vcompress version"
    )


def collect(run_dir: str | Path, fmt: str, *, allow_failed: bool = False) -> tuple[dict[str, Path | bytes], BundleIndex]:
    """The bundle's entries (name -> file or bytes) and its index (manifest.json), after every refusal check."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    run = layout.read_run()
    verdict = layout.validation(RunLayout.VERDICT)
    export = layout.folder("export")
    _refuse_unpackageable(run_dir, fmt, _export_format(export), verdict, allow_failed)
    entries = _model_entries(run_dir, export)
    entries["profile.yaml"] = _profile_text(run_dir, run.get("profile") or {}).encode()
    entries["verdict.json"] = layout.folder("validate") / RunLayout.VERDICT
    for folder in _stage_folders(run_dir):
        if (folder / "recipe.yaml").is_file():
            entries[f"recipes/{folder.name}.yaml"] = folder / "recipe.yaml"
    return entries, _bundle_index(layout, run, fmt, export, verdict, entries)


def _refuse_unpackageable(run_dir: Path, fmt: str, exported: str | None, verdict: dict, allow_failed: bool) -> None:
    """A run without a finished export of `fmt`, validated on another format, or (unless allowed) failed."""
    if exported != fmt:
        have = f"its export is {exported}" if exported else "it has no finished export"
        raise InputError(
            f"run {run_dir} has no {fmt} export ({have}); pass --format {exported}"
            if exported
            else f"run {run_dir} has no {fmt} export ({have}); finish it with `vcompress run --resume`"
        )
    if verdict.get("format") and verdict["format"] != fmt:
        raise InputError(f"run {run_dir} validated its {verdict['format']} export, not {fmt}; package --format {verdict['format']}")
    if not verdict.get("passed") and not allow_failed:
        failed = [c for c in verdict.get("checks") or [] if not c.get("passed")]
        details = "; ".join(f"{c['budget']} {c.get('value')} {c.get('unit', '')} vs limit {c.get('limit')}" for c in failed)
        raise CheckFailed(
            f"run {run_dir} failed its verdict ({details or 'passed is false'}); a failed run is not packaged, "
            "pass --allow-failed to package it anyway"
        )


def _model_entries(run_dir: Path, export: Path) -> dict[str, Path | bytes]:
    """model/...: the export folder without its stage bookkeeping, and the tokenizer, chat template and
    generation config of the stage before it where the export left them with the checkpoint it came from."""
    entries: dict[str, Path | bytes] = {}
    for path in sorted(export.rglob("*")):
        rel = path.relative_to(export).as_posix()
        if path.is_file() and rel not in STAGE_FILES:
            entries[f"model/{rel}"] = path
    earlier = [p for p in _stage_folders(run_dir) if p.name < export.name]
    for name in TOKENIZER_FILES + CHAT_TEMPLATE_FILES + ("generation_config.json",):
        source = next((folder / name for folder in reversed(earlier) if (folder / name).is_file()), None)
        if f"model/{name}" not in entries and source is not None:
            entries[f"model/{name}"] = source
    if not any(n in entries for n in ("model/tokenizer.json", "model/tokenizer.model", "model/vocab.json")):
        raise InputError(f"no tokenizer files in {export} or the stages before it; re-run the export stage")
    return entries


def _chat_template(entries: dict[str, Path | bytes]) -> str | None:
    chat_template = next((f"model/{n}" for n in CHAT_TEMPLATE_FILES if f"model/{n}" in entries), None)
    if chat_template is None and "model/tokenizer_config.json" in entries:
        if "chat_template" in json.loads(_read(entries["model/tokenizer_config.json"])):
            chat_template = "model/tokenizer_config.json"
    return chat_template


def _bundle_index(layout: RunLayout, run: dict, fmt: str, export: Path, verdict: dict, entries: dict[str, Path | bytes]) -> BundleIndex:
    """manifest.json of the bundle: the run, model, profile, signature, versions, verdict and every file's digest."""
    latency = layout.validation(RunLayout.LATENCY, required=False)
    device, backend = latency.get("device") or verdict.get("device"), latency.get("backend") or verdict.get("backend")
    model, profile = run.get("model") or {}, run.get("profile") or {}
    passed = bool(verdict.get("passed"))
    return BundleIndex(
        bundle=BUNDLE_SCHEMA,
        vcompress=__version__,
        format=fmt,
        run=RunInfo(
            run_id=run_id_of(run, device, backend),
            vcompress=run.get("vcompress"),
            git_commit=run.get("git_commit"),
            started=run.get("started"),
            finished=run.get("finished"),
            seed=run.get("seed"),
        ),
        model=ModelInfo(
            label=model.get("label") or (verdict.get("model") or {}).get("label"),
            spec=model.get("spec"),
            hash=model.get("hash") or (verdict.get("model") or {}).get("hash"),
        ),
        profile=ProfileInfo(name=profile.get("name") or verdict.get("profile") or "?", sha256=profile.get("sha256"), file="profile.yaml"),
        signature=Signature(**_signature(export)),
        validated_with=ValidatedWith(versions={k: str(v) for k, v in (run.get("versions") or {}).items()}, device=device, backend=backend),
        tokenizer=sorted(n for n in entries if n.removeprefix("model/") in TOKENIZER_FILES),
        chat_template=_chat_template(entries),
        generation_config="model/generation_config.json" if "model/generation_config.json" in entries else None,
        verdict=VerdictInfo(
            passed=passed,
            allow_failed=not passed,
            failed_checks=[c.get("budget", "?") for c in verdict.get("checks") or [] if not c.get("passed")],
            file="verdict.json",
        ),
        files=[FileEntry(path=name, **_digest(entries[name])) for name in sorted(entries)],
    )


def _read(source: Path | bytes) -> bytes:
    return source if isinstance(source, bytes) else source.read_bytes()


def _chunks(source: Path | bytes):
    if isinstance(source, bytes):
        yield source
        return
    with open(source, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _digest(source: Path | bytes) -> dict:
    sha, size = hashlib.sha256(), 0
    for chunk in _chunks(source):
        sha.update(chunk)
        size += len(chunk)
    return {"sha256": sha.hexdigest(), "bytes": size}


# --- writing ---------------------------------------------------------------------------------


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # unix, so the mode bits below mean the same everywhere
    info.external_attr = FILE_MODE << 16
    return info


def package(run_dir: str | Path, fmt: str, out: str | Path, *, allow_failed: bool = False, force: bool = False) -> BundleIndex:
    """Write the bundle zip for a run's `fmt` export; the same run always gives the same bytes."""
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    if out.is_dir():
        raise InputError(f"{out} is a folder; --out names the bundle file, e.g. {out / 'bundle.zip'}")
    entries, manifest = collect(run_dir, fmt, allow_failed=allow_failed)
    entries[BUNDLE_INDEX] = (json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()
    sizes = {f.path: f.bytes for f in manifest.files} | {BUNDLE_INDEX: len(entries[BUNDLE_INDEX])}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for name in sorted(entries):
                with zf.open(_zip_info(name), "w", force_zip64=sizes[name] >= zipfile.ZIP64_LIMIT) as dst:
                    for chunk in _chunks(entries[name]):
                        dst.write(chunk)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


# --- verifying ---------------------------------------------------------------------------------


def unsafe_name(name: str) -> str | None:
    """Why an entry name could land outside the folder it is unpacked into (zip-slip), or None."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if "\\" in name or "\0" in name:
        return "backslash or NUL in the name"
    parts = name.split("/")
    if ".." in parts:
        return "path outside the bundle root (..)"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' path component"
    return None


def verify(bundle: str | Path) -> BundleIndex:
    """Check a bundle without unpacking it; CheckFailed names the first offending file."""
    bundle = Path(bundle)
    if not bundle.is_file():
        raise InputError(f"{bundle} does not exist; pass a bundle written by `vcompress package`")

    def bad(name: str, problem: str) -> CheckFailed:
        return CheckFailed(f"{bundle}: {name}: {problem}; do not use this bundle, package the run again")

    try:
        zf = zipfile.ZipFile(bundle)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckFailed(f"{bundle}: not a readable zip ({e}); package the run again") from None
    with zf:
        seen = _entry_names(zf, bundle, bad)  # names and types first: nothing is read from an entry that could escape
        index = _read_index(zf, seen, bad)
        listed = _listed_files(index, seen, bad)
        for name, entry in sorted(listed.items()):
            _check_digest(zf, name, entry, bad)
        for name in [index.profile.file, index.verdict.file, *index.tokenizer]:
            if name not in listed:
                raise bad(name, "named in manifest.json but not among its files")
        _check_verdict(zf, index, bundle, bad)
    return index


def _entry_names(zf: zipfile.ZipFile, bundle: Path, bad) -> set[str]:
    """The zip's entry names, each a safe relative path to a regular, unencrypted file, none twice."""
    seen: set[str] = set()
    for info in zf.infolist():
        name, mode = info.filename, info.external_attr >> 16
        if problem := unsafe_name(name):
            raise bad(name, problem)
        if stat.S_ISLNK(mode):
            raise bad(name, "symbolic link entry")
        if info.is_dir() or (stat.S_IFMT(mode) not in (0, stat.S_IFREG)):
            raise bad(name, "not a regular file entry")
        if name in seen:
            raise bad(name, "appears twice in the zip")
        if info.flag_bits & 0x1:  # vcompress never encrypts; such an entry cannot be checked
            raise InputError(
                f"{bundle}: {name} is an encrypted zip entry, which `vcompress package` never writes; pass an unencrypted bundle written by it"
            )
        seen.add(name)
    return seen


def _read_index(zf: zipfile.ZipFile, seen: set[str], bad) -> BundleIndex:
    if BUNDLE_INDEX not in seen:
        raise bad(BUNDLE_INDEX, "missing")
    try:
        return BundleIndex.model_validate(json.loads(zf.read(BUNDLE_INDEX)))
    except (ValueError, ValidationError) as e:
        raise bad(BUNDLE_INDEX, f"does not follow the {BUNDLE_SCHEMA} schema ({_first_error(e)})") from None
    except (zipfile.BadZipFile, zlib.error) as e:
        raise bad(BUNDLE_INDEX, f"corrupt entry ({e})") from None


def _listed_files(index: BundleIndex, seen: set[str], bad) -> dict[str, FileEntry]:
    """The index's files by path: safe, each once, and exactly the zip's entries besides the index."""
    listed = {}
    for entry in index.files:
        if problem := unsafe_name(entry.path):
            raise bad(entry.path, f"listed in the manifest with an unsafe path: {problem}")
        if entry.path in listed or entry.path == BUNDLE_INDEX:
            raise bad(entry.path, "listed twice in the manifest")
        listed[entry.path] = entry
    for name in sorted(seen - {BUNDLE_INDEX}):
        if name not in listed:
            raise bad(name, "not listed in manifest.json")
    for name in sorted(listed):
        if name not in seen:
            raise bad(name, "listed in manifest.json but missing from the zip")
    return listed


def _check_digest(zf: zipfile.ZipFile, name: str, entry: FileEntry, bad) -> None:
    sha, size = hashlib.sha256(), 0
    try:
        with zf.open(name) as src:
            while chunk := src.read(CHUNK):
                sha.update(chunk)
                size += len(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise bad(name, f"corrupt entry ({e})") from None
    if size != entry.bytes:
        raise bad(name, f"size {size} differs from the manifest's {entry.bytes}")
    if sha.hexdigest() != entry.sha256:
        raise bad(name, "sha256 differs from the manifest")


def _check_verdict(zf: zipfile.ZipFile, index: BundleIndex, bundle: Path, bad) -> None:
    """verdict.json is a verdict that agrees with the index; a failed one only in a bundle marked allow_failed."""
    try:
        verdict = json.loads(zf.read(index.verdict.file))
    except ValueError:
        raise bad(index.verdict.file, "not valid JSON") from None
    if not isinstance(verdict, dict):
        raise InputError(f"{bundle}: {index.verdict.file} is not a verdict (a JSON object); pass a bundle written by `vcompress package`")
    if bool(verdict.get("passed")) != index.verdict.passed:
        raise bad(index.verdict.file, "verdict disagrees with manifest.json")
    if not index.verdict.passed and not index.verdict.allow_failed:
        raise bad(BUNDLE_INDEX, "the verdict failed but the bundle is not marked allow_failed")


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc']) or 'top level'}: {err['msg']}"
    return str(e).splitlines()[0]
