"""Low-bit ONNX: INT4 / INT8 weight-only (MatMulNBits) or INT8 dynamic, with the embedding table stored once.

The body's MatMuls: int4 by ONNX Runtime's `MatMulNBitsQuantizer` (RTN through its C++ block
quantizer, or HQQ); int8 as 8-bit MatMulNBits blocks (`rtn_blocks`) or by ORT's `quantize_dynamic`.
A quantized checkpoint's own grid is carried instead (_onnx_gptq.py). The embedding table is ours
to handle: ORT's int4 quantizer leaves it fp32 (113 MB of SmolLM2's 135M parameters) and, when the
head is tied to it, a plain export stores it twice. Here (`TableWeights`, while the graph is built,
so a streamed export never holds an fp32 graph) the table is block-quantized once into a
packed uint8 [vocab, hidden*bits/8] initializer that GatherBlockQuantized reads for the embedding
and, through a Reshape that ONNX Runtime folds at load, MatMulNBits reads for the tied head. An 8-bit
table is symmetric (scale = block absmax / 127, no zero points: both ops then take 128): that is GGUF
Q8_0's grid, so a Q8_0 token_embd (the embedded default's) comes back exactly and the file holds no
zero points for it.
An untied head (Qwen2.5 GGUFs, the tiny Qwen2 of the tests) is a second [vocab, hidden] table: it is
left out of the body's quantizers and block-quantized by the same code (MatMulNBits on its own
packed rows). `table_bits` decides both tables, tied or not, unless `head_bits` names the head's
(then a tied table takes the head's bits); 0 keeps a table fp32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vcompress.core.errors import InputError

from ._onnx_graph import EXTERNAL_THRESHOLD, MS, TABLE, GraphBuilder, Weights


def quantize_int4(
    model: onnx.ModelProto, *, block_size: int = 32, method: str = "rtn", accuracy_level: int = 4, only: list[str] | None = None
) -> onnx.ModelProto:
    """Every MatMul of the body to 4-bit MatMulNBits (the tables were quantized as the graph was built,
    `TableWeights`; an untied head they left fp32 stays fp32).

    method "rtn": ONNX Runtime's C++ block quantizer (min/max, integer zero point). "hqq": ONNX
    Runtime's HQQ (float zero point fitted by a proximal solver). "rtn-float": block min/max with a
    float zero point (ours): w = min + scale * q is GGUF Q4_1's grid, so weights dequantized from a
    Q4_1 file (the embedded default) come back exactly. Measured on this host (ONNX Runtime 1.31,
    2 threads), MatMulNBits with float zero points takes the unpacked path: 3.1 ms for a 576x1536
    token against 47 us with integer zero points (accuracy_level 4), so "rtn" is the default and
    the others are for accuracy studies. On SmolLM2 "rtn" keeps top-1 agreement 0.52 on the parity
    prompts and HQQ 0.83: carry a GPTQ grid from `vcompress quantize` for better int4.
    `only`: the MatMul nodes to quantize (the rest of a graph whose grid was carried), None: all.
    """
    head = untied_head(model) + _others(model, only)  # an fp32 LM head (table_bits 0) stays fp32
    if method == "rtn-float":
        return quantize_matmuls(model, bits=4, block_size=block_size, float_zero=True, accuracy_level=accuracy_level, exclude=head)
    return _ort_matmul_nbits(model, method, block_size, accuracy_level, exclude=head)


def _others(model: onnx.ModelProto, only: list[str] | None) -> list[str]:
    """The MatMul nodes not in `only` (none when `only` is None): what a quantizer must leave alone."""
    return [] if only is None else [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in only]


def _ort_matmul_nbits(
    model: onnx.ModelProto, method: str, block_size: int, accuracy_level: int, exclude: list[str] = ()
) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if method == "rtn":
        config = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",)
        )
    elif method == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=("MatMul",))
    else:
        raise ValueError(method)
    quantizer = MatMulNBitsQuantizer(model, accuracy_level=accuracy_level, nodes_to_exclude=list(exclude), algo_config=config)
    with quiet_logs():
        quantizer.process()
    model = quantizer.model.model
    if method == "hqq" and accuracy_level:
        _set_accuracy_level(model, accuracy_level)
    return model


def quantize_int8(
    model: onnx.ModelProto, *, block_size: int = 32, accuracy_level: int = 4, method: str = "blockwise", only: list[str] | None = None
) -> onnx.ModelProto:
    """method "blockwise": 8-bit MatMulNBits, a scale and zero point per block of 32 weights, and
    (accuracy_level 4) activations quantized per block at run time. "dynamic": ONNX Runtime's
    quantize_dynamic (int8 weights per channel, activations per tensor: a tensor with outlier
    channels loses its small ones, which SmolLM2's down-projection inputs have). The embedding and
    the LM head (tied or not) were quantized (8-bit blocks) or kept fp32 as the graph was built. `only`: as quantize_int4."""
    head = untied_head(model) + _others(model, only)
    if method == "blockwise":
        return quantize_matmuls(model, bits=8, block_size=block_size, float_zero=False, accuracy_level=accuracy_level, exclude=head)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="vcompress-int8-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, src, save_as_external_data=True, location="in.onnx.data")
        # The head's MatMulNBits (already 8-bit) and GQA's inputs are not MatMul: only the body is touched
        # (an untied head left fp32 by table_bits 0 is excluded by name).
        with quiet_logs():
            quantize_dynamic(
                src,
                dst,
                weight_type=QuantType.QInt8,
                per_channel=True,
                # 7-bit weights: ONNX Runtime's u8 x s8 kernel saturates its 16-bit pair sums on x86 without VNNI
                # (AVX2; ORT's quantization docs), which cost the tiny test model a quarter of its top-1 agreement
                # on such a host; with reduce_range the artifact computes the same on every x86 CPU.
                reduce_range=True,
                op_types_to_quantize=["MatMul"],
                nodes_to_exclude=head,
                use_external_data_format=True,
                extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        return onnx.load(dst)


def rtn_blocks(w: np.ndarray, *, bits: int, block_size: int, float_zero: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest of W [K, N] in blocks of `block_size` along K, in MatMulNBits' layout:
    B uint8 [N, blocks, block_size*bits/8], scales float32 [N, blocks], zero points (float32
    [N, blocks], or uint8 packed [N, ceil(blocks*bits/8)])."""
    k, n = w.shape
    blocks = -(-k // block_size)
    levels = 2**bits - 1
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    rows = padded.T.reshape(n, blocks, block_size)
    lo, hi = rows.min(-1), rows.max(-1)
    scale = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32)
    if float_zero:
        zero = (-lo / scale).astype(np.float32)
    else:
        zero = np.clip(np.rint(-lo / scale), 0, levels)
    codes = np.clip(np.rint(rows / scale[..., None] + zero[..., None]), 0, levels).astype(np.uint8)
    packed = codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    if float_zero:
        zp = zero
    elif bits == 8:
        zp = zero.astype(np.uint8)
    else:
        z = zero.astype(np.uint8)
        if blocks % 2:
            z = np.pad(z, ((0, 0), (0, 1)))
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scale), np.ascontiguousarray(zp)


