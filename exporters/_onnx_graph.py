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

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from vcompress.core.errors import InputError

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

    def manifest_fields(self) -> dict:
        """The model's shape as an exported folder's manifest states it."""
        return {
            "architecture": self.arch,
            "layers": self.layers,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_positions": self.max_positions,
            "tied_embeddings": self.tied,
        }


@dataclass
class GraphBuilder:
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _names: set = field(default_factory=set)
    # Where each initializer's bytes go as it is made (an ExternalData file); None keeps them in the proto.
    store: ExternalData | None = None
    # Side tables (block scales, zero-point corrections) stored float16 and cast at load (`side`).
    compact: bool = False

    def weight(self, name: str, array) -> str:
        if isinstance(array, torch.Tensor):
            array = array.detach().to(torch.float32).cpu().numpy()
        return self.add(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def side(self, name: str, array: np.ndarray) -> str:
        """A float32 side table the kernels read (block scales, corrections): as is, or when `compact` stored
        float16 with a Cast to float32 that ONNX Runtime folds when it loads the model, so the kernels (and
        MatMulNBits' prepacking, which needs constant scales) see float32 as before, from half the bytes on disk."""
        if not self.compact:
            return self.weight(name, array)
        half = self.add(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float16), f"{name}_fp16"))
        return self.op("Cast", [half], [name], name=f"{name}/Cast", to=TensorProto.FLOAT)[0]

    def add(self, tensor: TensorProto) -> str:
        """Add a made initializer (its bytes go to the store at once, if there is one); returns its name."""
        if self.store is not None:
            self.store.write(tensor)
        self.initializers.append(tensor)
        return tensor.name

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


# onnx.save_model's size_threshold: smaller tensors stay inside model.onnx
EXTERNAL_THRESHOLD = 1024


class ExternalData:
    """model.onnx.data written while the graph is built: each initializer's bytes are appended as it is
    made and the proto keeps only where they are (location, offset, length). onnx's own functions write
    them, under onnx.save_model's rule (external from EXTERNAL_THRESHOLD on), so the file is the one
    `_onnx_quant.save` writes for the same proto, and the proto in memory holds no weight data."""

    def __init__(self, folder: Path, location: str):
        self.folder, self.location = Path(folder), location
        (self.folder / location).write_bytes(b"")

    def write(self, tensor: TensorProto) -> None:
        from onnx.external_data_helper import save_external_data, set_external_data

        if not tensor.HasField("raw_data") or sys.getsizeof(tensor.raw_data) < EXTERNAL_THRESHOLD:
            return
        set_external_data(tensor, self.location)
        save_external_data(tensor, str(self.folder))
        tensor.ClearField("raw_data")


TABLE = "embed_tokens.weight"  # the embedding table's initializer (its quantized forms: TABLE_Q, ...)


class Weights:
    """The checkpoint's tensors as the graph reads them, and the form each weight takes in it.

    `tensors` maps checkpoint names to tensors: a state dict, or a reader that loads one tensor from
    disk when asked (a streamed export). Here every weight is fp32: a MatMul per linear, a Gather on
    the embedding table, a Gemm(transB) on it for a tied head. Subclasses store them quantized as the
    graph is built (_onnx_quant.TableWeights: the tables; _onnx_gptq.CarriedWeights: a quantize folder's
    grid). `fp32_bytes` counts what the weights read take at fp32 (the size an fp32 export compares to)."""

    compact = False  # store side tables float16 (GraphBuilder.side)

    def __init__(self, tensors: Mapping):
        self.tensors = tensors
        self.fp32_bytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        tensor = self.tensors[name]
        self.fp32_bytes += tensor.numel() * 4
        return tensor

    def matmul(self, g: GraphBuilder, x: str, modules: list[str], name: str, transposed: bool = False) -> str:
        """x @ W for the checkpoint linears `modules` (sharing the input x) as one W [in, out], outputs concatenated."""
        parts = [self.read(f"{m}.weight") for m in modules]
        w = torch.cat(parts, dim=1) if transposed else torch.cat(parts).t()  # GPT-2's Conv1D keeps [in, out] already
        return g.one("MatMul", [x, g.weight(f"{name}.weight", w)], name=f"{name}/MatMul")

    def gather(self, g: GraphBuilder, table: str, key: str, indices: str, name: str) -> str:
        """Rows `indices` of the table `key` (the graph's initializer `table`)."""
        return g.one("Gather", [g.weight(table, self.read(key)), indices], name=name)

    def tied_head(self, g: GraphBuilder, x: str) -> str:
        """x [rows, hidden] @ the embedding table^T: the tied table is stored once."""
        return g.one("Gemm", [x, TABLE], name="lm_head/Gemm", transB=1)

    def untied_head(self, g: GraphBuilder, x: str) -> str:
        return self.matmul(g, x, ["lm_head"], "lm_head")


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


