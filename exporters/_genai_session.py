"""ONNX Runtime GenAI's generator over an ONNX export folder: what an app that ships onnxruntime-genai runs.

The latency bench (devices/bench.py) loads this module for ONNX folders by default (the first of
`OnnxExport.sessions`), so host latency is that of the runtime an app ships (its C++ loop and KV cache), not of our Python loop.
numpy and onnxruntime_genai only, no torch. The prompt goes in with `append_tokens` and each picked token
the same way, the way an app that samples on its own drives the generator; logits come back through
`get_logits` so the bench picks greedy tokens exactly as it does for every other backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og

from vcompress.core.export_manifest import SessionError

RUNTIME = "onnxruntime_genai"
CONFIG = "genai_config.json"


class Session:
    headroom = 256  # cache slots past the prompt, as our own loop allocates before it grows

    def __init__(self, folder: str | Path, *, threads: int | None = None, **_):
        self.folder = Path(folder)
        if not (self.folder / CONFIG).is_file():
            raise SessionError(f"{self.folder} has no {CONFIG}; re-export it with `vcompress export onnx`")
        model = json.loads((self.folder / CONFIG).read_text())["model"]  # any genai folder: ours or genai's model builder's
        self.vocab, self.max_positions = model["vocab_size"], model["context_length"]
        self.threads = threads or os.cpu_count() or 1
        config = og.Config(str(self.folder))
        options = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        try:
            self.model = og.Model(config)
        except RuntimeError as e:
            raise SessionError(f"onnxruntime-genai cannot load {self.folder}: {e}") from None

    @property
    def max_length(self) -> int:
        return self.max_positions

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        params = og.GeneratorParams(self.model)
        # genai allocates the whole cache up front (past and present share one buffer of max_length)
        params.set_search_options(do_sample=False, max_length=min(len(ids) + self.headroom, self.max_positions))
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids)
        return generator.get_logits()[0, -1], generator

    def decode(self, token_id: int, generator: Any) -> tuple[np.ndarray, Any]:
        generator.append_tokens(np.array([token_id], np.int32))
        return generator.get_logits()[0, -1], generator
