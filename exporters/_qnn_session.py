"""The qnn artifact's decode loop on numpy and ONNX Runtime alone (the latency bench loads it without torch).

Two step graphs (_qnn_graph.py): prefill runs `chunk` tokens at a time, decode one, both over a cache of
`cache` slots per layer that this loop owns: each step returns its tokens' keys and values and the loop
writes them into the cache at their positions; the attention bias tells each query which slots it sees.
A prompt longer than a chunk runs chunk by chunk; the last chunk is padded (its padding writes cache slots
past the sequence, which no later query sees until they are overwritten).

backend "htp": the EPContext models (the compiled HTP context binaries) through ONNX Runtime's QNN execution
provider with its HTP backend: on a phone the Hexagon NPU, on an x86 host QNN's HTP emulation (the NPU's
integer arithmetic, slowly); no CPU fallback (`session.disable_cpu_ep_fallback`). backend "cpu": the
same QDQ graphs on the CPU execution provider, graph optimizations off so each DequantizeLinear is computed
as written (ONNX Runtime's fused QDQ kernels round differently).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vcompress.core.export_manifest import SessionError, open_exported

RUNTIME = "onnxruntime_qnn"
MASKED = -100.0  # _qnn_graph.MASKED (this module imports nothing from the exporters package)
SOC_MODELS = {73: 43, 75: 57}  # htp_arch -> QNN soc_model: SM8550 (8 Gen 2), SM8650 (8 Gen 3)


def qnn_devices() -> list:
    """The QNN execution provider's devices, its plugin library registered once per process."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise SessionError(
            "the QNN execution provider is not installed; pip install onnxruntime-qnn==2.7.0 (or `pip install -e .[qnn]`)"
        ) from None
    name = onnxruntime_qnn.get_ep_name()
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(name, onnxruntime_qnn.get_library_path())
    return [d for d in ort.get_ep_devices() if d.ep_name == name]


def htp_options(htp_arch: int) -> dict[str, str]:
    import onnxruntime_qnn

    return {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "htp_arch": str(htp_arch), "soc_model": str(SOC_MODELS[htp_arch])}


def open_step(path: Path, backend: str, htp_arch: int = 73, threads: int | None = None, config: dict | None = None) -> ort.InferenceSession:
    """One step graph on the HTP (no CPU fallback) or, QDQ as written, on the CPU execution provider."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if backend == "cpu":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_provider_for_devices(qnn_devices(), htp_options(htp_arch))
    return ort.InferenceSession(str(path), options)


@dataclass
class State:
    length: int
    cache: dict[str, np.ndarray]  # past_key.{i} / past_value.{i} -> [1, kv_heads, cache, head_dim]


class Steps:
    """The host loop over two step sessions (prefill: `chunk` tokens, decode: 1). `record`, when a list,
    receives a copy of every feed (the quantizer's calibration data)."""

    few = 4  # up to this many tokens go through the decode graph one by one

    def __init__(self, prefill, decode, *, layers: int, kv_heads: int, head_dim: int, chunk: int, cache: int, record: list | None = None):
        self.sessions = {chunk: prefill, 1: decode}
        self.layers, self.kv_heads, self.head_dim, self.chunk, self.capacity = layers, kv_heads, head_dim, chunk, cache
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}
        self.record = record

    def new_state(self) -> State:
        shape = (1, self.kv_heads, self.capacity, self.head_dim)
        return State(0, {f"past_{p}.{i}": np.zeros(shape, np.float32) for i in range(self.layers) for p in ("key", "value")})

    def run(self, tokens, state: State) -> np.ndarray:
        """Feed tokens after the state (chunks of the prefill graph, or one decode step); logits [n, vocab]."""
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if state.length + len(tokens) > self.capacity:
            raise SessionError(f"{state.length + len(tokens)} tokens exceed the artifact's {self.capacity}-token cache; shorten the input")
        if len(tokens) <= self.few:  # a short continuation: decode steps cost less than a padded chunk
            return np.concatenate([self._step(tokens[i : i + 1], state, 1) for i in range(len(tokens))])
        return np.concatenate([self._step(tokens[i : i + self.chunk], state, self.chunk) for i in range(0, len(tokens), self.chunk)])

    def _step(self, tokens: np.ndarray, state: State, seq: int) -> np.ndarray:
        n, start = len(tokens), state.length
        ids = np.zeros((1, seq), np.int32)
        ids[0, :n] = tokens
        positions = np.minimum(np.arange(start, start + seq), self.capacity - 1).astype(np.int32)[None]
        bias = np.full((1, 1, seq, self.capacity + seq), MASKED, np.float32)
        bias[0, 0, :, :start] = 0
        bias[0, 0, :, self.capacity :] = np.where(np.tri(seq, dtype=bool), 0, MASKED)
        feeds = {"input_ids": ids, "position_ids": positions, "attention_bias": bias, **state.cache}
        if self.record is not None:
            self.record.append({k: v.copy() for k, v in feeds.items()})
        logits, *new = self.sessions[seq].run(self.outputs[seq], feeds)
        for name, value in zip(self.outputs[seq][1:], new):
            state.cache["past_" + name.removeprefix("new_")][:, :, start : start + n] = value[:, :, :n]
        state.length += n
        return logits[0, :n]


class QnnSession:
    """An artifact folder's two step graphs: the compiled EPContext models on the HTP, or the QDQ models on the CPU."""

    def __init__(self, folder: str | Path, *, threads: int | None = None, backend: str = "htp"):
        self.folder = Path(folder)
        self.manifest = m = open_exported(self.folder, "qnn", keys=())[0]
        self.backend, self.threads = backend, threads
        files = m["files"]["htp" if backend == "htp" else "qdq"]
        paths = [self.folder / files[g] for g in ("prefill", "decode")]
        if missing := [str(p) for p in paths if not p.is_file()]:
            raise SessionError(f"{', '.join(missing)} missing; re-run `vcompress export qnn`")
        prefill, decode = (open_step(p, backend, m["htp_arch"], threads) for p in paths)
        self.steps = Steps(
            prefill, decode, layers=m["layers"], kv_heads=m["kv_heads"], head_dim=m["head_dim"], chunk=m["chunk"], cache=m["cache"]
        )
        self.vocab, self.max_length = m["vocab_size"], m["cache"]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full logits [batch, seq, vocab], each row from its own cache."""
        ids = np.asarray(ids).reshape(len(ids), -1)
        return np.stack([self.steps.run(row, self.steps.new_state()) for row in ids])

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, State]:
        state = self.steps.new_state()
        return self.steps.run(ids, state)[-1], state

    def decode(self, token_id: int, state: State) -> tuple[np.ndarray, State]:
        return self.steps.run([token_id], state)[-1], state

    def continuation_logits(self, prefix: np.ndarray, continuations: list[np.ndarray]) -> list[np.ndarray]:
        """The prefix once, then each continuation but its last token from a copy of the prefix's cache."""
        state = self.steps.new_state()
        first = self.steps.run(prefix, state)[-1]
        out = []
        for continuation in continuations:
            rows = [first[None]]
            if len(continuation) > 1:
                branch = State(state.length, {k: v.copy() for k, v in state.cache.items()})
                rows.append(self.steps.run(continuation[:-1], branch))
            out.append(np.concatenate(rows))
        return out


Session = QnnSession  # the name the latency bench looks for
