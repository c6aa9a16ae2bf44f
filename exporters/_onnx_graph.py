"""Write a causal LM as one ONNX decoder graph with a KV cache, built op by op from its weights.

Why this and not a tracer. We compared three ways to get a decoder with past key/values:
- transformers 5.23's own exporter (`transformers.exporters.OnnxExporter`) goes through
  torch.export + torch.onnx (dynamo), needs onnxscript (not installed), writes separate prefill and
  decode programs, and its ONNX Runtime fusions are pattern rewrites we would have to re-check on
  every transformers release;
- `torch.onnx.export` of a small wrapper (dynamo or TorchScript) gives a graph of hundreds of small
  ops per layer (rotary, repeat_kv, masks, concat of the cache): the issue measured such a graph at
  50 tok/s fp32 on this host, a quarter of which is per-op overhead, and the concat-based cache
  copies the whole past every token;
- writing the graph directly from the weights with ONNX Runtime's fused contrib ops
  (GroupQueryAttention with rotary and an in-place KV buffer, SkipSimplifiedLayerNormalization,
  one packed QKV MatMul and one packed gate/up MatMul per layer) gives ~10 nodes per layer, a
  cache that can be preallocated and shared between past and present, and MatMul nodes that
  MatMulNBits replaces one for one.
We chose the last: three architectures (Llama with GQA, Qwen2, GPT-2) are small and regular, the
graph is checked against PyTorch by every export (parity), and nothing depends on a tracer. The cost:
the file needs ONNX Runtime (com.microsoft ops), which is the runtime every profile with
`format: onnx` names.

Layout (also written into manifest.json by exporters/onnx.py), the inputs ONNX Runtime GenAI feeds
(exporters/_onnx_genai.py writes its genai_config.json beside the graph):
inputs   input_ids int64 [batch, seq]; attention_mask int64 [batch, total_seq] (ones: tokens in the
         cache after this call; GroupQueryAttention's seqlens_k and total_sequence_length are
         computed from it in the graph); position_ids int64 [batch, seq] (GPT-2 only: learned
         position embeddings); past_key_values.{i}.key / .value float32 [batch, kv_heads, past_seq, head_dim]
         logits_to_keep int64 [1] is an overridable initializer, 1 by default: the last N positions
         get logits. A runtime that does not feed it (ORT GenAI) gets the last position only.
outputs  logits float32 [batch, 1, vocab] (declared 1: ORT GenAI reads that as last-token logits;
         [batch, logits_to_keep, vocab] when fed); present.{i}.key / .value float32
         [batch, kv_heads, max(total_seq, past_seq), head_dim]. A past buffer longer than the
         sequence so far is used in place: bind present to the same memory (see the runner).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
MS = "com.microsoft"


@dataclass
class Dims:
    arch: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_positions: int
    tied: bool


@dataclass
class GraphBuilder:
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _names: set = field(default_factory=set)

    def weight(self, name: str, array) -> str:
        if isinstance(array, torch.Tensor):
            array = array.detach().to(torch.float32).cpu().numpy()
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        return self.weight(name, np.array(values, dtype=dtype))

    def op(
        self, op_type: str, inputs: list[str], outputs: list[str] | int = 1, name: str | None = None, domain: str = "", **attrs
    ) -> list[str]:
        name = name or f"{op_type}_{len(self.nodes)}"
        if name in self._names:
            raise ValueError(f"node name {name} used twice")
        self._names.add(name)
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def one(self, *args, **kwargs) -> str:
        return self.op(*args, **kwargs)[0]


def dims_of(config) -> Dims:
    if config.model_type == "gpt2":
        heads = config.n_head
        return Dims(
            "gpt2", config.n_layer, heads, heads, config.n_embd // heads, config.n_embd, config.vocab_size, config.n_positions, True
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Dims(
        config.model_type,
        config.num_hidden_layers,
        heads,
        config.num_key_value_heads or heads,
        head_dim,
        config.hidden_size,
        config.vocab_size,
        config.max_position_embeddings,
        bool(getattr(config, "tie_word_embeddings", False)),
    )


def io_names(d: Dims) -> tuple[list[str], list[str]]:
    """The inputs a caller must feed (not logits_to_keep, which has a default) and the outputs."""
    inputs = ["input_ids", "attention_mask"]
    if d.arch == "gpt2":
        inputs.append("position_ids")
    outputs = ["logits"]
    for i in range(d.layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def build(model) -> tuple[onnx.ModelProto, Dims]:
    """The fp32 decoder graph of a transformers Llama / Qwen2 / GPT-2 causal LM."""
    d = dims_of(model.config)
    g = GraphBuilder()
    sd = {k: v for k, v in model.state_dict().items()}
    _lengths_from_mask(g)
    if d.arch == "gpt2":
        hidden = _gpt2_body(g, model, sd, d)
    else:
        hidden = _llama_body(g, model, sd, d)
    _lm_head(g, model, sd, d, hidden)
    return _assemble(g, d), d


def _lengths_from_mask(g: GraphBuilder) -> None:
    """GroupQueryAttention's seqlens_k (per row: tokens in the cache after this call, minus one) and
    total_sequence_length, both int32, from the attention mask ORT GenAI feeds. Rows are left-aligned
    (no left padding), so the mask's sum is the row's length."""
    one = g.const("one", [1])
    tokens = g.one("ReduceSum", ["attention_mask", one], name="attention_mask/ReduceSum", keepdims=0)
    last = g.one("Sub", [tokens, one], name="attention_mask/Sub")
    g.op("Cast", [last], ["seqlens_k"], name="seqlens_k/Cast", to=TensorProto.INT32)
    total = g.one("Shape", ["attention_mask"], name="attention_mask/Shape", start=1, end=2)
    scalar = g.one("Squeeze", [total], name="attention_mask/Squeeze")
    g.op("Cast", [scalar], ["total_sequence_length"], name="total_sequence_length/Cast", to=TensorProto.INT32)


def _linear(g: GraphBuilder, x: str, weight: torch.Tensor, name: str, bias: torch.Tensor | None = None, transposed: bool = False) -> str:
    """x @ W^T (+ b). Weights are stored as [in, out] so MatMulNBits can replace the MatMul."""
    w = weight if transposed else weight.t()
    y = g.one("MatMul", [x, g.weight(f"{name}.weight", w)], name=f"{name}/MatMul")
    if bias is not None:
        y = g.one("Add", [y, g.weight(f"{name}.bias", bias)], name=f"{name}/Add")
    return y


def _attention(g: GraphBuilder, d: Dims, i: int, qkv: str, rotary: bool) -> str:
    inputs = [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length"]
    if rotary:
        inputs += ["cos_cache", "sin_cache"]
    out = g.op(
        "GroupQueryAttention",
        inputs,
        [f"layers.{i}.attn/out", f"present.{i}.key", f"present.{i}.value"],
        name=f"layers.{i}.attn/GroupQueryAttention",
        domain=MS,
        num_heads=d.heads,
        kv_num_heads=d.kv_heads,
        do_rotary=int(rotary),
        rotary_interleaved=0,
        scale=float(d.head_dim**-0.5),
    )
    return out[0]


def _rotary_caches(g: GraphBuilder, model, d: Dims) -> None:
    # The model's own rotary module, so any rope scaling it applies is the one exported.
    positions = torch.arange(d.max_positions).unsqueeze(0)
    probe = torch.zeros(1, 1, d.head_dim)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(probe, positions)
    half = d.head_dim // 2
    g.weight("cos_cache", cos[0, :, :half])
    g.weight("sin_cache", sin[0, :, :half])


def _llama_body(g: GraphBuilder, model, sd: dict, d: Dims) -> tuple[str, str]:
    cfg = model.config
    eps = float(cfg.rms_norm_eps)
    _rotary_caches(g, model, d)
    x = g.one("Gather", [g.weight("embed_tokens.weight", sd["model.embed_tokens.weight"]), "input_ids"], name="embed_tokens/Gather")
    residual, branch = x, None
    for i in range(d.layers):
        p = f"model.layers.{i}."
        gamma = g.weight(f"layers.{i}.input_layernorm.weight", sd[p + "input_layernorm.weight"])
        if branch is None:
            h = g.one(
                "SimplifiedLayerNormalization", [residual, gamma], name=f"layers.{i}.input_layernorm", axis=-1, epsilon=eps, stash_type=1
            )
        else:
            h, _, _, residual = g.op(
                "SkipSimplifiedLayerNormalization", [branch, residual, gamma], 4, name=f"layers.{i}.input_layernorm", domain=MS, epsilon=eps
            )
        w_qkv = torch.cat([sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"]])
        b_qkv = None
        if p + "self_attn.q_proj.bias" in sd:
            b_qkv = torch.cat([sd[p + "self_attn.q_proj.bias"], sd[p + "self_attn.k_proj.bias"], sd[p + "self_attn.v_proj.bias"]])
        qkv = _linear(g, h, w_qkv, f"layers.{i}.attn.qkv_proj", b_qkv)
        attn = _attention(g, d, i, qkv, rotary=True)
        branch = _linear(g, attn, sd[p + "self_attn.o_proj.weight"], f"layers.{i}.attn.o_proj", sd.get(p + "self_attn.o_proj.bias"))
        gamma = g.weight(f"layers.{i}.post_attention_layernorm.weight", sd[p + "post_attention_layernorm.weight"])
        h, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [branch, residual, gamma],
            4,
            name=f"layers.{i}.post_attention_layernorm",
            domain=MS,
            epsilon=eps,
        )
        # gate and up share their input: one MatMul (one MatMulNBits under int4) and a Split.
        w_gu = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        b_gu = torch.cat([sd[p + "mlp.gate_proj.bias"], sd[p + "mlp.up_proj.bias"]]) if p + "mlp.gate_proj.bias" in sd else None
        gate_up = _linear(g, h, w_gu, f"layers.{i}.mlp.gate_up_proj", b_gu)
        inner = sd[p + "mlp.gate_proj.weight"].shape[0]
        gate, up = g.op("Split", [gate_up, g.const(f"layers.{i}.mlp.split", [inner, inner])], 2, name=f"layers.{i}.mlp/Split", axis=-1)
        act = _activation(g, gate, cfg.hidden_act, f"layers.{i}.mlp.act")
        prod = g.one("Mul", [act, up], name=f"layers.{i}.mlp/Mul")
        branch = _linear(g, prod, sd[p + "mlp.down_proj.weight"], f"layers.{i}.mlp.down_proj", sd.get(p + "mlp.down_proj.bias"))
    gamma = g.weight("norm.weight", sd["model.norm.weight"])
    out, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [branch, residual, gamma], 4, name="norm", domain=MS, epsilon=eps)
    return out


def _gpt2_body(g: GraphBuilder, model, sd: dict, d: Dims) -> str:
    cfg = model.config
    eps = float(cfg.layer_norm_epsilon)
    tok = g.one("Gather", [g.weight("embed_tokens.weight", sd["transformer.wte.weight"]), "input_ids"], name="embed_tokens/Gather")
    pos = g.one("Gather", [g.weight("embed_positions.weight", sd["transformer.wpe.weight"]), "position_ids"], name="embed_positions/Gather")
    residual = g.one("Add", [tok, pos], name="embeddings/Add")
    branch, branch_bias = None, None
    for i in range(d.layers):
        p = f"transformer.h.{i}."
        gamma = g.weight(f"layers.{i}.ln_1.weight", sd[p + "ln_1.weight"])
        beta = g.weight(f"layers.{i}.ln_1.bias", sd[p + "ln_1.bias"])
        if branch is None:
            h = g.one("LayerNormalization", [residual, gamma, beta], name=f"layers.{i}.ln_1", axis=-1, epsilon=eps)
        else:
            h, _, _, residual = g.op(
                "SkipLayerNormalization", [branch, residual, gamma, beta, branch_bias], 4, name=f"layers.{i}.ln_1", domain=MS, epsilon=eps
            )
        # GPT-2's Conv1D keeps weights as [in, out] already.
        qkv = _linear(g, h, sd[p + "attn.c_attn.weight"], f"layers.{i}.attn.qkv_proj", sd[p + "attn.c_attn.bias"], transposed=True)
        attn = _attention(g, d, i, qkv, rotary=False)
        branch = _linear(g, attn, sd[p + "attn.c_proj.weight"], f"layers.{i}.attn.o_proj", transposed=True)
        branch_bias = g.weight(f"layers.{i}.attn.o_proj.bias", sd[p + "attn.c_proj.bias"])
        gamma = g.weight(f"layers.{i}.ln_2.weight", sd[p + "ln_2.weight"])
        beta = g.weight(f"layers.{i}.ln_2.bias", sd[p + "ln_2.bias"])
        h, _, _, residual = g.op(
            "SkipLayerNormalization", [branch, residual, gamma, beta, branch_bias], 4, name=f"layers.{i}.ln_2", domain=MS, epsilon=eps
        )
        fc = _linear(g, h, sd[p + "mlp.c_fc.weight"], f"layers.{i}.mlp.fc", transposed=True)
        act = _activation(
            g, fc, cfg.activation_function, f"layers.{i}.mlp.act", bias=g.weight(f"layers.{i}.mlp.fc.bias", sd[p + "mlp.c_fc.bias"])
        )
        branch = _linear(g, act, sd[p + "mlp.c_proj.weight"], f"layers.{i}.mlp.down_proj", transposed=True)
        branch_bias = g.weight(f"layers.{i}.mlp.down_proj.bias", sd[p + "mlp.c_proj.bias"])
    gamma = g.weight("norm.weight", sd["transformer.ln_f.weight"])
    beta = g.weight("norm.bias", sd["transformer.ln_f.bias"])
    out, _, _, _ = g.op("SkipLayerNormalization", [branch, residual, gamma, beta, branch_bias], 4, name="norm", domain=MS, epsilon=eps)
    return out


def _activation(g: GraphBuilder, x: str, kind: str, name: str, bias: str | None = None) -> str:
    if bias is not None and kind not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        x, bias = g.one("Add", [x, bias], name=f"{name}/Add"), None
    if kind in ("silu", "swish"):
        return g.one("Mul", [x, g.one("Sigmoid", [x], name=f"{name}/Sigmoid")], name=f"{name}/Mul")
    if kind in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):  # tanh approximation
        return g.one("FastGelu", [x] + ([bias] if bias else []), name=f"{name}/FastGelu", domain=MS)
    if kind == "gelu":
        return g.one("Gelu", [x], name=f"{name}/Gelu", domain=MS)
    if kind == "relu":
        return g.one("Relu", [x], name=f"{name}/Relu")
    raise ValueError(f"activation {kind!r} is not exported yet")


def _lm_head(g: GraphBuilder, model, sd: dict, d: Dims, hidden: str) -> None:
    # Only the last `logits_to_keep` positions reach the vocabulary projection: a 256-token
    # prompt needs one row of logits to start decoding, not 256. It is an initializer listed as
    # an input: 1 unless the caller feeds it (our scoring asks for every position).
    g.const("logits_to_keep", [1])
    start = g.one("Neg", ["logits_to_keep"], name="logits_to_keep/Neg")
    last = g.one(
        "Slice", [hidden, start, g.const("int64_max", [np.iinfo(np.int64).max]), g.const("axis_1", [1])], name="logits_to_keep/Slice"
    )
    if d.tied:
        # The tied embedding is stored once: the head reads the Gather's table through Gemm(transB).
        flat = g.one("Reshape", [last, g.const("shape_rows_hidden", [-1, d.hidden])], name="lm_head/Flatten")
        logits = g.one("Gemm", [flat, "embed_tokens.weight"], name="lm_head/Gemm", transB=1)
        shape = g.one("Shape", [last], name="lm_head/Shape", end=2)
        full = g.one("Concat", [shape, g.const("vocab", [d.vocab])], name="lm_head/Concat", axis=0)
        g.op("Reshape", [logits, full], ["logits"], name="lm_head/Reshape")
    else:
        y = _linear(g, last, sd["lm_head.weight"], "lm_head", sd.get("lm_head.bias"))
        g.op("Identity", [y], ["logits"], name="lm_head/Identity")


def _assemble(g: GraphBuilder, d: Dims) -> onnx.ModelProto:
    kv = ["batch", d.kv_heads, "past_seq", d.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"]),
    ]
    if d.arch == "gpt2":
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    # Declared [batch, 1, vocab], what the default logits_to_keep gives: ORT GenAI then expects
    # last-token logits at prefill instead of one row per prompt token.
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, d.vocab])]
    for i in range(d.layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{part}", TensorProto.FLOAT, kv))
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{part}", TensorProto.FLOAT, ["batch", d.kv_heads, "present_seq", d.head_dim])
            )
    inputs.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
    graph = helper.make_graph(g.nodes, f"{d.arch}-decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)], producer_name="vcompress")
    model.ir_version = 10
    return model
