"""The road from checkpoint to verdict: which stages a profile runs, with validated settings."""
from __future__ import annotations

import importlib

from vcompress.core.profiles import Profile
from vcompress.core.registry import STAGES

# Modules whose import registers stages, exporters and runners.
STAGE_MODULES = (
    "vcompress.compress",
    "vcompress.exporters",
)


def load_stages() -> None:
    for name in STAGE_MODULES:
        importlib.import_module(name)


def validate_recipe(profile: Profile, where: str = "profile") -> list:
    """Parse every recipe step's settings with its stage's Config, before any work starts.

    Returns (stage name, config) pairs; a stage not registered yet keeps its raw settings.
    """
    load_stages()
    steps = []
    for step in profile.recipe:
        if step.stage in STAGES:
            config = STAGES.get(step.stage).parse_config(step.settings, where=f"{where}: recipe.{step.stage}")
        else:
            config = step.settings
        steps.append((step.stage, config))
    return steps
