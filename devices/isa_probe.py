"""Answer a fixed job with an artifact, in a process that holds only numpy and the runtime: greedy tokens per prompt,
the logits at every position of a text, and the summed log-probability of each MMLU answer after its question.

    python isa_probe.py ARTIFACT JOB_DIR [--backend B] [--threads N]

The emulated device (devices/emulated.py) runs this file by path twice on the same job: with this machine's Python
(the x86 build of the runtime) and with an aarch64 Python under qemu-user (the ARM build), and compares what the two
wrote. JOB_DIR holds job.json (token ids, made by the caller's tokenizer); the answers go to result.json and the text's
logits to logits.npy. The artifact is opened by devices/bench.py's `open_artifact`, the same session a latency run uses
for the greedy tokens (the app's runtime); text and answers go through a session with a shared-prefix path.
"""

from __future__ import annotations

import argparse
import json
import platform
import runpy
import struct
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).with_name("bench.py")
# Linux's arm64 hwcap bits (arch/arm64/include/uapi/asm/hwcap.h), AT_HWCAP then AT_HWCAP2: what the CPU offers a kernel
HWCAP = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg"
HWCAP2 = "dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme"


def cpu_features() -> list[str]:
    """The ISA features this process sees: arm64 hwcaps from the auxiliary vector, x86 flags from /proc/cpuinfo."""
    if platform.machine() == "aarch64":
        auxv = dict(struct.iter_unpack("<QQ", Path("/proc/self/auxv").read_bytes()))
        bits = [(auxv.get(16, 0), HWCAP.split()), (auxv.get(26, 0), HWCAP2.split())]  # AT_HWCAP, AT_HWCAP2
        return [name for value, names in bits for i, name in enumerate(names) if value >> i & 1]
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "sse4", "fma", "amx"))]
    return []


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    top = rows.max(-1, keepdims=True)
    return rows - top - np.log(np.exp(rows - top).sum(-1, keepdims=True))


def greedy(runner, ids: list[int], new_tokens: int) -> list[int]:
    logits, state = runner.prefill(np.asarray([ids], np.int64))
    out = [int(logits.argmax())]
    for _ in range(new_tokens - 1):
        logits, state = runner.decode(out[-1], state)
        out.append(int(logits.argmax()))
    return out


def stepped_logits(runner, ids: list[int], first: int) -> np.ndarray:
    """Logits [len(ids) - first + 1, vocab] at positions first-1.. of `ids`: the prefix prefilled, then one token a step."""
    logits, state = runner.prefill(np.asarray([ids[:first]], np.int64))
    rows = [np.array(logits, np.float32)]
    for token in ids[first:]:
        logits, state = runner.decode(token, state)
        rows.append(np.array(logits, np.float32))
    return np.stack(rows)


def answer_scores(runner, prefix: list[int], answers: list[list[int]]) -> list[float]:
    """Each answer's summed log-probability after the prefix (the session's shared-prefix path where it has one)."""
    if hasattr(runner, "continuation_logits"):
        rows = runner.continuation_logits(np.asarray(prefix, np.int64), [np.asarray(a, np.int64) for a in answers])
    else:
        rows = [stepped_logits(runner, prefix + a[:-1], len(prefix)) for a in answers]
    return [float(log_softmax(r)[np.arange(len(a)), a].sum()) for r, a in zip(rows, answers)]


def text_logits(runner, ids: list[int]) -> np.ndarray:
    if not ids:
        return np.zeros((0, 0), np.float32)
    if hasattr(runner, "logits"):  # one forward over the whole text
        return runner.logits(np.asarray([ids], np.int64))[0]
    return stepped_logits(runner, ids, 1)


def scoring_backend(bench: dict, artifact: Path, backend: str | None) -> str | None:
    """The backend that scores text and answers: the one asked for, else the first session of the artifact's with a
    shared-prefix path (the app's own loop may take one token a step: far slower under emulation, same kernels)."""
    sessions = bench["read_manifest"](artifact).get("sessions") or {}
    if backend or not sessions:
        return backend
    fast = [name for name, module in sessions.items() if hasattr(bench["load_session"](module).Session, "continuation_logits")]
    return fast[0] if fast else None


def run(artifact: Path, job_dir: Path, backend: str | None, threads: int | None) -> dict:
    bench = runpy.run_path(str(BENCH))  # by path: the devices package imports torch
    job = json.loads((job_dir / "job.json").read_text())
    start = time.perf_counter()
    opened = bench["open_artifact"](artifact, backend, threads)
    runner, loaded = opened.runner, time.perf_counter()
    tokens = [greedy(runner, ids, job["new_tokens"]) for ids in job["prompts"]]
    greedy_s = time.perf_counter()
    scorer = scoring_backend(bench, artifact, backend)
    scoring = bench["open_artifact"](artifact, scorer, threads) if scorer != backend else opened
    np.save(job_dir / "logits.npy", text_logits(scoring.runner, job["text"]))
    text_s = time.perf_counter()
    answers = [answer_scores(scoring.runner, prefix, choices) for prefix, choices in job["mmlu"]]
    end = time.perf_counter()
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "runtime": opened.runtime,
        "scoring_runtime": scoring.runtime,
        "cpu_features": cpu_features(),
        "greedy": tokens,
        "answers": answers,
        "seconds": {"load": loaded - start, "greedy": greedy_s - loaded, "text": text_s - greedy_s, "mmlu": end - text_s},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="isa_probe.py", description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from vcompress.core.errors import VcompressError

    try:
        result = run(args.artifact, args.job_dir, args.backend, args.threads)
    except VcompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    (args.job_dir / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
