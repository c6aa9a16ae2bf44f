"""Carry the quantize stage's exact grid (GPTQ / RTN / INT8 codes, scales, zero points) into MatMulNBits.

The hand-off is a file format, not an import (compress/ and exporters/ do not import each other):
quant_manifest.json and the GPTQ tensors it names, read through vcompress.core.quant_format, give per
linear the codes q [K, N], scales [G, N] and zero points [G, N] of W[k, n] = scale * (q - zero).
MatMulNBits computes the same (q - zero) * scale with B [N, G, group_size*bits/8], so the codes are
repacked, not re-quantized: the ONNX model holds exactly the quantized model's weights.

Float zero points (Q4_1-style grids, W = scale * q + min): MatMulNBits takes them, but ONNX Runtime
then leaves its fast MLAS kernels for a reference path (~4 tokens/s instead of ~80 on SmolLM2).
So they are split exactly around the symmetric grid's fixed zero point m = 2^(bits-1):
  x @ W = MatMulNBits(x; q, scale)  +  groupsum(x) @ (-scale * (zero - m))
where MatMulNBits without zero points computes scale * (q - m), groupsum(x) [.., G] adds x over each
group of inputs and -scale * (zero - m) is a small [G, N] float matrix: the fast kernel does the work,
the correction is one tiny MatMul per quantized MatMul, and the file holds no zero points (an integer
zero point per block, the split used before, bought nothing the correction does not already carry).
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from vcompress.core.errors import InputError
from vcompress.core.quant_format import codes, linear_tensors, minimums

from ._onnx_graph import MS, GraphBuilder
from ._onnx_quant import TableWeights


def _check_order(tensors: dict, spec: dict) -> None:
    if "g_idx" in tensors and not np.array_equal(tensors["g_idx"].numpy(), np.arange(spec["in_features"]) // spec["group_size"]):
        raise InputError(
            "g_idx is not arange(K) // group_size: a permuted (act-order) grid cannot be carried; re-quantize with `vcompress quantize` or export with --quant none"
        )


def _codes(packed: dict, spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [K, N] uint8, scales [G, N] float32, zero [G, N] uint8, or float32 for float zero points) of one linear."""
    tensors = linear_tensors(packed, spec)
    _check_order(tensors, spec)
    q, scales, zero = codes(tensors, spec["bits"])
    zero = zero.numpy() if zero.is_floating_point() else zero.numpy().astype(np.uint8)
    return q.numpy().astype(np.uint8), scales.numpy(), zero


