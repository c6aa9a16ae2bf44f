"""Measure an artifact's latency the way an app runs it, in this process, and print latency.json.

    python -m vcompress.devices.bench ARTIFACT [--prompt-tokens 256] [--decode-tokens 64]
        [--runs 5] [--warmup 1] [--threads 2] [--backend B] [--seed 0]

One run = prefill of a fixed prompt, pick the first token (time to first token), then greedy
decode of --decode-tokens more (decode tokens/s). The prompt is token ids drawn by numpy's seeded
generator (`default_rng(seed)`; they came from torch's generator before, so the ids changed) over the
model's vocabulary, so every backend gets the same ids. Figures are medians of --runs runs after
--warmup runs, with the samples.

An exported artifact runs through a numpy-level session module its exporter names in manifest.json's
`sessions` (`Exporter.sessions`: --backend name -> module, the first what an app ships), loaded from its
file without the exporters package: this process then holds numpy and the runtime and nothing that
imports torch, as a deployed app would; the result lists the third-party modules it saw. An ONNX
folder runs through ONNX Runtime GenAI's generator by default (`--backend onnxruntime`: our loop); a
TFLite folder through LiteRT-LM, whose own benchmark times each run (`--backend tflite`: our
interpreter loop). An HF folder runs through the torch Runner (backend torch).
Peak RSS (VmHWM) is reported beside the runtime's baseline, the RSS after importing the runtime and
before loading the model; the difference is the model's share. Sizes are MiB. `host` is the machine that ran it
(devices/fingerprint.py, loaded by path: CPU, cores, kernel ISA features, copy bandwidth and GEMM speed measured
after the timed runs and the peak RSS), so a board over ssh reports its own.

Devices run this file by path (see `base.bench_command`), not as part of the vcompress.devices
package, whose other modules import torch; `python -m vcompress.devices.bench` re-executes it so.
Only the stdlib, numpy and vcompress's pure modules (core.errors, core.export_manifest, core.units) are
imported here, and the session module.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vcompress.core.by_path import load_by_path
from vcompress.core.errors import InputError, VcompressError
from vcompress.core.export_manifest import artifact_format, model_size_bytes, read_manifest, session_runtime
from vcompress.core.units import UNIT, figure, mib


def prompt_ids(vocab_size: int, prompt_tokens: int, seed: int = 0) -> np.ndarray:
    """The benchmark prompt: [1, prompt_tokens] int64 ids, the same for every backend given the seed."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(1, prompt_tokens), dtype=np.int64)


def rss_mib(field: str) -> float:
    """This process's resident memory: VmRSS (now) or VmHWM (its peak) from /proc/self/status."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == field:
                return mib(int(rest.split()[0]) * 1024, 1)
    return mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 1)  # no /proc: the high-water mark (KiB)


def third_party_modules() -> list[str]:
    """Top-level modules this process imported from outside the standard library."""
    tops = {name.partition(".")[0] for name in sys.modules}
    return sorted(t for t in tops - set(sys.stdlib_module_names) if not t.startswith("_"))


def session_module(artifact: Path, backend: str | None) -> str | None:
    """The session module the artifact's exporter named for this backend in manifest.json's `sessions` (the
    first: what an app ships; the format's own name asks for that too); None: open the Runner (an HF folder, a
    format without a session, or --backend torch)."""
    manifest = read_manifest(artifact)
    if not manifest:
        return None
    sessions = manifest.get("sessions")
    if not isinstance(sessions, dict):
        raise InputError(f"{artifact}'s manifest.json names no measurement sessions (an older export); export it again")
    if backend in sessions:
        return sessions[backend]
    if backend in (None, manifest["format"]) and sessions:
        return next(iter(sessions.values()))
    return None


def load_session(module: str):
    """A session module loaded from its file, without its package's __init__ (the exporters' imports every
    exporter, and torch with them): find_spec locates the package by importing only its parents."""
    package, _, leaf = module.rpartition(".")
    if not package.startswith("vcompress.") or not leaf.isidentifier():
        raise InputError(f"session module {module!r} is not one of vcompress's; export the artifact again")
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / f"{leaf}.py"
    name = f"_bench_{leaf}"
    return load_by_path(name, path)


def host_fingerprint(threads: int | None) -> dict:
    """devices/fingerprint.py's record of this host, its copy bandwidth and GEMM speed measured now."""
    return load_by_path("_bench_fingerprint", Path(__file__).with_name("fingerprint.py")).fingerprint(threads)


class Opened(NamedTuple):
    runner: Any  # prefill(ids) and decode(token, state), both giving logits with argmax()
    baseline_mib: float  # RSS with the runtime imported, before the model loads
    load_s: float
    runtime: dict
    prompt: Callable  # numpy ids -> what runner.prefill takes


def open_artifact(artifact: Path, backend: str | None, threads: int | None) -> Opened:
    module = session_module(artifact, backend)
    try:
        session = load_session(module) if module else None
        runtime = session_runtime(session) if session else None
    except ImportError as e:
        others = [b for b, m in read_manifest(artifact)["sessions"].items() if m != module]
        fallback = f" (or measure it another way: --backend {' or '.join(others)})" if others else ""
        fmt = backend or artifact_format(artifact)
        top = (e.name or "").split(".")[0]
        if not top or importlib.util.find_spec(top) is not None:  # installed: something else failed, name it
            raise InputError(f"{fmt} artifacts run on {module}, whose import failed here: {e}{fallback}") from None
        raise InputError(f"{fmt} artifacts run on {e.name}, which is not installed here; install it{fallback}") from None
    if session is None:
        return open_torch_runner(artifact, backend or artifact_format(artifact), threads)
    baseline = rss_mib("VmRSS")
    start = time.perf_counter()
    try:
        runner = session.Session(artifact, threads=threads)
    except session.SessionError as e:
        raise InputError(str(e)) from None
    return Opened(runner, baseline, time.perf_counter() - start, runtime, np.asarray)


