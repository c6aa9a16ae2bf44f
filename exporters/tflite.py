"""TFLite (LiteRT) export (prefill + decode signatures with a KV cache; fp32, INT8 or INT4 weights)
and its LiteRT Runner.

`export(model, out, quant=...)` writes an artifact folder:
  model.tflite                   both signatures over one set of weights (see _tflite_session.py)
  model.litertlm                 the LiteRT-LM bundle an app loads: that .tflite, tokenizer.json and LLM
                                 metadata (stop tokens, chat template), packed by litert-torch (_tflite_convert.py)
  config.json, generation_config.json, tokenizer files   from the source checkpoint
  manifest.json                  "format": "tflite", files, signatures with input/output names, dtypes
                                 and shapes, prefill and cache lengths, quantization, parity results,
                                 app_runtime (LiteRT-LM: its version, the bundle)
  recipe.yaml, metrics.json      written by vcompress.core.stage.execute
The conversion is litert-torch's (_tflite_convert.py, the optional [tflite] extra). Every export checks
itself against PyTorch with the exporters' shared parity check (base.parity); a failed check raises
Refused and leaves no artifact behind. Where litert-lm-api is installed the bundle is also loaded
in LiteRT-LM, and one it refuses fails the export the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from vcompress.core.artifact import MANIFEST, write_json
from vcompress.core.errors import Refused, Unsupported
from vcompress.core.models import attention_shape, bytes_on_disk, save_model
from vcompress.core.packages import import_failure
from vcompress.core.runner import RUNNERS
from vcompress.core.stage import StageContext

from . import _tflite_convert
from ._tflite_session import FORMAT, LiteRTSession, SessionError, signature_io
from .base import (
    Exporter,
    ParityConfig,
    SessionRunner,
    gate,
    load_source,
    package_version,
    refuse_if_too_big,
    save_sidecars,
    stored_weights,
    uncarried_source,
)

MODEL_FILE = "model.tflite"
BUNDLE_FILE = "model.litertlm"  # what LiteRT-LM loads (the name _litertlm_session.py looks for)


class TFLiteExportConfig(ParityConfig):
    quant: Literal["none", "int8", "int4"] = Field(
        "none", description="weights: fp32, or INT8 / INT4 per channel with float activations (ai-edge-quantizer dynamic range)"
    )
    prefill_tokens: int = Field(256, ge=1, description="tokens of the prefill signature (a prompt runs in chunks of this size)")
    short_prefill_tokens: int = Field(
        32,
        ge=0,
        description="a second, shorter prefill signature for short prompts and a long one's tail (none when 0 or not below prefill_tokens)",
    )
    cache_length: int = Field(1024, ge=2, description="KV cache slots: the longest sequence the export can hold")
    threads: int | None = Field(None, gt=0, description="LiteRT threads for the parity check")

    @model_validator(mode="after")
    def _cache_holds_a_chunk(self):
        if self.cache_length < self.prefill_tokens:
            raise ValueError(
                f"cache_length {self.cache_length} is shorter than prefill_tokens {self.prefill_tokens}; raise it or lower prefill_tokens"
            )
        return self


class TFLiteExport(Exporter):
    format = FORMAT
    runtime = "litert"
    runtime_package = "ai-edge-litert"
    app_runtime_package = "litert-lm-api"  # LiteRT-LM's Python API, to load and time model.litertlm here
    sessions = {"litert_lm": f"{__package__}._litertlm_session", FORMAT: f"{__package__}._tflite_session"}  # tflite: our loop
    Config = TFLiteExportConfig

    def predicted_weights(self, shape: dict, quantization: dict, max_positions: int) -> dict:
        """What this export stores (`Exporter.predicted_weights`): every weight re-quantized at the target's
        `quant` per output channel by ai-edge-quantizer (one float32 scale per row: left out), whatever grid the
        source carried; the embedding table and LM head at no fewer than 8 bits (not measured on an int4 export)."""
        bits = {"none": 32, "int8": 8, "int4": 4}[self.config.quant]
        return stored_weights(shape, bits, max(bits, 8), max(bits, 8))

    def run(self, ctx: StageContext) -> dict:
        cfg: TFLiteExportConfig = self.config
        refuse_if_too_big(ctx, "litert-torch's converter (it traces the whole PyTorch model)")
        source = ctx.read_source()
        model, tokenizer, grid = load_source(ctx)  # a quantize folder: its dequantized weights
        model_type = model.config.model_type
        if why := _tflite_convert.missing():
            raise Unsupported(f"the tflite exporter needs litert-torch, tensorflow-cpu and ai-edge-litert: {why}")
        uncarried = uncarried_source(
            ctx, cfg.quant, "ai-edge-quantizer computes its own per-channel scales from the float weights and takes no given grid"
        )
        hf = Path(str(source.path)) if source.kind == "hf" and grid is None else save_model(model, tokenizer, ctx.work / "hf")
        ctx.log(
            f"converting to TFLite with litert-torch ({model_type}, {cfg.quant}, prefill {'/'.join(map(str, _prefill_lengths(cfg)))}, "
            f"cache {cfg.cache_length})"
        )
        converted, bundle = _tflite_convert.convert(
            hf,
            ctx.work / "litert",
            model_type=model_type,
            quant=cfg.quant,
            prefill_lengths=_prefill_lengths(cfg),
            cache_length=cfg.cache_length,
            log=ctx.log,
        )
        fp32_bytes = (converted.parent / "model.tflite").stat().st_size
        shutil.copyfile(converted, ctx.out / MODEL_FILE)
        shutil.copyfile(bundle, ctx.out / BUNDLE_FILE)
        save_sidecars(model, tokenizer, ctx.out)
        manifest = self.manifest(
            {"model": MODEL_FILE, "litertlm": BUNDLE_FILE, "config": "config.json", "tokenizer": "tokenizer.json"},
            **_model_fields(model.config, cfg, ctx.out / MODEL_FILE),
            app_runtime={
                "name": "litert-lm",
                "version": package_version(self.app_runtime_package),
                "bundle": BUNDLE_FILE,
                "builder": f"litert-lm-builder {package_version('litert-lm-builder')}",
            },
        )
        if uncarried:
            manifest["quant"]["source_grid"] = uncarried
        write_json(ctx.out / MANIFEST, manifest)
        result = gate(ctx, TFLiteRunner, model, tokenizer, cfg, manifest, "TFLite", dequantized=bool(grid))
        loaded = _bundle_loads(ctx)
        size = bytes_on_disk(ctx.out / MODEL_FILE)
        metrics = {
            "format": FORMAT,
            "quant": cfg.quant,
            "model_bytes": size,
            "fp32_tflite_bytes": fp32_bytes,
            "size_ratio_to_fp32": round(size / fp32_bytes, 4),
            "litertlm_bytes": bytes_on_disk(ctx.out / BUNDLE_FILE),
            "litertlm_loaded": loaded,
            "prefill_tokens": cfg.prefill_tokens,
            "cache_length": cfg.cache_length,
            "parity": result,
        }
        return metrics


export = TFLiteExport.export  # the library API: export(model_path, out, quant=None, **settings) -> metrics


def _bundle_loads(ctx: StageContext) -> str:
    """Open model.litertlm in LiteRT-LM where it is installed; what happened, in one line."""
    try:
        from . import _litertlm_session
    except ImportError as e:
        said = f"not loaded: LiteRT-LM cannot be imported here: {import_failure(e, ('litert-lm-api',), _tflite_convert.INSTALL)}"
    else:
        try:
            _litertlm_session.Session(ctx.out, threads=1).close()
        except _litertlm_session.SessionError as e:
            raise Refused(f"{e}; the export was not written") from None
        said = f"loaded by LiteRT-LM {_litertlm_session.VERSION}"
    ctx.log(f"{BUNDLE_FILE}: {said}")
    return said


def _prefill_lengths(cfg: TFLiteExportConfig) -> list[int]:
    """The prefill signatures' lengths: prefill_tokens, and the short one where it is shorter. Most evaluation
    prompts are short (cloze MMLU medical: median 30 tokens), and each call costs its whole length."""
    short = cfg.short_prefill_tokens
    return [short, cfg.prefill_tokens] if 0 < short < cfg.prefill_tokens else [cfg.prefill_tokens]


def _model_fields(config, cfg: TFLiteExportConfig, model_file: Path) -> dict:
    """The manifest's description of the model: shape, signatures with their tensors, quantization."""
    shape = attention_shape(config)
    signatures = signature_io(model_file)
    lengths = _prefill_lengths(cfg)
    prefill = f"prefill_{lengths[-1]}"
    short = {"prefill_short": {"name": f"prefill_{lengths[0]}", **signatures[f"prefill_{lengths[0]}"]}} if len(lengths) > 1 else {}
    return {
        "architecture": config.model_type,
        "layers": shape["layers"],
        "heads": shape["query_heads"],
        "kv_heads": shape["kv_heads"],
        "head_dim": shape["head_dim"],
        "vocab_size": config.vocab_size,
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "prefill_tokens": cfg.prefill_tokens,
        "short_prefill_tokens": lengths[0] if short else None,
        "cache_length": cfg.cache_length,
        "signatures": {
            "prefill": {"name": prefill, **signatures[prefill]},
            **short,
            "decode": {"name": "decode", **signatures["decode"]},
        },
        "quant": {
            "scheme": cfg.quant,
            **(
                {}
                if cfg.quant == "none"
                else {
                    "recipe": _tflite_convert.RECIPES[cfg.quant],
                    "tool": f"ai-edge-quantizer {package_version('ai-edge-quantizer')}",
                    "weights": f"{cfg.quant} per output channel",
                    "activations": "float32, quantized on the fly (dynamic range)",
                }
            ),
        },
        "converter": {"litert-torch": package_version("litert-torch")},
        "notes": {
            "kv_cache": "kv_cache_k_<layer> [1, kv_heads, cache, head_dim] and kv_cache_v_<layer> [1, kv_heads, head_dim, cache]: "
            "passed in and returned by every call, new entries written at input_pos",
            "mask": "float32 added to attention scores: 0 where the cache slot is at or before the row's position, -inf after",
            "prompt": "all but the last token through prefill (chunks of prefill_tokens, zero-padded; a remainder that fits in "
            "fewer padded tokens in chunks of short_prefill_tokens goes through prefill_short), the last through decode",
            "logits": "decode only; prefill returns the cache",
        },
    }


# --- the runner -----------------------------------------------------------------------


@RUNNERS.register(FORMAT)
class TFLiteRunner(SessionRunner):
    """The ai-edge-litert interpreter on CPU: prefill + decode through the two signatures, int32 ids.

    A torch-facing adapter over `_tflite_session.LiteRTSession`. `forward` takes `positions` so that
    evaluation asks only for the logits it reads (every position costs one decode step here).
    """

    backend = FORMAT
    session_error = SessionError

    def __init__(self, path: str | Path, *, threads: int | None = None, **_):
        super().__init__(path, threads=threads)
        self.max_length = self.session.cache_length

    def open_session(self) -> LiteRTSession:
        return LiteRTSession(self.path, threads=self.threads)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        lengths = None if attention_mask is None else attention_mask.sum(-1).tolist()
        wanted = None if positions is None else positions.cpu().numpy()
        return torch.from_numpy(self._call(self.session.logits, input_ids.cpu().numpy(), lengths, wanted))
