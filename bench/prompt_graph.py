"""Which linears the int8 prompt graph (exporters/_onnx_prefill.py) can put on ONNX Runtime's int8 GEMM.

    flock /tmp/vcompress-heavy.lock .venv/bin/python bench/prompt_graph.py --quantized QUANTIZE_FOLDER \
        --artifact ONNX_INT4_ARTIFACT [--blocks 4] [--rounds 3] [--threads 2] [--out bench/results/prompt_graph] [--work DIR]

Builds the prompt graph from a quantize folder's grid with a choice of linears kept on the 4-bit MatMulNBits
(none; down_proj, the shipped choice; down_proj and o_proj) and compares each with the artifact's 4-bit graph:
held-out perplexity and top-1 next-token agreement on --blocks blocks of 256 tokens of the text validate uses
(each block one run, as a prompt is), and the time of a 256-token prefill (last-token logits), every graph timed
in each of --rounds interleaved rounds, one session alive at a time. Prints a Markdown table; --out writes it
with a JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

VARIANTS = {"every linear int8": (), "down_proj 4-bit (shipped)": ("down_proj",), "down_proj, o_proj 4-bit": ("down_proj", "o_proj")}


def build(quantized: Path, work: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from vcompress.core.layer_stream import file_tensors
    from vcompress.core.quant_format import read_quant_grid
    from vcompress.exporters import _onnx_graph, _onnx_prefill

    model = AutoModelForCausalLM.from_pretrained(str(quantized), dtype=torch.float32)
    grid = read_quant_grid(quantized)
    settings = dict(block_size=32, accuracy_level=4, bits=8, head_bits=8, tied=model.config.tie_word_embeddings, compact=True)
    paths = {}
    for i, (name, keep) in enumerate(VARIANTS.items()):
        weights_class = type("Variant", (_onnx_prefill.PrefillWeights,), {"four_bit": keep})
        weights = weights_class(model.state_dict(), file_tensors(quantized / grid["weights_file"]), grid, **settings)
        proto, _ = _onnx_graph.build(model, weights, _onnx_graph.ExternalData(work, f"variant{i}.onnx.data"))
        onnx.save_model(proto, work / f"variant{i}.onnx")
        paths[name] = work / f"variant{i}.onnx"
    return paths


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(s: ort.InferenceSession, ids: np.ndarray, keep: int) -> np.ndarray:
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64), "logits_to_keep": np.array([keep], np.int64)}
    for i in s.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return s.run(["logits"], feeds)[0][0]


def quality(path: Path, blocks: np.ndarray, threads: int) -> tuple[float, np.ndarray]:
    s = session(path, threads)
    nll, top = [], []
    for ids in blocks:
        lg = logits(s, ids, len(ids)).astype(np.float64)
        m = lg.max(-1, keepdims=True)
        logp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(len(ids) - 1), ids[1:]].mean())
        top.append(lg.argmax(-1)[:-1])
    return float(np.exp(np.mean(nll))), np.concatenate(top)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantized", type=Path, required=True, help="a `vcompress quantize` folder")
    parser.add_argument("--artifact", type=Path, required=True, help="its ONNX INT4 export (the 4-bit graph compared against)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prompt_graph"))
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vcompress" / "prompt_graph", help="the built graphs")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from vcompress.core.data import pack, texts_for

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    graphs = {"4-bit graph (decode)": args.artifact / "model.onnx", **build(args.quantized, args.work)}
    tokenizer = AutoTokenizer.from_pretrained(str(args.quantized))
    texts = texts_for(None, tokenizer, part="heldout", exclude="medical", mmlu=None, log=lambda _: None)
    blocks = pack(texts, tokenizer, 256, args.blocks).numpy().astype(np.int64)
    rows, reference = {}, None
    for name, path in graphs.items():
        ppl, top = quality(path, blocks, args.threads)
        reference = top if reference is None else reference
        rows[name] = {"perplexity": round(ppl, 3), "top1_vs_4bit": round(float((top == reference).mean()), 4), "prefill_ms": []}
    for _ in range(args.rounds):
        for name, path in graphs.items():
            s = session(path, args.threads)
            logits(s, blocks[0], 1)  # warm-up
            for _ in range(2):
                start = time.perf_counter()
                logits(s, blocks[0], 1)
                rows[name]["prefill_ms"].append(round((time.perf_counter() - start) * 1e3, 1))
            del s
    base = statistics.median(rows["4-bit graph (decode)"]["prefill_ms"])
    lines = [
        f"ONNX Runtime {ort.__version__}, {args.threads} threads; {args.blocks} x 256 held-out tokens; 256-token prefill, "
        f"{args.rounds} interleaved rounds x 2 runs (median [min-max])",
        "",
        "| graph | perplexity | rise over 4-bit | top-1 agreement with 4-bit | prefill 256 ms | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    ppl4 = rows["4-bit graph (decode)"]["perplexity"]
    for name, r in rows.items():
        ms = statistics.median(r["prefill_ms"])
        lines.append(
            f"| {name} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / ppl4 - 1):+.1f}% | {r['top1_vs_4bit']:.3f} | "
            f"{ms:.0f} [{min(r['prefill_ms']):.0f}-{max(r['prefill_ms']):.0f}] | {base / ms:.2f}x |"
        )
    print("\n".join(lines))
    (args.out / "prompt_graph.md").write_text("\n".join(lines) + "\n")
    (args.out / "prompt_graph.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
