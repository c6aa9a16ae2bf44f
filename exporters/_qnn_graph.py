"""The decoder as the Hexagon NPU (QNN HTP) takes it: static shapes and plain ONNX ops.

The ONNX exporter's graph (_onnx_graph.py) uses ONNX Runtime's fused contrib ops (GroupQueryAttention,
SkipSimplifiedLayerNormalization) and dynamic lengths, which the QNN execution provider cannot place on the
HTP. This builds the same decoder from the same weights with the same GraphBuilder, but as one "step" of
`seq` tokens over a fixed-size cache of `cache` slots, attention written out (MatMul, Softmax) and every
shape static. Two steps are exported: prefill (seq = the chunk length) and decode (seq = 1).

inputs   input_ids int32 [1, seq]; position_ids int32 [1, seq];
         attention_bias float32 [1, 1, seq, cache + seq]: 0 where a query may attend (a filled cache slot,
         or itself and the new tokens before it), MASKED elsewhere; the host builds it;
         past_key.{i} / past_value.{i} float32 [1, kv_heads, cache, head_dim]
outputs  logits float32 [1, seq, vocab]; new_key.{i} / new_value.{i} float32 [1, kv_heads, seq, head_dim]:
         the host writes them into its cache at the step's positions (the graph never copies the cache).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper

from vcompress.core.errors import InputError

from ._onnx_graph import Dims, GraphBuilder, Weights, _activation, _linear, _rotary_caches, dims_of

OPSET = 23  # RMSNormalization, which ONNX's shape inference (and so the quantizer's calibration) knows

# An additive bias, not -inf: the scores are quantized (uint16) over their calibrated range, which must stay
# narrow; exp(-100) next to any attended score is 0 in float32 already.
MASKED = -100.0


def step_io(d: Dims, seq: int, cache: int) -> tuple[dict, dict]:
    """The step graph's inputs and outputs: name -> (numpy dtype, shape)."""
    kv_in, kv_out = [1, d.kv_heads, cache, d.head_dim], [1, d.kv_heads, seq, d.head_dim]
    inputs = {
        "input_ids": (np.int32, [1, seq]),
        "position_ids": (np.int32, [1, seq]),
        "attention_bias": (np.float32, [1, 1, seq, cache + seq]),
    }
    outputs = {"logits": (np.float32, [1, seq, d.vocab])}
    for i in range(d.layers):
        inputs |= {f"past_key.{i}": (np.float32, kv_in), f"past_value.{i}": (np.float32, kv_in)}
        outputs |= {f"new_key.{i}": (np.float32, kv_out), f"new_value.{i}": (np.float32, kv_out)}
    return inputs, outputs


