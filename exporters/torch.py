"""The PyTorch Runner: HF folders, GGUF files and the embedded default, through `load_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vcompress.core.models import Intake
from vcompress.core.runner import RUNNERS, Runner


@RUNNERS.register("torch")
class TorchRunner(Runner):
    backend = "torch"

    def __init__(
        self,
        path: str | Path | None,
        *,
        threads: int | None = None,
        intake: Intake | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        intake = intake or Intake()
        source = intake.resolve(path)
        super().__init__(source.path, threads=threads)
        if threads:
            torch.set_num_threads(threads)
        model, tokenizer = intake.load(source, dtype=dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label = source.label or str(source.path)
        config = model.config
        self.max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @property
    def runtime(self) -> dict:
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__}  # transformers writes the forward

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float32 logits [batch, seq, vocab]; with `positions`, only those sequence positions."""
        kwargs: dict[str, Any] = {"use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        if positions is not None:
            kwargs["logits_to_keep"] = positions.to(self.device)
        return self.model(input_ids=input_ids.to(self.device), **kwargs).logits.float().cpu()

    @torch.no_grad()
    def continuation_logits(self, prefixes: list[torch.Tensor], continuations: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """One forward for a batch of questions: each row holds a prefix and then its continuations (all but
        their last token) side by side, under a mask that lets a continuation see its prefix and its own
        earlier tokens only, at positions counted from the prefix's end: no padding between answers,
        no cache to copy."""
        width = max(len(p) + sum(len(c) - 1 for c in conts) for p, conts in zip(prefixes, continuations))
        ids = torch.zeros((len(prefixes), width), dtype=torch.long)
        positions = torch.zeros_like(ids)
        allowed = torch.eye(width, dtype=torch.bool).repeat(len(prefixes), 1, 1)  # padding sees itself: no empty softmax row
        spans = []  # per question: where its prefix ends and where each continuation sits
        for b, (prefix, conts) in enumerate(zip(prefixes, continuations)):
            n = len(prefix)
            ids[b, :n], positions[b, :n] = prefix, torch.arange(n)
            allowed[b, :n, :n] = torch.ones((n, n), dtype=torch.bool).tril()
            at, starts = n, []
            for c in conts:
                k = len(c) - 1
                ids[b, at : at + k], positions[b, at : at + k] = c[:-1], n + torch.arange(k)
                allowed[b, at : at + k, :n] = True
                allowed[b, at : at + k, at : at + k] = torch.ones((k, k), dtype=torch.bool).tril()
                starts.append(at)
                at += k
            spans.append((n, starts))
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        # the LM head (a fifth of a small model's FLOPs) only from the first prefix end on
        keep = torch.arange(min(n for n, _ in spans) - 1, width)
        logits = (
            self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=False,
                logits_to_keep=keep.to(self.device),
            )
            .logits.float()
            .cpu()
        )
        offset = int(keep[0])
        out = []
        for b, ((n, starts), conts) in enumerate(zip(spans, continuations)):
            first = logits[b, n - 1 - offset : n - offset]
            out.append([torch.cat([first, logits[b, at - offset : at - offset + len(c) - 1]]) for at, c in zip(starts, conts)])
        return out

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=input_ids.to(self.device), use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float().cpu(), out.past_key_values

    @torch.no_grad()
    def decode(self, token_id: int, state: Any) -> tuple[torch.Tensor, Any]:
        ids = torch.tensor([[token_id]], device=self.device)
        out = self.model(input_ids=ids, past_key_values=state, use_cache=True)
        return out.logits[0, -1].float().cpu(), out.past_key_values

    def close(self) -> None:
        self.model = None
