"""Measure an artifact's latency through its Runner, in this process, and print latency.json.

    python -m vcompress.devices.bench ARTIFACT [--prompt-tokens 256] [--decode-tokens 64]
        [--runs 5] [--warmup 1] [--threads 2] [--backend B]

One run = prefill of a fixed prompt, pick the first token (time to first token), then greedy
decode of --decode-tokens more (decode tokens/s). The prompt is token ids drawn from a fixed seed
over the model's vocabulary, so every backend gets the same ids. Figures are medians of --runs
runs after --warmup runs, with the samples. Peak RSS is this process's high-water mark, which is
why `host` runs this module in a subprocess of its own. Boards run it the same way over ssh.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

MB = 2**20


def prompt_ids(vocab_size: int, prompt_tokens: int, seed: int = 0):
    """The benchmark prompt: [1, prompt_tokens] ids, the same for every backend given the seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, prompt_tokens), generator=generator, dtype=torch.long)


def peak_rss() -> dict:
    """This process's peak resident memory, from getrusage and /proc/self/status (both KiB)."""
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"maxrss_mb": round(maxrss_kb / 1024, 1), "vmhwm_mb": None, "vmrss_mb": None}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[f"{key.lower()}_mb"] = round(int(rest.split()[0]) / 1024, 1)
    return out


def model_size_bytes(artifact: Path) -> int:
    from vcompress.devices.roofline import weight_files

    files = weight_files(artifact)
    return sum(p.stat().st_size for p in files)


def vocab_size(artifact: Path, runner) -> int:
    config = artifact / "config.json" if artifact.is_dir() else None
    if config is not None and config.is_file():
        return int(json.loads(config.read_text())["vocab_size"])
    model = getattr(runner, "model", None)
    if model is not None and hasattr(model, "config"):
        return int(model.config.vocab_size)
    return len(runner.tokenizer)


def one_run(runner, ids, decode_tokens: int) -> tuple[float, float]:
    """(seconds to first token, seconds for decode_tokens greedy decode steps)."""
    import torch

    start = time.perf_counter()
    logits, state = runner.prefill(ids)
    token = int(torch.argmax(logits))
    first = time.perf_counter()
    for _ in range(decode_tokens):
        logits, state = runner.decode(token, state)
        token = int(torch.argmax(logits))
    end = time.perf_counter()
    return first - start, end - first


def run_benchmark(artifact: str | Path, *, prompt_tokens: int = 256, decode_tokens: int = 64, runs: int = 5,
                  warmup: int = 1, threads: int | None = 2, backend: str | None = None, seed: int = 0,
                  device_label: str | None = None, device_kind: str = "host") -> dict:
    import torch

    from vcompress.core.artifact import figure
    from vcompress.core.errors import InputError
    from vcompress.exporters import open_runner

    if prompt_tokens <= 0 or decode_tokens <= 0 or runs <= 0 or warmup < 0:
        raise InputError("--prompt-tokens, --decode-tokens and --runs must be positive and --warmup >= 0")
    artifact = Path(artifact)
    if not artifact.exists():
        raise InputError(f"artifact {artifact} does not exist; pass an exported artifact folder or an HF folder")
    if threads:
        torch.set_num_threads(threads)
    rss_before = peak_rss()["vmrss_mb"]
    start = time.perf_counter()
    runner = open_runner(artifact, threads=threads, backend=backend)
    load_s = time.perf_counter() - start
    limit = getattr(runner, "max_length", None)
    if limit and prompt_tokens + decode_tokens > limit:
        raise InputError(f"--prompt-tokens {prompt_tokens} + --decode-tokens {decode_tokens} exceeds the model's context of {limit}; lower them")
    ids = prompt_ids(vocab_size(artifact, runner), prompt_tokens, seed)

    ttft_ms, decode_tps = [], []
    with torch.no_grad():
        for i in range(warmup + runs):
            first_s, decode_s = one_run(runner, ids, decode_tokens)
            if i >= warmup:
                ttft_ms.append(round(first_s * 1e3, 3))
                decode_tps.append(round(decode_tokens / decode_s, 2))
    rss = peak_rss()
    runner.close()

    device = device_label or f"{platform.machine()} host"
    peak_mb = rss["vmhwm_mb"] if rss["vmhwm_mb"] is not None else rss["maxrss_mb"]
    return {
        "device": device,
        "device_kind": device_kind,
        "backend": runner.backend,
        "source": "measured",
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "runs": runs,
        "warmup": warmup,
        "seed": seed,
        "ttft_ms": figure(statistics.median(ttft_ms), "ms", measured=True, device=device, samples=ttft_ms),
        "decode_tokens_per_s": figure(statistics.median(decode_tps), "tokens/s", measured=True, device=device, samples=decode_tps),
        "peak_rss_mb": figure(peak_mb, "MB", measured=True, device=device, maxrss_mb=rss["maxrss_mb"], vmhwm_mb=rss["vmhwm_mb"],
                              rss_before_load_mb=rss_before),
        "model_size_mb": figure(round(model_size_bytes(artifact) / MB, 2), "MB", measured=True),
        "load_s": round(load_s, 3),
        "platform": {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
                     "cpus": os.cpu_count(), "torch": torch.__version__},
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
    parser.add_argument("--device-kind", default="host", help="host or ssh: how the result was obtained")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:  # stdout carries the JSON; keep stderr to real errors
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # a board with only the ONNX runtime
        pass
    from vcompress.core.errors import VcompressError

    try:
        result = run_benchmark(args.artifact, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                               runs=args.runs, warmup=args.warmup, threads=args.threads, backend=args.backend,
                               seed=args.seed, device_label=args.device_label, device_kind=args.device_kind)
    except VcompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    from vcompress.core.artifact import _clean

    print(json.dumps(_clean(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
