"""One seed threaded everywhere, without leaving the global RNGs changed behind the caller."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


@contextlib.contextmanager
def seeded(seed: int):
    """Seed python, numpy and torch inside the block; restore their states on exit.

    Libraries that reseed the global RNG (gptqmodel does) are run inside this block so the
    caller's RNG state is what it was before.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
