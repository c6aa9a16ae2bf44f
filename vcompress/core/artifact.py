"""Artifact folders: the one contract between stages.

A stage writes into a temp sibling and renames it into place when complete, so a folder that
exists is a finished one (`--resume` trusts it) and a crash never leaves half an artifact. Beside
the artifact lie `recipe.yaml` (the exact config that produced it) and `metrics.json`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import InputError

RECIPE = "recipe.yaml"
METRICS = "metrics.json"
MANIFEST = "manifest.json"


@contextlib.contextmanager
def stage_folder(out: Path | str, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it becomes `out`. An existing `out` needs force=True.

    With force, the old folder is replaced only after the new one is complete, so nothing
    already written is lost if the stage fails.
    """
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to replace it (or --resume in a run)")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path | str, data: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
    return path


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is missing; run the stage that writes it first") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON (line {e.lineno}); delete it and re-run the stage") from None


def write_recipe(folder: Path | str, stage: str, config: dict, **extra: Any) -> Path:
    from vcompress import __version__

    body = {"stage": stage, "vcompress": __version__, "config": _clean(config), **_clean(extra)}
    path = Path(folder) / RECIPE
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def read_recipe(folder: Path | str) -> dict:
    path = Path(folder) / RECIPE
    if not path.is_file():
        raise InputError(f"{path} is missing; {folder} was not written by vcompress")
    return yaml.safe_load(path.read_text())


def write_metrics(folder: Path | str, metrics: dict) -> Path:
    return write_json(Path(folder) / METRICS, metrics)


def read_metrics(folder: Path | str) -> dict:
    return read_json(Path(folder) / METRICS)


def figure(value: float | int | None, unit: str, *, measured: bool | None = None, device: str | None = None, **extra) -> dict:
    """A number with its unit; latency figures also say measured (with device) or estimated."""
    out: dict[str, Any] = {"value": value, "unit": unit}
    if measured is not None:
        out["source"] = "measured" if measured else "estimated"
        if device:
            out["device"] = device
    out.update(extra)
    return out


def _clean(data: Any) -> Any:
    """Make data safe for JSON/YAML: paths to str, tuples to lists, NaN to None."""
    if isinstance(data, dict):
        return {str(k): _clean(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_clean(v) for v in data]
    if isinstance(data, Path):
        return str(data)
    if isinstance(data, float) and (math.isnan(data) or math.isinf(data)):
        return None
    if hasattr(data, "item") and callable(data.item) and getattr(data, "ndim", 1) == 0:
        return _clean(data.item())
    return data
