"""What every device shares: its settings (validated before work starts) and how a result is labelled.

A device is where latency comes from: `host` and `ssh` run devices/bench.py (the sessions the
Runners wrap, in a process that imports only the runtime), `adb` runs LiteRT-LM's `litert_lm_main`
(or LiteRT's `benchmark_model`) on a phone, `roofline` estimates. Each is registered by name in
`vcompress.core.registry.DEVICES`; its settings start from the profile (prompt length, threads,
connection) and take command-line overrides on top.
"""

from __future__ import annotations

import abc
import platform
import signal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vcompress.core.errors import InputError, InternalError
from vcompress.core.profiles import Profile
from vcompress.core.registry import DEVICES


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: int = Field(gt=0)
    decode_tokens: int = Field(64, gt=0)
    runs: int = Field(5, gt=0)
    warmup: int = Field(1, ge=0)
    threads: int | None = Field(None, gt=0)
    backend: str | None = None
    seed: int = 0
    label: str | None = None  # what to call the device in the result; default from the profile
    timeout_s: float = Field(1800, gt=0)


class LatencyDevice(abc.ABC):
    kind: str = ""
    this_machine: bool = False  # measures where vcompress runs (the host), so its figures are this machine's
    Settings: type[Settings] = Settings

    def __init__(self, profile: Profile, settings: Settings):
        self.profile = profile
        self.settings = settings

    @classmethod
    def defaults(cls, profile: Profile) -> dict:
        """Settings taken from the profile before overrides: the budgets' prompt length, the device's threads,
        and the connection's own keys when the profile's connection names this device."""
        values = {"prompt_tokens": profile.budgets.prompt_tokens, "threads": profile.device.threads}
        if profile.device.connection.kind == cls.kind:
            values.update(profile.device.connection.settings)
        return values

    def attached(self) -> bool:
        """Whether the device can be reached from here now (a phone plugged in, a board named)."""
        return True

    @classmethod
    def configure(cls, profile: Profile, overrides: dict) -> LatencyDevice:
        values = {**cls.defaults(profile), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            settings = cls.Settings.model_validate(values)
        except ValidationError as e:
            # a misspelt required key also reads as a missing one: name what was written, beside the known keys
            err = next((x for x in e.errors() if x["type"] == "extra_forbidden"), e.errors()[0])
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                known = ", ".join(sorted(cls.Settings.model_fields))
                raise InputError(
                    f"device {cls.kind!r} has no setting {key!r} (device.connection or a command-line override); known: {known}"
                ) from None
            raise InputError(f"device {cls.kind!r} setting {key}: {err['msg']}") from None
        return cls(profile, settings)

    @property
    def label(self) -> str:
        return self.settings.label or self.profile.device.name

    @abc.abstractmethod
    def measure(self, artifact: Path) -> dict:
        """latency.json for the artifact (see docs/run_format.md)."""


def host_label(profile: Profile) -> str:
    """This machine's name: the profile's device when the profile describes the host itself."""
    if DEVICES.get(profile.device.connection.kind).this_machine:
        return profile.device.name
    return f"{platform.machine()} host"


# Runs devices/bench.py by path wherever vcompress is installed, so that the measuring process does not
# import the vcompress.devices package (whose modules import torch): find_spec imports `vcompress` only.
BENCH_BOOT = (
    "import importlib.util, runpy; runpy.run_path(importlib.util.find_spec('vcompress.devices')"
    ".submodule_search_locations[0] + '/bench.py', run_name='__main__')"
)


def bench_command(python: list[str], artifact: str, settings: Settings, label: str, kind: str) -> list[str]:
    """The command line that measures `artifact` with devices/bench.py (-P: nothing from the working folder)."""
    args = [
        *python,
        "-P",
        "-c",
        BENCH_BOOT,
        artifact,
        "--prompt-tokens",
        settings.prompt_tokens,
        "--decode-tokens",
        settings.decode_tokens,
        "--runs",
        settings.runs,
        "--warmup",
        settings.warmup,
        "--seed",
        settings.seed,
        "--device-label",
        label,
        "--device-kind",
        kind,
    ]
    if settings.threads:
        args += ["--threads", settings.threads]
    if settings.backend:
        args += ["--backend", settings.backend]
    return [str(a) for a in args]


BAD_INPUT_EXIT = 2  # bench.py's exit code for a VcompressError of input kind (InputError, Unsupported): its one line


def bench_error(returncode: int, stderr: str, what: str) -> Exception:
    """The error for a bench.py process that exited with `returncode`: exit 2 is bench.py's own one line about its
    input (an artifact it cannot read), anything else a crash (a Python traceback exits 1, a native fault or the
    kernel's OOM killer a signal): an internal error whose message carries the stderr tail for the log."""
    if returncode == BAD_INPUT_EXIT:
        return InputError(f"{what} failed: {last_line(stderr).removeprefix('error: ')}")
    how = (
        f"killed by {signal.Signals(-returncode).name}"
        if returncode < 0 and -returncode in signal.valid_signals()
        else f"exit {returncode}"
    )
    tail = "\n".join((stderr or "").splitlines()[-40:])
    return InternalError(f"{what} crashed ({how}): {last_line(stderr)}\n--- the benchmark's stderr, last lines ---\n{tail}")


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def parse_bench_json(stdout: str, where: str) -> dict:
    """The JSON document bench.py prints last (libraries may print lines before it)."""
    import json

    start = stdout.rfind("\n{\n")
    start = 0 if stdout.startswith("{") and start < 0 else start + 1
    try:
        return json.loads(stdout[start:])
    except (json.JSONDecodeError, ValueError):
        raise InputError(
            f"the benchmark on {where} printed no result (last line: {last_line(stdout)}); run `python -m vcompress.devices.bench ARTIFACT` there to see why"
        ) from None
