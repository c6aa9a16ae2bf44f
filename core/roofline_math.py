"""The roofline arithmetic: latency ceilings and peak RAM from shapes and byte counts alone.

Pure Python on config.json fields, so both devices/roofline_estimate.py (estimating an exported artifact from its
files) and compress/ (predicting the artifact a plan would export, before any work) use the same sums.
devices/roofline_estimate.py explains the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from .models import attention_shape
from .profiles import Device
from .units import MIB

DEFAULT_DECODE_TOKENS = 64
# What each runtime holds beside the file's weights, measured on the build host by bench/runtime_ram.py
RUNTIME_MEMORY = Path(__file__).with_name("runtime_memory.json")


def shapes(config: dict) -> dict:
    """Layers, heads, sizes and parameter counts that the roofline needs, from config.json."""
    ns = SimpleNamespace(**config)
    shape = attention_shape(ns)
    h, layers = shape["hidden_size"], shape["layers"]
    q, kv = shape["query_heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    gated = config.get("model_type") != "gpt2"  # Llama/Qwen2 MLPs have gate, up and down projections
    inter = config.get("intermediate_size") or config.get("n_inner") or 4 * h
    per_layer = h * q + 2 * h * kv + q * h + (3 if gated else 2) * h * inter
    vocab = config["vocab_size"]
    return {
        **shape,
        "model_type": config.get("model_type"),
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tied": bool(config.get("tie_word_embeddings", config.get("model_type") == "gpt2")),
        "body_params": layers * per_layer,  # matmul weights inside the layers
        "head_params": h * vocab,  # the vocabulary projection
    }


def roofline(shape: dict, weights: dict, device: Device, prompt_tokens: int, decode_tokens: int, kv_element_bytes: int = 4) -> dict:
    """Ceilings and expectations from shapes and byte counts alone (pure arithmetic, no files)."""
    P, N = prompt_tokens, decode_tokens
    bandwidth = device.memory_bandwidth_gbs * 1e9  # bytes/s
    compute = device.peak_compute_gflops * 1e9  # FLOP/s
    kv_per_token = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * kv_element_bytes
    mean_context = P + (N - 1) / 2  # the decode steps see P, P+1, ..., P+N-1 cached tokens
    bytes_per_token = weights["per_token_bytes"] + kv_per_token * mean_context
    attention_per_token = 4 * shape["layers"] * shape["query_heads"] * shape["head_dim"] * mean_context
    flops_per_token = 2 * (shape["body_params"] + shape["head_params"]) + attention_per_token
    # Decode is bandwidth bound on every device we know, but the compute roof is checked too.
    decode_ceiling = min(bandwidth / bytes_per_token, compute / flops_per_token)

    attention_flops = 2 * shape["layers"] * shape["query_heads"] * shape["head_dim"] * P * (P + 1)  # 2 matmuls x 2 FLOP x causal P(P+1)/2
    prompt_flops = 2 * shape["body_params"] * P + 2 * shape["head_params"] + attention_flops
    compute_floor_s = prompt_flops / compute
    memory_floor_s = weights["per_token_bytes"] / bandwidth
    ttft_floor_s = max(compute_floor_s, memory_floor_s)

    return {
        "ttft_ms": ttft_floor_s / device.prefill_efficiency * 1e3,
        "decode_tokens_per_s": decode_ceiling * device.decode_efficiency,
        "ttft_floor_ms": ttft_floor_s * 1e3,
        "decode_ceiling_tokens_per_s": decode_ceiling,
        "ttft_bound": "compute" if compute_floor_s >= memory_floor_s else "memory",
        "decode_bound": "memory" if bandwidth / bytes_per_token <= compute / flops_per_token else "compute",
        "decode_flops_per_token": flops_per_token,
        "prompt_flops": prompt_flops,
        "attention_flops": attention_flops,
        "weight_bytes_per_token": weights["per_token_bytes"],
        "kv_bytes_per_token_of_context": kv_per_token,
        "mean_decode_context_tokens": mean_context,
        "bytes_read_per_decode_token": bytes_per_token,
        "memory_bandwidth_gbs": device.memory_bandwidth_gbs,
        "peak_compute_gflops": device.peak_compute_gflops,
        "prefill_efficiency": device.prefill_efficiency,
        "decode_efficiency": device.decode_efficiency,
    }


def peak_ram_bytes(shape: dict, weights: dict, prompt_tokens: int, decode_tokens: int, kv_element_bytes: int = 4) -> int:
    """The model's part of resident memory: all stored weights, the KV cache at the full context, and
    the prefill's largest activations (attention scores of one layer, MLP hidden, the last logits).
    A lower bound on the process: process_ram_bytes adds the runtime's own."""
    P, context = prompt_tokens, prompt_tokens + decode_tokens
    kv = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * kv_element_bytes * context
    activations = 4 * (shape["query_heads"] * P * P + 2 * P * shape["intermediate_size"] + shape["vocab_size"])
    return weights["stored_bytes"] + kv + activations


def runtime_memory(session: str | None, fmt: str | None = None) -> dict | None:
    """{baseline_mib, fixed_mib, held_per_weight_byte} of the runtime an artifact runs through (devices/bench.py's session
    name: genai, onnx, litertlm, tflite), else the largest figures of those that run `fmt`; None where none
    was measured."""
    runtimes = json.loads(RUNTIME_MEMORY.read_text())["runtimes"]
    rows = [runtimes[session]] if session in runtimes else [r for r in runtimes.values() if r["format"] == fmt]
    if not rows:
        return None
    return {"session": session or fmt, **{k: max(r[k] for r in rows) for k in ("baseline_mib", "fixed_mib", "held_per_weight_byte")}}


def process_ram_bytes(shape: dict, weights: dict, prompt_tokens: int, decode_tokens: int, kv_element_bytes: int, runtime: dict) -> int:
    """Peak resident memory of the whole process: the runtime before the model (its baseline), what it holds beside
    the file (a fixed part, and packed or prepacked weight copies per stored weight byte) and the model's part
    (peak_ram_bytes)."""
    model = peak_ram_bytes(shape, weights, prompt_tokens, decode_tokens, kv_element_bytes)
    beside = runtime["fixed_mib"] * MIB + runtime["held_per_weight_byte"] * weights["stored_bytes"]
    return round(runtime["baseline_mib"] * MIB + beside + model)
