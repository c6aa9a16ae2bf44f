"""A `Quantized` layer to the saved GPTQ tensors (qweight/qzeros/scales/g_idx) and back.

The tensor layout, its packing and its math are the quantized-weight format's
(vcompress.core.quant_format, docs/quant_format.md), which the exporters read too.
"""

from __future__ import annotations

import torch

from vcompress.core.quant_format import codes, pack_cols, pack_rows

from ._gptq_core import Grid, Quantized


def to_tensors(q: Quantized) -> dict[str, torch.Tensor]:
    """The saved tensors of one layer (names relative to the module)."""
    bits = q.grid.bits
    out = {
        "qweight": pack_rows(q.codes.t(), bits),  # codes are [out, in]; GPTQ packs W [in, out]
        "scales": q.scales.t().contiguous().half(),
        "g_idx": q.g_idx.to(torch.int32).clone(),
    }
    zeros = q.zeros.t().contiguous()
    if q.grid.float_zero:
        out["zeros"] = zeros.float()
    else:
        out["qzeros"] = pack_cols(zeros.round().to(torch.int64), bits)
    return out


def from_tensors(tensors: dict[str, torch.Tensor], grid: Grid) -> Quantized:
    """Read back what to_tensors wrote."""
    q, scales, zeros = codes(tensors, grid.bits)
    return Quantized(q.t().to(torch.uint8), scales.t().contiguous(), zeros.float().t().contiguous(), tensors["g_idx"].to(torch.int32), grid)
