"""`vcompress distill` on two CPU processes (torchrun, gloo) against one: the same global batch gives the same loss
curve, checkpoints move between world sizes, and a job that loses a rank to kill -9 resumes."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_distill import CORPUS, Killed, kill_at, sliced_student, weights, write_jsonl
from tests.tiny import build_model
from vcompress.compress import _distributed
from vcompress.compress._distributed import Ranks
from vcompress.compress.distill import CHECKPOINT, distill

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distill_worker.py"
SEED = 3
# batch_size is the global batch: 4 blocks on one process, 2 on each of two.
CONFIG = dict(seq_len=32, batch_size=4, max_steps=8, save_every=2, warmup=2, lr=3e-3, ce_weight=0.5, hidden_weight=0.5)
CONFIG.update(eval_per_subject=0, patience=100)
# Two ranks sum their halves' gradients where one process sums the whole batch, so floats round differently.
# Measured with this CONFIG on a 2-core x86 host, torch 2.13 CPU, DDP and FSDP alike: losses (about 3.3) differ
# by at most 7.2e-7 (2.2e-7 relative) over the 8 steps, final weights by 1.2e-7. The tolerances allow ~50x that.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def cli_args(pair, data, **settings) -> list[str]:
    teacher, student = pair
    args = ["distill", "--teacher", teacher, "--student", student, "--data", data, "--seed", SEED]
    for key, value in {**CONFIG, **settings}.items():
        args += [f"--{key.replace('_', '-')}", value]
    return [str(a) for a in args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def torchrun_cmd(*args, nproc: int = 2) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*launcher, "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(*args, nproc=nproc), capture_output=True, text=True, env=ENV, timeout=300)


def checkpoint_step(work: Path) -> int:
    return torch.load(work / CHECKPOINT, map_location="cpu", weights_only=True)["step"]


def assert_close_curves(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) == CONFIG["max_steps"]
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert math.isclose(x, y, rel_tol=LOSS_RTOL), f"step {step}: {x} vs {y}"


def assert_close_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < WEIGHT_ATOL


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("distributed")
    teacher = build_model("llama", root / "teacher", tokenizer, layers=3)
    return teacher, sliced_student(teacher, root / "student", [0, 2])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = [{"instruction": q, "input": "", "output": CORPUS[(i + 3) % len(CORPUS)]} for i, q in enumerate(CORPUS * 2)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl", rows)


@pytest.fixture(scope="module")
def one_process(pair, data, tmp_path_factory) -> Path:
    """The uninterrupted one-process run every other run is held to."""
    out = tmp_path_factory.mktemp("one") / "03-distill"
    distill(pair[1], out, teacher=pair[0], data=data, config=CONFIG, seed=SEED, log=lambda _: None)
    return out


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_match_one_process_with_the_same_global_batch(pair, data, one_process, tmp_path):
    out = tmp_path / "two"
    result = torchrun("-m", "vcompress", *cli_args(pair, data), "--out", out, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)  # rank 0 alone prints: stdout is one JSON document
    one, two = metrics(one_process), metrics(out)
    assert printed["train_loss"] == two["train_loss"] and two["processes"] == 2 and one["processes"] == 1
    assert_close_curves(one["train_loss"], two["train_loss"])
    for a, b in zip(one["validation_history"], two["validation_history"], strict=True):
        assert a["step"] == b["step"] and math.isclose(a["kl_mean"], b["kl_mean"], rel_tol=1e-4)
    assert two["train_tokens"] == one["train_tokens"] == 8 * 4 * 32  # the global batch, counted once
    assert_close_weights(one_process, out)
    assert [p.name for p in tmp_path.iterdir()] == ["two"]  # no scratch, no second writer's leftovers
    assert result.stderr.count("distilling on 2 cpu processes (DDP)") == 1 and two["distributed"] == "ddp"


def test_checkpoints_move_between_world_sizes(pair, data, one_process, tmp_path):
    out, work = tmp_path / "moved", tmp_path / ".moved.work"
    # FSDP here (the sharded weights and optimizer state are gathered into a checkpoint), DDP in the other tests
    run = dict(
        student=str(pair[1]), out=str(out), teacher=str(pair[0]), data=str(data), config={**CONFIG, "distributed": "fsdp"}, seed=SEED
    )
    first = torchrun(WORKER, json.dumps({**run, "stop_at": 4}))  # two FSDP processes; rank 0 fails after step 4
    assert first.returncode != 0 and "stopped after step 4" in first.stderr
    assert checkpoint_step(work) == 4 and not out.exists()

    logs = []
    with pytest.raises(Killed):  # one process continues the two-process checkpoint, and stops after step 6
        distill(pair[1], out, teacher=pair[0], data=data, config=CONFIG, seed=SEED, resume=True, log=logs.append, progress=kill_at(6))
    assert f"resumed from {work / CHECKPOINT} at step 4" in logs and checkpoint_step(work) == 6

    last = torchrun(WORKER, json.dumps({**run, "resume": True}))  # and two processes finish what one left
    assert last.returncode == 0, last.stderr[-3000:]
    assert "at step 6" in last.stdout and last.stdout.count("resumed from") == 1
    assert_close_curves(metrics(one_process)["train_loss"], metrics(out)["train_loss"])
    assert_close_weights(one_process, out)
    assert metrics(out)["steps"] == 8 and metrics(out)["distributed"] == "fsdp" and not work.exists()


def test_kill_9_of_one_rank_then_resume(pair, data, tmp_path, cli):
    args = [*cli_args(pair, data, max_steps=24, save_every=4), "--out", tmp_path / "run"]
    work = tmp_path / ".run.work"
    with open(tmp_path / "killed.log", "w") as log:
        job = subprocess.Popen(torchrun_cmd("-m", "vcompress", *args), stdout=log, stderr=log, env=ENV)
        deadline = time.time() + 120
        while not (work / CHECKPOINT).is_file() and job.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        ranks = {_rank_of(pid): pid for pid in _children(job.pid)}
        assert job.poll() is None and {0, 1} <= set(ranks), "the job ended before a rank could be killed"
        os.kill(ranks[1], signal.SIGKILL)
        assert job.wait(timeout=120) != 0  # the launcher tears the job down
    saved = torch.load(work / CHECKPOINT, map_location="cpu", weights_only=True)  # whole, whatever the kill interrupted
    assert saved["step"] % 4 == 0 and 4 <= saved["step"] < 24 and len(saved["losses"]) == saved["step"]
    assert not (tmp_path / "run").exists()

    code, stdout, stderr = cli(*args, "--resume", "--json")  # the same command on one process (the CI's 2 cores)
    assert code == 0, stderr
    assert f"at step {saved['step']}" in stderr
    done = json.loads(stdout)
    assert done["steps"] == 24 and done["train_loss"][: saved["step"]] == saved["losses"] and len(done["train_loss"]) == 24
    assert done["validation"]["kl_mean"] < done["before"]["validation"]["kl_mean"]


def test_batch_that_does_not_split_over_the_ranks_is_refused(pair, data, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(_distributed, "setup", lambda mode: Ranks(rank=0, world=2, mode="ddp"))  # rank 0 of two
    code, _, err = cli(*cli_args(pair, data, batch_size=3), "--out", tmp_path / "o")
    assert code == 2 and err == "error: batch size 3 does not split over 2 processes; use a multiple of 2\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nccl, bf16 autocast); two ranks where there are two GPUs")
def test_cuda_bf16(pair, data, one_process, tmp_path):
    nproc = min(2, torch.cuda.device_count())
    result = torchrun("-m", "vcompress", *cli_args(pair, data), "--out", tmp_path / "gpu", "--json", nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    gpu = json.loads(result.stdout)
    assert gpu["device"] == "cuda" and gpu["processes"] == nproc
    for a, b in zip(metrics(one_process)["train_loss"], gpu["train_loss"], strict=True):  # bf16 against fp32 on CPU
        assert math.isclose(a, b, rel_tol=0.1), (a, b)
    assert gpu["validation"]["kl_mean"] < gpu["before"]["validation"]["kl_mean"]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rank_of(pid: int) -> int:
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    return int(env.get("RANK", -1))  # -1: a helper process of the launcher, not a rank
