"""The TensorRT graph's decode loop on ONNX Runtime CPU, with numpy alone: what both the Runner and the latency bench run.

The graph (exporters/_trt_graph.py) is made for TensorRT, which needs a CUDA GPU; here ONNX Runtime runs the
very same model.onnx so that its parity, accuracy and host latency are checked where no GPU exists. No torch
here, for the same reason as _onnx_session.py: the bench loads this module without the exporters package. The cache is the graph's own
(present = Concat(past, new)), so each decode step copies the past: fine for checking, not what an engine on the
Jetson does (TensorRT keeps the tensors on the GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vcompress.core.export_manifest import SessionError, open_exported

RUNTIME = "onnxruntime"  # what runs the graph here; on the Jetson it is TensorRT (manifest "runtime")
FORMAT = "tensorrt"
FLOAT = {"float16": np.float16, "float32": np.float32}


@dataclass
class CacheState:
    length: int
    cache: list[np.ndarray]


class GraphSession:
    def __init__(self, folder: str | Path, *, threads: int | None = None, **_):
        self.folder = Path(folder)
        self.manifest = m = open_exported(self.folder, FORMAT)[0]
        graph = self.folder / m["files"]["model"]
        self.threads = threads or os.cpu_count() or 1
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.layers, self.kv_heads, self.head_dim, self.max_positions = m["layers"], m["kv_heads"], m["head_dim"], m["max_positions"]
        self.max_length = self.max_positions  # the Runner's name for it
        self.kv_dtype = FLOAT[m["kv_dtype"]]
        self.past = [f"past_key_values.{i}.{p}" for i in range(self.layers) for p in ("key", "value")]
        self.outputs = ["logits"] + [f"present.{i}.{p}" for i in range(self.layers) for p in ("key", "value")]

    def check_length(self, seq: int) -> None:
        if seq > self.max_positions:
            raise SessionError(f"{seq} tokens exceed the model's {self.max_positions} positions; shorten the input")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full logits [batch, seq, vocab] for right-padded ids (causal: padding after a token is never seen)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.check_length(ids.shape[1])
        return self._run(ids, self._empty(ids.shape[0]))[0]

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, CacheState]:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(1, -1))
        self.check_length(ids.shape[1])
        logits, *cache = self._run(ids, self._empty(1))
        return logits[0, -1], CacheState(ids.shape[1], cache)

    def decode(self, token_id: int, state: CacheState) -> tuple[np.ndarray, CacheState]:
        self.check_length(state.length + 1)
        logits, *cache = self._run(np.array([[token_id]], np.int64), state.cache)
        return logits[0, -1], CacheState(state.length + 1, cache)

    def continuation_logits(self, prefix: np.ndarray, continuations: list[np.ndarray]) -> list[np.ndarray]:
        """For each continuation [C] of one prefix [P], logits [C, vocab] whose row j predicts continuation[j]:
        the prefix runs once, then all continuations in one batch, right-padded, from copies of its cache."""
        prefix = np.ascontiguousarray(np.asarray(prefix, dtype=np.int64).reshape(1, -1))
        rest = max(len(c) for c in continuations) - 1
        self.check_length(prefix.shape[1] + rest)
        first, *cache = self._run(prefix, self._empty(1))
        out = [np.empty((len(c), first.shape[-1]), np.float32) for c in continuations]
        for logits in out:
            logits[0] = first[0, -1]
        if rest:
            ids = np.zeros((len(continuations), rest), np.int64)
            for row, c in enumerate(continuations):
                ids[row, : len(c) - 1] = c[:-1]
            following = self._run(ids, [np.repeat(kv, len(continuations), axis=0) for kv in cache])[0]
            for row, logits in enumerate(out):
                logits[1:] = following[row, : len(logits) - 1]
        return out

    def _empty(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past]

    def _run(self, ids: np.ndarray, cache: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, {"input_ids": ids, **dict(zip(self.past, cache))})


Session = GraphSession  # the name the latency bench looks for
