"""Exporters (one module per format) and their Runners. Importing this registers them all."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from vcompress.core.errors import InputError, Unsupported
from vcompress.core.manifest import MANIFEST, artifact_format
from vcompress.core.registry import EXPORTERS, STAGES
from vcompress.core.runner import RUNNERS, Runner
from vcompress.core.stage import Stage

from .base import ExportStage

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


def export_stage(settings: dict, where: str | None = None) -> ExportStage:
    """The export Stage for settings that name their `format` (a registered exporter), its config validated."""
    settings = dict(settings)
    stage_cls = EXPORTERS.get(settings.pop("format"))
    return stage_cls(stage_cls.parse_config(settings, where=where))


@STAGES.register("export")
class Export(Stage):
    """A recipe's export step: the profile's target format picks the registered exporter, whose runtime
    must be the one the target names."""

    name = "export"
    folder = "05-export"  # 05-export-<format> in a run (ExportStage.run_folder)

    @classmethod
    def from_profile(cls, settings: dict, profile, where: str | None = None) -> ExportStage:
        target, prefix = profile.target, f"{where}: " if where else ""
        if target.format not in EXPORTERS:
            raise InputError(f"{prefix}target.format {target.format!r} has no exporter; known: {', '.join(EXPORTERS.names())}")
        exporter = EXPORTERS.get(target.format)
        if target.runtime and target.runtime != exporter.runtime:
            raise InputError(
                f"{prefix}target.runtime {target.runtime!r}: the {target.format} exporter's artifacts run on "
                f"{exporter.runtime!r}; set runtime: {exporter.runtime} or leave it out"
            )
        if exporter.refuses_checkpoints:  # a run hands the exporter a model checkpoint
            raise Unsupported(f"{prefix}{exporter.refuses_checkpoints}")
        return export_stage({"format": target.format, "quant": target.quant, **settings}, where)
