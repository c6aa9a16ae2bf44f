"""Calibration text for the stages that measure a model on it (analyze, prune, quantize)."""

from __future__ import annotations

import torch

from vcompress.core.data import pack, texts_for

from ._arch import decoder_layers


def calibration_blocks(
    tokenizer, *, data=None, subset="medical", mmlu=None, samples: int = 8, seq_len: int = 128, seed: int = 0, log=print
) -> torch.Tensor:
    """[samples, seq_len] token ids: the user's file, else MMLU text outside the evaluated subset.

    The seed picks which blocks (out of up to 4x as many packed) are used.
    """
    texts = texts_for(data, tokenizer, part="calib", exclude=subset, mmlu=mmlu, log=log)
    pool = pack(texts, tokenizer, seq_len, max_blocks=samples * 4)
    if pool.shape[0] < samples:
        log(f"calibration text gives {pool.shape[0]} blocks of {seq_len} tokens, fewer than the {samples} asked for; using them all")
        return pool
    pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:samples]
    return pool[pick.sort().values]


def stage_blocks(tokenizer, ctx, *, samples: int, seq_len: int) -> torch.Tensor:
    """calibration_blocks with a stage context's data file, evaluated subset, MMLU copy, seed and log."""
    return calibration_blocks(
        tokenizer, data=ctx.data, subset=ctx.subset, mmlu=ctx.mmlu, samples=samples, seq_len=seq_len, seed=ctx.seed, log=ctx.log
    )


def calibration_summary(blocks: torch.Tensor, ctx) -> dict:
    """What metrics.json says about the calibration set."""
    return {
        "data": str(ctx.data) if ctx.data else f"MMLU outside {ctx.subset!r} (calib half)",
        "blocks": blocks.shape[0],
        "seq_len": blocks.shape[1],
        "tokens": blocks.numel(),
    }


class _Captured(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model, blocks: torch.Tensor, batch_size: int, embed=None) -> list[tuple[torch.Tensor, tuple, dict]]:
    """(hidden states, other positional arguments, keyword arguments) entering the first decoder layer, per batch.

    Every layer is then called with the same masks and position embeddings (models whose layers
    differ in attention type, e.g. Qwen2 with sliding-window layers, are not handled). `embed`
    (token ids -> embeddings on the layers' device) stands in for the model's own token embedding when
    it is not loaded.
    """
    device = None if embed else next(model.parameters()).device
    captured = []

    def grab(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append((hidden.detach(), rest, dict(kwargs)))
        raise _Captured

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in blocks.split(batch_size):
            try:
                if embed:
                    model(inputs_embeds=embed(batch), use_cache=False)
                else:
                    model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured
