"""Runs killed part-way, for the tests of --resume."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def kill_when_saved(command: list[str], checkpoint: Path, env: dict, seconds: float) -> int:
    """Start `command`, SIGKILL it once `checkpoint` is a file (or it ended, or `seconds` passed); its return code."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + seconds
    while not checkpoint.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode
