"""Tiny Llama / Qwen2 models written as GGUF files with the `gguf` package, their linears in chosen block types.

gguf.quants quantizes Q4_0, Q4_1, Q5_0 and Q8_0; it has no K-quant quantizer, so Q4_K, Q5_K and Q6_K blocks are
drawn at random (random codes and sub-block scales, fp16 super-scales of a weight's size): any such bytes are a
valid block. The file holds what transformers needs to load it (hyperparameters and the tokenizer); Llama's q/k
rows are interleaved as llama.cpp's converter writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

T = gguf.GGMLQuantizationType
MADE_HERE = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0)


def blocks_of(w: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF bytes [rows, bytes per row] of a [rows, cols] tensor in `qtype`."""
    if qtype in MADE_HERE:
        return quantize(np.ascontiguousarray(w, np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (w.shape[0] * w.shape[1] // block, size), dtype=np.uint8)
    # fp16 super-scales: d (and dmin) so that weights come out near the float model's scale
    d = rng.uniform(0.2, 1.0, (len(raw), 2)).astype(np.float32) * float(np.abs(w).mean()) / 400
    field = d.astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:
        raw[:, -2:] = field[:, :2]
    else:
        raw[:, :4] = field
    return raw.reshape(w.shape[0], -1)


def _interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permute of Llama q/k rows (what transformers undoes on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output"}
LINEARS |= {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(
    model, tokenizer_dir: Path, path: Path, types: dict[str, T], table=T.F32, seed: int = 0, head: T | None = None
) -> dict[str, np.ndarray]:
    """Write `model` (a tiny Llama or Qwen2) as a GGUF with each linear in `types[gguf short name]` (default Q4_1), the
    token table in `table` and the LM head in `head` (default: `table`; given for a tied model, its table is written a
    second time as output.weight, as llama.cpp stores Qwen2.5's); returns the dequantized weight of every linear by its
    Hugging Face name ([out, in]), and of the two tables as "token_embd" and "output"."""
    rng = np.random.default_rng(seed)
    c, arch = model.config, model.config.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]) if getattr(c, "rope_parameters", None) else float(c.rope_theta))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    _tokenizer(w, tokenizer_dir, c.vocab_size)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    weights = {}

    def put(name: str, value: np.ndarray, qtype=T.F32) -> np.ndarray:
        if qtype == T.F32:
            w.add_tensor(name, np.ascontiguousarray(value, np.float32))
            return value
        raw = blocks_of(value, qtype, rng)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        return dequantize(raw, qtype).reshape(value.shape)

    weights["token_embd"] = put("token_embd.weight", state["model.embed_tokens.weight"], table)
    put("output_norm.weight", state["model.norm.weight"])
    if not c.tie_word_embeddings or head is not None:
        weights["output"] = put(
            "output.weight", state.get("lm_head.weight", state["model.embed_tokens.weight"]), table if head is None else head
        )
    for i in range(c.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        put(f"{blk}attn_norm.weight", state[f"{hf}input_layernorm.weight"])
        put(f"{blk}ffn_norm.weight", state[f"{hf}post_attention_layernorm.weight"])
        for module, short in LINEARS.items():
            value = state[f"{hf}{module}.weight"]
            heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(short) if arch == "llama" else None
            stored = put(f"{blk}{short}.weight", _interleave(value, heads) if heads else value, types.get(short, T.Q4_1))
            if heads:  # back to Hugging Face's row order
                stored = stored.reshape(heads, stored.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(stored.shape)
            weights[f"{hf}{module}"] = stored
            if f"{hf}{module}.bias" in state:
                put(f"{blk}{short}.bias", state[f"{hf}{module}.bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def _tokenizer(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """The byte-level BPE tokenizer of tests/tiny.py as GGUF's "gpt2" tokenizer fields."""
    spec = json.loads((Path(folder) / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [""] * vocab_size
    for token, i in vocab.items():
        if i < vocab_size:
            tokens[i] = token
    # transformers' GPT-2 tokenizer adds "<|endoftext|>" (its default unknown token) unless the vocabulary has it:
    # a model one token larger than the tokenizer holds it at the last id
    tokens = [t or "<|endoftext|>" for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {t["id"] for t in spec["added_tokens"]} | {vocab_size - 1}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab_size)])
    w.add_token_merges(merges)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
