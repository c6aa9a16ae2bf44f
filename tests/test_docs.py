"""Every pointer to a page or a section of the docs resolves, and the CHANGELOG keeps its form.

A pointer is written `docs/x.md`, `docs/x.md, "Heading"` or `README, "Heading"` in code, profiles and docs, and
`[x.md](x.md), "Heading"` as a link inside a page; the page must exist and the heading must be one of its own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from vcompress import __version__

ROOT = Path(__file__).resolve().parents[1]
SCANNED = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh"}
SKIPPED_DIRS = {"runs", "build", "dist", "__pycache__", "node_modules"}
# The CHANGELOG is history: it names sections as they were when each entry was written; this file holds examples.
SKIPPED_FILES = {"CHANGELOG.md", "test_docs.py"}

HEADING = r'(?:,\s+"(?P<heading>[^"]+)")?'
POINTERS = (
    # `onnx-tensorrt's docs/operators.md` is another project's page, not ours
    re.compile(r"(?<!'s )(?<!'s `)(?<![\w/.-])(?P<page>docs/[\w-]+\.md)`?" + HEADING),
    re.compile(r'\b(?P<page>README)(?:\.md)?,\s+"(?P<heading>[^"]+)"'),
    re.compile(r"\]\((?P<page>[\w./-]+\.md)\)" + HEADING),
)


@dataclass(frozen=True)
class Pointer:
    source: str  # the file it is written in, from the tree's root
    page: Path
    heading: str | None

    def __str__(self) -> str:
        return f"{self.source} -> {self.page.name}" + (f', "{self.heading}"' if self.heading else "")


def scanned_files(root: Path):
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not (d.startswith(".") or d in SKIPPED_DIRS or d.endswith(".egg-info")))
        for name in sorted(names):
            if Path(name).suffix in SCANNED and name not in SKIPPED_FILES:
                yield Path(folder) / name


def pointers_in(path: Path, root: Path) -> list[Pointer]:
    # a heading may wrap onto the next comment line: join lines, dropping the comment marker
    text = re.sub(r"[ \t]*\n[ \t]*(?:#+[ \t]|//[ \t]*)?", " ", path.read_text(encoding="utf-8", errors="replace"))
    found = []
    for pattern in POINTERS:
        for match in pattern.finditer(text):
            page = match["page"]
            if page == "README":
                target = root / "README.md"
            elif page.startswith("docs/"):
                target = root / page
            else:  # a link, relative to the page it is in
                target = (path.parent / page).resolve()
            found.append(Pointer(path.relative_to(root).as_posix(), target, match["heading"]))
    return found


def headings_of(page: Path) -> set[str]:
    lines = page.read_text(encoding="utf-8").splitlines()
    return {line.lstrip("#").strip() for line in lines if re.match(r"#{1,6} ", line)}


def broken(pointers: list[Pointer]) -> list[str]:
    problems = []
    for pointer in pointers:
        if not pointer.page.is_file():
            problems.append(f"{pointer}: no such page")
        elif pointer.heading and pointer.heading not in headings_of(pointer.page):
            problems.append(f"{pointer}: no such heading")
    return problems


def all_pointers(root: Path = ROOT) -> list[Pointer]:
    return [p for path in scanned_files(root) for p in pointers_in(path, root)]


def test_every_pointer_to_a_page_or_section_resolves():
    pointers = all_pointers()
    assert broken(pointers) == []
    # the finder sees the pointers it is meant to check: profiles, code comments and the README's links
    assert {"profiles/x86-cpu.yaml", "core/profiles.py"} <= {p.source for p in pointers if p.heading}
    assert any(p.source == "README.md" and p.page.name == "results.md" for p in pointers)


def test_a_stale_pointer_is_named(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("# Results\n\n## x86-cpu: the demo run\n")
    (tmp_path / "README.md").write_text("# vcompress\n\n## Quickstart\n\nSee [results](docs/results.md).\n")
    (tmp_path / "x86.yaml").write_text(
        '# halves GPTQ\'s share of the run (docs/results.md, "x86-cpu: the demo\n# run")\n'
        '# see (README, "The main job") and docs/peers.md; onnx-tensorrt\'s docs/operators.md is not ours\n'
    )
    problems = broken(all_pointers(tmp_path))
    assert sorted(problems) == ['x86.yaml -> README.md, "The main job": no such heading', "x86.yaml -> peers.md: no such page"]


CHANGELOG = ROOT / "CHANGELOG.md"


def test_changelog_is_one_line_per_change_in_versioned_releases():
    lines = CHANGELOG.read_text(encoding="utf-8").splitlines()
    releases = [line for line in lines if line.startswith("## ")]
    assert releases[0] == "## [Unreleased]"
    versions = [re.fullmatch(r"## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}", line) for line in releases[1:]]
    assert all(versions), releases
    assert versions[0][1] == __version__  # the newest release is the version we install
    sections = {line for line in lines if line.startswith("### ")}
    assert sections <= {"### Added", "### Changed", "### Fixed", "### Removed", "### Deprecated", "### Security"}
    entries = [line for line in lines if line.startswith("- ")]
    too_long = [line[:60] for line in entries if len(line) > 200]
    assert entries and too_long == []
    body = lines[lines.index(releases[0]) :]
    continued = [line[:60] for line in body if line.strip() and not line.startswith(("## ", "### ", "- ", "["))]
    assert continued == []  # an entry is one line: details go to the commit or the docs
