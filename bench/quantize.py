"""GPTQ vs round-to-nearest vs INT8 on the embedded default (or --model), side by side.

    flock /tmp/vcompress-heavy.lock python bench/quantize.py [--calib-samples 128] [--seq-len 512] [--group-size 128]

Prints minutes, weight bytes (% of fp32), held-out perplexity (fp32's beside it), top-1 next-token
agreement and MMLU answer agreement with fp32, and whether the GPTQ checkpoint reloads and generates.
Done-when (issue 6): GPTQ INT4 < 15 min on 2 cores with 128 calibration blocks, weights <= 35% of
fp32, perplexity within 5% of fp32, top-1 agreement >= 90%, better than RTN.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run(method: str, args, out: Path) -> dict:
    from vcompress.compress.quantize import Quantize
    from vcompress.core.stage import execute

    config = {
        "method": method,
        "group_size": args.group_size,
        "zero_point": args.zero_point,
        "calib_samples": args.calib_samples,
        "seq_len": args.seq_len,
        "act_order": args.act_order,
        "eval_per_subject": args.mmlu_per_subject,
    }
    if method == "int8":
        config["zero_point"] = "int"
    started = time.time()
    metrics = execute(Quantize(config), out, source=args.model, force=True, seed=0, log=lambda m: print(f"  [{method}] {m}", flush=True))
    metrics["wall_seconds"] = time.time() - started
    return metrics


def reloads_and_generates(folder: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The heart pumps blood", return_tensors="pt").input_ids
    new = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True).strip().replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--methods", default="gptq,rtn,int8")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--zero-point", choices=["int", "float"], default="int")
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--mmlu-per-subject", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="keep the checkpoints here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write all metrics to this file")
    args = parser.parse_args()

    import torch

    root = args.out or Path(tempfile.mkdtemp(prefix="vcompress-bench-quantize-"))
    rows, everything = [], {}
    for method in args.methods.split(","):
        metrics = run(method, args, root / method)
        everything[method] = metrics
        generated = reloads_and_generates(root / method) if method == "gptq" else ""
        ppl = metrics.get("perplexity") or {}
        nan = float("nan")
        rows.append(
            (
                method,
                f"{metrics['bits']}",
                f"g{metrics['group_size']}",
                f"{metrics['quantize_seconds'] / 60:.1f}",
                f"{metrics['wall_seconds'] / 60:.1f}",
                f"{metrics['weights_bytes_after'] / 1e6:.1f}",
                f"{metrics['weights_fraction_of_before']:.1%}",
                f"{ppl.get('student', nan):.2f} / {ppl.get('reference', nan):.2f}",
                f"{ppl.get('rise_pct', nan):+.1f}%",
                f"{metrics.get('top1_agreement') or nan:.1%}",
                f"{metrics.get('kl_mean') or nan:.4f}",
                f"{metrics['answer_agreement']:.1%} of {metrics['questions']}" if metrics.get("answer_agreement") is not None else "-",
                generated[:40],
            )
        )
    header = (
        "method",
        "bits",
        "group",
        "quant min",
        "stage min",
        "MB",
        "% fp32",
        "ppl / fp32",
        "ppl rise",
        "top-1",
        "KL",
        "MMLU agree",
        "gptq reload+generate",
    )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(
        f"\n{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs visible, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}; calibration {args.calib_samples} x {args.seq_len} tokens; "
        f"zero point {args.zero_point}{', act-order' if args.act_order else ''}; checkpoints in {root}"
    )
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    if "gptq" in everything and "rtn" in everything:
        g, r = everything["gptq"], everything["rtn"]
        if g.get("perplexity") and r.get("perplexity"):
            gp, rp = g["perplexity"]["student"], r["perplexity"]["student"]
            print(
                f"GPTQ beats RTN: perplexity {gp:.2f} < {rp:.2f}: {gp < rp}; "
                f"top-1 {g['top1_agreement']:.1%} > {r['top1_agreement']:.1%}: {g['top1_agreement'] > r['top1_agreement']}"
            )
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2, default=str))


if __name__ == "__main__":
    main()
