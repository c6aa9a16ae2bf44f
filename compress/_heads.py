"""Attention heads by whole KV groups: slice them out of q/k/v/o, or mask their contribution.

A KV group is one KV head and the query heads that share it (transformers' repeat_kv puts query
head h on KV head h // (query_heads // kv_heads)). Removing whole groups keeps that ratio, so the
sliced attention runs unchanged and the config stays a standard one.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._arch import attention_out, group_heads, head_rows, in_dim, out_dim


def slice_features(module: nn.Module, *, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> None:
    """Keep only the given output and/or input features of an nn.Linear or GPT-2 Conv1D, in place."""
    weight = module.weight.data
    if out_idx is not None:
        weight = weight.index_select(out_dim(module), out_idx)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.data[out_idx].clone())
    if in_idx is not None:
        weight = weight.index_select(in_dim(module), in_idx)
    module.weight = nn.Parameter(weight.contiguous())
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    else:  # Conv1D: weight is [in, out]
        module.nx, module.nf = weight.shape


def keep_kv_groups(attn: nn.Module, keep: list[int], *, query_heads: int, kv_heads: int, head_dim: int) -> list[int]:
    """Slice a Llama/Qwen2 attention block down to the KV groups in `keep`; returns the kept query heads.

    q_proj/k_proj/v_proj lose the output rows of the removed heads, o_proj the matching input columns.
    """
    keep = sorted(keep)
    if not keep or len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= kv_heads:
        raise ValueError(f"keep must name distinct KV groups in 0..{kv_heads - 1}, got {keep}")
    if query_heads % kv_heads:
        raise ValueError(f"{query_heads} query heads do not split into {kv_heads} KV groups")
    queries = [h for g in keep for h in group_heads(g, query_heads, kv_heads)]
    slice_features(attn.k_proj, out_idx=head_rows(keep, head_dim))
    slice_features(attn.v_proj, out_idx=head_rows(keep, head_dim))
    keep_query_heads(attn, queries, head_dim)
    return queries


def keep_query_heads(attn: nn.Module, keep: list[int], head_dim: int) -> None:
    """Slice q_proj's rows and o_proj's columns down to the query heads in `keep` (their KV heads stay). QK-norm
    (Gemma 3's q_norm) weighs one head's features, shared by every head: it is left as it is."""
    slice_features(attn.q_proj, out_idx=head_rows(sorted(keep), head_dim))
    slice_features(attn.o_proj, in_idx=head_rows(sorted(keep), head_dim))
    if hasattr(attn, "num_key_value_groups"):  # query heads per KV head, read by repeat_kv
        attn.num_key_value_groups = attn.q_proj.out_features // attn.k_proj.out_features


@contextlib.contextmanager
def masked_heads(layer: nn.Module, heads: list[int], head_dim: int):
    """Inside the block, the given query heads of `layer` contribute nothing (their outputs are zeroed
    before the attention output projection), which is what removing them does."""
    columns = head_rows(heads, head_dim)

    def zero(module, args):
        hidden = args[0].clone()
        hidden[..., columns] = 0
        return (hidden, *args[1:])

    handle = attention_out(layer).register_forward_pre_hook(zero)
    try:
        yield
    finally:
        handle.remove()
