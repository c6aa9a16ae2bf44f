"""The exit codes a script can rely on, from the real console script in its own process:
0 ok, 1 a check failed, 2 bad input (one line), 3 an internal error (one line + a log with the traceback), 4 an export
refused its own artifact (no verdict)."""

from __future__ import annotations

import json
import os
import re
import shutil
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


# --- the leaks of issue 32: each path that once read as a verdict (1) or as bad input (2) when it was neither ---

ROOT = Path(__file__).resolve().parents[1]


def plant(folder: Path, code: str) -> dict:
    """A sitecustomize.py that runs `code` in every Python process started with this env (a planted bug)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": str(folder), "VCOMPRESS_CACHE": str(folder / "cache")}


def after_import(name: str, attribute: str, patch: str) -> str:
    """sitecustomize code that replaces `attribute` of module `name` by the `patched` function `patch` defines, once
    that module is imported (the CLI imports most modules late); `module.<attribute>` inside `patch` is the original."""
    return f"""import importlib.abc, importlib.machinery, sys, types
class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != {name!r}:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(loaded):
            run(loaded)
            module = types.SimpleNamespace({attribute}=getattr(loaded, {attribute!r}))
            scope = {{"module": module}}
            exec({patch!r}, scope)
            setattr(loaded, {attribute!r}, scope["patched"])
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, Hook())
"""


def internal_error_log(stderr: str) -> str:
    """The log an exit-3 line names (one line, no traceback on the terminal); its text."""
    assert stderr.count("\n") >= 1 and "Traceback" not in stderr.splitlines()[-1], stderr
    match = re.fullmatch(r"internal error: \w+: .*; details in (\S+)", stderr.strip().splitlines()[-1])
    assert match, stderr[-2000:]
    return Path(match.group(1)).read_text()


def tiny_profile(path: Path, recipe: list[dict], **budgets) -> Path:
    import yaml

    data = yaml.safe_load((ROOT / "profiles" / "x86-cpu.yaml").read_text())
    data.update(name="tiny-host", recipe=recipe)
    data["evaluation"].update(subset="anatomy", per_subject=1)
    data["budgets"].update(prompt_tokens=16, **budgets)
    data["quantization"].update(method="rtn", group_size=32)
    path.write_text(yaml.safe_dump(data))
    return path


def test_4_when_an_export_refuses_its_artifact_and_no_verdict_is_written(tmp_path, tiny_llama):
    recipe = [{"stage": "export", "quant": "none", "max_abs_diff": 1e-12}, {"stage": "validate", "runs": 1, "warmup": 0}]
    profile = tiny_profile(tmp_path / "p.yaml", recipe)
    done = vcompress("run", "--profile", profile, "--model", tiny_llama, "--out", tmp_path / "R")
    assert done.returncode == 4, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ONNX parity check failed") and "the export was not written" in last and "Traceback" not in done.stderr
    assert not list((tmp_path / "R").glob("*/verdict.json")) and not (tmp_path / "R" / "05-export-onnx").exists()


@pytest.fixture
def fake_make(tmp_path):
    """`make demo` from the real Makefile in a scratch folder whose BIN holds a fake `vcompress` (its `run` does what
    FAKE says) and this Python; the stamp is fresh, so nothing is installed."""
    for name in ("Makefile", "pyproject.toml", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # a symlink would lose the venv
    (bin_dir / "vcompress").write_text(f"#!{sys.executable}\n" + FAKE_VCOMPRESS)
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    stamp = tmp_path / "stamp"
    stamp.touch()

    def make(mode: str) -> subprocess.CompletedProcess:
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)
        return subprocess.run(
            ["make", "--no-print-directory", "demo", f"BIN={bin_dir}", f"STAMP={stamp}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "FAKE": mode},
        )

    return make


FAKE_VCOMPRESS = """
import datetime, json, os, sys, time
from pathlib import Path
if sys.argv[1] != "run":
    sys.exit(0)
mode, run = os.environ["FAKE"], Path("runs/demo")
now = lambda: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
if mode in ("stale", "verdict"):
    (run / "06-validate").mkdir(parents=True, exist_ok=True)
    (run / "06-validate" / "verdict.json").write_text(json.dumps({"passed": False, "checks": []}))
    started = now() if mode == "verdict" else "2026-01-01T00:00:00Z"  # stale: a verdict an earlier run left behind
    stages = [{"name": "validate", "folder": "06-validate", "state": "done"}]
    (run / "run.json").write_text(json.dumps({"started": started, "finished": now(), "stages": stages}))
