"""Carry the quantize stage's exact grid (GPTQ / RTN / INT8 codes, scales, zero points) into MatMulNBits.

The hand-off is a file format, not an import (compress/ and exporters/ do not import each other):
a quantized folder holds quant_manifest.json ("format": "vcompress.quant/1") describing, per linear,
  qweight int32 [K*bits/32, N]  codes along K, low bits first
  qzeros  int32 [G, N*bits/32]  integer zero points along N (stored as is), or zeros float32 [G, N]
  scales  float16 [G, N]        g_idx int32 [K] == arange(K) // group_size
  W[k, n] = float32(scales[g, n]) * (q[k, n] - zero[g, n]),  g = k // group_size;  y = x @ W + bias
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

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ._onnx_graph import MS

FORMAT = "vcompress.quant/1"
MANIFEST = "quant_manifest.json"


def quant_manifest(source) -> dict | None:
    """The quantize stage's manifest if `source` is one of its folders, else None."""
    path = getattr(source, "path", source)
    if path is None:
        return None
    file = Path(str(path)) / MANIFEST
    if not file.is_file():
        return None
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file} has format {manifest.get('format')!r}; this exporter reads {FORMAT!r}")
    return manifest


def grid_bits(manifest: dict) -> int:
    bits = {spec["bits"] for spec in manifest["linears"].values()}
    if len(bits) != 1:
        raise ValueError(f"mixed bit widths {sorted(bits)} in one checkpoint are not exported")
    return bits.pop()


def load_dequantized(folder: str | Path, manifest: dict):
    """(model, tokenizer): a float32 transformers model whose quantized linears hold W as the
    quantized model computes it (the parity reference), built without gptqmodel."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    state = load_file(str(folder / "model.safetensors"))
    packed = state if manifest["weights_file"] == "model.safetensors" else load_file(str(folder / manifest["weights_file"]))
    for name, spec in manifest["linears"].items():
        w = torch.from_numpy(dequantize(packed, spec))  # [in, out]
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
        raise ValueError(f"{folder}: weights do not match the config (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def codes(packed: dict, spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [K, N] uint8, scales [G, N] float32, zero [G, N] uint8 or float32) of one linear."""
    bits, k, n = spec["bits"], spec["in_features"], spec["out_features"]
    t = {key: _numpy(packed[name]) for key, name in spec["tensors"].items()}
    if "g_idx" in t and not np.array_equal(t["g_idx"], np.arange(k) // spec["group_size"]):
        raise ValueError("g_idx is not arange(K) // group_size: a permuted (act-order) grid cannot be carried")
    q = _unpack(t["qweight"], bits, axis=0)[:k]
    if "zeros" in t:
        zero = t["zeros"].astype(np.float32)
    else:
        zero = _unpack(t["qzeros"], bits, axis=1)[:, :n]
    return q, t["scales"].astype(np.float32), zero


def dequantize(packed: dict, spec: dict) -> np.ndarray:
    """W [in, out] float32 by the manifest's math."""
    q, scales, zero = codes(packed, spec)
    g = np.arange(spec["in_features"]) // spec["group_size"]
    return scales[g] * (q.astype(np.float32) - zero[g].astype(np.float32))


def matmulnbits_inputs(packed: dict, specs: list[dict]) -> dict:
    """B, scales, zero points (and attributes) for one MatMulNBits of linears concatenated along N."""
    if len({(s["bits"], s["group_size"], s["in_features"], "zeros" in s["tensors"]) for s in specs}) != 1:
        raise ValueError("linears packed into one MatMul must share bits, group size, input size and zero-point kind")
    bits, gs, k = specs[0]["bits"], specs[0]["group_size"], specs[0]["in_features"]
    parts = [codes(packed, s) for s in specs]
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
    return {"B": np.ascontiguousarray(b), "scales": np.ascontiguousarray(scales.T), "zero_points": zp,
            "K": k, "N": n, "bits": bits, "block_size": gs, "correction": correction}


def graph_linears(arch: str, layers: int) -> dict[str, list[str]]:
    """Graph MatMul node -> the checkpoint linears it computes (in concatenation order)."""
    out = {}
    for i in range(layers):
        if arch == "gpt2":
            p = f"transformer.h.{i}."
            out.update({f"layers.{i}.attn.qkv_proj/MatMul": [p + "attn.c_attn"], f"layers.{i}.attn.o_proj/MatMul": [p + "attn.c_proj"],
                        f"layers.{i}.mlp.fc/MatMul": [p + "mlp.c_fc"], f"layers.{i}.mlp.down_proj/MatMul": [p + "mlp.c_proj"]})
        else:
            p = f"model.layers.{i}."
            out[f"layers.{i}.attn.qkv_proj/MatMul"] = [p + f"self_attn.{x}_proj" for x in "qkv"]
            out[f"layers.{i}.attn.o_proj/MatMul"] = [p + "self_attn.o_proj"]
            out[f"layers.{i}.mlp.gate_up_proj/MatMul"] = [p + "mlp.gate_proj", p + "mlp.up_proj"]
            out[f"layers.{i}.mlp.down_proj/MatMul"] = [p + "mlp.down_proj"]
    out["lm_head/MatMul"] = ["lm_head"]
    return out


def carry(model: onnx.ModelProto, folder: str | Path, manifest: dict, arch: str, layers: int, accuracy_level: int) -> tuple[onnx.ModelProto, dict]:
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
            raise ValueError(f"{node.name} packs {names} but only {quantized} are quantized: cannot carry a partial grid")
        inputs = matmulnbits_inputs(packed, [linears[n] for n in names])
        stem = node.name.rsplit("/", 1)[0]
        init_names = [f"{stem}.weight_Q{inputs['bits']}", f"{stem}.weight_scales", f"{stem}.weight_zero_points"]
        graph.initializer.extend(numpy_helper.from_array(inputs[key], name)
                                 for key, name in zip(("B", "scales", "zero_points"), init_names))
        attrs = {key: inputs[key] for key in ("K", "N", "bits", "block_size")}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        correction = inputs["correction"]
        main_out = list(node.output) if correction is None else [f"{stem}/MatMulNBits_out"]
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *init_names], main_out,
                                      name=f"{node.name}_Q{inputs['bits']}", domain=MS, **attrs))
        if correction is not None:
            nodes.extend(_float_zero_correction(graph, stem, node.input[0], main_out[0], node.output[0], correction, inputs["block_size"]))
        dropped.add(node.input[1])
        replaced.extend(names)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model, {"linears": len(replaced), "kept_float": kept_float, "method": manifest.get("method"),
                   "bits": grid_bits(manifest), "group_size": sorted({s["group_size"] for s in linears.values()})}


