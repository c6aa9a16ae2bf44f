"""llama.cpp over a GGUF export folder, through llama-cpp-python: what both the Runner and the latency bench run.

numpy and llama_cpp only, no torch, so the latency bench (devices/bench.py) loads this module by its file, as
`GGUFExport.sessions` names it in manifest.json, and measures what an app that embeds llama.cpp holds: the
memory-mapped GGUF and llama.cpp's own KV cache (float16). The prompt goes in as one batch and each picked
token as one more, with llama.cpp's own eval; the logits are read from its context, so every backend picks
greedy tokens the same way. `all_logits` (the Runner's evaluation and the export's checks) keeps a row of
logits per position, which a bench run does not need (n_ctx x vocab floats).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

RUNTIME = "llama_cpp"
FORMAT = "gguf"


def _has_amx() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and " amx_int8" in cpuinfo.read_text()


# llama-cpp-python 0.3.36 built for this Xeon (GGML_NATIVE) crashes in ggml_backend_amx_mul_mat on the first eval of
# any Q4_1 / Q8_0 model, llama.cpp's own SmolLM2 GGUF too: where the CPU has AMX, the weights stay in the plain CPU
# buffer instead of the AMX-repacked one ("extra buffer types"), which runs.
AMX = _has_amx()


def _without_extra_buffers(params):
    params.use_extra_bufts = False
    return params


class SessionError(ValueError):
    """A folder llama.cpp cannot open, or a sequence longer than its context."""


class Session:
    headroom = 256  # context slots past a prompt, as the other sessions allocate
    context = 2 * headroom  # the first context: the bench's 256-token prompt and its headroom

    def __init__(
        self,
        folder: str | Path,
        *,
        threads: int | None = None,
        context: int | None = None,
        all_logits: bool = False,
        kv_float32: bool = False,
        **_,
    ):
        self.folder = Path(folder)
        manifest_file = self.folder / "manifest.json"
        if not manifest_file.is_file():
            raise SessionError(f"{self.folder} has no manifest.json; pass a folder written by `vcompress export gguf`")
        self.manifest = json.loads(manifest_file.read_text())
        if self.manifest.get("format") != FORMAT:
            raise SessionError(f"{self.folder} is a {self.manifest.get('format')!r} artifact, not {FORMAT}; open it with its own backend")
        self.model_file = self.folder / self.manifest["files"]["model"]
        if not self.model_file.is_file():
            raise SessionError(f"{self.model_file} is missing; re-run `vcompress export gguf`")
        self.max_positions = int(self.manifest["max_positions"])
        self.threads = threads or os.cpu_count() or 1
        self.all_logits = all_logits
        self.kv_float32 = kv_float32  # llama.cpp's KV cache is float16 unless asked (an fp32 export's parity check)
        import llama_cpp  # here, not at import: the exporter's module loads where llama.cpp is not installed

        self.lib = llama_cpp
        self._open(min(context or self.context, self.max_positions))
        self.vocab = self.llm.n_vocab()

    def _open(self, context: int) -> None:
        """llama.cpp's model and context (its KV cache is allocated, and cleared, for all `context` slots now)."""
        low, default = self.lib.llama_cpp, self.lib.llama_cpp.llama_model_default_params
        if AMX:  # Llama() takes no argument for it: its model parameters with the extra buffer types off
            low.llama_model_default_params = lambda: _without_extra_buffers(default())
        try:
            self.llm = self.lib.Llama(
                model_path=str(self.model_file),
                n_ctx=context,
                n_batch=512,
                n_ubatch=512,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                logits_all=self.all_logits,
                **({"type_k": self.lib.GGML_TYPE_F32, "type_v": self.lib.GGML_TYPE_F32} if self.kv_float32 else {}),
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise SessionError(f"llama.cpp cannot load {self.model_file}: {e}") from None
        finally:
            low.llama_model_default_params = default
        self.context = context

    @property
    def max_length(self) -> int:
        return self.max_positions

    def _fit(self, total: int) -> None:
        """A context of at least `total` tokens: a longer one opened (the sequence so far evaluated again) when needed."""
        if total <= self.context:
            return
        if total > self.max_positions:
            raise SessionError(f"{total} tokens exceed the model's {self.max_positions} positions; shorten the input")
        kept = self.llm.input_ids[: self.llm.n_tokens].tolist()
        self.llm.close()
        self._open(min(max(total + self.headroom, 2 * self.context), self.max_positions))
        if kept:
            self.llm.eval(kept)

    def _last(self) -> np.ndarray:
        pointer = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.vocab,))

    def _eval(self, ids: list[int], reset: bool = False) -> None:
        if reset:
            self.llm.reset()
        self._fit(self.llm.n_tokens + len(ids))
        self.llm.eval(ids)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] at every position, one sequence at a time (needs all_logits)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1, np.shape(ids)[-1])
        if not self.all_logits:
            raise SessionError("this session keeps the last position's logits only; open it with all_logits=True")
        out = np.empty((ids.shape[0], ids.shape[1], self.vocab), np.float32)
        for row, seq in zip(out, ids):
            self._eval(seq.tolist(), reset=True)
            row[:] = self.llm.scores[: len(seq)]
        return out

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        """Run a prompt from an empty cache; the last position's logits [vocab] (a view, valid until the next call)."""
        self._eval(np.asarray(ids, dtype=np.int64).reshape(-1).tolist(), reset=True)
        return self._last(), self.llm.n_tokens

    def decode(self, token_id: int, state: Any) -> tuple[np.ndarray, Any]:
        """Feed one token after the cache (one sequence at a time: `state` is its length)."""
        self._eval([int(token_id)])
        return self._last(), self.llm.n_tokens

    def close(self) -> None:
        self.llm.close()