def build(model, weights: Weights | None = None, store: ExternalData | None = None) -> tuple[onnx.ModelProto, Dims]:
    """The decoder graph of a transformers Llama / Qwen2 / GPT-2 causal LM: `model` gives the config and
    the rotary tables (a meta-device skeleton will do), `weights` the tensors and their form (default:
    fp32 from the model's state dict); with a `store` the weight bytes go to its file as they are made."""
    d = dims_of(model.config)
    w = weights or Weights(model.state_dict())
    g = GraphBuilder(store=store, compact=w.compact)
    _lengths_from_mask(g)
    if d.arch == "gpt2":
        hidden = _gpt2_body(g, model, w, d)
    elif d.arch == "gemma3_text":
        hidden = _gemma3_body(g, model, w, d)
    else:
        hidden = _llama_body(g, model, w, d)
    _lm_head(g, w, d, hidden)
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


def _linear(g: GraphBuilder, w: Weights, x: str, modules: list[str], name: str, transposed: bool = False, bias: bool = True) -> str:
    """x @ W (+ b when the checkpoint has the linears' biases and `bias`). Weights are stored as [in, out]
    so MatMulNBits can replace the MatMul; linears sharing x (q/k/v, gate/up) are one MatMul."""
    y = w.matmul(g, x, modules, name, transposed)
    if not bias or f"{modules[0]}.bias" not in w:
        return y
    b = torch.cat([w.read(f"{m}.bias") for m in modules])
    return g.one("Add", [y, g.weight(f"{name}.bias", b)], name=f"{name}/Add")


def _attention(
    g: GraphBuilder, d: Dims, i: int, qkv: str | list[str], rotary: bool, *, caches: str = "", scale: float | None = None, window: int = -1
) -> str:
    """GroupQueryAttention over a packed qkv (or [q, k, v]); `caches`: the rotary tables' name suffix; `window`: a
    sliding-window layer's keys (ONNX Runtime's local_window_size; -1: all)."""
    qkv = [qkv, "", ""] if isinstance(qkv, str) else qkv
    inputs = [*qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length"]
    if rotary:
        inputs += [f"cos_cache{caches}", f"sin_cache{caches}"]
    local = {"local_window_size": window} if window > 0 else {}
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
        scale=float(d.head_dim**-0.5 if scale is None else scale),
        **local,
    )
    return out[0]


def _rotary_caches(g: GraphBuilder, model, d: Dims, layer_type: str | None = None, suffix: str = "") -> None:
    # The model's own rotary module, so any rope scaling it applies is the one exported. Gemma 3's takes the
    # layer type (a base for sliding layers, one for global ones): one pair of tables each, named with `suffix`.
    positions = torch.arange(d.max_positions).unsqueeze(0)
    probe = torch.zeros(1, 1, d.head_dim)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(probe, positions, *([layer_type] if layer_type else []))
    half = d.head_dim // 2
    cos, sin = cos[0, :, :half].numpy(), sin[0, :, :half].numpy()
    if g.compact and _rotary_in_graph(g, model, cos, sin, f"{layer_type}_" if layer_type else "", suffix):
        return
    g.weight(f"cos_cache{suffix}", cos)
    g.weight(f"sin_cache{suffix}", sin)


