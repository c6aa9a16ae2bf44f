"""The prompt graph: the same decoder with every linear on ONNX Runtime's int8 GEMM, for the prefill only.

A 4-bit MatMulNBits reads half the bytes of int8 per token, which is what decode is bound by; a prompt
of hundreds of tokens is bound by arithmetic instead, and there ONNX Runtime's int8 GEMM
(DynamicQuantizeMatMul: activations quantized per tensor at run time, weights int8) outruns MatMulNBits
by several times (bench/kernels.py, rows dq-int8 and sym4+correction). So an export with `prefill_graph:
int8` writes a second graph, model_prefill.onnx, whose linears hold the same weights as int8 per output
channel: a quantize folder's grid is dequantized (W = scale * (q - zero), as the quantized model computes
it) and rounded to 255 symmetric levels per column; a float source's weights are rounded directly. The
tables (embedding, LM head) are the decode graph's, block-quantized the same way. genai_config.json then
names both graphs as one pipeline (type decoder-pipeline): the prompt graph runs on the prompt, the 4-bit
graph on every generated token, both reading and writing the one KV cache ONNX Runtime GenAI keeps.
"""

from __future__ import annotations

import numpy as np
import torch

from vcompress.core.quant_format import dequantize, grid_bits, linear_tensors

from ._onnx_graph import MS, GraphBuilder
from ._onnx_quant import TableWeights

FILE = "model_prefill.onnx"


def per_channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q [K, N] int8, scale [N] float32): W ~= q * scale, symmetric per output column (zero point 0)."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


class PrefillWeights(TableWeights):
    """Every linear of the body as DynamicQuantizeMatMul on per-channel int8 weights; the tables as TableWeights.
    `codes` / `grid`: a quantize folder's weights file and manifest (its linears are dequantized from their codes)."""

    def __init__(self, tensors, codes=None, grid: dict | None = None, **table_settings):
        super().__init__(tensors, **table_settings)
        self.codes, self.grid = codes, grid
        self.linears = grid["linears"] if grid else {}

    def _float(self, module: str) -> torch.Tensor:
        """W [in, out] of one checkpoint linear, as the model computes it."""
        if module in self.linears:
            return dequantize(linear_tensors(self.codes, self.linears[module]), grid_bits(self.grid))
        return self.read(f"{module}.weight").t()

    def matmul(self, g: GraphBuilder, x: str, modules: list[str], name: str, transposed: bool = False) -> str:
        if transposed:  # GPT-2's Conv1D: [in, out] already
            w = torch.cat([self.read(f"{m}.weight") for m in modules], dim=1)
        else:
            w = torch.cat([self._float(m) for m in modules], dim=1)
        q, scale = per_channel_int8(w.detach().to(torch.float32).numpy())
        inputs = [
            x,
            g.weight(f"{name}.weight_int8", q),
            g.side(f"{name}.weight_scale", scale),
            g.weight(f"{name}.weight_zero", np.zeros(q.shape[1], np.int8)),
        ]
        return g.one("DynamicQuantizeMatMul", inputs, name=f"{name}/DynamicQuantizeMatMul", domain=MS)
