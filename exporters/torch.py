"""The PyTorch Runner: HF folders, GGUF files and the embedded default, through `load_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vcompress.core.models import load_model, resolve
from vcompress.core.runner import RUNNERS, Runner


@RUNNERS.register("torch")
class TorchRunner(Runner):
    backend = "torch"

    def __init__(
        self,
        path: str | Path | None,
        *,
        threads: int | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        base: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        source = resolve(path, allow_pickle=allow_pickle, base=base)
        super().__init__(source.path, threads=threads)
        if threads:
            torch.set_num_threads(threads)
        model, tokenizer = load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, dtype=dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label = source.label or str(source.path)
        config = model.config
        self.max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

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