def _rotary_in_graph(g: GraphBuilder, model, cos: np.ndarray, sin: np.ndarray, prefix: str = "", suffix: str = "") -> bool:
    """cos/sin caches computed by the graph (positions x inv_freq, then Cos/Sin, times the module's
    attention scaling; ONNX Runtime folds them at load) instead of stored: a few hundred bytes instead of
    max_positions x head_dim floats. Only when that arithmetic, done here in float32 as ONNX Runtime does,
    gives the module's own tables (a rope scaling that is not a plain inv_freq keeps the stored tables)."""
    rotary = model.model.rotary_emb
    inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
    if inv_freq is None or inv_freq.is_meta:
        return False
    inv = inv_freq.detach().to(torch.float32).cpu().numpy()[None, :]
    scale = np.float32(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    angles = np.arange(cos.shape[0], dtype=np.float32)[:, None] * inv
    if inv.shape[1] != cos.shape[1] or max(np.abs(np.cos(angles) * scale - cos).max(), np.abs(np.sin(angles) * scale - sin).max()) > 1e-5:
        return False
    r = f"rotary{suffix}"
    scalars = [
        g.add(numpy_helper.from_array(np.array(v, np.float32), f"{r}.{n}"))
        for n, v in (("start", 0), ("limit", cos.shape[0]), ("delta", 1))
    ]
    positions = g.one("Range", scalars, name=f"{r}/Range")
    column = g.one("Unsqueeze", [positions, g.const(f"{r}.axes", [1])], name=f"{r}/Unsqueeze")
    freqs = g.one("Mul", [column, g.weight(f"{r}.inv_freq", inv)], name=f"{r}/Mul")
    for op, name in (("Cos", f"cos_cache{suffix}"), ("Sin", f"sin_cache{suffix}")):
        if scale == 1:
            g.op(op, [freqs], [name], name=f"{r}/{op}")
        else:
            raw = g.one(op, [freqs], name=f"{r}/{op}")
            g.op("Mul", [raw, g.const(f"{r}.scaling", float(scale), np.float32)], [name], name=f"{r}/{op}Scale")
    return True


def _llama_body(g: GraphBuilder, model, w: Weights, d: Dims) -> str:
    cfg = model.config
    eps = float(cfg.rms_norm_eps)
    _rotary_caches(g, model, d)
    x = w.gather(g, TABLE, "model.embed_tokens.weight", "input_ids", "embed_tokens/Gather")
    residual, branch = x, None
    for i in range(d.layers):
        p = f"model.layers.{i}."
        gamma = g.weight(f"layers.{i}.input_layernorm.weight", w.read(p + "input_layernorm.weight"))
        if branch is None:
            h = g.one(
                "SimplifiedLayerNormalization", [residual, gamma], name=f"layers.{i}.input_layernorm", axis=-1, epsilon=eps, stash_type=1
            )
        else:
            h, _, _, residual = g.op(
                "SkipSimplifiedLayerNormalization", [branch, residual, gamma], 4, name=f"layers.{i}.input_layernorm", domain=MS, epsilon=eps
            )
        qkv = _linear(g, w, h, [p + f"self_attn.{x}_proj" for x in "qkv"], f"layers.{i}.attn.qkv_proj")
        attn = _attention(g, d, i, qkv, rotary=True)
        branch = _linear(g, w, attn, [p + "self_attn.o_proj"], f"layers.{i}.attn.o_proj")
        gamma = g.weight(f"layers.{i}.post_attention_layernorm.weight", w.read(p + "post_attention_layernorm.weight"))
        h, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [branch, residual, gamma],
            4,
            name=f"layers.{i}.post_attention_layernorm",
            domain=MS,
            epsilon=eps,
        )
        # gate and up share their input: one MatMul (one MatMulNBits under int4) and a Split.
        gate_up = _linear(g, w, h, [p + "mlp.gate_proj", p + "mlp.up_proj"], f"layers.{i}.mlp.gate_up_proj")
        inner = cfg.intermediate_size
        gate, up = g.op("Split", [gate_up, g.const(f"layers.{i}.mlp.split", [inner, inner])], 2, name=f"layers.{i}.mlp/Split", axis=-1)
        act = _activation(g, gate, cfg.hidden_act, f"layers.{i}.mlp.act")
        prod = g.one("Mul", [act, up], name=f"layers.{i}.mlp/Mul")
        branch = _linear(g, w, prod, [p + "mlp.down_proj"], f"layers.{i}.mlp.down_proj")
    gamma = g.weight("norm.weight", w.read("model.norm.weight"))
    out, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [branch, residual, gamma], 4, name="norm", domain=MS, epsilon=eps)
    return out


