"""Latency of the ONNX exports (fp32, INT8, INT4) of a model on this host, against the issue's targets.

    flock /tmp/vcompress-heavy.lock python bench/onnx_latency.py [--model M] [--work DIR] [--threads 2]

Exports each variant into --work (kept between runs; --reexport to redo them), then measures each
in its own subprocess, so peak RSS is that variant's alone: time to first token (prefill of a
--prompt-tokens prompt, to the first token's logits), decode tokens/s (greedy, --decode-tokens
tokens after the prompt), peak RSS (VmHWM). Each figure is the median of --runs runs after one
warm-up. The subprocess runs exporters/_onnx_session.py, the numpy decode loop OnnxRunner wraps,
loaded by path so that torch (~200 MB resident) is not imported: the RSS is what an app built on
ONNX Runtime pays. Threads are fixed (--threads) and printed.

Targets (issue 7, INT4 on this 2-core host): decode >= 133 tok/s (llama.cpp Q4_1), TTFT <= 100 ms
at 256 prompt tokens, peak RSS <= 300 MB.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"decode_tok_s": 133.0, "ttft_ms": 100.0, "peak_rss_mb": 300.0}
TEXT = (
    "A patient presents with fever, cough and shortness of breath. The physician orders a chest x-ray, "
    "which shows a consolidation in the right lower lobe. Blood tests reveal an elevated white cell count. "
    "The contract is void if either party fails to deliver the goods on time, and interest rates rose by two "
    "percent while bond prices fell. Cells divide by mitosis; the nucleus holds the chromosomes. "
)


def rss_mb(field: str = "VmHWM") -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def measure(folder: Path, threads: int, prompt_tokens: int, decode_tokens: int, runs: int, optimization: str) -> dict:
    """One variant, in this (fresh) process."""
    import numpy as np
    from tokenizers import Tokenizer

    spec = importlib.util.spec_from_file_location("onnx_session", ROOT / "exporters" / "_onnx_session.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    before = rss_mb("VmRSS")
    session = module.DecoderSession(folder, threads=threads, optimization=optimization)
    loaded = rss_mb("VmRSS")
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT * 20, add_special_tokens=False).ids
    if len(ids) < prompt_tokens:
        raise SystemExit(f"the bench text gives {len(ids)} tokens, fewer than {prompt_tokens}")
    prompt = np.array(ids[:prompt_tokens], np.int64)

    def once() -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        logits, state = session.prefill(prompt)
        token = int(logits.argmax())
        ttft = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for _ in range(decode_tokens):
            logits, state = session.decode(token, state)
            token = int(logits.argmax())
            tokens.append(token)
        return ttft, decode_tokens / (time.perf_counter() - start), tokens

    once()  # warm-up: first-run allocations and prepacking are not what a user waits for per request
    results = [once() for _ in range(runs)]
    ttft = [r[0] for r in results]
    speed = [r[1] for r in results]
    return {
        "threads": session.threads,
        "ttft_ms": statistics.median(ttft) * 1000,
        "ttft_ms_runs": [round(t * 1000, 1) for t in ttft],
        "decode_tok_s": statistics.median(speed),
        "decode_tok_s_runs": [round(s, 1) for s in speed],
        "peak_rss_mb": rss_mb("VmHWM"),
        "model_rss_mb": loaded - before,
        "load_s": session.load_seconds,
        "tokens": results[0][2][:8],
    }


def variant_settings(name: str) -> tuple[str, dict]:
    """'int4' or with suffixes: -a0 (MatMulNBits accuracy_level 0: fp32 activations), -t8 / -t0
    (embedding table and tied head at 8 bits / fp32), -hqq / -rtnfloat (int4 quantizer), -dyn (int8 by
    ONNX Runtime dynamic quantization instead of 8-bit blocks)."""
    quant, *flags = name.split("-")
    settings = {}
    for flag in flags:
        if flag.startswith("a"):
            settings["accuracy_level"] = int(flag[1:])
        elif flag.startswith("t"):
            settings["table_bits"] = int(flag[1:])
        elif flag in ("hqq", "rtnfloat"):
            settings["method"] = {"hqq": "hqq", "rtnfloat": "rtn-float"}[flag]
        elif flag == "dyn":
            settings["int8_method"] = "dynamic"
        else:
            raise SystemExit(f"unknown variant flag {flag!r} in {name!r}")
    return quant, settings


def export_variants(model: str | None, work: Path, variants: list[str], reexport: bool, block_size: int, min_top1: float) -> dict:
    from vcompress.exporters.onnx import export

    parity = {}
    for name in variants:
        out = work / name
        if (out / "manifest.json").is_file() and not reexport:
            parity[name] = json.loads((out / "manifest.json").read_text()).get("parity", {})
            continue
        quant, settings = variant_settings(name)
        print(f"exporting {name} -> {out}", file=sys.stderr, flush=True)
        metrics = export(model, out, quant, force=True, block_size=block_size, threads=2, min_top1_quantized=min_top1, **settings, log=lambda m: print(m, file=sys.stderr))
        p = parity[name] = metrics["parity"]
        print(f"  parity: max|diff| {p['max_abs_diff']:.2e}, top-1 {p['top1_agreement']:.3f}, greedy identical {p['greedy_identical']}/{p['prompts']}",
              file=sys.stderr, flush=True)
    return parity


def file_mb(folder: Path) -> float:
    manifest = json.loads((folder / "manifest.json").read_text())
    return sum((folder / manifest["files"][k]).stat().st_size for k in ("model", "weights")) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint to export (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vcompress-bench-onnx"))
    parser.add_argument("--variants", default="none,int8,int4",
                        help="comma list: none, int8, int4, with flags -a0 (fp32 activations), -t8/-t0 (table bits), -hqq/-rtnfloat, -dyn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--optimization", default="all", choices=["none", "basic", "extended", "all"])
    parser.add_argument("--reexport", action="store_true")
    parser.add_argument("--min-top1-quantized", type=float, default=0.0,
                        help="gate the int8/int4 exports on this top-1 agreement (default: report it only)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--json-out", type=Path, help="also write the figures to this file")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the per-variant subprocess
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads, args.prompt_tokens, args.decode_tokens, args.runs, args.optimization)))
        return 0

    variants = args.variants.split(",")
    parity = export_variants(args.model, args.work, variants, args.reexport, args.block_size, args.min_top1_quantized)
    rows = {}
    for quant in variants:
        cmd = [sys.executable, __file__, "--measure", str(args.work / quant), "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
               "--runs", str(args.runs), "--optimization", args.optimization]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return 1
        rows[quant] = {**json.loads(done.stdout.strip().splitlines()[-1]), "file_mb": file_mb(args.work / quant),
                       "top1_agreement": parity[quant].get("top1_agreement"), "greedy_identical": parity[quant].get("greedy_identical")}
    if args.json_out:
        args.json_out.write_text(json.dumps({"threads": args.threads, "prompt_tokens": args.prompt_tokens,
                                             "decode_tokens": args.decode_tokens, "runs": args.runs, "variants": rows}, indent=2))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    fp32_mb = rows.get("none", {}).get("file_mb")
    print(f"ONNX Runtime, CPU, {args.threads} threads, prompt {args.prompt_tokens} tokens, {args.decode_tokens} decoded, "
          f"median of {args.runs} runs after 1 warm-up, optimization={args.optimization}")
    print(f"{'variant':9} {'file MB':>8} {'of fp32':>8} {'TTFT ms':>8} {'decode tok/s':>13} {'peak RSS MB':>12} {'model RSS MB':>13} {'top-1 vs torch':>15} {'greedy =':>9}")
    for quant, r in rows.items():
        share = f"{r['file_mb'] / fp32_mb:.1%}" if fp32_mb else "-"
        print(f"{quant:9} {r['file_mb']:8.1f} {share:>8} {r['ttft_ms']:8.1f} {r['decode_tok_s']:13.1f} {r['peak_rss_mb']:12.1f} {r['model_rss_mb']:13.1f}"
              f" {r['top1_agreement'] if r['top1_agreement'] is not None else '-':>15} {str(r['greedy_identical']) + '/5':>9}")
    if "int4" in rows:
        r = rows["int4"]
        print("INT4 against the targets:")
        for key, target, better in (("decode_tok_s", TARGETS["decode_tok_s"], "higher"), ("ttft_ms", TARGETS["ttft_ms"], "lower"),
                                    ("peak_rss_mb", TARGETS["peak_rss_mb"], "lower")):
            ok = r[key] >= target if better == "higher" else r[key] <= target
            print(f"  {key:13} {r[key]:8.1f}  target {'>=' if better == 'higher' else '<='} {target:g}  "
                  f"{'met' if ok else 'missed'} (gap {r[key] - target:+.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
