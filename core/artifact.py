"""Artifact folders: the one contract between stages.

A stage writes into a temp sibling and renames it into place when complete, so a folder that
exists is a finished one (`--resume` trusts it) and a crash never leaves half an artifact. Beside
the artifact lie `recipe.yaml` (the exact config that produced it) and `metrics.json`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError
from .export_manifest import MANIFEST  # noqa: F401  (re-exported: stages import it from here)
from .units import figure  # noqa: F401  (re-exported: stages import it from here)

RECIPE = "recipe.yaml"
METRICS = "metrics.json"


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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise InputError(f"cannot write into {out.parent} ({e.strerror}); choose a writable --out") from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InputError(
                f"no space left on {out.parent} while writing {out.name}; free space or choose another --out (earlier artifacts are intact)"
            ) from None
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class RunLayout:
    """Every path of a run folder, named once (docs/run_format.md). Stage folders are listed in run.json
    (written by the pipeline from the registered stages), so readers find a stage's folder by its name."""

    RUN = "run.json"
    VERDICT, LATENCY, EVAL = "verdict.json", "latency.json", "eval.json"

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.run_json = self.root / self.RUN
        self.log_file = self.root / "logs" / "run.log"
        self.auto_json = self.root / "auto.json"
        self.candidates = self.root / "candidates"

    def read_run(self) -> dict:
        if not self.run_json.is_file():
            raise InputError(f"{self.root} has no {self.RUN}; pass a folder written by `vcompress run`")
        try:
            run = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{self.run_json} is corrupt (not JSON); start the run again with --force, or restore the file") from None
        if not isinstance(run, dict) or not isinstance(run.get("stages"), list):
            raise InputError(f"{self.run_json} is not a run record (no stage list); delete it and start the run again with --force")
        return run

    def folder(self, stage: str) -> Path | None:
        """The folder of the named stage in this run (None if the run's recipe has no such stage)."""
        for entry in self.read_run()["stages"]:
            if isinstance(entry, dict) and entry.get("name") == stage and entry.get("folder"):
                return self.root / entry["folder"]
        return None

    def validation(self, name: str, *, required: bool = True) -> dict:
        """verdict.json, latency.json or eval.json of the run's validate stage ({} when not `required` and absent)."""
        folder = self.folder("validate")
        path = folder / name if folder is not None else None
        if path is None or not path.is_file():
            if required:
                raise InputError(
                    f"{self.root} has no {name}: the run did not finish validating; finish it with `vcompress run --resume` first"
                )
            return {}
        data = read_json(path)
        if not isinstance(data, dict):
            raise InputError(f"{path} is not a JSON object; re-run the validate stage (`vcompress run --resume --from validate`)")
        return data


def write_json(path: Path | str, data: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(clean(data), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} is missing; run the stage that writes it first") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON (line {e.lineno}); delete it and re-run the stage that writes it") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 JSON; delete it and re-run the stage that writes it") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, not a JSON file; remove it and re-run the stage that writes it") from None


def write_recipe(folder: Path | str, stage: str, config: dict, **extra: Any) -> Path:
    from vcompress import __version__

    body = {"stage": stage, "vcompress": __version__, "config": clean(config), **clean(extra)}
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


def clean(data: Any) -> Any:
    """Make data safe for JSON/YAML: paths to str, tuples to lists, NaN to None."""
    if isinstance(data, dict):
        return {str(k): clean(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [clean(v) for v in data]
    if isinstance(data, Path):
        return str(data)
    if isinstance(data, float) and (math.isnan(data) or math.isinf(data)):
        return None
    if hasattr(data, "item") and callable(data.item) and getattr(data, "ndim", 1) == 0:
        return clean(data.item())
    return data
