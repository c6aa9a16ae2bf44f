"""A GGUF tensor's quantized blocks as a carried grid: codes, a scale and a float minimum per block.

Every block type read here computes, per block of consecutive inputs of one output row,

    W = scale * q + minimum        q: unsigned integer codes

exactly as `gguf.quants.dequantize` does (the same float32 products), so a grid read here and carried
into an export (core/quant_format.py's "mins" role, exporters/_onnx_gptq.py) computes the source's own
weights. Per type (sizes from gguf.GGML_QUANT_SIZES; the byte layouts are ggml's):

    Q4_0  32-blocks: fp16 d, 4-bit q              W = d * (q - 8)
    Q4_1  32-blocks: fp16 d and m, 4-bit q        W = d * q + m
    Q5_0  32-blocks: fp16 d, 5-bit q              W = d * (q - 16)
    Q8_0  32-blocks: fp16 d, int8 q               W = d * q           (codes q + 128 here)
    Q4_K  256-superblocks of eight 32-blocks: fp16 d, dmin; 6-bit sc, m per 32-block; 4-bit q
                                                  W = (d * sc) * q - (dmin * m)
    Q5_K  as Q4_K with 5-bit q
    Q6_K  256-superblocks of sixteen 16-blocks: int8 sc per 16-block, fp16 d; 6-bit q
                                                  W = (d * sc) * (q - 32)
Symmetric types (a fixed integer zero: Q4_0, Q5_0, Q8_0, Q6_K) also say their `zero`, so a target
whose kernel has that zero built in needs no minimum. The GGUF exporter reuses these layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf.quants import Q4_K

T = GGMLQuantizationType
BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5, T.Q6_K: 6}  # code width per type read here


@dataclass
class Blocks:
    """One [rows, cols] tensor's grid, blocks along cols: W[r, c] = scale[r, c // block] * codes[r, c] + minimum[r, c // block]."""

    codes: np.ndarray  # uint8 [rows, cols]
    scale: np.ndarray  # float32 [rows, cols // block]
    minimum: np.ndarray  # float32 [rows, cols // block]
    bits: int  # codes are < 2**bits
    block: int
    zero: int | None = None  # symmetric: minimum == -scale * zero for every block
    qtype: str = ""

    def dequantize(self) -> np.ndarray:
        rows, cols = self.codes.shape
        q = self.codes.reshape(rows, -1, self.block).astype(np.float32)
        return (self.scale[..., None] * q + self.minimum[..., None]).reshape(rows, cols)

    def take_rows(self, order: np.ndarray) -> Blocks:
        return replace(self, codes=self.codes[order], scale=self.scale[order], minimum=self.minimum[order])

    def at(self, bits: int, block: int | None = None) -> Blocks:
        """The same weights in wider codes and/or smaller blocks (bits >= self.bits, block dividing self.block).
        A symmetric grid is re-centred on the wider grid's middle (zero 2**(bits-1)), so it stays symmetric."""
        block = block or self.block
        if bits < self.bits or self.block % block:
            raise ValueError(f"{self.qtype} blocks ({self.bits}-bit, {self.block}) cannot widen to {bits}-bit {block}-blocks")
        out, repeat = self, self.block // block
        if repeat > 1:
            out = replace(out, scale=np.repeat(out.scale, repeat, 1), minimum=np.repeat(out.minimum, repeat, 1), block=block)
        if bits != self.bits and self.zero is not None:
            middle = 2 ** (bits - 1)
            shifted = (out.codes.astype(np.int16) + (middle - self.zero)).astype(np.uint8)
            out = replace(out, codes=shifted, minimum=(-out.scale * middle).astype(np.float32), zero=middle)
        return replace(out, bits=bits)


def readable(qtype) -> bool:
    return qtype in BITS


