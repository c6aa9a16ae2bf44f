"""Scores over any ids -> logits function, so every stage and backend is scored the same way.

`LogitsFn` takes a LongTensor [batch, seq] of token ids and returns float logits [batch, seq, vocab].
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def torch_logits_fn(model) -> LogitsFn:
    """An ids -> logits function for a transformers causal LM (no cache, no grad)."""

    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()

    return run


@torch.no_grad()
def text_fidelity(logits_fn: LogitsFn, blocks: torch.Tensor, reference_fn: LogitsFn | None = None, batch_size: int = 1) -> dict:
    """Perplexity on [N, T] blocks; with a reference, also top-1 next-token agreement and mean KL(ref || model).

    Every position but the last of each block predicts the next token.
    """
    nll_sum, count, agree, kl_sum = 0.0, 0, 0, 0.0
    ref_nll_sum = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size]
        logits = logits_fn(ids)[:, :-1].float()
        targets = ids[:, 1:]
        logp = F.log_softmax(logits, dim=-1)
        nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
        if reference_fn is not None:
            ref_logp = F.log_softmax(reference_fn(ids)[:, :-1].float(), dim=-1)
            ref_nll_sum += -ref_logp.gather(-1, targets.unsqueeze(-1)).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum(-1).sum().item()
    out = {"perplexity": math.exp(nll_sum / count), "tokens": count}
    if reference_fn is not None:
        out.update(
            reference_perplexity=math.exp(ref_nll_sum / count),
            top1_agreement=agree / count,
            kl_mean=kl_sum / count,
        )
    return out


def perplexity(logits_fn: LogitsFn, blocks: torch.Tensor, batch_size: int = 1) -> float:
    return text_fidelity(logits_fn, blocks, batch_size=batch_size)["perplexity"]