def _gemma3_body(g: GraphBuilder, model, w: Weights, d: Dims) -> str:
    """Gemma 3: the embedding times sqrt(hidden) (the model's own scale), RMSNorms that weigh by 1 + gamma, four
    per layer (around attention and around the MLP), QK-norm before rotary, the query scaled by
    query_pre_attn_scalar, GeGLU, and sliding-window layers (their own rotary base, ONNX Runtime's
    local_window_size) between global ones."""
    cfg = model.config
    eps = float(cfg.rms_norm_eps)
    kinds = sorted(set(cfg.layer_types))
    for kind in kinds:
        _rotary_caches(g, model, d, kind, f"_{kind}")
    x = w.gather(g, TABLE, "model.embed_tokens.weight", "input_ids", "embed_tokens/Gather")
    scale = model.model.embed_tokens.embed_scale.detach().to(torch.float32).cpu().numpy()
    residual = g.one("Mul", [x, g.weight("embed_tokens.scale", scale)], name="embed_tokens/Scale")
    branch = None

    def norm(x: str, key: str, name: str, shape: list[int] | None = None) -> str:
        gamma = g.weight(f"{name}.weight", 1.0 + w.read(key).to(torch.float32))
        if shape is not None:  # per head: normalized over the head's features
            x = g.one("Reshape", [x, g.const(f"{name}.heads", shape)], name=f"{name}/Heads")
        y = g.one("SimplifiedLayerNormalization", [x, gamma], name=name, axis=-1, epsilon=eps, stash_type=1)
        return y if shape is None else g.one("Reshape", [y, g.const(f"{name}.flat", [0, 0, -1])], name=f"{name}/Flat")

    def add_norm(key: str, name: str) -> str:  # residual += branch, then the norm of the sum
        nonlocal residual
        gamma = g.weight(f"{name}.weight", 1.0 + w.read(key).to(torch.float32))
        h, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [branch, residual, gamma], 4, name=name, domain=MS, epsilon=eps)
        return h

    for i in range(d.layers):
        p, n = f"model.layers.{i}.", f"layers.{i}"
        h = (
            norm(residual, p + "input_layernorm.weight", f"{n}.input_layernorm")
            if branch is None
            else add_norm(p + "input_layernorm.weight", f"{n}.input_layernorm")
        )
        qkv = _linear(g, w, h, [p + f"self_attn.{x}_proj" for x in "qkv"], f"{n}.attn.qkv_proj")
        sizes = [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
        q, k, v = g.op("Split", [qkv, g.const(f"{n}.attn.split", sizes)], 3, name=f"{n}.attn/Split", axis=-1)
        q = norm(q, p + "self_attn.q_norm.weight", f"{n}.attn.q_norm", [0, 0, d.heads, d.head_dim])
        k = norm(k, p + "self_attn.k_norm.weight", f"{n}.attn.k_norm", [0, 0, d.kv_heads, d.head_dim])
        kind = cfg.layer_types[i]
        window = cfg.sliding_window if kind == "sliding_attention" else -1
        attn = _attention(g, d, i, [q, k, v], True, caches=f"_{kind}", scale=float(cfg.query_pre_attn_scalar) ** -0.5, window=window)
        branch = norm(
            _linear(g, w, attn, [p + "self_attn.o_proj"], f"{n}.attn.o_proj"),
            p + "post_attention_layernorm.weight",
            f"{n}.post_attention_layernorm",
        )
        h = add_norm(p + "pre_feedforward_layernorm.weight", f"{n}.pre_feedforward_layernorm")
        gate_up = _linear(g, w, h, [p + "mlp.gate_proj", p + "mlp.up_proj"], f"{n}.mlp.gate_up_proj")
        inner = cfg.intermediate_size
        gate, up = g.op("Split", [gate_up, g.const(f"{n}.mlp.split", [inner, inner])], 2, name=f"{n}.mlp/Split", axis=-1)
        act = _activation(g, gate, cfg.hidden_activation, f"{n}.mlp.act")
        down = _linear(g, w, g.one("Mul", [act, up], name=f"{n}.mlp/Mul"), [p + "mlp.down_proj"], f"{n}.mlp.down_proj")
        branch = norm(down, p + "post_feedforward_layernorm.weight", f"{n}.post_feedforward_layernorm")
    return add_norm("model.norm.weight", "norm")


def _gpt2_body(g: GraphBuilder, model, w: Weights, d: Dims) -> str:
    cfg = model.config
    eps = float(cfg.layer_norm_epsilon)
    tok = w.gather(g, TABLE, "transformer.wte.weight", "input_ids", "embed_tokens/Gather")
    pos = w.gather(g, "embed_positions.weight", "transformer.wpe.weight", "position_ids", "embed_positions/Gather")
    residual = g.one("Add", [tok, pos], name="embeddings/Add")
    branch, branch_bias = None, None
    for i in range(d.layers):
        p = f"transformer.h.{i}."
        gamma = g.weight(f"layers.{i}.ln_1.weight", w.read(p + "ln_1.weight"))
        beta = g.weight(f"layers.{i}.ln_1.bias", w.read(p + "ln_1.bias"))
        if branch is None:
            h = g.one("LayerNormalization", [residual, gamma, beta], name=f"layers.{i}.ln_1", axis=-1, epsilon=eps)
        else:
            h, _, _, residual = g.op(
                "SkipLayerNormalization", [branch, residual, gamma, beta, branch_bias], 4, name=f"layers.{i}.ln_1", domain=MS, epsilon=eps
            )
        # GPT-2's Conv1D keeps weights as [in, out] already; the projections' biases feed the next op.
        qkv = _linear(g, w, h, [p + "attn.c_attn"], f"layers.{i}.attn.qkv_proj", transposed=True)
        attn = _attention(g, d, i, qkv, rotary=False)
        branch = _linear(g, w, attn, [p + "attn.c_proj"], f"layers.{i}.attn.o_proj", transposed=True, bias=False)
        branch_bias = g.weight(f"layers.{i}.attn.o_proj.bias", w.read(p + "attn.c_proj.bias"))
        gamma = g.weight(f"layers.{i}.ln_2.weight", w.read(p + "ln_2.weight"))
        beta = g.weight(f"layers.{i}.ln_2.bias", w.read(p + "ln_2.bias"))
        h, _, _, residual = g.op(
            "SkipLayerNormalization", [branch, residual, gamma, beta, branch_bias], 4, name=f"layers.{i}.ln_2", domain=MS, epsilon=eps
        )
        fc = _linear(g, w, h, [p + "mlp.c_fc"], f"layers.{i}.mlp.fc", transposed=True, bias=False)
        act = _activation(
            g, fc, cfg.activation_function, f"layers.{i}.mlp.act", bias=g.weight(f"layers.{i}.mlp.fc.bias", w.read(p + "mlp.c_fc.bias"))
        )
        branch = _linear(g, w, act, [p + "mlp.c_proj"], f"layers.{i}.mlp.down_proj", transposed=True, bias=False)
        branch_bias = g.weight(f"layers.{i}.mlp.down_proj.bias", w.read(p + "mlp.c_proj.bias"))
    gamma = g.weight("norm.weight", w.read("transformer.ln_f.weight"))
    beta = g.weight("norm.bias", w.read("transformer.ln_f.bias"))
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
    raise InputError(
        f"the ONNX exporter has no {kind!r} activation (it has silu, gelu, gelu_new, relu); this checkpoint cannot be exported to ONNX yet"
    )


def _lm_head(g: GraphBuilder, w: Weights, d: Dims, hidden: str) -> None:
    # Only the last `logits_to_keep` positions reach the vocabulary projection: a 256-token
    # prompt needs one row of logits to start decoding, not 256. It is an initializer listed as
    # an input: 1 unless the caller feeds it (our scoring asks for every position).
    g.const("logits_to_keep", [1])
    start = g.one("Neg", ["logits_to_keep"], name="logits_to_keep/Neg")
    last = g.one(
        "Slice", [hidden, start, g.const("int64_max", [np.iinfo(np.int64).max]), g.const("axis_1", [1])], name="logits_to_keep/Slice"
    )
    if d.tied:
        # The tied embedding is stored once: the head reads the Gather's table.
        flat = g.one("Reshape", [last, g.const("shape_rows_hidden", [-1, d.hidden])], name="lm_head/Flatten")
        logits = w.tied_head(g, flat)
        shape = g.one("Shape", [last], name="lm_head/Shape", end=2)
        full = g.one("Concat", [shape, g.const("vocab", [d.vocab])], name="lm_head/Concat", axis=0)
        g.op("Reshape", [logits, full], ["logits"], name="lm_head/Reshape")
    else:
        y = w.untied_head(g, last)
        if "lm_head.bias" in w:
            y = g.one("Add", [y, g.weight("lm_head.bias", w.read("lm_head.bias"))], name="lm_head/Add")
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
