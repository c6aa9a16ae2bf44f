"""GPTQ tensor layout: pack a `Quantized` layer into qweight/qzeros/scales/g_idx and back.

The layout is the one transformers (through optimum and gptqmodel) loads, "gptq_v2" flavour:
zero points are stored as they are (v1 stored zero - 1, which cannot hold a zero point of 0).
docs/quant_format.md and the artifact's quant_manifest.json describe it for exporters.

    qweight int32 [in * bits / 32, out]   code of input k, output n at word k // (32/bits),
                                          bits (k % (32/bits)) * bits .. + bits - 1 (low bits first)
    qzeros  int32 [groups, out * bits / 32]  zero of group g, output n at word n // (32/bits), same order
    scales  float16 [groups, out]
    g_idx   int32 [in]                     group of input column k (always k // group_size here)
    W[k, n] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n]);   y = x @ W (+ bias)

A grid with a float zero point stores `zeros` float32 [groups, out] instead of qzeros.
"""
from __future__ import annotations

import torch

from ._gptq_core import Grid, Quantized

SUPPORTED_BITS = (2, 4, 8)


def _per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{bits}-bit packing is not supported; use one of {SUPPORTED_BITS}")
    return 32 // bits


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] small non-negative integers -> int32 [R * bits / 32, C], packed along rows, low bits first."""
    per = _per_word(bits)
    rows, cols = values.shape
    if rows % per:
        raise ValueError(f"{rows} rows cannot be packed {per} to a 32-bit word")
    v = values.to(torch.int64).reshape(rows // per, per, cols)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    words = (v << shifts).sum(1)  # < 2**32, exact in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [R', C] -> int64 [R' * 32 / bits, C]."""
    per = _per_word(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    values = (w.unsqueeze(1) >> shifts) & (2**bits - 1)
    return values.reshape(-1, words.shape[1])


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] -> int32 [R, C * bits / 32], packed along columns, low bits first."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(words.t(), bits).t()


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
    """Read back what to_tensors wrote (the reference the exporters are checked against)."""
    bits = grid.bits
    codes = unpack_rows(tensors["qweight"], bits).t()
    scales = tensors["scales"].float().t()
    if "zeros" in tensors:
        zeros = tensors["zeros"].float().t()
    else:
        zeros = unpack_cols(tensors["qzeros"], bits).float().t()
    return Quantized(codes.to(torch.uint8), scales.contiguous(), zeros.contiguous(), tensors["g_idx"].to(torch.int32), grid)


def dequantize(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """W [in, out] float32 from saved GPTQ tensors, exactly as the quantized layer computes it."""
    codes = unpack_rows(tensors["qweight"], bits).float()
    g = tensors["g_idx"].long()
    if "zeros" in tensors:
        zeros = tensors["zeros"].float()
    else:
        zeros = unpack_cols(tensors["qzeros"], bits).float()
    return tensors["scales"].float()[g] * (codes - zeros[g])
