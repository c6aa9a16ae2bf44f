"""Exporters (one module per format) and their Runners. Importing this registers them all."""
from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

from vcompress.core.errors import InputError
from vcompress.core.registry import EXPORTERS
from vcompress.core.runner import RUNNERS, Runner

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def detect_backend(path: str | Path) -> str:
    """The backend that runs an artifact folder: its manifest's `format`, else torch for an HF folder."""
    path = Path(path)
    manifest = path / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["format"]
    if (path / "config.json").is_file() or path.suffix == ".gguf":
        return "torch"
    raise InputError(f"{path} is neither an HF checkpoint folder nor an exported artifact (no manifest.json); pass one of those")


def open_runner(path: str | Path | None, *, threads: int | None = None, backend: str | None = None, **kwargs) -> Runner:
    """A Runner for any artifact: HF folder / GGUF / default (torch), or an exported folder."""
    if path is None:
        backend = backend or "torch"
    backend = backend or detect_backend(path)
    return RUNNERS.get(backend)(path, threads=threads, **kwargs)


NOT_A_PIPELINE_FORMAT = {
    "tensorrt": "TensorRT's ONNX parser does not take the ONNX Runtime fused operators our ONNX graph is built from "
                "(GroupQueryAttention, MatMulNBits), so `run` cannot end in an engine; run an onnx profile, then "
                "`vcompress export tensorrt --onnx RUN/05-export-onnx --out E` for the labelled engine build plan",
}


def export_stage(settings: dict, where: str | None = None):
    """The export Stage for settings that name their `format` (onnx, tflite, tensorrt)."""
    settings = dict(settings)
    fmt = settings.pop("format")
    if fmt not in EXPORTERS:
        known = ", ".join(EXPORTERS.names())
        hint = NOT_A_PIPELINE_FORMAT.get(fmt, f"available: {known}")
        raise InputError(f"{where + ': ' if where else ''}no pipeline exporter for format {fmt!r}; {hint}")
    stage_cls = EXPORTERS.get(fmt)
    return stage_cls(stage_cls.parse_config(settings, where=where))