def _minimums(packed: dict, spec: dict, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [K, N] uint8, scales [G, N], mins [G, N]) of one linear with float minimums, in blocks of `group`
    (a divisor of its own: each scale and minimum repeated)."""
    tensors = linear_tensors(packed, spec)
    _check_order(tensors, spec)
    q, scales, mins = (t.numpy() for t in minimums(tensors, spec["bits"]))
    repeat = spec["group_size"] // group
    return q.astype(np.uint8), np.repeat(scales, repeat, 0), np.repeat(mins, repeat, 0)


def matmulnbits_inputs(packed: dict, specs: list[dict]) -> dict:
    """B, scales, zero points (and attributes) for one MatMulNBits of linears concatenated along N.
    Linears with float minimums (a GGUF source's blocks) may differ in bits and block: they share the
    widest codes and the smallest block, which hold each one's weights as they are."""
    kinds = {next(k for k in ("mins", "zeros", "qzeros") if k in s["tensors"]) for s in specs}
    alike = len({(s["bits"], s["group_size"]) for s in specs}) == 1 and len(kinds) == 1
    if not (alike or "mins" in kinds) or len({s["in_features"] for s in specs}) != 1:
        names = [s["tensors"]["scales"].rsplit(".", 1)[0] for s in specs]
        raise InputError(
            f"{names} share one MatMul but not bits, group size and zero-point kind; re-quantize them alike or export with --quant none"
        )
    k = specs[0]["in_features"]
    if "mins" in kinds:  # (re-quantized linears beside kept ones: their zero points become minimums too)
        bits, gs = (4 if max(s["bits"] for s in specs) <= 4 else 8), min(s["group_size"] for s in specs)
        parts = [_minimums(packed, s, gs) for s in specs]
    else:
        bits, gs = specs[0]["bits"], specs[0]["group_size"]
        parts = [_codes(packed, s) for s in specs]
    q = np.concatenate([p[0] for p in parts], axis=1)  # [K, N]
    scales = np.concatenate([p[1] for p in parts], axis=1)
    zero = np.concatenate([p[2] for p in parts], axis=1)
    n, groups = q.shape[1], k // gs
    rows = q.T.reshape(n, groups, gs).astype(np.uint8)
    b = rows if bits == 8 else (rows[..., 0::2] | (rows[..., 1::2] << 4)).astype(np.uint8)
    correction = None
    if "mins" in kinds:  # W = s * q + min = s * (q - m) + (min + s * m): zero for a symmetric grid
        correction = (zero + scales * 2 ** (bits - 1)).astype(np.float32)
        correction = np.ascontiguousarray(correction) if correction.any() else None
        zp = None
    elif zero.dtype == np.float32:  # the symmetric kernel plus an exact float correction (module doc)
        correction = np.ascontiguousarray((-scales * (zero - 2 ** (bits - 1))).astype(np.float32))  # [G, N]
        zp = None
    elif bits == 8:
        zp = np.ascontiguousarray(zero.T.astype(np.uint8))
    else:
        z = zero.T.astype(np.uint8)
        if groups % 2:
            z = np.pad(z, ((0, 0), (0, 1)))
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return {
        "B": np.ascontiguousarray(b),
        "scales": np.ascontiguousarray(scales.T),
        "zero_points": zp,
        "K": k,
        "N": n,
        "bits": bits,
        "block_size": gs,
        "correction": correction,
    }


class CarriedWeights(TableWeights):
    """The graph's weights with each linear the checkpoint quantized as MatMulNBits on its own grid,
    made from that linear's codes when the graph reaches it (`codes` maps the weights file's tensor
    names to tensors; a lazy reader reads one linear's at a time). Linears left float stay MatMul;
    the tables follow TableWeights (`bits` 0: fp32). `carried` describes what was carried."""

    def __init__(self, tensors, codes, manifest: dict, **table_settings):
        super().__init__(tensors, **table_settings)
        self.codes, self.linears = codes, manifest["linears"]
        self.rerounded: dict[str, str] = {}  # a GGUF source's linears it cannot carry (left float here, re-rounded after)
        bits = sorted({s["bits"] for s in self.linears.values()})
        self.carried = {
            "linears": 0,
            "kept_float": [],
            "method": manifest.get("method"),
            "bits": bits[0] if len(bits) == 1 else bits,
            "group_size": sorted({s["group_size"] for s in self.linears.values()}),
        }

    def matmul(self, g: GraphBuilder, x: str, modules: list[str], name: str, transposed: bool = False) -> str:
        quantized = [m for m in modules if m in self.linears]
        if quantized and len(quantized) != len(modules) and self.rerounded:
            # a GGUF source's linear that cannot be carried shares this MatMul: the whole MatMul is re-rounded
            first = next(m for m in modules if m in self.rerounded)
            self.rerounded |= {m: f"shares {name}/MatMul with {first.rsplit('.', 1)[-1]}, which cannot be carried" for m in quantized}
            quantized = []
        if not quantized:
            self.carried["kept_float"].append(f"{name}/MatMul")
            return super().matmul(g, x, modules, name, transposed)
        if len(quantized) != len(modules):
            raise InputError(
                f"{name}/MatMul packs {modules} but only {quantized} are quantized; re-quantize keeping all or none of them in float, or export with --quant none"
            )
        inputs = matmulnbits_inputs(self.codes, [self.linears[m] for m in modules])
        self.fp32_bytes += inputs["K"] * inputs["N"] * 4
        self.carried["linears"] += len(modules)
        bits = inputs["bits"]
        weights = [g.add(numpy_helper.from_array(inputs["B"], f"{name}.weight_Q{bits}")), g.side(f"{name}.weight_scales", inputs["scales"])]
        if inputs["zero_points"] is not None:
            weights.append(g.add(numpy_helper.from_array(inputs["zero_points"], f"{name}.weight_zero_points")))
        attrs = {key: inputs[key] for key in ("K", "N", "bits", "block_size")}
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        y = g.one("MatMulNBits", [x, *weights], name=f"{name}/MatMul_Q{bits}", domain=MS, **attrs)
        if inputs["correction"] is None:
            return y
        return _float_zero_correction(g, name, x, y, inputs["correction"], inputs["block_size"])


def _float_zero_correction(g: GraphBuilder, stem: str, x: str, main: str, correction: np.ndarray, block: int) -> str:
    """main + groupsum(x) @ correction: the float part of the zero points (see the module doc)."""
    names = {key: f"{stem}.zero_correction.{key}" for key in ("shape", "axes", "matrix")}
    shape = g.const(names["shape"], [0, 0, correction.shape[0], block])
    axes = g.const(names["axes"], [-1])
    matrix = g.side(names["matrix"], correction)
    grouped = g.one("Reshape", [x, shape], name=f"{stem}/zero_correction/Reshape")
    sums = g.one("ReduceSum", [grouped, axes], name=f"{stem}/zero_correction/ReduceSum", keepdims=0)
    fix = g.one("MatMul", [sums, matrix], name=f"{stem}/zero_correction/MatMul")
    return g.one("Add", [main, fix], name=f"{stem}/zero_correction/Add")
