"""The roofline calibrated on published measurements (devices/anchors.yaml).

Each anchor is a published run of a known model (its config in anchor_models/) on a device of some family and
backend. Estimated with a profile's bandwidth and compute, an anchor gives the profile's two ceilings: the TTFT
floor (prefill is compute bound on a CPU: about 2 x parameters FLOPs per prompt token) and the decode ceiling
(bandwidth over the weight bytes read per token, at the anchor's weight bits). The measured share of each
ceiling, fitted over the anchors of the profile's family and backend (geometric mean), is the profile's
`prefill_efficiency` and `decode_efficiency`; the band is the largest relative error of an anchor's estimate
when the fit leaves that anchor out, or WIDE_BAND_PCT where fewer than three anchors publish the figure. A profile
declares at least that band (`band_to_declare`: never under MIN_BAND_PCT, rounded up to a multiple of 5).

    python -m vcompress.devices.calibration [--anchors FILE] [--write docs/calibration.md]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vcompress.core.errors import InputError
from vcompress.core.profiles import WIDE_BAND_PCT, Device, builtin_names, load_profile
from vcompress.core.roofline_math import roofline, shapes

ANCHORS = Path(__file__).with_name("anchors.yaml")
MODELS = Path(__file__).with_name("anchor_models")
KV_ELEMENT_BYTES = 2  # the anchors' runtimes keep their KV cache in 16 bits
QUANTIZED_BITS = 8  # the widest weights an anchor may have to calibrate our int8 / int4 exports
MIN_BAND_PCT = 25.0  # the least band to declare: one device's published figures move that much between runtime versions
MIN_ANCHORS = 3  # fewer, and a leave-one-out error says too little: the band is WIDE_BAND_PCT
# where a source gives no lengths: the estimate scales with the prompt almost linearly, so the TTFT it derives
# (prompt / prefill speed) and the floor move together; the decode context changes only the KV bytes
ASSUMED_PROMPT_TOKENS, ASSUMED_DECODE_TOKENS = 256, 128
GENERATED = "<!-- below: python -m vcompress.devices.calibration --write docs/calibration.md -->"


def load_anchors(path: Path | str = ANCHORS) -> list[dict]:
    try:
        return yaml.safe_load(Path(path).read_text())["anchors"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise InputError(f"cannot read anchors from {path} ({e}); pass a YAML file with an `anchors:` list") from None


def anchors_for(device: Device, anchors: list[dict] | None = None) -> list[dict]:
    """The published measurements of the device's family on its backend, with the quantized weights our exports
    carry (16-bit weights run other kernels: float FMA, not int8 dot products)."""
    rows = load_anchors() if anchors is None else anchors
    return [a for a in rows if a["family"] == device.family and a["backend"] == device.backend and a["weight_bits"] <= QUANTIZED_BITS]


def ceilings(anchor: dict, device: Device) -> dict:
    """The anchor's TTFT floor and decode ceiling with the device's figures, beside what was measured (None where
    the source gives no figure)."""
    config = MODELS / f"{anchor['model']}.json"
    if not config.is_file():
        raise InputError(f"anchor {anchor['id']} names model {anchor['model']!r}, which has no {config}; add its config.json (shapes only)")
    shape = shapes(json.loads(config.read_text()))
    # every matmul weight (the head's table too) read once per token at the anchor's weight bits
    weight_bytes = round((shape["body_params"] + shape["head_params"]) * anchor["weight_bits"] / 8)
    weights = {"stored_bytes": weight_bytes, "per_token_bytes": weight_bytes}
    roof = device.model_copy(update={"prefill_efficiency": 1.0, "decode_efficiency": 1.0})
    prompt, decode = anchor["prompt_tokens"] or ASSUMED_PROMPT_TOKENS, anchor["decode_tokens"] or ASSUMED_DECODE_TOKENS
    line = roofline(shape, weights, roof, prompt, decode, KV_ELEMENT_BYTES)
    prefill_rate = anchor["prefill_tokens_per_s"]
    return {
        "id": anchor["id"],
        "ttft_ms_roof": line["ttft_floor_ms"],
        "decode_roof": line["decode_ceiling_tokens_per_s"],
        "ttft_ms": 1e3 * prompt / prefill_rate if prefill_rate else None,
        "decode": anchor["decode_tokens_per_s"],
    }


def share(row: dict, figure: str) -> float:
    """The share of its roof the anchor reached: TTFT floor over TTFT, decode speed over its ceiling."""
    return row["ttft_ms_roof"] / row["ttft_ms"] if figure == "ttft_ms" else row["decode"] / row["decode_roof"]


def estimated(row: dict, figure: str, efficiency: float) -> float:
    return row["ttft_ms_roof"] / efficiency if figure == "ttft_ms" else row["decode_roof"] * efficiency


def error_pct(measured: float, estimate: float) -> float:
    """How far the measurement sits from the estimate, in % of the estimate (the band's unit)."""
    return 100 * (measured - estimate) / estimate


@dataclass
class Fit:
    """One figure's calibration: the share of the roof reached (geometric mean; None without anchors), the band
    and the anchors it rests on, with each anchor's estimate and errors (in the fit, and left out of it)."""

    efficiency: float | None
    band_pct: float
    anchors: list[str]
    rows: list[dict] = field(default_factory=list)


def fit(rows: list[dict], figure: str) -> Fit:
    """The efficiency and band of one figure (ttft_ms or decode) over the anchors that publish it."""
    rows = [r for r in rows if r[figure] is not None]
    if not rows:
        return Fit(None, WIDE_BAND_PCT, [])
    efficiency = _geomean([share(r, figure) for r in rows])
    table = []
    for i, row in enumerate(rows):
        others = rows[:i] + rows[i + 1 :]
        # left out of its own fit, where enough others remain to fit without it
        left_out = _geomean([share(r, figure) for r in others]) if len(rows) >= MIN_ANCHORS else efficiency
        estimate, alone = estimated(row, figure, efficiency), estimated(row, figure, left_out)
        table.append(
            {
                "id": row["id"],
                "measured": row[figure],
                "estimated": estimate,
                "error_pct": error_pct(row[figure], estimate),
                "left_out_error_pct": error_pct(row[figure], alone),
            }  # fmt: skip
        )
    return Fit(efficiency, _band([abs(r["left_out_error_pct"]) for r in table]), [r["id"] for r in table], table)


def calibrate(device: Device, anchors: list[dict] | None = None) -> dict[str, Fit] | None:
    """{"ttft": Fit, "decode": Fit} of `device` from its family's anchors on its backend; None without any."""
    rows = [ceilings(a, device) for a in anchors_for(device, anchors)]
    if not rows:
        return None
    return {"ttft": fit(rows, "ttft_ms"), "decode": fit(rows, "decode")}


def band_to_declare(fit: Fit) -> float:
    """What a profile should declare for a fitted band: at least MIN_BAND_PCT, rounded up to a multiple of 5."""
    return 5 * math.ceil(max(fit.band_pct, MIN_BAND_PCT) / 5)


def _band(errors: list[float]) -> float:
    return max(errors) if len(errors) >= MIN_ANCHORS else max(WIDE_BAND_PCT, *errors)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# --- the table ------------------------------------------------------------------------


def table(anchors: list[dict] | None = None) -> str:
    """Markdown: every built-in profile's fit and band, each anchor measured against its estimate."""
    anchors = load_anchors() if anchors is None else anchors
    lines = [
        "| profile | anchor | TTFT ms measured | estimated | error | left out | decode tok/s measured | estimated | error | left out |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fits, used = [], set()
    for name in builtin_names():
        device = load_profile(name).device
        cal = calibrate(device, anchors)
        declared = device.estimate_band_pct
        where = f"{name} ({device.family}, {device.backend})"
        if cal is None:
            fits.append(f"- {where}: no anchors; bands TTFT {declared.ttft:g}%, decode {declared.decode:g}% stated")
            continue
        ids = [a["id"] for a in anchors_for(device, anchors)]
        used.update(ids)
        fits.append(f"- {where}: " + "; ".join(_fit_line(label, cal[label], getattr(declared, label)) for label in ("ttft", "decode")))
        by_id = {label: {r["id"]: r for r in cal[label].rows} for label in ("ttft", "decode")}
        for anchor in ids:
            cells = [_cells(by_id[label].get(anchor)) for label in ("ttft", "decode")]
            lines.append(f"| {name} | {anchor} | {cells[0]} | {cells[1]} |")
    unused = [f"- {a['id']} ({a['family']}, {a['backend']}, {a['weight_bits']}-bit weights)" for a in anchors if a["id"] not in used]
    out = ["## Anchors, estimates and errors", "", *lines, "", "## Fits and bands", "", *fits]
    if unused:
        out += ["", f"## Anchors no profile uses (another family or backend, or weights over {QUANTIZED_BITS} bits)", "", *unused]
    return "\n".join(out) + "\n"


def _fit_line(label: str, fit: Fit, declared: float) -> str:
    if fit.efficiency is None:
        return f"{label}: no anchors publish it, band {declared:g}% stated"
    return (
        f"{label} efficiency {fit.efficiency:.3g} over {len(fit.anchors)} anchors, band {fit.band_pct:.1f}% "
        f"{'(left out)' if len(fit.anchors) >= MIN_ANCHORS else '(fewer than 3: the wide default)'}, "
        f"to declare {band_to_declare(fit):g}%, declared {declared:g}%"
    )


def _cells(row: dict | None) -> str:
    if row is None:
        return " | | | "
    return f"{row['measured']:.4g} | {row['estimated']:.4g} | {row['error_pct']:+.1f}% | {row['left_out_error_pct']:+.1f}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vcompress.devices.calibration", description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", default=ANCHORS, help="a YAML file of anchors (default: devices/anchors.yaml)")
    parser.add_argument("--write", type=Path, help=f"replace what follows the line {GENERATED!r} in this file with the table")
    args = parser.parse_args(argv)
    try:
        text = table(load_anchors(args.anchors))
    except InputError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")  # bad input: one line, exit 2
    print(text, end="")
    if args.write:
        head = args.write.read_text().partition(GENERATED)[0]
        args.write.write_text(f"{head}{GENERATED}\n{text}")


if __name__ == "__main__":
    main()
