"""The host a measurement ran on: what it is (CPU model, cores, the ISA features that pick the runtimes' kernels)
and how fast it was at that moment (memory copy bandwidth, fp32 GEMM throughput).

bench.py loads this file by path in the measuring process, so it imports only the standard library and numpy.
The fingerprint `id` hashes what the host is (CPU model, architecture, cores, kernel ISA features), never the
measured speeds, which vary from run to run: two runs with the same id ran on the same kind of host.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

# ISA features that change which kernels ONNX Runtime, XNNPACK and the BLAS pick (and so the latency).
KERNEL_FEATURES = (
    # x86: 256-bit FMA, 512-bit, int8 dot products (512- and 256-bit VNNI), Intel AMX tiles
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    # ARM: NEON, int8 dot product, int8 matrix multiply, scalable vectors
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "sve2",
)
COPY_MIB = 128  # each of the two buffers: past any last-level cache, so the copy streams from memory
GEMM_N = 1024  # fp32 [N, N] @ [N, N]: 2.1 GFLOP, compute-bound on any CPU
REPEATS = 3  # best of: the least disturbed run


def cpu_facts(cpuinfo: str | None = None, machine: str | None = None) -> dict:
    """CPU model, architecture, cores this process may use and the kernel ISA features, from /proc/cpuinfo
    (x86: `model name` and `flags`; ARM: `Features`, the model from `model name`, `Hardware` or the device tree)."""
    text = cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model name") or fields.get("Hardware") or _read("/proc/device-tree/model").strip("\x00 \n")
    return {
        "cpu": model or platform.processor() or "unknown",
        "machine": machine or platform.machine(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": [f for f in KERNEL_FEATURES if f in flags],
    }


def fingerprint_id(facts: dict) -> str:
    """12 hex digits over what the host is (never its measured speeds)."""
    key = json.dumps([facts["cpu"], facts["machine"], facts["cores"], sorted(facts["isa"])])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def copy_bandwidth_gbs(mib: int = COPY_MIB, repeats: int = REPEATS) -> float:
    """Memory bandwidth of a numpy copy, GB/s (10^9 bytes), counting the bytes read and written (as STREAM's Copy)."""
    src = np.ones(mib * 2**20, dtype=np.uint8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return round(2 * src.nbytes / best / 1e9, 1)


def gemm_gflops(n: int = GEMM_N, repeats: int = REPEATS) -> float:
    """fp32 matrix multiply throughput through numpy's BLAS (its own threads), GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    np.matmul(a, b)  # the BLAS starts its threads and warms its caches
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return round(2 * n**3 / best / 1e9, 1)


def fingerprint(threads: int | None = None, *, measure: bool = True) -> dict:
    """This host: facts, the id over them, the threads the measurement used and, with `measure`, its speeds now."""
    facts = cpu_facts()
    host = {"id": fingerprint_id(facts), **facts, "threads": threads}
    if measure:
        host["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
        host["gemm_fp32_gflops"] = gemm_gflops()
    return host


def describe(host: dict) -> str:
    """One line: what the host is and how fast it measured."""
    threads = f" ({host['threads']} used)" if host.get("threads") else ""
    speeds = [f"copy {host['copy_bandwidth_gbs']:g} GB/s" if host.get("copy_bandwidth_gbs") else ""]
    speeds.append(f"fp32 GEMM {host['gemm_fp32_gflops']:g} GFLOP/s" if host.get("gemm_fp32_gflops") else "")
    isa = " ".join(host.get("isa") or []) or "no kernel ISA features read"
    return ", ".join(x for x in [f"{host.get('cpu')} ({host.get('machine')})", f"{host.get('cores')} cores{threads}", isa, *speeds] if x)


def differences(host: dict, isa: list[str] | None, threads: int | None) -> list[str]:
    """How the measuring host differs from a profile's device (its kernel ISA features and threads); [] when it
    matches or the profile does not say."""
    found = []
    if isa is not None:
        have, want = set(host.get("isa") or []), set(isa)
        extra, missing = sorted(have - want), sorted(want - have)
        if extra or missing:
            found.append("ISA " + " ".join([*(f"+{f}" for f in extra), *(f"-{f}" for f in missing)]) + " against the profile's")
    if threads and host.get("cores") and host["cores"] < threads:
        found.append(f"{host['cores']} cores for the profile's {threads} threads")
    return found


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""
