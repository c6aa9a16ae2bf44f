"""`ssh`: a Linux board (Jetson, Raspberry Pi). Copy the artifact to the board's workdir, run
devices/bench.py there with the board's Python (`base.bench_command`), read the JSON it prints.

The board needs vcompress and the artifact's runtime installed for that Python
(`pip install vcompress` in its environment); the measuring process imports only the runtime.
Connection settings come from the profile's `device.connection` (host, user, port, python,
workdir) and command-line overrides; key-based login is assumed (BatchMode: ssh never waits for a
password).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from pydantic import Field

from vcompress.core.errors import InputError
from vcompress.core.registry import DEVICES

from .base import LatencyDevice, Settings, bench_command, bench_error, last_line, parse_bench_json


class SshSettings(Settings):
    host: str | None = None
    user: str | None = None
    port: int | None = Field(None, gt=0, lt=65536)
    python: str = "python3"
    workdir: str = "/tmp/vcompress"
    identity_file: str | None = None  # ssh -i
    ssh_options: list[str] = []  # extra `-o Key=Value` options, e.g. UserKnownHostsFile=...
    connect_timeout_s: int = Field(15, gt=0)


@DEVICES.register("ssh")
class SshDevice(LatencyDevice):
    kind = "ssh"
    Settings = SshSettings

    def attached(self) -> bool:
        return bool(self.settings.host)

    @property
    def target(self) -> str:
        s = self.settings
        if not s.host:
            raise InputError(
                f"device ssh needs a host: set device.connection.host in the profile or pass --host (profile {self.profile.name})"
            )
        return f"{s.user}@{s.host}" if s.user else s.host

    def _options(self, port_flag: str) -> list[str]:
        s = self.settings
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={s.connect_timeout_s}"]
        for o in s.ssh_options:
            opts += ["-o", o]
        if s.port:
            opts += [port_flag, str(s.port)]
        if s.identity_file:
            opts += ["-i", s.identity_file]
        return opts

    def ssh_command(self, remote: str) -> list[str]:
        return ["ssh", *self._options("-p"), self.target, remote]

    def copy_command(self, artifact: Path) -> list[str]:
        return ["scp", "-q", "-r", *self._options("-P"), str(artifact), f"{self.target}:{self.settings.workdir}/"]

    def remote_path(self, artifact: Path) -> str:
        return f"{self.settings.workdir.rstrip('/')}/{Path(artifact).name}"

    def bench_command(self, artifact: Path) -> str:
        command = bench_command(shlex.split(self.settings.python), self.remote_path(artifact), self.settings, self.label, self.kind)
        return " ".join(shlex.quote(word) for word in command)

    def _run(self, command: list[str], what: str, timeout: float, bench: bool = False) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise InputError(f"{command[0]} is not installed here; install openssh-client to reach an ssh board") from None
        except subprocess.TimeoutExpired:
            raise InputError(f"{what} on {self.target} ran past {timeout:.0f} s; check the board, or raise --timeout") from None
        if done.returncode == 255:  # ssh's own failure: connection, key or host key
            raise InputError(
                f"cannot reach {self.target} to {what}: {last_line(done.stderr)}; check host, user, port and that your key is authorized"
            )
        missing = "No module named" in done.stderr or done.returncode == 127  # vcompress or the board's python itself
        if done.returncode != 0 and bench and not missing:
            raise bench_error(done.returncode, done.stderr, f"the benchmark on {self.target}")
        if done.returncode != 0:
            hint = (
                "; install vcompress for that Python on the board (pip install vcompress), or set device.connection.python"
                if missing
                else ""
            )
            raise InputError(f"{what} on {self.target} failed: {last_line(done.stderr)}{hint}")
        return done

    def measure(self, artifact: Path) -> dict:
        artifact = Path(artifact).resolve()
        if not artifact.exists():
            raise InputError(f"artifact {artifact} does not exist; pass an exported artifact folder")
        s = self.settings
        workdir, remote = shlex.quote(s.workdir), shlex.quote(self.remote_path(artifact))
        self._run(self.ssh_command(f"mkdir -p {workdir} && rm -rf {remote}"), "prepare the workdir", s.connect_timeout_s * 4)
        self._run(self.copy_command(artifact), "copy the artifact", s.timeout_s)
        done = self._run(self.ssh_command(self.bench_command(artifact)), "run the benchmark", s.timeout_s, bench=True)
        return parse_bench_json(done.stdout, self.target)
