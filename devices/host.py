"""`host`: measure on this machine, in a subprocess with the same Python, so that the peak RSS
belongs to the benchmark (runtime + model) alone and not to the pipeline that asked for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vcompress.core.errors import InputError
from vcompress.core.registry import DEVICES

from .base import LatencyDevice, bench_command, bench_error, host_label, parse_bench_json


@DEVICES.register("host")
class HostDevice(LatencyDevice):
    kind = "host"
    this_machine = True

    @property
    def label(self) -> str:
        return self.settings.label or host_label(self.profile)

    def command(self, artifact: Path) -> list[str]:
        return bench_command([sys.executable], str(Path(artifact).resolve()), self.settings, self.label, self.kind)

    def measure(self, artifact: Path) -> dict:
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        try:
            done = subprocess.run(self.command(artifact), capture_output=True, text=True, env=env, timeout=self.settings.timeout_s)
        except subprocess.TimeoutExpired:
            raise InputError(
                f"the host benchmark of {artifact} ran past {self.settings.timeout_s:.0f} s; lower --runs or --prompt-tokens, or raise the timeout"
            ) from None
        if done.returncode != 0:
            raise bench_error(done.returncode, done.stderr, f"the host benchmark of {artifact}")
        return parse_bench_json(done.stdout, "this host")
