"""Where the parts of a supported decoder live (Llama, Qwen2, GPT-2), so analysis and pruning
address attention heads, MLP channels and layers the same way for every architecture.

GPT-2 uses `Conv1D` (weights stored [in, out]) where the others use `nn.Linear` ([out, in]);
`out_dim`/`in_dim` hide that difference.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from vcompress.core.models import attention_shape, check_supported

LINEAR_TYPES = (nn.Linear, Conv1D)


def shape(model) -> dict:
    """layers, query_heads, kv_heads, head_dim, hidden_size, intermediate_size."""
    check_supported(model.config)
    out = attention_shape(model.config)
    first = mlp_in(decoder_layers(model)[0])
    out["intermediate_size"] = first.weight.shape[out_dim(first)]
    return out


def is_gpt2(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return config.model_type == "gpt2"


def decoder_layers(model) -> nn.ModuleList:
    return model.transformer.h if is_gpt2(model) else model.model.layers


def layer_prefix(model) -> str:
    """The state dict's name of the decoder layers' list: layer i's tensors are `{prefix}.{i}.*`."""
    return "transformer.h" if is_gpt2(model) else "model.layers"


def final_norm(model) -> nn.Module:
    """The norm between the last decoder layer and lm_head."""
    return model.transformer.ln_f if is_gpt2(model) else model.model.norm


def attention(layer) -> nn.Module:
    return layer.attn if hasattr(layer, "attn") else layer.self_attn


def attention_out(layer) -> nn.Module:
    """The projection whose input columns are the heads' outputs, head-major (h * head_dim + j)."""
    attn = attention(layer)
    return attn.c_proj if hasattr(attn, "c_proj") else attn.o_proj


def mlp_in(layer) -> nn.Module:
    """The first MLP projection (its output features are the MLP channels)."""
    return layer.mlp.c_fc if hasattr(layer.mlp, "c_fc") else layer.mlp.gate_proj


def mlp_out(layer) -> nn.Module:
    """The last MLP projection (its input features are the MLP channels)."""
    return layer.mlp.c_proj if hasattr(layer.mlp, "c_proj") else layer.mlp.down_proj


def out_dim(module) -> int:
    return 1 if isinstance(module, Conv1D) else 0


def in_dim(module) -> int:
    return 0 if isinstance(module, Conv1D) else 1


def linear_modules(layer) -> list[tuple[str, nn.Module]]:
    """(name relative to the layer, module) of every linear projection in a decoder layer."""
    return [(name, m) for name, m in layer.named_modules() if isinstance(m, LINEAR_TYPES)]


def head_rows(heads, head_dim: int) -> torch.Tensor:
    """Feature indices of the given heads in a head-major projection."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]) if len(heads) else torch.zeros(0, dtype=torch.long)


def group_heads(group: int, query_heads: int, kv_heads: int) -> list[int]:
    """The query heads that share KV head `group` (transformers' repeat_kv layout)."""
    per = query_heads // kv_heads
    return list(range(group * per, (group + 1) * per))


def unit_heads(unit: int, query_heads: int, kv_heads: int) -> list[int]:
    """The query heads of head unit `unit` (head_units)."""
    return [unit] if kv_heads == 1 else group_heads(unit, query_heads, kv_heads)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers saved with it, shared (tied) tensors once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
