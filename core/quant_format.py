"""The quantized-weight format: what the quantize stage writes and the exporters read, in one place.

compress/ and exporters/ do not import each other; both import this module. A quantized folder holds
quant_manifest.json ("format": "vcompress.quant/1", docs/quant_format.md) describing, per linear,
the GPTQ ("gptq_v2") tensors:

    qweight int32 [in * bits / 32, out]   code of input k, output n at word k // (32/bits),
                                          bits (k % (32/bits)) * bits .. + bits - 1 (low bits first)
    qzeros  int32 [groups, out * bits / 32]  zero of group g, output n at word n // (32/bits), same order,
                                          stored as is (v1 stored zero - 1, which cannot hold a zero of 0)
    zeros   float32 [groups, out]         instead of qzeros for float zero points (Q4_1-style grids)
    mins    float32 [groups, out]         instead of either: a float minimum, W = scale * code + min (a GGUF
                                          source's blocks, core/gguf_blocks.py: exact even where a scale is 0)
    scales  float16 [groups, out]         (float32 for a GGUF source's grid: K-quant scales are d * sc)
    g_idx   int32 [in]                    group of input column k (always k // group_size here)
    W[k, n] = float32(scales[g_idx[k], n]) * (code[k, n] - zero[g_idx[k], n]);   y = x @ W (+ bias)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import InputError

FORMAT = "vcompress.quant/1"
QUANT_GRID_FILE = "quant_manifest.json"
LAYOUT = "gptq_v2"
SUPPORTED_BITS = (2, 4, 8)
MATH = "W[k,n] = float32(scales[g_idx[k],n]) * (q[k,n] - zero[g_idx[k],n]); y = x @ W + bias (x [..., in], W [in, out])"
PACKING = {
    "qweight": "int32 [in*bits/32, out]: code of input k at word k // (32/bits), bit offset (k % (32/bits))*bits, low bits first",
    "qzeros": "int32 [groups, out*bits/32]: zero of output n at word n // (32/bits), bit offset (n % (32/bits))*bits; stored as is (not zero-1)",
    "zeros": "float32 [groups, out] (zero_point float only, instead of qzeros)",
    "mins": "float32 [groups, out] (zero_point min only, instead of qzeros/zeros): W = scales * q + mins",
    "scales": "float16 [groups, out]",
    "g_idx": "int32 [in] == arange(in) // group_size (act-order uses static groups: no permutation)",
}


# --- the manifest ---------------------------------------------------------------------------


def make_quant_grid(*, method: str, weights_file: str, linears: dict[str, dict], kept: dict[str, str]) -> dict:
    """The quant_manifest.json of a quantized folder: per linear its grid and tensor names."""
    return {
        "format": FORMAT,
        "method": method,
        "layout": LAYOUT,
        "weights_file": weights_file,
        "math": MATH,
        "packing": PACKING,
        "linears": linears,
        "kept": kept,
    }


def read_quant_grid(folder: str | Path | None) -> dict | None:
    """The manifest of a quantized folder, or None when `folder` is not one."""
    if folder is None:
        return None
    file = Path(folder) / QUANT_GRID_FILE
    if not file.is_file():
        return None
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise InputError(
            f"{file} has format {manifest.get('format')!r}, not {FORMAT!r}; re-run `vcompress quantize` with this vcompress version"
        )
    return manifest


def grid_bits(manifest: dict) -> int:
    """The checkpoint's bits: one width, or the widest where only a GGUF source's kept blocks ("mins") are narrower."""
    specs = manifest["linears"].values()
    bits = {spec["bits"] for spec in specs}
    if any(spec["bits"] != max(bits) and "mins" not in spec["tensors"] for spec in specs):
        raise InputError(f"mixed bit widths {sorted(bits)} in one checkpoint cannot be exported; quantize every linear to the same bits")
    return max(bits)


def carries_wider_source(manifest: dict) -> bool:
    """Whether every linear wider than 4 bits is a GGUF source's own blocks (quantize's `wider_source: carry`): such a
    grid is carried as it is under an int4 export too."""
    specs = manifest["linears"].values()
    return any(s["bits"] > 4 for s in specs) and all(s["bits"] <= 4 or "mins" in s["tensors"] for s in specs)


def linear_tensors(packed: dict[str, torch.Tensor], spec: dict) -> dict[str, torch.Tensor]:
    """One linear's tensors by role (qweight, qzeros or zeros, scales, g_idx) from a weights file."""
    return {key: packed[name] for key, name in spec["tensors"].items()}


# --- packing --------------------------------------------------------------------------------


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


# --- reading the weights back ---------------------------------------------------------------


def codes(tensors: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [in, out] int64, scales [groups, out] float32, zero [groups, out]: int64, or float32 for float zero points).
    A grid with float minimums ("mins") has no zero point: use `minimums`."""
    q = unpack_rows(tensors["qweight"], bits)
    zero = tensors["zeros"].float() if "zeros" in tensors else unpack_cols(tensors["qzeros"], bits)
    return q, tensors["scales"].float(), zero


def minimums(tensors: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [in, out] int64, scales [groups, out] float32, mins [groups, out] float32) of W = scales * q + mins,
    for any of the three grids (a zero point becomes mins = -scales * zero)."""
    if "mins" in tensors:
        return unpack_rows(tensors["qweight"], bits), tensors["scales"].float(), tensors["mins"].float()
    q, scales, zero = codes(tensors, bits)
    return q, scales, -scales * zero.float()


def dequantize(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """W [in, out] float32 from saved GPTQ tensors, exactly as the quantized layer computes it."""
    g = tensors["g_idx"].long()
    if "mins" in tensors:
        q, scales, mins = minimums(tensors, bits)
        return scales[g] * q.float() + mins[g]
    q, scales, zero = codes(tensors, bits)
    return scales[g] * (q.float() - zero.float()[g])


def load_dequantized(folder: str | Path, manifest: dict):
    """(model, tokenizer): a float32 transformers model whose quantized linears hold W as the
    quantized model computes it, built without gptqmodel."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    state = load_file(str(folder / "model.safetensors"))
    packed = state if manifest["weights_file"] == "model.safetensors" else load_file(str(folder / manifest["weights_file"]))
    for name, spec in manifest["linears"].items():
        w = dequantize(linear_tensors(packed, spec), spec["bits"])  # [in, out]
        state[f"{name}.weight"] = w if spec.get("module") == "Conv1D" else w.t().contiguous()
        for key in spec["tensors"].values():
            state.pop(key, None)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise InputError(
            f"{folder}: weights do not match the config (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]}); re-run `vcompress quantize`"
        )
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(folder)