sys.exit({"refused": 4, "internal": 3}.get(mode, 1))
"""


def test_make_demo_fails_when_the_run_wrote_no_verdict(fake_make):
    done = fake_make("verdict")  # exit 1 with this run's verdict: a failed budget, the demo worked
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exit 1 is the verdict" in done.stdout
    for mode in ("none", "stale"):  # exit 1 and no verdict from this run
        done = fake_make(mode)
        assert done.returncode != 0 and "wrote no verdict" in done.stderr, (mode, done.stdout, done.stderr)
    for mode in ("refused", "internal"):
        assert fake_make(mode).returncode != 0, mode


def test_3_when_prune_finds_its_own_bug(tmp_path, tiny_llama):
    # A planted bug: the model in memory drifts from the folder just saved, which prune's own reload check catches.
    patch = "def patched(model, folder, ids):\n    next(model.parameters()).data.add_(1.0)\n    return module.check_reload(model, folder, ids)\n"
    env = plant(tmp_path / "plant", after_import("vcompress.compress.prune", "check_reload", patch))
    done = vcompress("prune", "--model", tiny_llama, "--heads", "0.5", "--out", tmp_path / "P", env=env)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "reloads with different logits" in internal_error_log(done.stderr)


def validate_on_host(profile: Path, artifact: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return vcompress(
        "validate", "--profile", profile, "--artifact", artifact, "--reference", artifact, "--out", out, "--device", "host", env=env
    )


def test_3_when_the_host_bench_crashes_with_its_stderr_in_the_log(tmp_path, tiny_llama):
    # The bench runs with -P (safe_path) and the CLI does not: a native crash planted in the bench process alone.
    env = plant(
        tmp_path / "plant",
        "import os, signal, sys\n"
        "if sys.flags.safe_path:\n"
        "    sys.stderr.write('planted fault in the runtime\\n'); sys.stderr.flush()\n"
        "    os.kill(os.getpid(), signal.SIGSEGV)\n",
    )
    profile = tiny_profile(tmp_path / "p.yaml", [{"stage": "validate", "runs": 1, "warmup": 0, "decode_tokens": 2}])
    done = validate_on_host(profile, tiny_llama, tmp_path / "V", env)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "crashed (killed by SIGSEGV): planted fault in the runtime" in done.stderr.strip().splitlines()[-1]
    assert "planted fault in the runtime" in internal_error_log(done.stderr)


def test_2_when_the_host_bench_cannot_read_the_artifact(tmp_path, tiny_llama):
    # bench.py's own one line about its input (exit 2) stays bad input: here a context shorter than the prompt
    profile = tiny_profile(tmp_path / "p.yaml", [{"stage": "validate", "runs": 1, "warmup": 0, "decode_tokens": 100000}])
    done = validate_on_host(profile, tiny_llama, tmp_path / "V")
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the host benchmark of") and "exceeds the model's context" in last and "error: error" not in last


def test_3_when_the_tflite_converter_crashes_on_an_architecture_it_converts(tmp_path, tiny_llama):
    pytest.importorskip("litert_torch")
    # A crash planted in litert-torch's exporter, installed when that module is imported (the CLI imports it late).
    crash = "def patched(**_):\n    raise RuntimeError('planted converter crash')\n"
    env = plant(tmp_path / "plant", after_import("litert_torch.generative.export_hf.export", "export", crash))
    done = vcompress("export", "tflite", "--model", tiny_llama, "--out", tmp_path / "T", env=env)
    assert done.returncode == 3, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "litert-torch failed to convert 'llama'" in last and "planted converter crash" in last


def test_2_when_bad_input_stops_the_auto_candidates_before_any_verdict(tmp_path, tiny_llama):
    """--data with one record: enough for the shared analysis, too little for distillation, which every pruned
    candidate runs; the unpruned ones are ruled out by the size budget. No verdict was reached: exit 2, not 1."""
    from tests.test_auto import _profile
    from vcompress.auto import candidates
    from vcompress.core.profiles import load_profile

    config = json.loads((tiny_llama / "config.json").read_text())
    found = candidates(
        {"shape": {"query_heads": config["num_attention_heads"], "kv_heads": config["num_key_value_heads"]}, "config": config},
        load_profile(_profile(tmp_path / "p.yaml")),
    )
    pruned, unpruned = found[0].estimated_mb, min(c.estimated_mb for c in found if not c.heads)
    assert found[0].heads and pruned < unpruned
    profile = _profile(tmp_path / "p.yaml", max_model_size_mb=(pruned + unpruned) / 4)  # tried below 2x the budget, skipped above
    data = tmp_path / "one-record.txt"
    data.write_text("The heart pumps blood through the body and the kidneys filter it. " * 200 + "\n")
    done = vcompress("run", "--profile", profile, "--model", tiny_llama, "--data", data, "--out", tmp_path / "R", "--auto")
    summary = json.loads((tmp_path / "R" / "auto.json").read_text())
    assert done.returncode == 2, done.stderr[-3000:]
    assert [c["status"] for c in summary["candidates"]].count("error") >= 1 and summary["winner"] is None
    assert all(c["exit_code"] == 2 for c in summary["candidates"] if c["status"] == "error")
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no candidate passed") and "distillation needs at least 2 records" in last
