"""The ONNX Runtime decode loop, on numpy alone: what both the Runner and the latency bench run.

No torch here on purpose: importing torch costs ~280 MiB of resident memory, which a deployed ONNX
Runtime app does not pay, so the latency bench (devices/bench.py) loads this module without the
exporters package (the exporter names it in `OnnxExport.sessions`, written into manifest.json) and
measures the same code that `OnnxRunner` (exporters/onnx.py) wraps for evaluation. Like every session
module, it names its class `Session` and the module an app imports to run the format `RUNTIME`.

The KV cache is one [1, kv_heads, capacity, head_dim] float32 buffer per layer and side, bound by
pointer both as past_key_values.* and present.*: GroupQueryAttention appends in place, so a decode
step copies nothing. The token is a numpy scalar written in place before each run; the attention
mask is a view of a preallocated row of ones, re-bound one column longer each step (a pointer and
a shape: nothing is copied). The same folder also runs under ONNX Runtime GenAI (genai_config.json).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from vcompress.core.export_manifest import SessionError, open_exported

RUNTIME = "onnxruntime"
OPTIMIZATION = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class KVState:
    """The cache of one sequence. decode() updates and returns the same object: an older state
    of the same sequence is not kept (the Runner interface never goes back to one)."""

    length: int
    capacity: int
    cache: list[np.ndarray]
    binding: Any = None
    token: np.ndarray | None = None
    ones: np.ndarray | None = None  # [1, capacity]: the attention mask is its first length+1 columns
    position: np.ndarray | None = None
    logits: np.ndarray | None = None


class DecoderSession:
    headroom = 256  # cache slots allocated past the prompt before the first growth

    def __init__(
        self, folder: str | Path, *, threads: int | None = None, optimization: str = "all", spin: bool = True, prompt_graph: bool = True
    ):
        self.folder = Path(folder)
        self.manifest, (model_file,) = open_exported(self.folder, "onnx")
        self.threads = threads or os.cpu_count() or 1
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = OPTIMIZATION[optimization]
        options.log_severity_level = 3
        if not spin:  # threads sleep between runs instead of spinning: less CPU, a little more latency
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        start = time.perf_counter()
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        # An export with an int8 prompt graph (_onnx_prefill.py): every multi-token run goes through it, as ORT
        # GenAI's pipeline runs a prompt; single tokens through the 4-bit graph. prompt_graph=False: the 4-bit graph alone.
        prompt_file = self.manifest["files"].get("prefill_model") if prompt_graph else None
        self.prompt_session = (
            ort.InferenceSession(str(self.folder / prompt_file), options, providers=["CPUExecutionProvider"])
            if prompt_file
            else self.session
        )
        self.load_seconds = time.perf_counter() - start
        m = self.manifest
        self.layers, self.kv_heads, self.head_dim, self.vocab = m["layers"], m["kv_heads"], m["head_dim"], m["vocab_size"]
        self.max_positions = self.max_length = m["max_positions"]  # max_length: the Runner's name for it
        self.uses_positions = any(i.name == "position_ids" for i in self.session.get_inputs())
        self.kv_names = [(f"past_key_values.{i}.{p}", f"present.{i}.{p}") for i in range(self.layers) for p in ("key", "value")]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full logits [batch, seq, vocab] for right-padded ids (attention is causal: a real token
        never sees the padding after it, so the mask is all ones)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        batch, seq = ids.shape
        self.check_length(seq)
        feeds = self._feeds(ids, batch, seq, keep=seq)
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        feeds.update({past: empty for past, _ in self.kv_names})
        return self.prompt_session.run(["logits"], feeds)[0]

    def continuation_logits(self, prefix: np.ndarray, continuations: list[np.ndarray]) -> list[np.ndarray]:
        """For each continuation [C] of one prefix [P], logits [C, vocab] whose row j predicts continuation[j].
        The prefix runs once; each continuation then runs from its cache (GroupQueryAttention takes a
        multi-token step after a cache only at batch 1, so one run per continuation)."""
        prefix = np.ascontiguousarray(np.asarray(prefix, dtype=np.int64).reshape(1, -1))
        seq = prefix.shape[1]
        self.check_length(seq + max(len(c) for c in continuations) - 1)
        feeds = self._feeds(prefix, 1, seq, keep=1)
        feeds.update({past: np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for past, _ in self.kv_names})
        first, *cache = self.prompt_session.run(["logits"] + [present for _, present in self.kv_names], feeds)
        feeds = {past: kv for (past, _), kv in zip(self.kv_names, cache)}
        out = []
        for continuation in continuations:
            logits = np.empty((len(continuation), self.vocab), np.float32)
            logits[0] = first[0, -1]
            rest = len(continuation) - 1
            if rest:
                feeds.update(
                    input_ids=np.ascontiguousarray(np.asarray(continuation[:rest], dtype=np.int64).reshape(1, rest)),
                    attention_mask=np.ones((1, seq + rest), np.int64),
                    logits_to_keep=np.array([rest], np.int64),
                )
                if self.uses_positions:
                    feeds["position_ids"] = np.arange(seq, seq + rest, dtype=np.int64).reshape(1, rest)
                logits[1:] = self.prompt_session.run(["logits"], feeds)[0][0]
            out.append(logits)
        return out

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, KVState]:
        """Run a prompt; the last position's logits [vocab] (a view, valid until the next call) and the state."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(1, -1))
        seq = ids.shape[1]
        self.check_length(seq)
        capacity = min(seq + self.headroom, self.max_positions)
        state = KVState(length=0, capacity=capacity, cache=self._new_cache(capacity))
        binding = self.prompt_session.io_binding()
        for name, array in self._feeds(ids, 1, seq, keep=1).items():
            bind_input(binding, name, array)
        logits = np.empty((1, 1, self.vocab), np.float32)
        bind_output(binding, "logits", logits)
        self._bind_cache(binding, state)
        self.prompt_session.run_with_iobinding(binding)
        state.length = seq
        self._decode_binding(state)
        return logits[0, -1], state

    def decode(self, token_id: int, state: KVState) -> tuple[np.ndarray, KVState]:
        """Feed one token; its logits [vocab] (a view into the state's buffer) and the same state."""
        if state.length + 1 > state.capacity:
            self._grow(state)
        state.token[0, 0] = token_id
        _bind_mask(state.binding, state.ones, state.length + 1)
        if state.position is not None:
            state.position[0, 0] = state.length
        self.session.run_with_iobinding(state.binding)
        state.length += 1
        return state.logits[0, -1], state

    def check_length(self, seq: int) -> None:
        if seq > self.max_positions:
            raise SessionError(f"{seq} tokens exceed the model's {self.max_positions} positions; shorten the input")

    def _feeds(self, ids: np.ndarray, batch: int, seq: int, keep: int) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64), "logits_to_keep": np.array([keep], np.int64)}
        if self.uses_positions:
            feeds["position_ids"] = np.ascontiguousarray(np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)))
        return feeds

    def _new_cache(self, capacity: int) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_heads, capacity, self.head_dim), np.float32) for _ in self.kv_names]

    def _bind_cache(self, binding, state: KVState) -> None:
        for (past, present), buffer in zip(self.kv_names, state.cache):
            bind_input(binding, past, buffer)
            bind_output(binding, present, buffer)

    def _decode_binding(self, state: KVState) -> None:
        binding = self.session.io_binding()
        state.token = np.zeros((1, 1), np.int64)
        state.ones = np.ones((1, state.capacity), np.int64)
        state.logits = np.empty((1, 1, self.vocab), np.float32)
        bind_input(binding, "input_ids", state.token)
        _keep(binding, state.ones)
        if self.uses_positions:
            state.position = np.zeros((1, 1), np.int64)
            bind_input(binding, "position_ids", state.position)
        bind_output(binding, "logits", state.logits)
        self._bind_cache(binding, state)
        state.binding = binding

    def _grow(self, state: KVState) -> None:
        capacity = min(state.capacity * 2, self.max_positions)
        if capacity <= state.length:
            raise SessionError(f"the sequence reached the model's {self.max_positions} positions; generate fewer tokens")
        bigger = self._new_cache(capacity)
        for old, new in zip(state.cache, bigger):
            new[:, :, : state.length] = old[:, :, : state.length]
        state.cache, state.capacity = bigger, capacity
        self._decode_binding(state)


