"""What each fp16 choice of the qnn export buys: held-out perplexity and top-1 agreement of the QDQ prefill graph on
the CPU EP against the fp32 step graph, for the embedded default (or --model), one line per variant.

    /work/heavy python bench/qnn_precision.py [--model DIR] [--calibration 2] [--heldout 1] [--variants uint16 residual 1024 256]

Variants: `uint16` (every activation on the uint16 grid), `residual` (the residual stream in float), a number N
(the residual stream and every MLP whose output reaches N on the calibration text: the export's `fp16_mlp_above`).
The graphs are one 128-token prefill over a 128-slot cache (the export's prefill graph, a smaller cache).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

CHUNK = 128


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vcompress.core.data import pack, texts_for
    from vcompress.core.models import default_model_dir
    from vcompress.exporters import _onnx_graph, _qnn_compile, _qnn_graph
    from vcompress.exporters._qnn_session import MASKED, open_step
    from vcompress.exporters.qnn import _wide_mlps

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--calibration", type=int, default=2, help="calibration chunks")
    parser.add_argument("--heldout", type=int, default=1, help="held-out chunks scored")
    parser.add_argument("--variants", nargs="+", default=["uint16", "residual", "1024", "256"])
    args = parser.parse_args()
    folder = args.model or default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    proto, dims = _qnn_graph.build_step(model, _onnx_graph.Weights(model.state_dict()), CHUNK, CHUNK)
    calibration = pack(texts_for(None, tokenizer, part="calib", log=lambda _: None), tokenizer, CHUNK, args.calibration)
    heldout = pack(texts_for(None, tokenizer, part="heldout", log=lambda _: None), tokenizer, CHUNK, args.heldout)
    bias = np.full((1, 1, CHUNK, 2 * CHUNK), MASKED, np.float32)
    bias[0, 0, :, CHUNK:] = np.where(np.tri(CHUNK, dtype=bool), 0, MASKED)
    empty = {
        f"past_{p}.{i}": np.zeros((1, dims.kv_heads, CHUNK, dims.head_dim), np.float32)
        for i in range(dims.layers)
        for p in ("key", "value")
    }

    def feeds(block) -> dict:
        ids = np.asarray(block, np.int32)[None]
        return {"input_ids": ids, "position_ids": np.arange(CHUNK, dtype=np.int32)[None], "attention_bias": bias, **empty}

    def logits(path: Path) -> list[torch.Tensor]:
        session = open_step(path, "cpu")
        return [torch.from_numpy(session.run(["logits"], feeds(b))[0][0, :-1]) for b in heldout.tolist()]

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "prefill.onnx"
        onnx.save_model(proto, fp32, save_as_external_data=True, location="prefill.onnx.data")
        reference = logits(fp32)
        targets = [b[1:] for b in heldout]
        ref_nll = sum(torch.nn.functional.cross_entropy(r, t, reduction="sum").item() for r, t in zip(reference, targets))
        positions = sum(len(t) for t in targets)
        print(
            f"{folder.name}: {positions} held-out positions, {len(calibration)} calibration chunks, fp32 perplexity {np.exp(ref_nll / positions):.2f}"
        )
        print("| variant | fp16 MLP layers | perplexity rise % | top-1 agreement | seconds |")
        print("|---|---|---|---|---|")
        for variant in args.variants:
            started = time.perf_counter()
            wide = {} if variant in ("uint16", "residual") else _wide_mlps(model, calibration, float(variant))
            floats = [] if variant == "uint16" else _qnn_graph.float_nodes(proto, wide)
            qdq = Path(tmp) / f"prefill.{variant}.onnx"
            _qnn_compile.quantize(fp32, qdq, [feeds(b) for b in calibration.tolist()], 8, floats)
            out = logits(qdq)
            nll = sum(torch.nn.functional.cross_entropy(o, t, reduction="sum").item() for o, t in zip(out, targets))
            agree = sum((o.argmax(-1) == r.argmax(-1)).sum().item() for o, r in zip(out, reference)) / positions
            rise = (np.exp((nll - ref_nll) / positions) - 1) * 100
            print(f"| {variant} | {sorted(wide) or '-'} | {rise:+.1f} | {agree:.3f} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
