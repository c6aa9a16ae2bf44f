"""The prompt graph: the same decoder with every linear on ONNX Runtime's int8 GEMM, for the prefill only.

A 4-bit MatMulNBits reads half the bytes of int8 per token, which is what decode is bound by; a prompt
of hundreds of tokens is bound by arithmetic instead, and there ONNX Runtime's int8 GEMM
(DynamicQuantizeMatMul: activations quantized per tensor at run time, weights int8) outruns MatMulNBits
by several times (bench/kernels.py, rows dq-int8 and sym4+correction). So an export with `prefill_graph:
int8` writes a second graph, model_prefill.onnx, whose linears hold the same weights as int8 per output
channel: a quantize folder's grid is dequantized (W = scale * (q - zero), as the quantized model computes
it) and rounded to 255 symmetric levels per column (down_proj stays 4-bit: see PrefillWeights). The
tables (embedding, LM head) are the decode graph's, block-quantized the same way. genai_config.json then
names both graphs as one pipeline (type decoder-pipeline): the prompt graph runs on the prompt, the 4-bit
graph on every generated token, both reading and writing the one KV cache ONNX Runtime GenAI keeps.
"""

from __future__ import annotations

import numpy as np
import torch

from vcompress.core.quant_format import dequantize, linear_tensors

from ._onnx_gptq import CarriedWeights
from ._onnx_graph import MS, GraphBuilder

FILE = "model_prefill.onnx"


def per_channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q [K, N] int8, scale [N] float32): W ~= q * scale, symmetric per output column (zero point 0)."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


class PrefillWeights(CarriedWeights):
    """The linears that read a normalized hidden state (qkv, gate_up, o) as DynamicQuantizeMatMul on per-channel int8
    weights dequantized from the carried grid; down_proj keeps the decode graph's 4-bit MatMulNBits: its input,
    SiLU(gate) * up, has outlier channels that one activation scale per tensor rounds away (SmolLM2-135M, 4 x 256
    held-out tokens against the 4-bit graph: every linear int8, perplexity +54% and top-1 0.65; down_proj kept
    4-bit, +2.1% and 0.86; docs/peers.md, "The int8 prompt graph"). The tables are the decode graph's."""

    four_bit = ("down_proj",)

    def matmul(self, g: GraphBuilder, x: str, modules: list[str], name: str, transposed: bool = False) -> str:
        if transposed or name.endswith(self.four_bit) or not all(m in self.linears for m in modules):
            return super().matmul(g, x, modules, name, transposed)
        w = torch.cat([dequantize(linear_tensors(self.codes, self.linears[m]), self.carried["bits"]) for m in modules], dim=1)
        q, scale = per_channel_int8(w.numpy())
        zero = np.zeros(q.shape[1], np.int8)
        inputs = [x, g.weight(f"{name}.weight_int8", q), g.side(f"{name}.weight_scale", scale), g.weight(f"{name}.weight_zero", zero)]
        return g.one("DynamicQuantizeMatMul", inputs, name=f"{name}/DynamicQuantizeMatMul", domain=MS)
