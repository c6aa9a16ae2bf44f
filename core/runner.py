"""The one interface between token ids and logits that evaluation and latency share.

Every backend (PyTorch for HF folders, ONNX Runtime, LiteRT, TensorRT) implements `Runner`, so
the numbers in a verdict come from the same code path for every format, and the same token ids
go into every backend. Runners are registered by backend name in `RUNNERS`; the exporters
package registers its own (see `vcompress.exporters.open_runner`).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch

from .registry import Registry

RUNNERS: Registry = Registry("backend")


class Runner(abc.ABC):
    backend: str = ""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        self.path = Path(path)
        self.threads = threads
        self.tokenizer = None  # a transformers tokenizer, loaded from the artifact folder

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full logits, float32 [batch, seq, vocab], for a batch of (right-padded) token ids."""

    @abc.abstractmethod
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Run a prompt [1, seq]; return the last position's logits [vocab] and the KV state."""

    @abc.abstractmethod
    def decode(self, token_id: int, state: Any) -> tuple[torch.Tensor, Any]:
        """Feed one token after the state; return its logits [vocab] and the new state."""

    @property
    def runtime(self) -> dict:
        """What computes this runner's logits, with versions ({"module": ..., "version": ...} or {package: version}):
        part of the key of the answers cached on disk, so a runtime upgrade scores again. Empty where unknown."""
        return {}

    # A backend too slow for the evaluator's held-out text (an NPU's arithmetic in emulation) scores this many
    # positions of it through `text_logits`; None: the evaluator's own sample, through `forward`.
    text_positions: int | None = None

    def text_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] for the held-out text's perplexity and top-1 agreement."""
        return self.forward(input_ids)

    def text_report(self) -> dict:
        """What scored the held-out text where that is not what scored the answers ({} when it is the same)."""
        return {}

    def continuation_logits(self, prefixes: list[torch.Tensor], continuations: list[list[torch.Tensor]]) -> list[list[torch.Tensor]] | None:
        """For each prefix [P] and each of its continuations [C], logits [C, vocab] whose row j predicts
        continuation[j] (row 0: the prefix's last logits). A prefix runs once for all its continuations,
        which makes cloze scoring ~3x cheaper than one full sequence per answer. None where a backend
        has no such path: the scorer then runs the sequences in full."""
        return None

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_id: int | None = None,
    ) -> list[int]:
        """Greedy (temperature 0) or nucleus sampling through prefill + decode."""
        generator = torch.Generator().manual_seed(seed)
        logits, state = self.prefill(input_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = _pick(logits, temperature, top_p, generator)
            out.append(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            if len(out) == max_new_tokens:
                break
            logits, state = self.decode(token, state)
        return out

    def close(self) -> None:  # noqa: B027  (optional: runners without resources keep this no-op)
        pass


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
