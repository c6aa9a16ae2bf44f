"""The LiteRT decode loop on numpy alone: what both the Runner and the latency bench run.

No torch here, for the same reason as _onnx_session.py: a deployed LiteRT app does not pay for it
(the latency bench loads this module with `--backend tflite`, as `TFLiteExport.sessions` names it; `Session`
and `RUNTIME` are the names it looks for).

The .tflite holds these signatures with static shapes (litert-torch's generative export):
  prefill_<P>  tokens int32 [1, P], input_pos int32 [P], mask float32 [1, 1, P, C], kv_cache_* -> kv_cache_*
               (P = prefill_tokens, and short_prefill_tokens where exported: a 30-token prompt then costs
               one short call, not a 256-token one)
  decode       tokens int32 [1, 1], input_pos int32 [1], mask float32 [1, 1, 1, C], kv_cache_* -> kv_cache_*, logits
C is the cache length (the model's context here). Every call takes the whole cache and returns it
updated (the new keys/values written at input_pos); `mask` is added to the attention scores, so a
row holds 0 where a position may be seen and -inf elsewhere. The prefill signature returns no
logits (LiteRT-LM samples from decode too), so a prompt runs all but its last token through
prefill and the last one through decode.

It runs on LiteRT's CompiledModel API, as LiteRT-LM does: each kv_cache_* tensor is one buffer,
bound as input and output of both signatures, so the cache stays in the runtime and is updated in
place (no copy in or out of a call). Slots past a sequence's length get zero attention weight (the
mask), so they may hold any finite stale value; that also makes a state at length L a valid fork
point for continuations written at L and after. XNNPACK's packed weights go to a file-backed
weight cache, which both signatures share: without it each signature packs its own copy of the
weights in memory (measured on SmolLM2-135M int8: 545 MiB peak instead of 329).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vcompress.core.export_manifest import SessionError, open_exported

FORMAT = "tflite"
RUNTIME = "ai_edge_litert.compiled_model"


@dataclass(eq=False)
class KVState:
    """One sequence: its length and every token fed so far. Its keys/values live in the session's
    cache buffers while it is the resident state; another state's call rebuilds them from `tokens`."""

    length: int
    tokens: list[int] = field(default_factory=list)


class _Signature:
    """One signature's input and output buffers; the kv_cache_* ones are the session's shared buffers."""

    def __init__(self, model, key: str, cache: dict):
        self.model, self.key = model, key
        inputs, outputs = model.get_input_tensor_details(key), model.get_output_tensor_details(key)
        self.inputs = {name: cache[name] if name in cache else model.create_input_buffer_by_name(key, name) for name in inputs}
        self.outputs = {name: cache[name] if name in cache else model.create_output_buffer_by_name(key, name) for name in outputs}

    def __call__(self, **feeds: np.ndarray) -> None:
        for name, value in feeds.items():
            self.inputs[name].write(value)
        self.model.run_by_name(self.key, self.inputs, self.outputs)


