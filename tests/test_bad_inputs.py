"""Inputs that once gave a traceback: each now ends with exit 2 and one line that names the problem and the
fix, and nothing already written is lost."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The heart pumps blood through the body. The kidneys filter the blood and make urine.\n\n" * 40


def one_line(err: str) -> bool:
    """Exactly one error line, and it is the last thing printed (a stage's progress log may come before it)."""
    lines = err.strip().splitlines()
    return "Traceback" not in err and lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_profile_that_is_not_utf8(cli, tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes((ROOT / "profiles" / "x86-cpu.yaml").read_bytes().replace(b"Generic", b"G\xe9n\xe9rique"))
    for args in (("profiles", "validate", bad), ("run", "--profile", bad, "--out", tmp_path / "R", "--dry-run")):
        code, _, err = cli(*args)
        assert code == 2 and one_line(err) and "UTF-8" in err and str(bad) in err


def test_an_out_folder_that_cannot_be_written(cli, tmp_path, tiny_llama):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"  # its parent is a file: no user, root included, can create it
    code, _, err = cli("run", "--profile", "x86-cpu", "--model", tiny_llama, "--out", out)
    assert code == 2 and one_line(err) and "--out" in err
    code, _, err = cli("prune", "--model", tiny_llama, "--heads", "0.5", "--out", out)
    assert code == 2 and one_line(err) and "--out" in err
    assert blocker.read_text() == "not a folder"


def test_a_corrupt_run_json_on_resume(cli, tmp_path, tiny_llama):
    run = tmp_path / "R"
    (run / "01-analyze").mkdir(parents=True)
    (run / "run.json").write_text('{"stages": [')
    code, _, err = cli("run", "--profile", "x86-cpu", "--model", tiny_llama, "--out", run, "--resume")
    assert code == 2 and one_line(err) and "run.json" in err and "--force" in err
    assert (run / "run.json").read_text() == '{"stages": ['  # nothing rewritten


def test_disk_full_during_a_stage_keeps_the_previous_artifact(cli, tmp_path, tiny_llama, monkeypatch):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "q"
    args = ("quantize", "--model", tiny_llama, "--method", "rtn", "--calib", calib, "--calib-samples", "4", "--seq-len", "32", "--out", out)
    code, _, err = cli(*args)
    assert code == 0, err
    before = digest(out)

    import vcompress.core.stage as stage

    def full(folder, metrics):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "metrics.json"))

    monkeypatch.setattr(stage, "write_metrics", full)
    code, _, err = cli(*args, "--force")
    assert code == 2 and one_line(err) and f"no space left on {tmp_path}" in err
    assert digest(out) == before  # the finished artifact is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp or work folder left


def test_a_corrupt_manifest_in_an_artifact(cli, tmp_path):
    artifact = tmp_path / "export"
    artifact.mkdir()
    (artifact / "manifest.json").write_text("{ not json")
    code, _, err = cli("eval", "--model", artifact, "--per-subject", "1")
    assert code == 2 and one_line(err) and "manifest.json" in err


@pytest.mark.parametrize("manifest", [[1, 2], {"files": []}])
def test_a_manifest_without_a_format(cli, tmp_path, manifest):
    artifact = tmp_path / "export"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli("eval", "--model", artifact, "--per-subject", "1")
    assert code == 2 and one_line(err) and "manifest.json" in err
