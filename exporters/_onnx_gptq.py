"""Carry the quantize stage's exact grid (GPTQ / RTN / INT8 codes, scales, zero points) into MatMulNBits.

The hand-off is a file format, not an import (compress/ and exporters/ do not import each other):
quant_manifest.json and the GPTQ tensors it names, read through vcompress.core.quant_format, give per
linear the codes q [K, N], scales [G, N] and zero points [G, N] of W[k, n] = scale * (q - zero).
MatMulNBits computes the same (q - zero) * scale with B [N, G, group_size*bits/8], so the codes are
repacked, not re-quantized: the ONNX model holds exactly the quantized model's weights.

Float zero points (Q4_1-style grids, W = scale * q + min): MatMulNBits takes them, but ONNX Runtime
then leaves its fast MLAS kernels for a reference path (~4 tokens/s instead of ~80 on SmolLM2).
So they are split exactly: zero = z_int + r with z_int = round(zero) in [0, 2^bits - 1], and
  x @ W = MatMulNBits(x; q, scale, z_int)  +  groupsum(x) @ (-scale * r)
where groupsum(x) [.., G] adds x over each group of inputs and (-scale * r) is a small [G, N] float
matrix: the fast kernel does the work, the correction is one tiny MatMul per quantized MatMul.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vcompress.core.errors import InputError
from vcompress.core.quant_format import codes, grid_bits, linear_tensors

from ._onnx_graph import MS


def _codes(packed: dict, spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [K, N] uint8, scales [G, N] float32, zero [G, N] uint8, or float32 for float zero points) of one linear."""
    tensors = linear_tensors(packed, spec)
    if "g_idx" in tensors and not np.array_equal(tensors["g_idx"].numpy(), np.arange(spec["in_features"]) // spec["group_size"]):
        raise InputError(
            "g_idx is not arange(K) // group_size: a permuted (act-order) grid cannot be carried; re-quantize with `vcompress quantize` or export with --quant none"
        )
    q, scales, zero = codes(tensors, spec["bits"])
    zero = zero.numpy() if zero.is_floating_point() else zero.numpy().astype(np.uint8)
    return q.numpy().astype(np.uint8), scales.numpy(), zero


def matmulnbits_inputs(packed: dict, specs: list[dict]) -> dict:
    """B, scales, zero points (and attributes) for one MatMulNBits of linears concatenated along N."""
    if len({(s["bits"], s["group_size"], s["in_features"], "zeros" in s["tensors"]) for s in specs}) != 1:
        names = [s["tensors"]["scales"].rsplit(".", 1)[0] for s in specs]
        raise InputError(
            f"{names} share one MatMul but not bits, group size and zero-point kind; re-quantize them alike or export with --quant none"
        )
    bits, gs, k = specs[0]["bits"], specs[0]["group_size"], specs[0]["in_features"]
    parts = [_codes(packed, s) for s in specs]
    q = np.concatenate([p[0] for p in parts], axis=1)  # [K, N]
    scales = np.concatenate([p[1] for p in parts], axis=1)
    zero = np.concatenate([p[2] for p in parts], axis=1)
    n, groups = q.shape[1], k // gs
    rows = q.T.reshape(n, groups, gs).astype(np.uint8)
    b = rows if bits == 8 else (rows[..., 0::2] | (rows[..., 1::2] << 4)).astype(np.uint8)
    correction = None
    if zero.dtype == np.float32:  # split into an integer zero point and an exact float correction
        z_int = np.clip(np.round(zero), 0, 2**bits - 1)
        correction = np.ascontiguousarray((-scales * (zero - z_int)).astype(np.float32))  # [G, N]
        zero = z_int.astype(np.uint8)
    if bits == 8:
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


def graph_linears(arch: str, layers: int) -> dict[str, list[str]]:
    """Graph MatMul node -> the checkpoint linears it computes (in concatenation order)."""
    out = {}
    for i in range(layers):
        if arch == "gpt2":
            p = f"transformer.h.{i}."
            out.update(
                {
                    f"layers.{i}.attn.qkv_proj/MatMul": [p + "attn.c_attn"],
                    f"layers.{i}.attn.o_proj/MatMul": [p + "attn.c_proj"],
                    f"layers.{i}.mlp.fc/MatMul": [p + "mlp.c_fc"],
                    f"layers.{i}.mlp.down_proj/MatMul": [p + "mlp.c_proj"],
                }
            )
        else:
            p = f"model.layers.{i}."
            out[f"layers.{i}.attn.qkv_proj/MatMul"] = [p + f"self_attn.{x}_proj" for x in "qkv"]
            out[f"layers.{i}.attn.o_proj/MatMul"] = [p + "self_attn.o_proj"]
            out[f"layers.{i}.mlp.gate_up_proj/MatMul"] = [p + "mlp.gate_proj", p + "mlp.up_proj"]
            out[f"layers.{i}.mlp.down_proj/MatMul"] = [p + "mlp.down_proj"]
    out["lm_head/MatMul"] = ["lm_head"]
    return out


def carry(
    model: onnx.ModelProto, folder: str | Path, manifest: dict, arch: str, layers: int, accuracy_level: int
) -> tuple[onnx.ModelProto, dict]:
    """Replace every MatMul whose linears the checkpoint quantized by MatMulNBits with their grid."""
    from safetensors.torch import load_file

    packed = load_file(str(Path(folder) / manifest["weights_file"]))
    linears = manifest["linears"]
    targets = graph_linears(arch, layers)
    graph = model.graph
    nodes, replaced, kept_float, dropped = [], [], [], set()
    for node in graph.node:
        names = targets.get(node.name) if node.op_type == "MatMul" else None
        quantized = [n for n in names or [] if n in linears]
        if not quantized:
            if names:
                kept_float.append(node.name)
            nodes.append(node)
            continue
        if len(quantized) != len(names):
            raise InputError(
                f"{node.name} packs {names} but only {quantized} are quantized; re-quantize keeping all or none of them in float, or export with --quant none"
            )
        inputs = matmulnbits_inputs(packed, [linears[n] for n in names])
        stem = node.name.rsplit("/", 1)[0]
        init_names = [f"{stem}.weight_Q{inputs['bits']}", f"{stem}.weight_scales", f"{stem}.weight_zero_points"]
        graph.initializer.extend(
            numpy_helper.from_array(inputs[key], name) for key, name in zip(("B", "scales", "zero_points"), init_names)
        )
        attrs = {key: inputs[key] for key in ("K", "N", "bits", "block_size")}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        correction = inputs["correction"]
        main_out = list(node.output) if correction is None else [f"{stem}/MatMulNBits_out"]
        nodes.append(
            helper.make_node(
                "MatMulNBits", [node.input[0], *init_names], main_out, name=f"{node.name}_Q{inputs['bits']}", domain=MS, **attrs
            )
        )
        if correction is not None:
            nodes.extend(_float_zero_correction(graph, stem, node.input[0], main_out[0], node.output[0], correction, inputs["block_size"]))
        dropped.add(node.input[1])
        replaced.extend(names)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model, {
        "linears": len(replaced),
        "kept_float": kept_float,
        "method": manifest.get("method"),
        "bits": grid_bits(manifest),
        "group_size": sorted({s["group_size"] for s in linears.values()}),
    }


def _float_zero_correction(graph, stem: str, x: str, main: str, out: str, correction: np.ndarray, block: int) -> list:
    """out = main + groupsum(x) @ correction: the float part of the zero points (see the module doc)."""
    groups = correction.shape[0]
    names = {key: f"{stem}.zero_correction.{key}" for key in ("shape", "axes", "matrix")}
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0, 0, groups, block], dtype=np.int64), names["shape"]),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), names["axes"]),
            numpy_helper.from_array(correction, names["matrix"]),
        ]
    )
    grouped, sums, fix = (f"{stem}/zero_correction/{t}" for t in ("grouped", "sums", "fix"))
    return [
        helper.make_node("Reshape", [x, names["shape"]], [grouped], name=f"{stem}/zero_correction/Reshape"),
        helper.make_node("ReduceSum", [grouped, names["axes"]], [sums], name=f"{stem}/zero_correction/ReduceSum", keepdims=0),
        helper.make_node("MatMul", [sums, names["matrix"]], [fix], name=f"{stem}/zero_correction/MatMul"),
        helper.make_node("Add", [main, fix], [out], name=f"{stem}/zero_correction/Add"),
    ]
