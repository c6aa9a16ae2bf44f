"""The judge every compress stage measures its result with: held-out text outside the evaluated
subset and MMLU answer agreement, against the stage's reference model (core.scoring.Judge)."""

from __future__ import annotations

import torch

from vcompress.core.data import agreement_questions, pack, texts_for
from vcompress.core.errors import InputError
from vcompress.core.scoring import Judge, torch_logits_fn


def judge_of(reference, tokenizer, ctx, *, blocks: int, seq_len: int, per_subject: int, keep_logits: bool = True) -> Judge:
    """A Judge of `reference` (a model) on `blocks` held-out blocks of `seq_len` tokens and `per_subject`
    MMLU questions per subject of the run's subset (0: that part is skipped)."""
    heldout = heldout_blocks(tokenizer, ctx, blocks, seq_len)
    questions = agreement_questions(ctx.mmlu, ctx.subset, per_subject, ctx.seed, ctx.log)
    return Judge(
        torch_logits_fn(reference), heldout, tokenizer=tokenizer, questions=questions, keep_logits=keep_logits, progress=ctx.progress
    )


def heldout_blocks(tokenizer, ctx, count: int, seq_len: int) -> torch.Tensor | None:
    """[count, seq_len] ids of MMLU held-out text outside the evaluated subset; None (and a log line) without it."""
    if not count:
        return None
    try:
        texts = texts_for(None, tokenizer, part="heldout", exclude=ctx.subset, mmlu=ctx.mmlu, log=lambda _: None)
        return pack(texts, tokenizer, seq_len, count)
    except InputError as e:
        ctx.log(f"no held-out perplexity: {e}")
        return None
