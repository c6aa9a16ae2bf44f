"""Exporters (one module per format) and their Runners. Importing this registers them all."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from vcompress.core.errors import InputError
from vcompress.core.export_manifest import MANIFEST, artifact_format
from vcompress.core.runner import RUNNERS, Runner

from .base import Exporter, ExportStep, export_stage  # noqa: F401  (the public entry points)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def detect_backend(path: str | Path) -> str:
    """The backend that runs an artifact folder: its manifest's `format`, else torch for an HF folder."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return artifact_format(path)
    if (path / "config.json").is_file() or path.suffix == ".gguf":
        return "torch"
    raise InputError(f"{path} is neither an HF checkpoint folder nor an exported artifact (no manifest.json); pass one of those")


def open_runner(path: str | Path | None, *, threads: int | None = None, backend: str | None = None, **kwargs) -> Runner:
    """A Runner for any artifact: HF folder / GGUF / default (torch), or an exported folder."""
    if path is None:
        backend = backend or "torch"
    backend = backend or detect_backend(path)
    return RUNNERS.get(backend)(path, threads=threads, **kwargs)
