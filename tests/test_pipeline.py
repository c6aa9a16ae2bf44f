"""`vcompress run` end to end on a tiny Llama: plan, stage folders, verdict, resume, --from, kill -9."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.processes import kill_when_saved
from tests.tiny import build_model

ROOT = Path(__file__).resolve().parents[1]
FULL = [
    {"stage": "analyze", "samples": 2, "seq_len": 32, "parts": ["heads", "layers"]},
    {"stage": "prune", "heads": 0.5, "heldout_blocks": 2, "heldout_seq_len": 32},
    {
        "stage": "distill",
        "max_steps": 6,
        "seq_len": 32,
        "batch_size": 2,
        "save_every": 2,
        "eval_per_subject": 0,
        "eval_blocks": 2,
        "val_blocks": 2,
        "lr": 1e-3,
        "warmup": 1,
    },
    {"stage": "quantize", "method": "rtn", "group_size": 32, "heldout_blocks": 1, "heldout_seq_len": 64, "eval_per_subject": 0},
    {"stage": "export", "quant": "int4"},
    {"stage": "validate", "runs": 2, "warmup": 0, "decode_tokens": 4},
]


def write_profile(path: Path, recipe: list[dict]) -> Path:
    data = yaml.safe_load((ROOT / "profiles" / "x86-cpu.yaml").read_text())
    data.update(name="tiny-host", recipe=recipe)
    data["evaluation"].update(subset="anatomy", per_subject=2)
    data["budgets"]["prompt_tokens"] = 32
    data["quantization"].update(method="rtn", group_size=32)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def student_src(tmp_path_factory, tokenizer):
    return build_model("llama", tmp_path_factory.mktemp("pipe") / "llama3", tokenizer, layers=3)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, student_src):
    root = tmp_path_factory.mktemp("run")
    profile = write_profile(root / "tiny.yaml", FULL)
    from vcompress.cli import main

    code = main(["run", "--profile", str(profile), "--model", str(student_src), "--out", str(root / "RUN")])
    return code, root / "RUN", profile


def test_dry_run_prints_the_plan_without_work(cli, tmp_path, student_src):
    profile = write_profile(tmp_path / "p.yaml", FULL)
    code, out, _ = cli("run", "--profile", profile, "--model", student_src, "--out", tmp_path / "R", "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 0 and not (tmp_path / "R").exists()
    assert [s["folder"] for s in plan["steps"]] == ["01-analyze", "02-prune", "03-distill", "04-quantize", "05-export-onnx", "06-validate"]
    assert plan["steps"][3]["config"]["method"] == "rtn" and plan["steps"][4]["config"]["quant"] == "int4"


def test_bad_recipe_setting_is_refused_before_any_work(cli, tmp_path, student_src):
    profile = write_profile(tmp_path / "p.yaml", [{"stage": "prune", "heads": 0.5, "headz": 1}, {"stage": "export"}])
    code, _, err = cli("run", "--profile", profile, "--model", student_src, "--out", tmp_path / "R")
    assert code == 2 and "recipe.prune" in err and "'headz'" in err
    assert not (tmp_path / "R").exists()


def test_full_run_writes_every_stage_and_a_verdict(full_run):
    code, run, _ = full_run
    state = json.loads((run / "run.json").read_text())
    assert [s["state"] for s in state["stages"]] == ["done"] * 6
    for s in state["stages"]:
        assert (run / s["folder"] / "recipe.yaml").is_file() and (run / s["folder"] / "metrics.json").is_file()
    verdict = json.loads((run / "06-validate" / "verdict.json").read_text())
    assert code == (0 if verdict["passed"] else 1)
    budgets = {c["budget"]: c for c in verdict["checks"]}
    assert set(budgets) == {
        "max_model_size_mb",
        "max_peak_ram_mb",
        "max_ttft_ms",
        "min_decode_tokens_per_s",
        "max_mmlu_drop_points",
        "max_perplexity_rise_pct",
        "min_answer_agreement",
    }
    assert budgets["max_ttft_ms"]["source"] == "measured" and budgets["max_ttft_ms"]["device"]
    assert len(budgets["min_decode_tokens_per_s"]["samples"]) == 2
    for c in verdict["checks"]:
        if c["budget"] == "max_mmlu_drop_points":  # judged on its paired interval (tests/test_accuracy_budget.py)
            assert c["passed"] == (c["result"] == "pass")
            continue
        assert c["passed"] == (
            c["value"] is not None and (c["value"] <= c["limit"] if c["budget"].startswith("max") else c["value"] >= c["limit"])
        )
    prune = json.loads((run / "02-prune" / "metrics.json").read_text())
    assert json.loads((run / "02-prune" / "config.json").read_text())["num_key_value_heads"] == 1
    assert yaml.safe_load((run / "02-prune" / "recipe.yaml").read_text())["config"]["scores"].endswith("01-analyze")
    assert prune["parameters_after"] < prune["parameters_before"]
    assert json.loads((run / "05-export-onnx" / "manifest.json").read_text())["format"] == "onnx"


def test_finished_run_needs_resume_and_resume_skips(full_run, cli):
    _, run, profile = full_run
    code, _, err = cli("run", "--profile", profile, "--model", json.loads((run / "run.json").read_text())["model"]["spec"], "--out", run)
    assert code == 2 and "--resume" in err
    before = {p: p.stat().st_mtime_ns for p in run.glob("0*/metrics.json")}
    code, out, _ = cli(
        "run", "--profile", profile, "--model", json.loads((run / "run.json").read_text())["model"]["spec"], "--out", run, "--resume"
    )
    assert code in (0, 1) and "skipped (resume)" in out
    assert before == {p: p.stat().st_mtime_ns for p in run.glob("0*/metrics.json")}


def test_from_stage_redoes_that_stage_and_later_only(full_run, cli):
    _, run, profile = full_run
    spec = json.loads((run / "run.json").read_text())["model"]["spec"]
    kept = (run / "05-export-onnx" / "metrics.json").stat().st_mtime_ns
    redone = (run / "06-validate" / "metrics.json").stat().st_mtime_ns
    code, _, _ = cli("run", "--profile", profile, "--model", spec, "--out", run, "--from", "validate")
    assert code in (0, 1)
    assert (run / "05-export-onnx" / "metrics.json").stat().st_mtime_ns == kept
    assert (run / "06-validate" / "metrics.json").stat().st_mtime_ns != redone


def _digest(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.suffix in (".safetensors", ".onnx", ".data")
    }


def test_kill_9_during_distillation_then_resume_gives_the_same_artifacts(tmp_path, student_src):
    recipe = [
        {"stage": "prune", "heads": 0.5, "heldout_blocks": 1, "heldout_seq_len": 32},
        {
            "stage": "distill",
            "max_steps": 60,
            "seq_len": 32,
            "batch_size": 2,
            "save_every": 5,
            "eval_per_subject": 0,
            "eval_blocks": 1,
            "val_blocks": 1,
            "lr": 1e-3,
            "warmup": 1,
            "patience": 100,
        },
        {"stage": "export", "quant": "none"},
    ]
    profile = write_profile(tmp_path / "p.yaml", recipe)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "vcompress", "run", "--profile", str(profile), "--model", str(student_src)]
    straight = subprocess.run([*args, "--out", str(tmp_path / "A")], env=env, capture_output=True, text=True)
    assert straight.returncode in (0, 1), straight.stderr[-2000:]

    run = tmp_path / "B"
    checkpoint = run / ".03-distill.work" / "checkpoint.pt"
    code = kill_when_saved([*args, "--out", str(run)], checkpoint, env, seconds=300)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    assert (run / "02-prune").is_dir() and not (run / "03-distill").exists()
    resumed = subprocess.run([*args, "--out", str(run), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode in (0, 1), resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    for folder in ("02-prune", "03-distill", "05-export-onnx"):
        assert _digest(tmp_path / "A" / folder) == _digest(run / folder), folder
        assert _digest(run / folder)


@pytest.mark.parametrize(
    "case, step, named",
    [
        ("validate setting", {"stage": "validate", "runz": 3}, "'runz'"),
        ("device", {"stage": "validate", "device": "toaster"}, "'toaster'"),
        ("stage", {"stage": "compile"}, "'compile'"),
        ("prune auto with a fraction", {"stage": "prune", "auto": True, "heads": 0.5}, "either auto or heads/mlp/layers"),
    ],
)
def test_a_typo_anywhere_in_the_recipe_fails_validate_and_dry_run(cli, tmp_path, case, step, named):
    profile = write_profile(tmp_path / "p.yaml", [{"stage": "export", "quant": "int4"}, step])
    for args in (("profiles", "validate", profile), ("run", "--profile", profile, "--out", tmp_path / "R", "--dry-run")):
        code, _, err = cli(*args)
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, (case, err)
    assert not (tmp_path / "R").exists()


def test_device_connection_keys_are_checked_by_that_device(cli, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", [{"stage": "export"}, {"stage": "validate"}])
    data = yaml.safe_load(profile.read_text())
    data["device"]["connection"] = {"kind": "ssh", "hots": "board.local"}
    profile.write_text(yaml.safe_dump(data))
    code, _, err = cli("profiles", "validate", profile)
    assert code == 2 and "'hots'" in err and "ssh" in err
    data["device"]["connection"] = {"kind": "ssh", "host": "board.local", "port": 22}
    profile.write_text(yaml.safe_dump(data))
    assert cli("profiles", "validate", profile)[0] == 0


def test_target_format_and_runtime_are_checked_against_the_exporters(cli, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", [{"stage": "export"}])
    data = yaml.safe_load(profile.read_text())
    data["target"] = {"format": "coreml", "quant": "int4"}
    profile.write_text(yaml.safe_dump(data))
    code, _, err = cli("profiles", "validate", profile)
    assert code == 2 and "'coreml'" in err and "onnx" in err
    data["target"] = {"format": "onnx", "runtime": "litert", "quant": "int4"}
    profile.write_text(yaml.safe_dump(data))
    code, _, err = cli("profiles", "validate", profile)
    assert code == 2 and "'litert'" in err and "onnxruntime" in err


def test_out_of_order_recipe_names_the_order(cli, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", [{"stage": "export"}, {"stage": "quantize"}])
    code, _, err = cli("profiles", "validate", profile)
    assert code == 2 and "out of order" in err and "['quantize', 'export']" in err


def test_prune_auto_in_a_run_prunes_nothing_when_the_budgets_are_met_and_refuses_an_impossible_one(cli, tmp_path, student_src):
    recipe = [{"stage": "prune", "auto": True, "heldout_blocks": 1, "heldout_seq_len": 32}, dict(FULL[2], max_minutes=10)]
    profile = write_profile(tmp_path / "p.yaml", recipe)
    code, out, _ = cli("run", "--profile", profile, "--model", student_src, "--out", tmp_path / "R")
    assert code == 1 and "no validate stage" in out  # no verdict without validate; the stages ran
    plan = json.loads((tmp_path / "R" / "02-prune" / "prune_plan.json").read_text())
    assert plan["prunes"] is False and plan["before"]["model_size_mb"] < 512
    assert "removed nothing" in json.loads((tmp_path / "R" / "03-distill" / "metrics.json").read_text())["skipped"]
    log = (tmp_path / "R" / "logs" / "run.log").read_text()
    assert "prune: plan: the unpruned model meets every budget" in log and "distill: skipped" in log

    data = yaml.safe_load(profile.read_text())
    data["budgets"]["max_model_size_mb"] = 0.01
    profile.write_text(yaml.safe_dump(data))
    code, _, err = cli("run", "--profile", profile, "--model", student_src, "--out", tmp_path / "S")
    assert code == 2 and "max_model_size_mb 0.01 MiB cannot be met by pruning" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "S" / "02-prune").exists()