def read_blocks(raw: np.ndarray, qtype, cols: int) -> Blocks:
    """The grid of one GGUF tensor from its raw bytes (uint8 [rows, bytes per row], as gguf.GGUFReader gives them)."""
    qtype = T(qtype)
    if qtype not in BITS:
        raise ValueError(f"GGUF type {qtype.name} has no block reader; readable: {', '.join(t.name for t in BITS)}")
    block, size = GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(-1, cols // block * size).shape[0]
    b = np.ascontiguousarray(raw).reshape(rows * cols // block, size)  # one quantized block a row
    codes, scale, minimum, zero = _READERS[qtype](b)
    sub = codes.shape[-1]  # values per scale: the block, or a K-quant's sub-block
    return Blocks(
        codes=codes.reshape(rows, cols).astype(np.uint8),
        scale=scale.reshape(rows, cols // sub).astype(np.float32),
        minimum=minimum.reshape(rows, cols // sub).astype(np.float32),
        bits=BITS[qtype],
        block=sub,
        zero=zero,
        qtype=qtype.name,
    )


def _f16(b: np.ndarray, start: int) -> np.ndarray:
    """A fp16 field at byte `start` of each block, as float32 [blocks, 1]."""
    return b[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes [n, m] -> [n, 2m]: the m low nibbles, then the m high ones (ggml's order within 32 values)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _symmetric(codes, d, zero):
    return codes, d, -d * zero, zero


def _q4_0(b):
    return _symmetric(_nibbles(b[:, 2:]), _f16(b, 0), 8)


def _q4_1(b):
    return _nibbles(b[:, 4:]), _f16(b, 0), _f16(b, 2), None


def _q5_0(b):
    high = (b[:, 2:6].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1
    return _symmetric(_nibbles(b[:, 6:]) | (high.astype(np.uint8) << 4), _f16(b, 0), 16)


def _q8_0(b):
    return _symmetric((b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(b, 0), 128)


K_CODES = 4 + Q4_K.K_SCALE_SIZE  # Q4_K / Q5_K: fp16 d and dmin, then the packed 6-bit scales and minimums


def _k_scales(b):
    """Q4_K / Q5_K: the eight 32-blocks' float scale d * sc and float minimum -(dmin * m), [blocks, 8]."""
    sc, m = Q4_K.get_scale_min(b[:, 4:K_CODES])
    return _f16(b, 0) * sc.astype(np.float32), -(_f16(b, 2) * m.astype(np.float32))


def _q4_k(b):
    scale, minimum = _k_scales(b)
    codes = _nibbles(b[:, K_CODES:].reshape(len(b), 4, 32)).reshape(len(b), 8, 32)
    return codes, scale, minimum, None


def _q5_k(b):
    scale, minimum = _k_scales(b)
    qs = K_CODES + QK_K // 8  # after qh: the fifth bit of each value, bit j for 32-block j
    high = (b[:, K_CODES:qs][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [blocks, 8, 32]
    codes = _nibbles(b[:, qs:].reshape(len(b), 4, 32)).reshape(len(b), 8, 32) | (high << 4)
    return codes, scale, minimum, None


def _q6_k(b):
    n = len(b)
    ql, qh = b[:, : QK_K // 2].reshape(n, 2, 64), b[:, QK_K // 2 : QK_K // 2 + QK_K // 4].reshape(n, 2, 1, 32)
    low = np.concatenate([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=-1)  # [n, 2, 128]
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3  # [n, 2, 4, 32]
    codes = (low | (high.reshape(n, 2, 128) << 4)).reshape(n, 16, 16)
    scale = _f16(b, QK_K // 2 + QK_K // 4 + QK_K // 16) * b[:, QK_K * 3 // 4 : QK_K * 3 // 4 + 16].view(np.int8).astype(np.float32)
    return _symmetric(codes, scale, 32)


_READERS = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q8_0: _q8_0, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}


# --- a GGUF file's linears under Hugging Face names ------------------------------------------


@dataclass
class GGUFTensor:
    name: str  # the GGUF name (blk.0.attn_q.weight)
    qtype: GGMLQuantizationType
    rows: int
    cols: int
    raw: np.ndarray  # memory-mapped bytes


class GGUFFile:
    """A GGUF file's tensors, read lazily, under the Hugging Face module names of the model it converts to."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(self.path))
        self.arch = self.reader.fields["general.architecture"].contents()
        self.tensors = {
            t.name: GGUFTensor(t.name, T(t.tensor_type), int(t.shape[1]) if len(t.shape) > 1 else 1, int(t.shape[0]), t.data)
            for t in self.reader.tensors
        }

    def tensor(self, module: str, num_layers: int) -> GGUFTensor | None:
        """The GGUF tensor of a Hugging Face module's weight (model.layers.0.self_attn.q_proj), or None."""
        import gguf

        arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.arch), None)
        name = None if arch is None else gguf.get_tensor_name_map(arch, num_layers).get_name(module)
        return None if name is None else self.tensors.get(f"{name}.weight")

    def blocks(self, module: str, config) -> Blocks | None:
        """A linear's grid with Hugging Face's row order, or None when the file holds it unquantized or in a type not read here."""
        t = self.tensor(module, config.num_hidden_layers)
        if t is None or not readable(t.qtype):
            return None
        blocks = read_blocks(t.raw, t.qtype, t.cols)
        heads = _permuted_heads(self.arch, module, config)
        return blocks if heads is None else blocks.take_rows(_unpermute(t.rows, heads))


def _permuted_heads(arch: str, module: str, config) -> int | None:
    """llama.cpp's converter interleaves the rotary halves of Llama's q/k rows (its `permute`); transformers undoes it."""
    if arch != "llama":
        return None
    if module.endswith("q_proj"):
        return config.num_attention_heads
    if module.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _unpermute(rows: int, heads: int) -> np.ndarray:
    """Row order taking GGUF's interleaved q/k rows back to Hugging Face's (the inverse of llama.cpp's permute)."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


# --- the carried grid of a GGUF source ---------------------------------------------------------


@dataclass
class CarriedGrid:
    """What an export carries from a GGUF source: a quant manifest and its tensors (core/quant_format.py's layout,
    float minimums), and the linears it could not carry with the reason (the exporter re-rounds those)."""

    manifest: dict
    tensors: dict  # name -> torch.Tensor
    rerounded: dict[str, str]
    types: dict[str, str]  # linear -> its GGUF type


def carried_grid(path: str | Path, model, bits: int) -> CarriedGrid:
    """The grid of every linear of `model`'s decoder layers (the model `path` converts to) at most `bits` wide:
    4-bit types carried at 4 bits, 5-, 6- and 8-bit types at 8 when `bits` allows; the rest re-rounded."""
    import torch

    from .quant_format import make_quant_grid, pack_rows

    source = GGUFFile(path)
    linears, tensors, rerounded, types = {}, {}, {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head" or ".layers." not in f".{name}":
            continue
        t = source.tensor(name, model.config.num_hidden_layers)
        types[name] = t.qtype.name if t is not None else "absent"
        blocks = source.blocks(name, model.config)
        if blocks is None:
            rerounded[name] = f"stored as {types[name]}, not quantized blocks"
            continue
        width = 4 if blocks.bits <= 4 else 8
        if blocks.codes.shape != tuple(module.weight.shape):
            rerounded[name] = f"{blocks.qtype} tensor is {list(blocks.codes.shape)}, the model's {list(module.weight.shape)}"
        elif width > bits:
            rerounded[name] = f"{blocks.qtype} holds {blocks.bits}-bit codes and the target holds {bits}"
        if name in rerounded:
            continue
        blocks = blocks.at(width)
        keys = {key: f"{name}.{key}" for key in ("qweight", "scales", "mins", "g_idx")}
        out_features, in_features = blocks.codes.shape
        tensors[keys["qweight"]] = pack_rows(torch.from_numpy(blocks.codes.T.copy()), width)
        tensors[keys["scales"]] = torch.from_numpy(np.ascontiguousarray(blocks.scale.T))
        tensors[keys["mins"]] = torch.from_numpy(np.ascontiguousarray(blocks.minimum.T))
        tensors[keys["g_idx"]] = torch.arange(in_features, dtype=torch.int32) // blocks.block
        linears[name] = {
            "bits": width,
            "group_size": blocks.block,
            "sym": blocks.zero is not None,
            "zero_point": "min",
            "in_features": in_features,
            "out_features": out_features,
            "bias": module.bias is not None,
            "module": "Linear",
            "act_order": False,
            "source_type": blocks.qtype,
            "tensors": keys,
        }
    manifest = make_quant_grid(method="gguf", weights_file="", linears=linears, kept={})
    return CarriedGrid(manifest, tensors, rerounded, types)


def table_type(path: str | Path) -> str | None:
    """The GGUF type of the token embedding table (token_embd.weight), or None."""
    t = GGUFFile(path).tensors.get("token_embd.weight")
    return None if t is None else t.qtype.name
