"""Figures and their units. Every size, shown or budgeted, is in MiB (2**20 bytes), as /proc and
LiteRT's benchmark_model count memory; the budgets keep their historical key names
(`max_model_size_mb`, `max_peak_ram_mb`) but mean MiB too.

Pure Python on purpose: the latency bench imports this in a process that must hold only the runtime.
"""

from __future__ import annotations

from typing import Any

MIB = 2**20
UNIT = "MiB"


def mib(nbytes: float, digits: int = 2) -> float:
    """Bytes in MiB, rounded."""
    return round(nbytes / MIB, digits)


def figure(value: float | int | None, unit: str, *, measured: bool | None = None, device: str | None = None, **extra) -> dict:
    """A number with its unit; latency figures also say measured (with device) or estimated."""
    out: dict[str, Any] = {"value": value, "unit": unit}
    if measured is not None:
        out["source"] = "measured" if measured else "estimated"
        if device:
            out["device"] = device
    out.update(extra)
    return out
