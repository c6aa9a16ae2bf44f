"""Perplexity at equal file size, every file run by llama.cpp: one float checkpoint quantized to Q4_1 (tables Q8_0)
by our GPTQ and by llama.cpp's own quantizer, round-to-nearest and with an importance matrix.

    python bench/gguf_equal_size.py CHECKPOINT [--work DIR] [--calib-samples 64] [--ppl-blocks 8] [--out DIR]

CHECKPOINT is an HF folder that is not already on a 4-bit grid (a distilled or fine-tuned student). Rows:
  float (F32)          `vcompress export gguf --quant none --table-bits 0`: the checkpoint itself, the reference
  vcompress GPTQ       `vcompress quantize --method gptq --group-size 32 --zero-point float`, then `vcompress export
                       gguf`: the codes written as Q4_1 blocks
  llama.cpp RTN        llama_model_quantize (llama-cpp-python) of the F32 file, ftype MOSTLY_Q4_1, token embedding
                       and output Q8_0 (as our export), no importance matrix: what `llama-quantize F32 Q4_1` does
  llama.cpp imatrix    the same call with an importance matrix: per linear and input column the mean squared input
                       activation over the calibration blocks our GPTQ uses (what llama-imatrix collects, here from
                       PyTorch hooks: llama-imatrix is not part of the llama-cpp-python wheel)
Perplexity on --ppl-blocks blocks of --ppl-seq-len tokens of held-out MMLU text outside the medical subjects (the text
validate uses), with top-1 agreement with the float row, in llama.cpp through exporters/_gguf_session.py (its float16
KV cache). Prints a table; writes equal_size.json and equal_size.md to --out. Files are kept in --work between runs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Q4_1_FILE, Q8_0 = 3, 8  # LLAMA_FTYPE_MOSTLY_Q4_1, GGML_TYPE_Q8_0


def vcompress(*args) -> None:
    subprocess.run([sys.executable, "-m", "vcompress", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def importance(checkpoint: Path, samples: int, seq_len: int) -> dict:
    """GGUF tensor name -> mean squared input activation per column, over the calibration blocks GPTQ sees."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vcompress.compress._calib import calibration_blocks

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    names = gguf.TensorNameMap(
        gguf.MODEL_ARCH.LLAMA if model.config.model_type == "llama" else gguf.MODEL_ARCH.QWEN2, model.config.num_hidden_layers
    )
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def collect(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return collect

    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(hook(names.get_name(f"{name}.weight", try_suffixes=(".weight",)))))
    blocks = calibration_blocks(tokenizer, samples=samples, seq_len=seq_len, log=lambda _: None)
    with torch.no_grad():
        for batch in blocks.split(4):
            model(input_ids=batch)
    for h in hooks:
        h.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


def llama_quantize(source: Path, out: Path, imatrix: dict | None) -> None:
    """llama.cpp's own quantizer (llama-quantize's library call) on an F32 GGUF."""
    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.token_embedding_type, params.output_tensor_type = Q4_1_FILE, Q8_0, Q8_0
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # a null name ends the array
        for entry, (name, values) in zip(entries, imatrix.items()):
            values = np.ascontiguousarray(values, np.float32)
            keep += [values, name.encode()]
            entry.name, entry.data, entry.size = keep[-1], values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), values.size
        params.imatrix = entries
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise SystemExit(f"llama_model_quantize returned {status} for {out.name}")


