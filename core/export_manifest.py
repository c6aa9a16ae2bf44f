"""What an artifact folder says about itself: an exported folder's manifest.json (its format and the
files an exporter listed), or, without one, an HF folder whose weights are its safetensors.

Pure Python on purpose: the latency bench reads artifacts in a process that must hold only the runtime.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from .errors import InputError

MANIFEST = "manifest.json"
# The export's parity check answers these against PyTorch (exporters/base.py); the emulated aarch64 check answers the
# same ones on the target's build of the runtime (devices/emulated.py).
PARITY_PROMPTS = (
    "The heart pumps blood through",
    "A patient presents with fever and cough. The most likely diagnosis is",
    "The contract is void if either party",
    "Interest rates rose by two percent, and bond prices",
    "Question: which organ filters the blood?\nAnswer:",
)
MODEL_FILE_KEYS = ("model", "weights", "engine")  # the manifest's `files` that hold the model (not config, tokenizer, scripts)
# A prompt graph stored beside the decode graph (ONNX's --prefill-graph, QNN's prefill context binary): part of the
# artifact's size, which a size budget judges, but not of the bytes each decoded token reads (the roofline's).
PREFILL_FILE_KEYS = ("prefill_model", "prefill_weights")


def read_manifest(artifact: Path | str) -> dict:
    """An exported folder's manifest.json; {} for an HF folder or a single file."""
    path = Path(artifact) / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON (line {e.lineno}); re-export the artifact") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 JSON; re-export the artifact") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), str):
        raise InputError(f"{path} names no format (not a JSON object with a `format`); re-export the artifact")
    return manifest


class SessionError(ValueError):
    """A runtime session cannot open or run an artifact; the message names the problem and the fix."""


def open_exported(folder: Path, fmt: str, keys: tuple[str, ...] = ("model",)) -> tuple[dict, list[Path]]:
    """A `fmt` artifact's manifest and the files its `keys` name, for a session to open (each must exist)."""
    if not (folder / MANIFEST).is_file():
        raise SessionError(f"{folder} has no {MANIFEST}; pass a folder written by `vcompress export {fmt}`")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != fmt:
        raise SessionError(f"{folder} is a {manifest.get('format')!r} artifact, not {fmt}; open it with its own backend")
    files = manifest.get("files", {})
    if absent := [key for key in keys if key not in files]:
        raise SessionError(f"{folder}'s {MANIFEST} lists no {', '.join(absent)} file; re-run `vcompress export {fmt}`")
    paths = [folder / files[key] for key in keys]
    if missing := [str(path) for path in paths if not path.is_file()]:
        raise SessionError(f"{', '.join(missing)} missing; re-run `vcompress export {fmt}`")
    return manifest, paths


def artifact_format(artifact: Path | str) -> str:
    """The exporter's format the manifest names; torch for an HF folder or a .gguf."""
    return read_manifest(artifact).get("format", "torch")


def model_files(artifact: Path | str) -> list[Path]:
    """The files that hold the model: a file as given, the model files an exporter listed in its
    manifest, or an HF folder's safetensors."""
    path = Path(artifact)
    if path.is_file():
        return [path]
    manifest = read_manifest(path)
    if not manifest:
        return sorted(path.glob("*.safetensors"))
    files = manifest.get("files") or {}
    listed = [path / files[key] for key in MODEL_FILE_KEYS if files.get(key)]
    missing = [p.name for p in listed if not p.is_file()]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}, which its manifest.json lists; re-export the artifact")
    return listed


def model_size_bytes(artifact: Path | str) -> int:
    """Bytes on disk of the model files and of a prompt graph stored beside them."""
    path = Path(artifact)
    files = (read_manifest(path) or {}).get("files") or {} if path.is_dir() else {}
    beside = [path / files[key] for key in PREFILL_FILE_KEYS if files.get(key) and (path / files[key]).is_file()]
    return sum(p.stat().st_size for p in [*model_files(artifact), *beside])


def session_runtime(session_module) -> dict:
    """{"module", "version"} of the runtime a session module (exporters/_<backend>_session.py, whose RUNTIME names
    the module it runs on) imports: the session's own VERSION where that module has no __version__ (LiteRT-LM), else
    the runtime package's. Raises ImportError when the runtime is not installed."""
    runtime = importlib.import_module(session_module.RUNTIME)
    package = sys.modules[runtime.__name__.partition(".")[0]]
    return {"module": runtime.__name__, "version": getattr(session_module, "VERSION", None) or getattr(package, "__version__", None)}