def _float_zero_correction(graph, stem: str, x: str, main: str, out: str, correction: np.ndarray, block: int) -> list:
    """out = main + groupsum(x) @ correction: the float part of the zero points (see the module doc)."""
    groups = correction.shape[0]
    names = {key: f"{stem}.zero_correction.{key}" for key in ("shape", "axes", "matrix")}
    graph.initializer.extend([
        numpy_helper.from_array(np.array([0, 0, groups, block], dtype=np.int64), names["shape"]),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), names["axes"]),
        numpy_helper.from_array(correction, names["matrix"]),
    ])
    grouped, sums, fix = (f"{stem}/zero_correction/{t}" for t in ("grouped", "sums", "fix"))
    return [
        helper.make_node("Reshape", [x, names["shape"]], [grouped], name=f"{stem}/zero_correction/Reshape"),
        helper.make_node("ReduceSum", [grouped, names["axes"]], [sums], name=f"{stem}/zero_correction/ReduceSum", keepdims=0),
        helper.make_node("MatMul", [sums, names["matrix"]], [fix], name=f"{stem}/zero_correction/MatMul"),
        helper.make_node("Add", [main, fix], [out], name=f"{stem}/zero_correction/Add"),
    ]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


def _unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words to codes along `axis` (low bits first): [R, C] -> [R*32/bits, C] or [R, C*32/bits]."""
    per = 32 // bits
    w = words.astype(np.int64) & 0xFFFFFFFF
    shifts = np.arange(per, dtype=np.int64) * bits
    mask = (1 << bits) - 1
    if axis == 0:
        return ((w[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, w.shape[1]).astype(np.uint8)
    return ((w[:, :, None] >> shifts[None, None, :]) & mask).reshape(w.shape[0], -1).astype(np.uint8)