def open_torch_runner(artifact: Path, backend: str, threads: int | None) -> Opened:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers.utils import logging as hf_logging

    from vcompress.exporters import open_runner

    hf_logging.disable_progress_bar()  # stdout carries the JSON; keep stderr to real errors
    if threads:
        torch.set_num_threads(threads)
    baseline = rss_mib("VmRSS")
    start = time.perf_counter()
    runner = open_runner(artifact, threads=threads, backend=backend)
    return Opened(runner, baseline, time.perf_counter() - start, {"module": "torch", "version": torch.__version__}, torch.from_numpy)


def vocab_size(artifact: Path, runner) -> int:
    config = artifact / "config.json" if artifact.is_dir() else None
    if config is not None and config.is_file():
        return int(json.loads(config.read_text())["vocab_size"])
    if getattr(runner, "vocab", None):  # a session: the manifest's
        return int(runner.vocab)
    model = getattr(runner, "model", None)
    if model is not None and hasattr(model, "config"):
        return int(model.config.vocab_size)
    return len(runner.tokenizer)


def one_run(runner, ids, decode_tokens: int) -> tuple[float, float]:
    """(seconds to first token, seconds for decode_tokens greedy decode steps)."""
    if hasattr(runner, "timed_run"):  # LiteRT-LM: its own benchmark times the run (see _litertlm_session.py)
        return runner.timed_run(ids, decode_tokens)
    start = time.perf_counter()
    logits, state = runner.prefill(ids)
    token = int(logits.argmax())
    first = time.perf_counter()
    for _ in range(decode_tokens):
        logits, state = runner.decode(token, state)
        token = int(logits.argmax())
    end = time.perf_counter()
    return first - start, end - first


def run_benchmark(
    artifact: str | Path,
    *,
    prompt_tokens: int = 256,
    decode_tokens: int = 64,
    runs: int = 5,
    warmup: int = 1,
    threads: int | None = 2,
    backend: str | None = None,
    seed: int = 0,
    device_label: str | None = None,
    device_kind: str | None = None,
) -> dict:
    if prompt_tokens <= 0 or decode_tokens <= 0 or runs <= 0 or warmup < 0:
        raise InputError("--prompt-tokens, --decode-tokens and --runs must be positive and --warmup >= 0")
    artifact = Path(artifact)
    if not artifact.exists():
        raise InputError(f"artifact {artifact} does not exist; pass an exported artifact folder or an HF folder")
    opened = open_artifact(artifact, backend, threads)
    backend = backend or artifact_format(artifact)
    runner = opened.runner
    limit = getattr(runner, "max_length", None)
    if limit and prompt_tokens + decode_tokens > limit:
        raise InputError(
            f"--prompt-tokens {prompt_tokens} + --decode-tokens {decode_tokens} exceeds the model's context of {limit}; lower them"
        )
    ids = opened.prompt(prompt_ids(vocab_size(artifact, runner), prompt_tokens, seed))

    ttft_ms, decode_tps = [], []
    for i in range(warmup + runs):
        first_s, decode_s = one_run(runner, ids, decode_tokens)
        if i >= warmup:
            ttft_ms.append(round(first_s * 1e3, 3))
            decode_tps.append(round(decode_tokens / decode_s, 2))
    peak, baseline = rss_mib("VmHWM"), opened.baseline_mib  # read before the fingerprint's buffers raise the peak
    threads = getattr(runner, "threads", None) or threads

    device = device_label or f"{platform.machine()} host"
    return {
        "device": device,
        "device_kind": device_kind,
        "backend": backend,
        "source": "measured",
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "runs": runs,
        "warmup": warmup,
        "seed": seed,
        "ttft_ms": figure(statistics.median(ttft_ms), "ms", measured=True, device=device, samples=ttft_ms),
        "decode_tokens_per_s": figure(statistics.median(decode_tps), "tokens/s", measured=True, device=device, samples=decode_tps),
        "peak_rss_mb": figure(
            peak, UNIT, measured=True, device=device, runtime_baseline_mib=baseline, model_share_mib=round(peak - baseline, 1)
        ),
        "model_size_mb": figure(mib(model_size_bytes(artifact)), UNIT, measured=True),
        "load_s": round(opened.load_s, 3),
        "runtime": opened.runtime,
        "modules_imported": third_party_modules(),
        "platform": {
            "machine": platform.machine(),
            "system": platform.system(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "host": host_fingerprint(threads),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vcompress.devices.bench", description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="exported artifact folder, HF folder or .gguf file")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default=None, help="runner backend (default: from the artifact's manifest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids")
    parser.add_argument("--device-label", default=None, help="name of this device in the result")
    parser.add_argument("--device-kind", default=None, help="the registered device that ran this (none: run by hand)")
    args = parser.parse_args(argv)
    try:
        result = run_benchmark(
            args.artifact,
            prompt_tokens=args.prompt_tokens,
            decode_tokens=args.decode_tokens,
            runs=args.runs,
            warmup=args.warmup,
            threads=args.threads,
            backend=args.backend,
            seed=args.seed,
            device_label=args.device_label,
            device_kind=args.device_kind,
        )
    except VcompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    if __package__:  # `python -m vcompress.devices.bench`: the package's import already pulled in torch
        os.execv(sys.executable, [sys.executable, "-P", __file__, *sys.argv[1:]])
    sys.exit(main())
