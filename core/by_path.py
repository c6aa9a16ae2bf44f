"""Load a module from its file without importing the package around it: the runtime-only processes (the host
bench, the peers' workers) open a session module this way, since the exporters' and devices' packages import torch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # dataclasses look their module up there
    spec.loader.exec_module(loaded)
    return loaded