Session = DecoderSession  # the name the latency bench looks for

_ELEMENT = {np.dtype(np.float32): np.float32, np.dtype(np.int64): np.int64, np.dtype(np.int32): np.int32}


def bind_input(binding, name: str, array: np.ndarray) -> None:
    # Bound by pointer: later writes into `array` are what the next run reads. ONNX Runtime keeps
    # no reference to the memory, so the binding object does.
    binding.bind_input(name, "cpu", 0, _ELEMENT[array.dtype], list(array.shape), array.ctypes.data)
    _keep(binding, array)


def _bind_mask(binding, ones: np.ndarray, length: int) -> None:
    # The first `length` columns of a [1, capacity] row are contiguous: bound in place, and kept
    # alive by the state (and the binding) that holds the row.
    binding.bind_input("attention_mask", "cpu", 0, np.int64, [1, length], ones.ctypes.data)


def bind_output(binding, name: str, array: np.ndarray) -> None:
    binding.bind_output(name, "cpu", 0, _ELEMENT[array.dtype], list(array.shape), array.ctypes.data)
    _keep(binding, array)


def _keep(binding, array: np.ndarray) -> None:
    kept = getattr(binding, "_vcompress_arrays", None)
    if kept is None:
        kept = binding._vcompress_arrays = []
    kept.append(array)