def build_step(model, weights: Weights, seq: int, cache: int) -> tuple[onnx.ModelProto, Dims]:
    """The step graph of a Llama / Qwen2 causal LM (rotary, RMSNorm, gated MLP) with fp32 weights."""
    d = dims_of(model.config)
    if d.arch == "gpt2":
        raise InputError(
            "the qnn exporter builds Llama-style decoders (rotary, RMSNorm); GPT-2 is not supported: export it to onnx instead"
        )
    g = GraphBuilder()
    _rotary_caches(g, model, dataclasses.replace(d, max_positions=cache))  # positions past the cache never occur
    bias = g.one("Tile", ["attention_bias", g.const("bias_repeats", [1, 1, d.heads // d.kv_heads, 1])], name="attention_bias/Tile")
    cos, sin = (_rotary_rows(g, table, seq) for table in ("cos_cache", "sin_cache"))
    x = weights.gather(g, "embed_tokens.weight", "model.embed_tokens.weight", "input_ids", "embed_tokens/Gather")
    eps = float(model.config.rms_norm_eps)
    for i in range(d.layers):
        p = f"model.layers.{i}."
        h = _rms_norm(g, weights, x, p + "input_layernorm.weight", f"layers.{i}.input_layernorm", eps)
        qkv = _linear(g, weights, h, [p + f"self_attn.{x}_proj" for x in "qkv"], f"layers.{i}.attn.qkv_proj")
        attn = _attention(g, d, i, qkv, seq, cos, sin, bias)
        o = _linear(g, weights, attn, [p + "self_attn.o_proj"], f"layers.{i}.attn.o_proj")
        x = g.one("Add", [x, o], name=f"layers.{i}.attn/residual")
        h = _rms_norm(g, weights, x, p + "post_attention_layernorm.weight", f"layers.{i}.post_attention_layernorm", eps)
        gate_up = _linear(g, weights, h, [p + "mlp.gate_proj", p + "mlp.up_proj"], f"layers.{i}.mlp.gate_up_proj")
        inner = model.config.intermediate_size
        gate, up = g.op("Split", [gate_up, g.const(f"layers.{i}.mlp.split", [inner, inner])], 2, name=f"layers.{i}.mlp/Split", axis=-1)
        act = _activation(g, gate, model.config.hidden_act, f"layers.{i}.mlp.act")
        down = _linear(g, weights, g.one("Mul", [act, up], name=f"layers.{i}.mlp/Mul"), [p + "mlp.down_proj"], f"layers.{i}.mlp.down_proj")
        x = g.one("Add", [x, down], name=f"layers.{i}.mlp/residual")
    h = _rms_norm(g, weights, x, "model.norm.weight", "norm", eps)
    # The head as a MatMul over its own [hidden, vocab] copy of a tied table: the HTP runs MatMul with
    # per-channel weights, while the Gather's table is quantized as an activation.
    head = ["model.embed_tokens"] if d.tied else ["lm_head"]
    g.op("Identity", [weights.matmul(g, h, head, "lm_head")], ["logits"], name="lm_head/Identity")
    return _assemble(g, d, seq, cache), d


def float_nodes(model: onnx.ModelProto, wide_mlps=()) -> list[str]:
    """The nodes that stay in float (fp16 on the HTP): the residual stream's adds and the RMSNorms that read it, and the
    product and down projection of the MLPs in `wide_mlps`. Some models carry a few "massive activations" in the
    stream, written by a few MLPs (SmolLM2-135M: about 26,000 from layer 11's down_proj), which leave a uint16 grid
    over such a tensor a step of 0.4, far coarser than its ordinary values."""
    wide = {f"layers.{i}.mlp/Mul" for i in wide_mlps} | {f"layers.{i}.mlp.down_proj/MatMul" for i in wide_mlps}
    return [n.name for n in model.graph.node if n.op_type == "RMSNormalization" or n.name.endswith("/residual") or n.name in wide]


def _rotary_rows(g: GraphBuilder, table: str, seq: int) -> str:
    """The table's rows at position_ids, both halves: [1, 1, seq, head_dim]."""
    rows = g.one("Gather", [table, "position_ids"], name=f"{table}/Gather")
    full = g.one("Concat", [rows, rows], name=f"{table}/Concat", axis=-1)
    return g.one("Unsqueeze", [full, g.const(f"{table}.axes", [1])], name=f"{table}/Unsqueeze")


def _rms_norm(g: GraphBuilder, w: Weights, x: str, key: str, name: str, eps: float) -> str:
    gamma = g.weight(f"{name}.weight", w.read(key))
    return g.one("RMSNormalization", [x, gamma], name=name, axis=-1, epsilon=eps, stash_type=1)


def _heads(g: GraphBuilder, x: str, n: int, d: Dims, seq: int, name: str) -> str:
    """[1, seq, n * head_dim] -> [1, n, seq, head_dim]."""
    split = g.one("Reshape", [x, g.const(f"{name}.shape", [1, seq, n, d.head_dim])], name=f"{name}/Reshape")
    return g.one("Transpose", [split], name=f"{name}/Transpose", perm=[0, 2, 1, 3])


def _rotate(g: GraphBuilder, x: str, d: Dims, cos: str, sin: str, name: str) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] (transformers' Llama rotary)."""
    half = d.head_dim // 2
    axis = g.const(f"{name}.axis", [-1])
    x1 = g.one("Slice", [x, g.const(f"{name}.s0", [0]), g.const(f"{name}.e0", [half]), axis], name=f"{name}/Slice1")
    x2 = g.one("Slice", [x, g.const(f"{name}.s1", [half]), g.const(f"{name}.e1", [d.head_dim]), axis], name=f"{name}/Slice2")
    rotated = g.one("Concat", [g.one("Neg", [x2], name=f"{name}/Neg"), x1], name=f"{name}/Concat", axis=-1)
    return g.one(
        "Add",
        [g.one("Mul", [x, cos], name=f"{name}/MulCos"), g.one("Mul", [rotated, sin], name=f"{name}/MulSin")],
        name=f"{name}/Add",
    )


def _attention(g: GraphBuilder, d: Dims, i: int, qkv: str, seq: int, cos: str, sin: str, bias: str) -> str:
    """Grouped-query attention over [past cache ; this step's keys]. The query heads sharing a KV head are
    stacked along the rows ([1, kv_heads, groups * seq, head_dim]), so no key or value is repeated."""
    n = f"layers.{i}.attn"
    groups = d.heads // d.kv_heads
    sizes = [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
    q, k, v = g.op("Split", [qkv, g.const(f"{n}.split", sizes)], 3, name=f"{n}/Split", axis=-1)
    q = _rotate(g, _heads(g, q, d.heads, d, seq, f"{n}.q"), d, cos, sin, f"{n}.q_rotary")
    g.op(
        "Identity",
        [_rotate(g, _heads(g, k, d.kv_heads, d, seq, f"{n}.k"), d, cos, sin, f"{n}.k_rotary")],
        [f"new_key.{i}"],
        name=f"{n}/new_key",
    )
    g.op("Identity", [_heads(g, v, d.kv_heads, d, seq, f"{n}.v")], [f"new_value.{i}"], name=f"{n}/new_value")
    keys = g.one("Concat", [f"past_key.{i}", f"new_key.{i}"], name=f"{n}/keys", axis=2)
    values = g.one("Concat", [f"past_value.{i}", f"new_value.{i}"], name=f"{n}/values", axis=2)
    rows = g.one("Reshape", [q, g.const(f"{n}.rows", [1, d.kv_heads, groups * seq, d.head_dim])], name=f"{n}/q_rows")
    scaled = g.one("Mul", [rows, g.const(f"{n}.scale", d.head_dim**-0.5, np.float32)], name=f"{n}/scale")
    keys_t = g.one("Transpose", [keys], name=f"{n}/keys_T", perm=[0, 1, 3, 2])
    scores = g.one("Add", [g.one("MatMul", [scaled, keys_t], name=f"{n}/scores"), bias], name=f"{n}/mask")
    probs = g.one("Softmax", [scores], name=f"{n}/Softmax", axis=-1)
    context = g.one("MatMul", [probs, values], name=f"{n}/context")
    heads = g.one("Reshape", [context, g.const(f"{n}.heads", [1, d.heads, seq, d.head_dim])], name=f"{n}/heads")
    tokens = g.one("Transpose", [heads], name=f"{n}/tokens", perm=[0, 2, 1, 3])
    return g.one("Reshape", [tokens, g.const(f"{n}.merge", [1, seq, d.heads * d.head_dim])], name=f"{n}/merge")


def _assemble(g: GraphBuilder, d: Dims, seq: int, cache: int) -> onnx.ModelProto:
    inputs, outputs = step_io(d, seq, cache)
    info = lambda name, spec: helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(spec[0])), spec[1])  # noqa: E731
    # int32 ids: the HTP has no int64 tensors
    graph = helper.make_graph(
        g.nodes, f"{d.arch}-step{seq}", [info(n, s) for n, s in inputs.items()], [info(n, s) for n, s in outputs.items()], g.initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vcompress")
    model.ir_version = 10
    return model
