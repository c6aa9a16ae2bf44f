"""The exit codes a script can rely on, from the real console script in its own process:
0 ok, 1 a check failed, 2 bad input (one line), 3 an internal error (one line + a log with the traceback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("vcompress")


def vcompress(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}, cwd=cwd
    )


@pytest.fixture(scope="module", autouse=True)
def _script_exists():
    assert SCRIPT.is_file(), f"the console script {SCRIPT} is not installed (pip install -e .)"


def test_0_when_all_is_well():
    done = vcompress("profiles", "validate", "x86-cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok:")


def test_1_when_a_check_fails(tmp_path):
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(b"not a zip at all")
    done = vcompress("verify", bundle)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_2_on_bad_input_one_line():
    done = vcompress("run", "--profile", "no-such-device", "--out", "unused")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "unknown profile 'no-such-device'" in done.stderr and "Traceback" not in done.stderr


def test_3_on_an_internal_error_with_the_traceback_in_a_log(tmp_path):
    # A bug of ours, planted: loading any profile raises an exception that is not one of vcompress's errors.
    (tmp_path / "sitecustomize.py").write_text(
        "import vcompress.core.profiles as p\ndef broken(*a, **k):\n    raise ZeroDivisionError('planted bug')\np.load_profile = broken\n"
    )
    cache = tmp_path / "cache"
    done = vcompress("profiles", "show", "x86-cpu", env={"PYTHONPATH": str(tmp_path), "VCOMPRESS_CACHE": str(cache)})
    assert done.returncode == 3, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    match = re.fullmatch(r"internal error: ZeroDivisionError: planted bug; details in (\S+)\n", done.stderr)
    assert match, done.stderr
    log = Path(match.group(1))
    assert log.parent == cache / "logs"
    assert "Traceback" in log.read_text() and "planted bug" in log.read_text()