class LiteRTSession:
    def __init__(self, folder: str | Path, *, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest, (model_file,) = open_exported(self.folder, FORMAT)
        try:
            import ai_edge_litert
            from ai_edge_litert.compiled_model import CompiledModel
            from ai_edge_litert.environment import Environment, EnvironmentOptions
            from ai_edge_litert.options import CpuOptions, Options
        except ImportError as e:
            from vcompress.core.packages import import_failure  # only on failure: this module runs on numpy alone

            why = import_failure(e, ("ai-edge-litert",), "`pip install -e '.[tflite]'`")
            raise SessionError(f"running a .tflite needs ai-edge-litert's CompiledModel API: {why}") from None
        self.threads = threads or os.cpu_count() or 1  # LiteRT's own default (0) runs on one thread
        # No compiler plugins: CPU only, and LiteRT would otherwise try (and loudly fail) to load vendor plugins.
        environment = Environment.create(
            options=EnvironmentOptions(runtime_path=str(Path(ai_edge_litert.__file__).parent), compiler_plugin_path=str(self.folder))
        )
        options = Options(cpu_options=CpuOptions(num_threads=self.threads, xnnpack_weight_cache_path=str(weight_cache_file(model_file))))
        try:
            self.model = CompiledModel.from_file(str(model_file), environment=environment, options=options)
        except RuntimeError as e:
            raise SessionError(f"LiteRT cannot load {model_file} ({str(e).splitlines()[0]}); re-run `vcompress export tflite`") from None
        signatures = self.manifest["signatures"]
        decode_key = signatures["decode"]["name"]
        self.prefill_tokens = int(self.manifest["prefill_tokens"])
        self.cache_length = int(self.manifest["cache_length"])
        self.vocab = int(self.manifest["vocab_size"])
        self.cache = {}
        for name, details in self.model.get_input_tensor_details(decode_key).items():
            if name.startswith("kv_cache_"):
                self.cache[name] = self.model.create_input_buffer_by_name(decode_key, name)
                # fresh buffers are uninitialised, and a NaN in a masked slot still poisons attention (0 * NaN)
                self.cache[name].write(np.zeros(details["shape"], np.dtype(details["dtype"])))
        # prefill length -> its signature: the main one, and a short one for short prompts where exported
        self.prefills = {self.prefill_tokens: _Signature(self.model, signatures["prefill"]["name"], self.cache)}
        if "prefill_short" in signatures:
            short = int(self.manifest["short_prefill_tokens"])
            self.prefills[short] = _Signature(self.model, signatures["prefill_short"]["name"], self.cache)
        self.decode_signature = _Signature(self.model, decode_key, self.cache)
        self.resident: KVState | None = None  # the state whose keys/values the cache holds

    def new_state(self) -> KVState:
        return KVState(0)

    def prefill(self, ids) -> tuple[np.ndarray, KVState]:
        """Run a prompt; the last position's logits [vocab] and the state."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise SessionError("the prompt is empty; pass at least one token")
        self.check_length(ids.size)
        state = self.fill(ids[:-1], self.new_state())
        return self.decode(int(ids[-1]), state)

    def fill(self, ids: np.ndarray, state: KVState) -> KVState:
        """Write the keys/values of `ids` after the state through the prefill signature (no logits)."""
        self.make_resident(state)
        new = [int(t) for t in np.asarray(ids).reshape(-1)]
        self.check_length(state.length + len(new))
        del state.tokens[state.length :]  # a fork point drops what was fed after it
        state.tokens.extend(new)
        self._prefill(state, state.length, len(state.tokens))
        state.length = len(state.tokens)
        return state

    def decode(self, token_id: int, state: KVState) -> tuple[np.ndarray, KVState]:
        """Feed one token; its logits [vocab] and the same state, updated."""
        self.make_resident(state)
        self.check_length(state.length + 1)
        position = state.length
        positions = np.array([position], np.int32)
        self.decode_signature(tokens=np.array([[token_id]], np.int32), input_pos=positions, mask=self.mask(positions))
        logits = self.decode_signature.outputs["logits"].read(self.vocab, np.float32)
        del state.tokens[position:]
        state.tokens.append(int(token_id))
        state.length = position + 1
        return logits, state

    def continuation_logits(self, prefix: np.ndarray, continuations: list[np.ndarray]) -> list[np.ndarray]:
        """For each continuation [C] of one prefix [P], logits [C, vocab] whose row j predicts continuation[j].
        The prefix runs once; each continuation decodes from the prefix's length (slots past it are
        masked, so the prefix's keys/values stay valid under what a continuation writes)."""
        prefix = np.asarray(prefix, dtype=np.int32).reshape(-1)
        self.check_length(prefix.size + max(len(c) for c in continuations) - 1)
        first, state = self.prefill(prefix)
        fork = state.length
        out = []
        for continuation in continuations:
            logits = np.empty((len(continuation), self.vocab), np.float32)
            logits[0] = first
            state.length = fork
            for j, token in enumerate(np.asarray(continuation[:-1]).reshape(-1), start=1):
                logits[j], state = self.decode(int(token), state)
            out.append(logits)
        return out

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

    def make_resident(self, state: KVState) -> None:
        """Put the state's keys/values in the cache buffers: nothing to do for the resident one (or a
        fresh one); another is recomputed from its tokens."""
        if state is self.resident:
            return
        self.resident = state
        if state.length:
            self._prefill(state, 0, state.length)

    def _prefill(self, state: KVState, start: int, end: int) -> None:
        """Run tokens[start:end] through the prefill signatures in chunks."""
        while start < end:
            p = self.chunk(end - start)
            stop = min(start + p, end)
            # A chunk is written whole at its start (dynamic_update_slice), so a short last chunk
            # padded past the cache's end would be clamped back over real entries: start it earlier
            # instead (the overlap is recomputed to the same values).
            first = start if start + p <= self.cache_length else stop - p
            chunk = np.zeros((1, p), np.int32)
            chunk[0, : stop - first] = state.tokens[first:stop]
            positions = np.arange(first, first + p, dtype=np.int32)
            self.prefills[p](tokens=chunk, input_pos=positions, mask=self.mask(positions))
            start = stop

    def chunk(self, remaining: int) -> int:
        """The prefill length for the next chunk: the short signature while its padded chunks cost fewer
        tokens than one main chunk (each call computes its whole length), else the main one."""
        short = min(self.prefills)
        if short < self.prefill_tokens and -(-remaining // short) * short < self.prefill_tokens:
            return short
        return self.prefill_tokens

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


def weight_cache_file(model_file: Path) -> Path:
    """Where XNNPACK keeps this model's packed weights: one file per model file, under ~/.cache/vcompress/xnnpack
    (or the temp folder where that is not writable). Keyed by the file's inode, size and mtime, not its path:
    an export checks itself in a temp folder that is then renamed, and the renamed file must find the same cache."""
    stat = model_file.stat()
    key = hashlib.sha1(f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    for root in (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vcompress", Path(tempfile.gettempdir()) / "vcompress"):
        folder = root / "xnnpack"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder / f"{model_file.stem}-{key}.xnnpack_cache"
    raise SessionError("no writable folder for LiteRT's weight cache (tried ~/.cache/vcompress and the temp folder)")


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
