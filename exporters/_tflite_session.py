"""The LiteRT decode loop on numpy alone: what both the Runner and the latency bench run.

No torch here, for the same reason as _onnx_session.py: a deployed LiteRT app does not pay for it
(the latency bench loads this file by path; `Session` and `RUNTIME` are the names it looks for).

The .tflite holds two signatures with static shapes (litert-torch's generative export):
  prefill_<P>  tokens int32 [1, P], input_pos int32 [P], mask float32 [1, 1, P, C], kv_cache_* -> kv_cache_*
  decode       tokens int32 [1, 1], input_pos int32 [1], mask float32 [1, 1, 1, C], kv_cache_* -> kv_cache_*, logits
C is the cache length (the model's context here). Every call takes the whole cache and returns it
updated (the new keys/values written at input_pos); `mask` is added to the attention scores, so a
row holds 0 where a position may be seen and -inf elsewhere. The prefill signature returns no
logits (LiteRT-LM samples from decode too), so a prompt runs all but its last token through
prefill and the last one through decode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "tflite"
RUNTIME = "ai_edge_litert.interpreter"


class SessionError(ValueError):
    """A folder that is not a usable LiteRT artifact, or a sequence past the cache."""


@dataclass
class KVState:
    """The cache of one sequence. decode() updates and returns the same object."""

    length: int
    cache: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)  # every token fed so far (a shifted prefill chunk re-reads some)


class LiteRTSession:
    def __init__(self, folder: str | Path, *, threads: int | None = None):
        self.folder = Path(folder)
        manifest_file = self.folder / "manifest.json"
        if not manifest_file.is_file():
            raise SessionError(f"{self.folder} has no manifest.json; pass a folder written by `vcompress export tflite`")
        self.manifest = json.loads(manifest_file.read_text())
        if self.manifest.get("format") != FORMAT:
            raise SessionError(f"{self.folder} is a {self.manifest.get('format')!r} artifact, not tflite; open it with its own backend")
        model_file = self.folder / self.manifest["files"]["model"]
        if not model_file.is_file():
            raise SessionError(f"{model_file} is missing; re-run `vcompress export tflite`")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise SessionError(
                "running a .tflite needs the ai-edge-litert interpreter; install it with `pip install -e '.[tflite]'`"
            ) from None
        self.threads = threads
        self.interpreter = Interpreter(model_path=str(model_file), num_threads=threads)
        signatures = self.manifest["signatures"]
        self.prefill_runner = self.interpreter.get_signature_runner(signatures["prefill"]["name"])
        self.decode_runner = self.interpreter.get_signature_runner(signatures["decode"]["name"])
        self.prefill_tokens = int(self.manifest["prefill_tokens"])
        self.cache_length = int(self.manifest["cache_length"])
        self.vocab = int(self.manifest["vocab_size"])
        details = self.decode_runner.get_input_details()
        self.cache_shapes = {name: tuple(d["shape"]) for name, d in details.items() if name.startswith("kv_cache_")}

    def new_state(self) -> KVState:
        return KVState(0, {name: np.zeros(shape, np.float32) for name, shape in self.cache_shapes.items()})

    def prefill(self, ids) -> tuple[np.ndarray, KVState]:
        """Run a prompt; the last position's logits [vocab] and the state."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise SessionError("the prompt is empty; pass at least one token")
        self.check_length(ids.size)
        state = self.new_state()
        self.fill(ids[:-1], state)
        return self.decode(int(ids[-1]), state)

    def fill(self, ids: np.ndarray, state: KVState) -> KVState:
        """Write the keys/values of `ids` after the state through the prefill signature (no logits)."""
        state.tokens.extend(int(t) for t in np.asarray(ids).reshape(-1))
        p, start, end = self.prefill_tokens, state.length, len(state.tokens)
        self.check_length(end)
        while start < end:
            stop = min(start + p, end)
            # A chunk is written whole at its start (dynamic_update_slice), so a short last chunk
            # padded past the cache's end would be clamped back over real entries: start it earlier
            # instead (the overlap is recomputed to the same values).
            first = start if start + p <= self.cache_length else stop - p
            chunk = np.zeros((1, p), np.int32)
            chunk[0, : stop - first] = state.tokens[first:stop]
            positions = np.arange(first, first + p, dtype=np.int32)
            out = self.prefill_runner(tokens=chunk, input_pos=positions, mask=self.mask(positions), **state.cache)
            state.cache = {name: out[name] for name in self.cache_shapes}
            start = stop
        state.length = end
        return state

    def decode(self, token_id: int, state: KVState) -> tuple[np.ndarray, KVState]:
        """Feed one token; its logits [vocab] and the same state, updated."""
        self.check_length(state.length + 1)
        position = np.array([state.length], np.int32)
        out = self.decode_runner(tokens=np.array([[token_id]], np.int32), input_pos=position, mask=self.mask(position), **state.cache)
        state.cache = {name: out[name] for name in self.cache_shapes}
        state.tokens.append(int(token_id))
        state.length += 1
        return out["logits"][0, -1], state

    def logits(self, ids: np.ndarray, lengths=None, positions=None) -> np.ndarray:
        """Logits [batch, len(positions) or seq, vocab] of right-padded rows (positions past a row's
        length are left zero). Each row runs prefill up to its first wanted position, then decode."""
        ids = np.asarray(ids, dtype=np.int32)
        batch, seq = ids.shape
        wanted = np.arange(seq) if positions is None else np.asarray(positions, dtype=np.int64)
        out = np.zeros((batch, wanted.size, self.vocab), np.float32)
        for row in range(batch):
            n = seq if lengths is None else int(lengths[row])
            columns = [(i, int(p)) for i, p in enumerate(wanted) if p < n]
            if not columns:
                continue
            self.check_length(max(p for _, p in columns) + 1)
            first = min(p for _, p in columns)
            state = self.fill(ids[row, :first], self.new_state())
            by_position = {}
            for p in range(first, max(p for _, p in columns) + 1):
                logits, state = self.decode(int(ids[row, p]), state)
                by_position[p] = logits
            for i, p in columns:
                out[row, i] = by_position[p]
        return out

    def mask(self, positions: np.ndarray) -> np.ndarray:
        """[1, 1, len(positions), C]: 0 where the cache slot is at or before the row's position, -inf after."""
        slots = np.arange(self.cache_length)[None, :]
        visible = slots <= positions[:, None]
        return np.where(visible, 0.0, -np.inf).astype(np.float32)[None, None]

    @property
    def max_length(self) -> int:
        """The most tokens one sequence may hold."""
        return self.cache_length

    def check_length(self, tokens: int) -> None:
        if tokens > self.cache_length:
            raise SessionError(
                f"{tokens} tokens exceed the export's cache of {self.cache_length}; shorten the input or re-export with a larger --cache-length"
            )


Session = LiteRTSession  # the name the latency bench looks for


def signature_io(model_file: str | Path) -> dict[str, dict]:
    """{signature: {"inputs": [...], "outputs": [...]}} with each tensor's name, dtype and shape, as the interpreter reads them."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_file))
    out = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)

        def describe(details):
            return [
                {"name": key, "dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape"]]}
                for key, d in sorted(details.items())
            ]

        out[name] = {"inputs": describe(runner.get_input_details()), "outputs": describe(runner.get_output_details())}
    return out