def quantize_matmuls(
    model: onnx.ModelProto, *, bits: int, block_size: int, float_zero: bool, accuracy_level: int, exclude: list[str] = ()
) -> onnx.ModelProto:
    """Every MatMul with a constant [K, N] weight (but the nodes named in `exclude`) to MatMulNBits by `rtn_blocks`."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes, dropped, added = [], set(), []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights or node.name in exclude:
            nodes.append(node)
            continue
        name = node.input[1]
        w = numpy_helper.to_array(weights[name])
        packed, scales, zp = rtn_blocks(w, bits=bits, block_size=block_size, float_zero=float_zero)
        names = [f"{name}_Q{bits}", f"{name}_scales", f"{name}_zero_points"]
        added += [numpy_helper.from_array(a, n) for a, n in zip((packed, scales, zp), names)]
        attrs = dict(K=w.shape[0], N=w.shape[1], bits=bits, block_size=block_size)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        nodes.append(
            helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output), name=f"{node.name}_Q{bits}", domain=MS, **attrs)
        )
        dropped.add(name)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    return model


HEAD_NODE, HEAD_WEIGHT = "lm_head/MatMul", "lm_head.weight"  # the untied head as _onnx_graph._lm_head writes it


def untied_head(model: onnx.ModelProto) -> list[str]:
    """[the untied LM head's MatMul node name] while it is still a plain MatMul on its own weight, else []."""
    weights = {t.name for t in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and n.name == HEAD_NODE and n.input[1] == HEAD_WEIGHT and HEAD_WEIGHT in weights
    ]


class TableWeights(Weights):
    """The embedding table and the LM head (tied or untied) block-quantized at `bits` as the graph is built
    (0 keeps them fp32): at 4 bits ORT's C++ block quantizer along hidden, integer zero point; at 8 bits
    symmetric (`_symmetric_rows`). GatherBlockQuantized
    reads the table's rows; a tied head reads the same blocks through a Reshape (MatMulNBits), an untied
    head (a second [vocab, hidden] table) gets its own blocks, at `head_bits`. Each table is quantized from
    one read of it. A tied table is the head's, so it takes `head_bits`; an untied embedding, only gathered
    (one row per token), can take fewer bits than the head that decides every logit."""

    def __init__(
        self,
        tensors,
        *,
        bits: int,
        block_size: int,
        accuracy_level: int,
        head_bits: int | None = None,
        tied: bool = False,
        compact: bool = False,
    ):
        super().__init__(tensors)
        self.compact = compact
        self.head_bits = bits if head_bits is None else head_bits
        self.bits = self.head_bits if tied else bits  # the embedding table's
        self.block_size, self.accuracy_level = block_size, accuracy_level
        self._made: dict[str, TableBlocks] = {}  # table name -> its blocks, for the tied head

    def gather(self, g: GraphBuilder, table: str, key: str, indices: str, name: str) -> str:
        if not self.bits:
            return super().gather(g, table, key, indices, name)
        blocks = self._blocks(g, table, self.read(key).numpy(), bits=self.bits, gathered=True)
        return g.one(
            "GatherBlockQuantized",
            [blocks.data, indices, blocks.scales, *blocks.zero_points],
            name=name,
            domain=MS,
            bits=self.bits,
            block_size=blocks.block,
            gather_axis=0,
            quantize_axis=1,
        )

    def tied_head(self, g: GraphBuilder, x: str) -> str:
        if not self.bits:
            return super().tied_head(g, x)
        # MatMulNBits wants B as [N, blocks, bytes per block]: the gathered rows' bytes, reshaped (ORT folds it at load).
        blocks = self._made[TABLE]
        shape = g.const(f"{blocks.data}_shape", [blocks.rows, blocks.hidden // blocks.block, blocks.block * blocks.bits // 8])
        b = g.op("Reshape", [blocks.data, shape], ["lm_head/B"], name="lm_head/ReshapeB")[0]
        return self._head(g, x, b, blocks, "lm_head/Gemm")

    def untied_head(self, g: GraphBuilder, x: str) -> str:
        if not self.head_bits:
            return super().untied_head(g, x)
        blocks = self._blocks(g, HEAD_WEIGHT, self.read(HEAD_WEIGHT).numpy(), bits=self.head_bits, gathered=False)
        return self._head(g, x, blocks.data, blocks, HEAD_NODE)

    def _head(self, g: GraphBuilder, x: str, b: str, blocks: TableBlocks, name: str) -> str:
        attrs = dict(K=blocks.hidden, N=blocks.rows, bits=blocks.bits, block_size=blocks.block)
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        return g.one("MatMulNBits", [x, b, blocks.scales, *blocks.zero_points], name=name, domain=MS, **attrs)

    def _blocks(self, g: GraphBuilder, name: str, table: np.ndarray, bits: int, gathered: bool) -> TableBlocks:
        """Quantize one [rows, hidden] table into the graph's initializers `name`_Q, _scales, _zero_points.
        GatherBlockQuantized reads rows [rows, hidden*bits/8]; a table only a head reads is stored as
        MatMulNBits' B [rows, blocks, block*bits/8] (the same bytes)."""
        rows, hidden = table.shape
        block = _table_block(hidden, self.block_size)
        if bits == 8:
            (packed, scales), zero_points = _symmetric_rows(table, block=block), None
        else:
            packed, scales, zero_points = _block_quant_rows(table, bits=bits, block=block)
        data_shape = (rows, hidden * bits // 8) if gathered else (rows, hidden // block, block * bits // 8)
        blocks = TableBlocks(
            data=g.add(numpy_helper.from_array(packed.reshape(data_shape), f"{name}_Q")),
            scales=g.side(f"{name}_scales", scales.reshape(rows, hidden // block)),
            zero_points=()
            if zero_points is None
            else (g.add(numpy_helper.from_array(zero_points.reshape(rows, -1), f"{name}_zero_points")),),
            rows=rows,
            hidden=hidden,
            block=block,
            bits=bits,
        )
        self._made[name] = blocks
        return blocks


TABLE_ROWS_AT_ONCE = 8192  # rows per call of ORT's block quantizer: its transposed input is a slice, not a second table


def _block_quant_rows(table: np.ndarray, *, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ORT's C++ block quantizer (asymmetric, integer zero point) on each row of a [rows, hidden] table along
    hidden: packed [rows, blocks, block*bits/8], scales [rows, blocks], zero points [rows, packed blocks].
    Rows are independent, so slices of rows give the whole table's bytes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=bits))
    parts = [
        quantizer.qbits_block_quant(np.ascontiguousarray(table[start : start + TABLE_ROWS_AT_ONCE].T))
        for start in range(0, table.shape[0], TABLE_ROWS_AT_ONCE)
    ]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def _symmetric_rows(table: np.ndarray, *, block: int) -> tuple[np.ndarray, np.ndarray]:
    """8-bit symmetric blocks along hidden of a [rows, hidden] table: codes q + 128 (uint8) with
    q = round(w / scale) in [-127, 127], scale = block absmax / 127 (GGUF Q8_0's rule, so a table
    dequantized from Q8_0 gives its own codes back); returns codes [rows, hidden] and scales [rows, blocks]."""
    rows, hidden = table.shape
    codes, scales = np.empty((rows, hidden), np.uint8), np.empty((rows, hidden // block), np.float32)
    for start in range(0, rows, TABLE_ROWS_AT_ONCE):
        part = np.asarray(table[start : start + TABLE_ROWS_AT_ONCE], np.float32).reshape(-1, hidden // block, block)
        absmax = np.abs(part).max(-1)
        scale = np.where(absmax > 0, absmax / 127, 1.0).astype(np.float32)
        q = np.clip(np.rint(part / scale[..., None]), -127, 127) + 128
        codes[start : start + len(part)] = q.reshape(len(part), hidden).astype(np.uint8)
        scales[start : start + len(part)] = scale
    return codes, scales


ONE_MATRIX_STEPS = 1.0  # how far (in steps of a 4-bit grid over each block) two copies of one table may differ


def one_matrix_steps(embedding, head, block: int) -> float:
    """The largest difference between an untied embedding and its head, in steps of a 4-bit grid over the head's
    blocks of `block` weights along hidden (max |E - H| / ((max H - min H) / 15), block by block). Two roundings of
    one matrix differ by at most half a step of each grid: a GGUF of a tied model can hold its table twice (Qwen2.5's
    as Q5_0 token_embd and Q8_0 output) and measures ~0.3 here; two trained tables differ by several steps."""
    rows, hidden = head.shape
    worst = 0.0
    for start in range(0, rows, TABLE_ROWS_AT_ONCE):
        h = np.asarray(head[start : start + TABLE_ROWS_AT_ONCE], np.float32).reshape(-1, hidden // block, block)
        e = np.asarray(embedding[start : start + TABLE_ROWS_AT_ONCE], np.float32).reshape(h.shape)
        step = (h.max(-1) - h.min(-1)) / 15
        diff = np.abs(e - h).max(-1)
        worst = max(worst, float(np.max(diff / np.maximum(step, np.finfo(np.float32).tiny))))
        if worst > ONE_MATRIX_STEPS:  # two tables: no need to read on
            break
    return worst


@dataclass
class TableBlocks:
    """One block-quantized table in the graph: its initializers' names and its shape."""

    data: str
    scales: str
    zero_points: tuple[str, ...]  # () for a symmetric (8-bit) table: its ops take 128
    rows: int
    hidden: int
    block: int
    bits: int


@contextlib.contextmanager
def quiet_logs():
    """ONNX Runtime's quantizers log every node at INFO on the root logger: keep errors only."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.ERROR))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _table_block(hidden: int, block_size: int) -> int:
    # The shared bytes need whole blocks per row: fall back to the largest power of two that divides.
    block = block_size
    while block >= 16 and hidden % block:
        block //= 2
    if block < 16:
        raise InputError(
            f"hidden size {hidden} has no power-of-two block >= 16 that divides it, so its embedding cannot be block-quantized; keep it float with --table-bits 0"
        )
    return block


def _set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(helper.make_attribute("accuracy_level", level))


def save(model: onnx.ModelProto, out: Path, name: str = "model.onnx") -> list[str]:
    """model.onnx with every weight in one model.onnx.data beside it; returns the file names."""
    out = Path(out)
    data = f"{name}.data"
    if (out / data).exists():
        os.remove(out / data)
    onnx.save_model(
        model, out / name, save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=EXTERNAL_THRESHOLD
    )
    return [name, data]