def perplexity(peers, target: Path, blocks: list[list[int]], threads: int) -> dict:
    engine = peers.LlamaEngine(target, threads, max(len(b) for b in blocks) + 8, logits_all=True)
    try:
        return peers.heldout_nll(engine, blocks)
    finally:
        engine.session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="HF folder of a float checkpoint off the 4-bit grid")
    parser.add_argument("--work", type=Path, default=None, help="where the GGUFs are written and kept (default: CHECKPOINT-equal-size)")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration blocks of GPTQ and of the importance matrix")
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--ppl-blocks", type=int, default=8)
    parser.add_argument("--ppl-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf_equal_size")
    args = parser.parse_args()
    work = args.work or args.checkpoint.with_name(args.checkpoint.name + "-equal-size")
    work.mkdir(parents=True, exist_ok=True)
    ckpt, fast = args.checkpoint, ["--heldout-blocks", "0"]
    calib = ["--calib-samples", args.calib_samples, "--seq-len", args.calib_seq_len]
    files = {"float (F32)": work / "f32" / "model.gguf", "vcompress GPTQ": work / "gptq-gguf" / "model.gguf"}
    if not files["float (F32)"].is_file():
        print("writing the F32 GGUF", file=sys.stderr, flush=True)
        vcompress("export", "gguf", "--model", ckpt, "--out", work / "f32", "--quant", "none", "--table-bits", "0", *fast)
    if not files["vcompress GPTQ"].is_file():
        print("GPTQ onto Q4_1, then the GGUF", file=sys.stderr, flush=True)
        if not (work / "gptq").is_dir():
            vcompress(
                "quantize",
                "--model",
                ckpt,
                "--out",
                work / "gptq",
                "--method",
                "gptq",
                "--group-size",
                32,
                "--zero-point",
                "float",
                *calib,
                *fast,
                "--eval-per-subject",
                0,
            )
        vcompress("export", "gguf", "--model", work / "gptq", "--out", work / "gptq-gguf", "--table-bits", 8, *fast)
    files["llama.cpp RTN"], files["llama.cpp imatrix"] = work / "rtn-q4_1.gguf", work / "imatrix-q4_1.gguf"
    if not files["llama.cpp RTN"].is_file():
        llama_quantize(files["float (F32)"], files["llama.cpp RTN"], None)
    if not files["llama.cpp imatrix"].is_file():
        print("importance matrix (PyTorch hooks on the calibration blocks)", file=sys.stderr, flush=True)
        llama_quantize(files["float (F32)"], files["llama.cpp imatrix"], importance(ckpt, args.calib_samples, args.calib_seq_len))

    import peers  # bench/peers.py, beside this script
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    positions = json.loads((ckpt / "config.json").read_text())["max_position_embeddings"]
    blocks = peers.heldout_blocks(tokenizer, argparse.Namespace(mmlu=None, ppl_seq_len=args.ppl_seq_len, ppl_blocks=args.ppl_blocks))
    rows = []
    for name, path in files.items():
        print(f"perplexity: {name}", file=sys.stderr, flush=True)
        # an export opens as it is; llama.cpp's files through a folder linking them (the session reads a manifest)
        folder = (
            path.parent
            if (path.parent / "manifest.json").is_file()
            else peers.gguf_folder(path, work / f"open-{path.stem}", {"max_positions": positions})
        )
        scored = perplexity(peers, folder, blocks, args.threads)
        rows.append({"row": name, "file": str(path), "size_mib": round(path.stat().st_size / 2**20, 2), **scored})
    reference, top1 = rows[0], rows[0]["top1"]
    for row in rows:
        row["perplexity"] = round(math.exp(row["nll"] / row["tokens"]), 3)
        row["rise_pct"] = round(100 * (row["perplexity"] / reference["perplexity"] - 1), 2)
        row["top1_vs_float"] = round(sum(a == b for a, b in zip(row.pop("top1"), top1)) / row["tokens"], 4)
    lines = ["| row | file MiB | perplexity | rise vs float | top-1 vs float |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['size_mib']} | {r['perplexity']} | {r['rise_pct']:+.2f}% | {r['top1_vs_float']:.4f} |" for r in rows]
    command = "python bench/gguf_equal_size.py " + " ".join(sys.argv[1:])
    text = (
        "\n".join(lines) + f"\n\n{rows[0]['tokens']} held-out tokens ({args.ppl_blocks} x {args.ppl_seq_len}), llama.cpp's float16 KV cache"
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "equal_size.json").write_text(
        json.dumps({"command": command, "checkpoint": str(ckpt), "rows": rows}, indent=2, default=str)
    )
    (args.out / "equal_size.md").write_text(f"`{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
