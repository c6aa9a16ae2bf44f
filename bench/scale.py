"""How the stages' memory and time grow with the model: peak RSS and wall time of analyze, quantize
(in memory and streamed layer by layer) and export, per model, and the growth fitted across models.

    python bench/scale.py                                   # the embedded default only
    python bench/scale.py --model ~/.cache/vcompress/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
                                                            # (bench/second_model.py assembles it)
    python bench/scale.py --skip analyze --skip quantize --export-from runs/q
                                                            # the export steps only, from a quantize folder

Every step is its own `vcompress` process (what a user runs), measured by the kernel: peak RSS is the
child's ru_maxrss. A GGUF is converted to safetensors once first ("intake"), so the steps after it
stream from the converted folder. Both quantize runs use the same settings; the table says whether
their checkpoints hold the same tensors bit for bit. Growth is a straight line through the models'
(parameters, figure) points; the 7B rows are predictions from that line, not measurements.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VCOMPRESS = [sys.executable, "-m", "vcompress"]


def measured(cmd: list[str], log: Path) -> dict:
    """Run one command; its wall seconds, peak RSS (MiB, the kernel's count for that process tree's
    largest member) and exit code."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.time() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "rc": proc.returncode}


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two quantize folders hold the same tensors, read one at a time."""
    import torch
    from safetensors import safe_open

    files = sorted(p.name for p in a.glob("*.safetensors"))
    if files != sorted(p.name for p in b.glob("*.safetensors")):
        return False
    for name in files:
        with safe_open(str(a / name), framework="pt") as fa, safe_open(str(b / name), framework="pt") as fb:
            if sorted(fa.keys()) != sorted(fb.keys()):
                return False
            if not all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()):
                return False
    return True


def parameters(folder: Path) -> int:
    from vcompress.core.layer_stream import checkpoint_bytes

    return checkpoint_bytes(folder) // 4  # fp32 bytes / 4


def bench_model(model: str | None, args, work: Path) -> dict:
    from vcompress.core.models import converted_gguf_dir, default_model_dir

    name = Path(model).stem if model else "SmolLM2-135M-Instruct (default)"
    print(f"\n== {name}", flush=True)
    rows = {}
    if model and model.endswith(".gguf"):
        cache = Path(os.environ.get("VCOMPRESS_CACHE", Path.home() / ".cache" / "vcompress")) / "models"
        fresh = not any(cache.glob(f"{Path(model).stem}-*/config.json"))
        script = f"from pathlib import Path; from vcompress.core.models import converted_gguf_dir; converted_gguf_dir(Path({model!r}))"
        rows["intake (GGUF -> safetensors, once)"] = measured([sys.executable, "-c", script], work / "intake.log")
        if not fresh:
            rows["intake (GGUF -> safetensors, once)"]["note"] = "cached"
        folder = converted_gguf_dir(Path(model))
    else:
        folder = Path(model) if model else default_model_dir()
    params = parameters(folder)
    src = ["--model", str(folder)]
    quant = ["--method", "gptq", "--group-size", "32", "--zero-point", "float", "--calib-samples", str(args.calib_samples)]
    quant += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--heldout-blocks", "0", "--eval-per-subject", "0"]
    steps = {
        "analyze (in memory)": [
            *VCOMPRESS,
            "analyze",
            *src,
            "--stream",
            "off",
            "--out",
            str(work / "a-mem"),
            "--samples",
            str(args.analyze_samples),
        ],
        "analyze (streamed)": [
            *VCOMPRESS,
            "analyze",
            *src,
            "--stream",
            "on",
            "--out",
            str(work / "a-stream"),
            "--samples",
            str(args.analyze_samples),
        ],
        "quantize GPTQ (in memory)": [*VCOMPRESS, "quantize", *src, *quant, "--stream", "off", "--out", str(work / "q-mem")],
        "quantize GPTQ (streamed)": [*VCOMPRESS, "quantize", *src, *quant, "--stream", "on", "--out", str(work / "q-stream")],
    }
    quantized = str(args.export_from or work / "q-stream")  # the quantize folder the export steps read
    for mode in ("off", "on"):
        label = f"export onnx int4 ({'streamed' if mode == 'on' else 'in memory'})"
        steps[label] = [*VCOMPRESS, "export", "onnx", "--model", quantized, "--quant", "int4", "--stream", mode]
        steps[label] += ["--threads", str(args.threads), "--out", str(work / f"onnx-{mode}")]
    for label, cmd in steps.items():
        if args.skip and any(s in label for s in args.skip):
            continue
        print(f"  {label} ...", flush=True)
        rows[label] = measured(cmd, work / f"{label.split()[0]}-{len(rows)}.log")
        if rows[label]["rc"] not in (0, 1):
            print(f"    exit {rows[label]['rc']}; see {work}", flush=True)
        print(f"    {rows[label]}", flush=True)
    identical = None
    if (work / "q-mem").is_dir() and (work / "q-stream").is_dir():
        identical = same_tensors(work / "q-mem", work / "q-stream")
    result = {"model": name, "parameters": params, "fp32_mib": round(params * 4 / 2**20, 1), "steps": rows, "streamed_identical": identical}
    if (work / "onnx-off").is_dir() and (work / "onnx-on").is_dir():
        result["onnx_identical"] = all(filecmp.cmp(work / "onnx-off" / f, work / "onnx-on" / f, shallow=False) for f in ONNX_FILES)
    return result


ONNX_FILES = ("model.onnx", "model.onnx.data")


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(intercept, slope per billion parameters) of the line through the points; None with fewer than 2."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def table(results: list[dict]) -> str:
    lines = ["| model | params | fp32 MiB | step | wall s | peak RSS MiB | RSS / fp32 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for label, row in r["steps"].items():
            ratio = row["peak_rss_mib"] / r["fp32_mib"]
            note = f" ({row['note']})" if row.get("note") else ("" if row["rc"] in (0, 1) else f" (exit {row['rc']})")
            lines.append(
                f"| {r['model']} | {r['parameters'] / 1e9:.3f} B | {r['fp32_mib']:.0f} | {label}{note} | {row['seconds']:.0f} | "
                f"{row['peak_rss_mib']:.0f} | {ratio:.2f} |"
            )
        if r["streamed_identical"] is not None:
            lines.append(
                f"| {r['model']} | | | streamed checkpoint == in-memory checkpoint | {'yes, bit for bit' if r['streamed_identical'] else 'NO'} | | |"
            )
        if r.get("onnx_identical") is not None:
            same = "yes, byte for byte" if r["onnx_identical"] else "NO"
            lines.append(f"| {r['model']} | | | streamed ONNX export == in-memory export | {same} | | |")
    labels = [label for label in results[0]["steps"] if not label.startswith("intake")] if results else []
    growth = ["", "Fitted growth (straight line through the models above) and what it predicts for 7B parameters:", ""]
    growth += ["| step | s per B params | MiB per B params | 7B wall (predicted) | 7B peak RSS (predicted) |", "|---|---|---|---|---|"]
    any_fit = False
    for label in labels:
        pts = [(r["parameters"] / 1e9, r["steps"][label]) for r in results if label in r["steps"] and r["steps"][label]["rc"] in (0, 1)]
        t, m = fit([(x, s["seconds"]) for x, s in pts]), fit([(x, s["peak_rss_mib"]) for x, s in pts])
        if t and m:
            any_fit = True
            growth.append(f"| {label} | {t[1]:.0f} | {m[1]:.0f} | {(t[0] + 7 * t[1]) / 3600:.1f} h | {(m[0] + 7 * m[1]) / 1024:.1f} GiB |")
    return "\n".join(lines + (growth if any_fit else []))


def _earlier(result: dict, path: Path) -> dict:
    """A model from an --add file, each row saying where it came from."""
    for row in result["steps"].values():
        row["note"] = "; ".join(filter(None, [row.get("note"), f"from {path.name}"]))
    return result


def merged(results: list[dict]) -> list[dict]:
    """One entry per model (the same parameter count is the same model), its steps in the order first seen;
    a row measured later replaces an earlier one of the same step."""
    by_size: dict[int, dict] = {}
    for r in results:
        first = by_size.setdefault(r["parameters"], {**r, "steps": {}})
        first["steps"].update(r["steps"])
        for key in ("streamed_identical", "onnx_identical"):
            if r.get(key) is not None:
                first[key] = r[key]
    return list(by_size.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="a model besides the default (repeatable)")
    parser.add_argument("--no-default", action="store_true", help="leave the embedded default out")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="quantize's calibration blocks per forward pass (activation memory)")
    parser.add_argument("--analyze-samples", type=int, default=4, help="analyze's calibration blocks (of 128 tokens; the profiles use 4)")
    parser.add_argument("--skip", action="append", default=[], help="skip steps whose label contains this (e.g. analyze)")
    parser.add_argument(
        "--export-from", type=Path, default=None, help="a quantize folder the export steps read (default: the streamed quantize step's)"
    )
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the exports' parity checks")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale"))
    parser.add_argument("--keep", action="store_true", help="keep the artifacts (in a temp folder)")
    parser.add_argument(
        "--add",
        type=Path,
        action="append",
        default=[],
        help="scale.json of an earlier run: its models join the table and the fit; a step measured again in this run replaces its row",
    )
    args = parser.parse_args()
    models = (args.model or []) + ([] if args.no_default else [None])
    results = [_earlier(r, path) for path in args.add for r in json.loads(path.read_text())]
    for model in models:
        work = Path(tempfile.mkdtemp(prefix="vcompress-scale-"))
        try:
            results.append(bench_model(model, args, work))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    text = table(merged(results))
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(merged(results), indent=1))
    (args.out / "scale.md").write_text(
        f"# Scale: peak RSS and wall time per stage\n\n`python bench/scale.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPUs, "
        f"GPTQ with {args.calib_samples} x {args.seq_len} calibration tokens, {args.batch_size} blocks per forward"
        f"{f'; the exports read {args.export_from}' if args.export_from else ''}.\n\n{text}\n"
    )


if __name__ == "__main__":
    main()
