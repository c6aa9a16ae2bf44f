"""LiteRT-LM over a TFLite export folder's model.litertlm: what an app that ships LiteRT-LM runs.

The latency bench (devices/bench.py) loads this module for TFLite folders by default (the first of
`TFLiteExport.sessions`), so host latency is that of LiteRT-LM's C++ loop, not of our interpreter loop.
Only the stdlib and litert_lm (litert-lm-api) here, no numpy, no torch.

LiteRT-LM's Python API (0.18) takes text and returns text: no token ids in, no logits out, so it
cannot be driven step by step the way the bench drives the other backends. Its Benchmark API times
the runtime itself instead: it tokenizes a prompt, truncates or zero-pads it to exactly N prefill
tokens, decodes exactly M, and reports time to first token (the prefill plus one decode step) and
decode tokens/s. `timed_run` is that, once per run; the prompt is our ids turned back into text.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import litert_lm

from vcompress.core.export_manifest import SessionError

RUNTIME = "litert_lm"
VERSION = metadata.version("litert-lm-api")  # the module has no __version__
BUNDLE = "model.litertlm"

# Loads the runtime's library now (it loads on first use), so the bench's runtime baseline includes it.
try:
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
except OSError as e:  # a wheel whose library does not load on this system (glibc older than 2.27, ...)
    raise ImportError(f"litert_lm's library does not load here ({e})", name="litert_lm") from None


class Session:
    def __init__(self, folder: str | Path, *, threads: int | None = None, **_):
        self.folder = Path(folder)
        self.bundle = self.folder / BUNDLE
        if not self.bundle.is_file():
            raise SessionError(f"{self.folder} has no {BUNDLE}; re-export it with `vcompress export tflite`")
        manifest = json.loads((self.folder / "manifest.json").read_text())
        self.max_length, self.vocab = int(manifest["cache_length"]), int(manifest["vocab_size"])
        self.threads = threads
        self.backend = litert_lm.Backend.CPU(thread_count=threads)
        # LiteRT-LM writes its XNNPACK weight cache beside the model unless told otherwise: not into the artifact.
        self.cache_dir = tempfile.mkdtemp(prefix="litertlm-cache-")
        self.prompt: tuple[list[int], str] | None = None
        self.engine().close()  # fails here, with the reason, on a bundle LiteRT-LM cannot load

    def engine(self, **settings) -> litert_lm.Engine:
        try:
            return litert_lm.Engine(str(self.bundle), backend=self.backend, cache_dir=self.cache_dir, **settings)
        except RuntimeError as e:
            raise SessionError(f"LiteRT-LM {VERSION} cannot load {self.bundle}: {e}") from None

    def timed_run(self, ids, decode_tokens: int) -> tuple[float, float]:
        """(seconds to first token, seconds for decode_tokens decode steps), as LiteRT-LM measures them."""
        ids = [int(t) for t in getattr(ids, "flat", ids)]
        if self.prompt is None or self.prompt[0] != ids:
            engine = self.engine()  # closed before the benchmark's own engine loads: one model in memory at a time
            self.prompt = (ids, engine.detokenize(ids))
            engine.close()
        info = litert_lm.Benchmark(
            model_path=str(self.bundle),
            backend=self.backend,
            prefill_tokens=len(ids),
            decode_tokens=decode_tokens,
            prompt=self.prompt[1],
            cache_dir=self.cache_dir,
        ).run()
        if info.last_prefill_token_count != len(ids) or info.last_decode_token_count != decode_tokens:
            raise SessionError(f"LiteRT-LM's benchmark ran other lengths than {len(ids)} + {decode_tokens} tokens: {info}")
        return info.time_to_first_token_in_second, decode_tokens / info.last_decode_tokens_per_second

    def close(self) -> None:
        if getattr(self, "cache_dir", None):
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def __del__(self):
        self.close()
