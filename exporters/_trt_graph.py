"""A Llama / Qwen2 decoder with a KV cache as one ONNX graph of standard operators only, for TensorRT's parser.

Why not our ONNX graph (_onnx_graph.py): it is built on ONNX Runtime's com.microsoft operators
(GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization), which TensorRT's ONNX parser does not
take. This graph spells the same model with MatMul, Softmax, Mul/ReduceMean/Sqrt/Div, Slice/Concat and
DequantizeLinear (checked node by node against TensorRT 10's operator matrix by _trt_ops.py):
- weights: float (fp16 or fp32), or INT4/INT8 codes with a symmetric per-block scale read through opset-21
  `DequantizeLinear(axis=0, block_size=B)` (no zero point: TensorRT wants it zero), then MatMul; the
  embedding table (and a tied head) stays float;
- RMSNorm and softmax compute in fp32 (Cast in, Cast out), as transformers does, so fp16 cannot overflow there;
- rotary: rows [past, past + seq) sliced from cos/sin tables, rotate-half by Split/Neg/Concat;
- attention: query heads reshaped to [batch, kv_heads, group, seq, head_dim] so one MatMul broadcasts each KV
  head over its group (GQA without copying K/V), a causal mask from Range/Less, the cache grown by Concat.
One graph serves prefill and decode (dynamic seq and past_seq). It returns logits for every position, so no
input feeds a shape computation (a TensorRT shape-tensor input would need values in every profile).

inputs   input_ids int64 [batch, seq]; past_key_values.{i}.key / .value [batch, kv_heads, past_seq, head_dim]
outputs  logits float32 [batch, seq, vocab]; present.{i}.key / .value [batch, kv_heads, past_seq + seq, head_dim]
(the cache in the graph's float type: float16 or float32)
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from vcompress.core.errors import InputError

from ._onnx_graph import Dims, GraphBuilder, dims_of

OPSET = 21  # blocked DequantizeLinear (block_size) needs 21; TensorRT 10.15's parser takes opsets 9 to 24
FLOATS = {"fp16": (np.float16, TensorProto.FLOAT16, "float16"), "fp32": (np.float32, TensorProto.FLOAT, "float32")}
CODES = {"int4": (4, TensorProto.INT4), "int8": (8, TensorProto.INT8)}
ARCHS = ("llama", "qwen2", "gemma3_text")


def build(model, *, precision: str = "fp16", weights: str = "int4", block_size: int = 128) -> tuple[onnx.ModelProto, Dims, dict]:
    """The decoder graph, its dims, and the block size each quantized linear got ({} for float weights)."""
    d = dims_of(model.config)
    if d.arch not in ARCHS:
        raise InputError(
            f"the TensorRT graph is written for {', '.join(ARCHS)}, not {d.arch}; export {d.arch} with `vcompress export onnx`"
        )
    g = _Builder(precision, weights, block_size)
    sd = model.state_dict()
    hidden = (_gemma3_body if d.arch == "gemma3_text" else _body)(g, model, sd, d)
    _lm_head(g, sd, d, hidden)
    return _assemble(g, d), d, g.blocks


class _Builder(GraphBuilder):
    def __init__(self, precision: str, weights: str, block_size: int):
        super().__init__()
        self.np_float, self.float_type, _ = FLOATS[precision]
        self.weights, self.block_size, self.blocks = weights, block_size, {}

    def floats(self, name: str, tensor) -> str:
        array = tensor.detach().float().cpu().numpy() if isinstance(tensor, torch.Tensor) else tensor
        return self.weight(name, array.astype(self.np_float))

    def cast(self, x: str, to: int, name: str) -> str:
        return x if to == self.float_type == TensorProto.FLOAT else self.one("Cast", [x], name=name, to=to)

    def linear(self, x: str, weight: torch.Tensor, name: str, bias: torch.Tensor | None = None) -> str:
        """x @ W^T (+ b), W stored [in, out]; quantized weights go through DequantizeLinear."""
        w = weight.detach().float().t().contiguous()
        if self.weights in CODES:
            bits, code_type = CODES[self.weights]
            block = fitting_block(w.shape[0], self.block_size)
            codes, scale = symmetric_blocks(w, bits, block, self.np_float)
            self.blocks[name] = block
            packed = helper.make_tensor(f"{name}.codes", code_type, list(codes.shape), pack(codes, bits), raw=True)
            self.initializers.append(packed)
            w_name = self.one(
                "DequantizeLinear",
                [packed.name, self.weight(f"{name}.scale", scale)],
                name=f"{name}/DequantizeLinear",
                axis=0,
                block_size=block,
            )
        else:
            w_name = self.floats(f"{name}.weight", w)
        y = self.one("MatMul", [x, w_name], name=f"{name}/MatMul")
        return self.one("Add", [y, self.floats(f"{name}.bias", bias)], name=f"{name}/Add") if bias is not None else y


def fitting_block(rows: int, wanted: int) -> int:
    """The largest power-of-two block from `wanted` down to 16 that divides the input dimension."""
    block = wanted
    while block >= 16 and rows % block:
        block //= 2
    if block < 16:
        raise InputError(f"input dimension {rows} has no power-of-two block of 16 or more; export with --weights fp16")
    return block


def symmetric_blocks(w: torch.Tensor, bits: int, block: int, scale_type) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest symmetric codes [in, out] int8 and scales [in / block, out]: W ~= codes * scale."""
    top = 2 ** (bits - 1) - 1
    blocks = w.reshape(w.shape[0] // block, block, w.shape[1])
    scale = (blocks.abs().amax(dim=1) / top).clamp_min(1e-8).numpy().astype(scale_type)
    exact = torch.from_numpy(scale.astype(np.float32)).unsqueeze(1)  # the codes against the scale as stored
    codes = torch.round(blocks / exact).clamp(-top - 1, top).to(torch.int8).reshape(w.shape)
    return codes.numpy(), scale


def pack(codes: np.ndarray, bits: int) -> bytes:
    """ONNX raw data: int8 as is; int4 two to a byte, the first element in the low nibble."""
    if bits == 8:
        return codes.astype(np.int8).tobytes()
    flat = codes.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _rms_norm(g: _Builder, x: str, gamma: torch.Tensor, eps: float, name: str) -> str:
    xf = g.cast(x, TensorProto.FLOAT, f"{name}/CastIn")
    mean = g.one("ReduceMean", [g.one("Mul", [xf, xf], name=f"{name}/Square"), "axis_last"], name=f"{name}/ReduceMean", keepdims=1)
    rms = g.one(
        "Sqrt", [g.one("Add", [mean, g.weight(f"{name}.eps", np.array(eps, np.float32))], name=f"{name}/AddEps")], name=f"{name}/Sqrt"
    )
    normed = g.cast(g.one("Div", [xf, rms], name=f"{name}/Div"), g.float_type, f"{name}/CastOut")
    return g.one("Mul", [normed, g.floats(f"{name}.weight", gamma)], name=f"{name}/Mul")


def _positions(g: _Builder, model, d: Dims) -> None:
    """Shared per call: past and total lengths, the rows of the rotary tables, the causal mask [seq, total]."""
    g.const("axis_last", [-1])
    g.const("axis_0", [0])
    g.const("axis_1", [1])
    g.const("axis_2", [2])
    past = g.one("Shape", ["past_key_values.0.key"], name="past_len", start=2, end=3)
    seq = g.one("Shape", ["input_ids"], name="seq_len", start=1, end=2)
    total = g.one("Add", [past, seq], name="total_len")
    # Gemma 3: a rotary base per layer type (tables cos_<type>), and sliding layers see the last `window` keys only
    kinds = sorted(set(model.config.layer_types)) if d.arch == "gemma3_text" else [None]
    for kind in kinds:
        with torch.no_grad():  # the model's own rotary module, so its rope scaling is the one exported
            positions = torch.arange(d.max_positions).unsqueeze(0)
            cos, sin = model.model.rotary_emb(torch.zeros(1, 1, d.head_dim), positions, *([kind] if kind else []))
        for which, table in (("cos", cos[0]), ("sin", sin[0])):
            name = f"{which}_{kind}" if kind else which
            g.op("Slice", [g.floats(f"{name}_table", table), past, total, "axis_0"], [name], name=f"rotary/{name}")
    scalar = [g.one("Squeeze", [t, "axis_0"], name=f"{n}/Squeeze") for t, n in ((past, "past"), (total, "total"))]
    one, zero = g.const("one", 1), g.const("zero", 0)
    rows = g.one("Unsqueeze", [g.one("Range", [scalar[0], scalar[1], one], name="query_positions"), "axis_1"], name="query_positions/col")
    cols = g.one("Range", [zero, scalar[1], one], name="key_positions")
    g.op("Less", [rows, cols], ["future"], name="causal_mask")
    if "sliding_attention" in kinds:
        oldest = g.one("Sub", [rows, g.const("window", model.config.sliding_window)], name="window/oldest")
        g.op("LessOrEqual", [cols, oldest], ["outside_window"], name="window_mask")
    g.weight("masked", np.array(np.finfo(np.float32).min, np.float32))


def _rotate(g: _Builder, x: str, d: Dims, name: str, kind: str | None = None) -> str:
    first, second = g.op("Split", [x, g.const(f"{name}.halves", [d.head_dim // 2] * 2)], 2, name=f"{name}/Split", axis=-1)
    rotated = g.one("Concat", [g.one("Neg", [second], name=f"{name}/Neg"), first], name=f"{name}/Concat", axis=-1)
    return g.one(
        "Add",
        [
            g.one("Mul", [x, f"cos_{kind}" if kind else "cos"], name=f"{name}/MulCos"),
            g.one("Mul", [rotated, f"sin_{kind}" if kind else "sin"], name=f"{name}/MulSin"),
        ],
        name=f"{name}/Add",
    )


def _heads(g: _Builder, x: str, heads: int, d: Dims, name: str) -> str:
    """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]"""
    split = g.one("Reshape", [x, g.const(f"{name}.shape", [0, 0, heads, d.head_dim])], name=f"{name}/Reshape")
    return g.one("Transpose", [split], name=f"{name}/Transpose", perm=[0, 2, 1, 3])


def _attention(g: _Builder, d: Dims, i: int, q: str, k: str, v: str, *, kind: str | None = None, norms=None, scale=None) -> str:
    """`kind`: a Gemma 3 layer type (its rotary tables; sliding: the window mask); `norms`: QK-norm as (q, k) ->
    (q, k) on [batch, heads, seq, head_dim] before rotary; `scale`: the scores' (default head_dim^-0.5)."""
    n, group = f"layers.{i}.attn", d.heads // d.kv_heads
    q, k = _heads(g, q, d.heads, d, f"{n}.q"), _heads(g, k, d.kv_heads, d, f"{n}.k")
    if norms is not None:
        q, k = norms(q, k)
    q = _rotate(g, q, d, f"{n}.q_rotary", kind)
    k = _rotate(g, k, d, f"{n}.k_rotary", kind)
    v = _heads(g, v, d.kv_heads, d, f"{n}.v")
    key = g.one("Concat", [f"past_key_values.{i}.key", k], name=f"{n}/ConcatKey", axis=2)
    value = g.one("Concat", [f"past_key_values.{i}.value", v], name=f"{n}/ConcatValue", axis=2)
    g.op("Identity", [key], [f"present.{i}.key"], name=f"{n}/PresentKey")
    g.op("Identity", [value], [f"present.{i}.value"], name=f"{n}/PresentValue")
    # each KV head serves `group` query heads: [b, kv, group, seq, hd] x [b, kv, 1, hd, total]
    q5 = g.one("Reshape", [q, g.const(f"{n}.grouped", [0, d.kv_heads, group, -1, d.head_dim])], name=f"{n}/GroupQueries")
    k5 = g.one("Transpose", [g.one("Unsqueeze", [key, "axis_2"], name=f"{n}/KeyGroup")], name=f"{n}/KeyT", perm=[0, 1, 2, 4, 3])
    scores = g.cast(g.one("MatMul", [q5, k5], name=f"{n}/Scores"), TensorProto.FLOAT, f"{n}/ScoresFloat")
    scale = d.head_dim**-0.5 if scale is None else scale
    scaled = g.one("Mul", [scores, g.weight(f"{n}.scale", np.array(scale, np.float32))], name=f"{n}/Scale")
    masked = g.one("Where", ["future", "masked", scaled], name=f"{n}/Mask")
    if kind == "sliding_attention":
        masked = g.one("Where", ["outside_window", "masked", masked], name=f"{n}/WindowMask")
    probs = g.one("Softmax", [masked], name=f"{n}/Softmax", axis=-1)
    probs = g.cast(probs, g.float_type, f"{n}/ProbsCast")
    out = g.one("MatMul", [probs, g.one("Unsqueeze", [value, "axis_2"], name=f"{n}/ValueGroup")], name=f"{n}/Context")
    out = g.one("Reshape", [out, g.const(f"{n}.heads", [0, d.heads, -1, d.head_dim])], name=f"{n}/Heads")
    out = g.one("Transpose", [out], name=f"{n}/Transpose", perm=[0, 2, 1, 3])
    return g.one("Reshape", [out, g.const(f"{n}.merged", [0, 0, d.heads * d.head_dim])], name=f"{n}/Merge")


def _body(g: _Builder, model, sd: dict, d: Dims) -> str:
    eps = float(model.config.rms_norm_eps)
    _positions(g, model, d)
    x = g.one("Gather", [g.floats("embed_tokens.weight", sd["model.embed_tokens.weight"]), "input_ids"], name="embed_tokens/Gather")
    for i in range(d.layers):
        p = f"model.layers.{i}."
        h = _rms_norm(g, x, sd[p + "input_layernorm.weight"], eps, f"layers.{i}.input_layernorm")
        qkv = [
            g.linear(h, sd[f"{p}self_attn.{w}_proj.weight"], f"layers.{i}.attn.{w}_proj", sd.get(f"{p}self_attn.{w}_proj.bias"))
            for w in "qkv"
        ]
        attn = _attention(g, d, i, *qkv)
        x = g.one("Add", [x, g.linear(attn, sd[p + "self_attn.o_proj.weight"], f"layers.{i}.attn.o_proj")], name=f"layers.{i}/AttnResidual")
        h = _rms_norm(g, x, sd[p + "post_attention_layernorm.weight"], eps, f"layers.{i}.post_attention_layernorm")
        gate = g.linear(h, sd[p + "mlp.gate_proj.weight"], f"layers.{i}.mlp.gate_proj")
        up = g.linear(h, sd[p + "mlp.up_proj.weight"], f"layers.{i}.mlp.up_proj")
        silu = g.one("Mul", [gate, g.one("Sigmoid", [gate], name=f"layers.{i}.mlp/Sigmoid")], name=f"layers.{i}.mlp/SiLU")
        down = g.linear(g.one("Mul", [silu, up], name=f"layers.{i}.mlp/Mul"), sd[p + "mlp.down_proj.weight"], f"layers.{i}.mlp.down_proj")
        x = g.one("Add", [x, down], name=f"layers.{i}/MlpResidual")
    return _rms_norm(g, x, sd["model.norm.weight"], eps, "norm")


def _gemma3_body(g: _Builder, model, sd: dict, d: Dims) -> str:
    """Gemma 3 (as _onnx_graph._gemma3_body): scaled embedding, 1 + gamma RMSNorms (four per layer, QK-norm),
    the query_pre_attn_scalar scale, GeGLU (tanh GELU from Tanh/Mul/Add), sliding layers masked to the window."""
    cfg = model.config
    eps = float(cfg.rms_norm_eps)
    norm = lambda x, key, name: _rms_norm(g, x, 1.0 + sd[key].to(torch.float32), eps, name)  # noqa: E731
    _positions(g, model, d)
    x = g.one("Gather", [g.floats("embed_tokens.weight", sd["model.embed_tokens.weight"]), "input_ids"], name="embed_tokens/Gather")
    x = g.one("Mul", [x, g.floats("embed_tokens.scale", model.model.embed_tokens.embed_scale)], name="embed_tokens/Scale")
    for i in range(d.layers):
        p, n = f"model.layers.{i}.", f"layers.{i}"
        h = norm(x, p + "input_layernorm.weight", f"{n}.input_layernorm")
        qkv = [g.linear(h, sd[f"{p}self_attn.{w}_proj.weight"], f"{n}.attn.{w}_proj") for w in "qkv"]

        def qk_norm(q, k, p=p, n=n):
            return norm(q, p + "self_attn.q_norm.weight", f"{n}.attn.q_norm"), norm(k, p + "self_attn.k_norm.weight", f"{n}.attn.k_norm")

        scale = float(cfg.query_pre_attn_scalar) ** -0.5
        attn = _attention(g, d, i, *qkv, kind=cfg.layer_types[i], norms=qk_norm, scale=scale)
        out = norm(
            g.linear(attn, sd[p + "self_attn.o_proj.weight"], f"{n}.attn.o_proj"),
            p + "post_attention_layernorm.weight",
            f"{n}.post_attention_layernorm",
        )
        x = g.one("Add", [x, out], name=f"{n}/AttnResidual")
        h = norm(x, p + "pre_feedforward_layernorm.weight", f"{n}.pre_feedforward_layernorm")
        gate = g.linear(h, sd[p + "mlp.gate_proj.weight"], f"{n}.mlp.gate_proj")
        up = g.linear(h, sd[p + "mlp.up_proj.weight"], f"{n}.mlp.up_proj")
        down = g.linear(
            g.one("Mul", [_gelu_tanh(g, gate, f"{n}.mlp.act"), up], name=f"{n}.mlp/Mul"),
            sd[p + "mlp.down_proj.weight"],
            f"{n}.mlp.down_proj",
        )
        x = g.one(
            "Add", [x, norm(down, p + "post_feedforward_layernorm.weight", f"{n}.post_feedforward_layernorm")], name=f"{n}/MlpResidual"
        )
    return norm(x, "model.norm.weight", "norm")


def _gelu_tanh(g: _Builder, x: str, name: str) -> str:
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), transformers' gelu_pytorch_tanh, in standard ops."""
    c = lambda label, v: g.floats(f"{name}.{label}", torch.tensor(v))  # noqa: E731
    cube = g.one("Mul", [g.one("Mul", [x, x], name=f"{name}/Square"), x], name=f"{name}/Cube")
    inner = g.one("Add", [x, g.one("Mul", [cube, c("k", 0.044715)], name=f"{name}/MulK")], name=f"{name}/Inner")
    t = g.one("Tanh", [g.one("Mul", [inner, c("c", (2 / np.pi) ** 0.5)], name=f"{name}/MulC")], name=f"{name}/Tanh")
    half = g.one("Mul", [x, c("half", 0.5)], name=f"{name}/Half")
    return g.one("Mul", [half, g.one("Add", [t, c("one", 1.0)], name=f"{name}/AddOne")], name=f"{name}/Mul")


def _lm_head(g: _Builder, sd: dict, d: Dims, hidden: str) -> None:
    if d.tied:  # the table is stored once: the head reads it through Gemm(transB)
        flat = g.one("Reshape", [hidden, g.const("shape_rows_hidden", [-1, d.hidden])], name="lm_head/Flatten")
        rows = g.one("Gemm", [flat, "embed_tokens.weight"], name="lm_head/Gemm", transB=1)
        shape = g.one(
            "Concat", [g.one("Shape", [hidden], name="lm_head/Shape", end=2), g.const("vocab", [d.vocab])], name="lm_head/Concat", axis=0
        )
        logits = g.one("Reshape", [rows, shape], name="lm_head/Reshape")
    else:
        logits = g.linear(hidden, sd["lm_head.weight"], "lm_head", sd.get("lm_head.bias"))
    g.op("Cast", [logits], ["logits"], name="logits/Cast", to=TensorProto.FLOAT)


def _assemble(g: _Builder, d: Dims) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", d.vocab])]
    for i in range(d.layers):
        for part in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{part}", g.float_type, ["batch", d.kv_heads, "past_seq", d.head_dim])
            )
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{part}", g.float_type, ["batch", d.kv_heads, "total_seq", d.head_dim])
            )
    graph = helper.make_graph(g.nodes, f"{d.arch}-decoder-standard-ops", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vcompress")
    model.ir_version = 10
    return model
