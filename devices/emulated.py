"""`emulated`: the artifact on the target's own build of its runtime (aarch64), under qemu-user on this machine.

It measures agreement, not speed: devices/isa_probe.py answers one job (the export's 5 parity prompts greedily, the
logits at every position of a short text, a sample of MMLU answers) twice, with this machine's runtime (x86) and with
the aarch64 wheels of the same versions (the artifact's manifest) in an aarch64 Python under `qemu-aarch64-static
-cpu CPU`, the qemu model that offers the profile's `device.isa` (cortex-a76 for the Raspberry Pi 5; max: NEON,
dotprod, i8mm, SVE), and compares the two. Its latency is not the device's, so as a latency device it is never
attached and the roofline estimate stands in.

Set up once, cached under ~/.cache/vcompress/emulated: a Debian user space (`debootstrap --foreign`, its packages
unpacked without running their scripts, which need no binfmt_misc) and the runtime wheels installed by this
machine's pip for the target platform. See docs/emulated.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import Field

from vcompress.core.data import default_texts, load_mmlu, resolve_subjects, sample_questions
from vcompress.core.errors import InputError, Unsupported
from vcompress.core.export_manifest import PARITY_PROMPTS, read_manifest
from vcompress.core.profiles import Profile
from vcompress.core.registry import DEVICES, EXPORTERS

from .base import LatencyDevice, Settings, last_line

APT = "apt-get install -y qemu-user-static debootstrap"
CACHE = Path.home() / ".cache" / "vcompress" / "emulated"
PROBE = Path(__file__).with_name("isa_probe.py")
ARCHES = {  # arch -> Debian's name, qemu-user's binary, the wheel platforms pip may pick for it
    "aarch64": ("arm64", "qemu-aarch64-static", ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]),
}
# qemu's CPU models, least first, with the features kernels are picked by (hwcaps, as /proc/cpuinfo names them). The
# first that offers all of a profile's device.isa runs it: the kernels its device gets, and no SVE emulation (10x slower
# here on SmolLM2, docs/emulated.md, "Time") unless the device has SVE.
QEMU_CPUS = {
    "cortex-a76": {"asimd", "asimddp"},
    "max,sve=off": {"asimd", "asimddp", "asimdfhm", "i8mm", "bf16"},
    "max": {"asimd", "asimddp", "asimdfhm", "i8mm", "bf16", "sve", "sve2", "svei8mm", "svebf16"},
}
RUNTIME_PACKAGES = {"onnxruntime": "onnxruntime", "onnxruntime_genai": "onnxruntime-genai"}  # session RUNTIME -> wheel


class EmulatedSettings(Settings):
    prompt_tokens: int = Field(256, gt=0)  # a latency setting: unused, emulation times nothing
    arch: Literal["aarch64"] = "aarch64"
    cpu: str | None = None  # qemu's -cpu; default: the least that offers the profile's device.isa (QEMU_CPUS)
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    text_tokens: int = Field(128, gt=1, description="positions of the short text whose logits are compared")
    # 16 cloze questions cost ~280 s under qemu here (docs/emulated.md, "Time"): the row says its n and interval
    mmlu_questions: int = Field(16, ge=0, description="MMLU questions answered on both builds, drawn evenly from the profile's subjects")
    timeout_s: float = Field(3600, gt=0)
    # one thread: threads the guest spins on cost host cores that emulation needs; kernels are picked by ISA, not threads
    threads: int | None = Field(1, gt=0)


@DEVICES.register("emulated")
class EmulatedDevice(LatencyDevice):
    kind = "emulated"
    Settings = EmulatedSettings

    @classmethod
    def defaults(cls, profile: Profile) -> dict:
        return {k: v for k, v in super().defaults(profile).items() if k != "threads"}

    def attached(self) -> bool:
        return False  # never the latency device: an emulated figure is not the target's speed

    def measure(self, artifact: Path) -> dict:
        """What the target's build answered, beside this machine's (no latency: emulation is not the device's speed)."""
        return self.check(artifact)

    def require_tools(self) -> str:
        """qemu-user's binary for the arch; a one-line error naming the packages where it or debootstrap is missing."""
        qemu = shutil.which(ARCHES[self.settings.arch][1])
        if qemu is None or shutil.which("debootstrap") is None:
            raise InputError(
                f"emulating {self.settings.arch} needs qemu-user-static and debootstrap; install them: {APT} "
                "(or leave the check out: budgets.min_target_isa_agreement: null in your profile)"
            )
        return qemu

    def check(self, artifact: Path, log=print) -> dict:
        """The artifact answered by the target's build of its runtime and by this machine's, compared."""
        s, started = self.settings, time.perf_counter()
        manifest = read_manifest(artifact)
        qemu = self.require_tools()
        log(f"emulated {s.arch}: setting up the user space and runtime wheels (cached under {CACHE})")
        root = userspace(s.arch, s.suite, s.mirror)
        site = runtime_wheels(root, s.arch, wheel_pins(manifest))
        setup_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory(prefix="vcompress-emulated-") as tmp:
            x86, arm = Path(tmp, "host"), Path(tmp, s.arch)
            job = make_job(Path(artifact), self.profile, s, manifest)
            for folder in (x86, arm):
                folder.mkdir()
                (folder / "job.json").write_text(json.dumps(job))
            log(f"emulated {s.arch}: answering on this machine ({platform.machine()})")
            self._probe([sys.executable], artifact, x86, {})
            reference = EXPORTERS.get(manifest["format"]).float_reference(Path(artifact), Path(tmp, "float-copy"))
            if reference is not None:  # the text only: what each build's logits are measured against
                Path(tmp, "reference").mkdir()
                Path(tmp, "reference", "job.json").write_text(json.dumps(job | {"prompts": [], "mmlu": [], "lengths": []}))
                self._probe([sys.executable], reference, Path(tmp, "reference"), {})
            log(f"emulated {s.arch}: answering under qemu-user (slow)")
            guest = [qemu, "-L", str(root), "-cpu", self.cpu, str(root / "usr/bin/python3")]
            failure = self._probe(guest, artifact, arm, {"PYTHONPATH": f"{site}:{package_shim(Path(tmp))}"}, fail=False)
            record = {"device": self.label, "arch": s.arch, "cpu": self.cpu, "qemu": qemu_version(qemu), "source": "emulated"}
            if failure:
                return record | {"loads": False, "error": failure, "runtime": wheel_pins(manifest), "seconds": {"setup": round(setup_s, 1)}}
            result = compare(x86, arm, job, Path(tmp, "reference") if reference is not None else None)
            result["seconds"]["setup"] = round(setup_s, 1)
            return record | result | {"loads": True}

    @property
    def cpu(self) -> str:
        if self.settings.cpu:
            return self.settings.cpu
        isa = set(self.profile.device.isa or QEMU_CPUS["max"])
        return next((cpu for cpu, features in QEMU_CPUS.items() if isa <= features), "max")

    @property
    def label(self) -> str:
        return self.settings.label or f"{self.settings.arch} (qemu-user, -cpu {self.cpu})"

    def _probe(self, python: list[str], artifact: Path, job: Path, env: dict, fail: bool = True) -> str | None:
        command = [*python, "-s", "-P", str(PROBE), str(Path(artifact).resolve()), str(job)]
        if self.settings.threads:
            command += ["--threads", str(self.settings.threads)]
        if self.settings.backend:
            command += ["--backend", self.settings.backend]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | env
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=self.settings.timeout_s)
        except subprocess.TimeoutExpired:
            raise InputError(
                f"the {job.name} run ran past {self.settings.timeout_s:.0f} s; lower mmlu_questions or raise timeout_s"
            ) from None
        if done.returncode == 0:
            return None
        if fail:
            raise InputError(f"the {job.name} run of {artifact} failed: {last_line(done.stderr)}")
        return f"exit {done.returncode}: {last_line(done.stderr)}"


def userspace(arch: str, suite: str, mirror: str) -> Path:
    """A Debian user space with python3 for `arch`, made once: debootstrap's first stage downloads and unpacks the
    base; python3 and its dependencies are unpacked by dpkg-deb (no maintainer scripts: nothing here runs them)."""
    root = CACHE / f"{arch}-{suite}" / "rootfs"
    if (root / "usr/bin/python3").exists():
        return root
    work = root.with_name("rootfs.partial")
    shutil.rmtree(work, ignore_errors=True)
    debian = ARCHES[arch][0]
    command = ["debootstrap", f"--arch={debian}", "--variant=minbase", "--foreign", "--include=python3", suite, str(work), mirror]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(
            f"debootstrap of {suite}/{debian} failed: {last_line(done.stderr or done.stdout)}; check the mirror ({mirror}) and that you are root"
        )
    paths = dict(line.split() for line in (work / "debootstrap/debpaths").read_text().splitlines() if line.strip())
    for package in (work / "debootstrap/base").read_text().split():  # the --include packages: downloaded, not unpacked
        deb = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(work / paths[package].lstrip("/"))], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(work)], input=deb.stdout, check=True)
    # qemu reads /proc/cpuinfo through the prefix: the host's x86 one has no ARM processors, which makes the cpuinfo
    # library in ONNX Runtime crash. Stand-in entries (an Arm core, no feature list: features come from the hwcaps).
    proc = work / "proc"
    proc.unlink(missing_ok=True)
    proc.mkdir(exist_ok=True)
    core = "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd0c\nCPU revision\t: 0\n"
    (proc / "cpuinfo").write_text("".join(f"processor\t: {i}\n{core}\n" for i in range(os.cpu_count() or 1)))
    shutil.rmtree(work / "var/cache/apt/archives", ignore_errors=True)
    work.rename(root)
    return root


def wheel_pins(manifest: dict) -> dict[str, str]:
    """The runtime wheels the artifact's manifest names (its runtime and the app's), and this machine's numpy."""
    pins = {"numpy": metadata.version("numpy")}
    for name, version in ((manifest.get("runtime"), manifest.get("runtime_version")), *_app(manifest)):
        if name in RUNTIME_PACKAGES and version:
            pins[RUNTIME_PACKAGES[name]] = version
    if len(pins) == 1:
        raise Unsupported(
            f"no {manifest.get('runtime')} build for Linux {list(ARCHES)} is known here: the artifact cannot be checked on the target's kernels"
        )
    return pins


def _app(manifest: dict) -> list[tuple]:
    app = manifest.get("app_runtime") or {}
    return [(app.get("name", "").replace("-", "_"), app.get("version"))]


def runtime_wheels(root: Path, arch: str, pins: dict[str, str]) -> Path:
    """The pinned wheels for the guest's Python, installed once by this machine's pip for the target platform."""
    python = (root / "usr/bin/python3").readlink().name.removeprefix("python")  # python3.11 -> 3.11
    key = hashlib.sha256(json.dumps(sorted(pins.items())).encode()).hexdigest()[:12]
    site = CACHE / f"{arch}-py{python}-{key}"
    if site.is_dir():
        return site
    platforms = [x for p in ARCHES[arch][2] for x in ("--platform", p)]
    work = site.with_name(site.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:", *platforms]
    command += ["--python-version", python, "--target", str(work), *(f"{k}=={v}" for k, v in pins.items())]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise Unsupported(
            f"no {arch} wheels of {', '.join(f'{k} {v}' for k, v in pins.items())} on the package index: {last_line(done.stderr)}"
        )
    work.rename(site)
    return site


def package_shim(folder: Path) -> Path:
    """A folder that makes `vcompress` importable for the guest Python: links to this install's pure modules."""
    import importlib.util

    shim = folder / "shim" / "vcompress"
    shim.mkdir(parents=True)
    top = Path(importlib.util.find_spec("vcompress").origin)
    (shim / "__init__.py").symlink_to(top)
    for sub in ("core", "devices", "exporters"):
        (shim / sub).symlink_to(importlib.util.find_spec(f"vcompress.{sub}").submodule_search_locations[0])
    return shim.parent


def make_job(artifact: Path, profile: Profile, s: EmulatedSettings, manifest: dict) -> dict:
    """Token ids for both runs, from the artifact's tokenizer: the parity prompts, a held-out text, MMLU questions."""
    from transformers import AutoTokenizer

    from vcompress.core.scoring import encode_pair, exemplars_for, prompt_and_continuations

    tokenizer = AutoTokenizer.from_pretrained(str(artifact))
    ev = profile.evaluation
    subjects = resolve_subjects(ev.subset)
    questions = mmlu_sample(subjects, s.mmlu_questions, ev.seed)
    dev = load_mmlu(None, "dev", subjects) if ev.shots and questions else []
    mmlu, lengths = [], []
    for q in questions:
        prompt, answers = prompt_and_continuations(q, exemplars_for(dev, q.subject, ev.shots), ev.format)
        pairs = [encode_pair(tokenizer, prompt, a) for a in answers]
        # the shared context: encode_pair cuts each answer off the same prompt's ids
        mmlu.append([pairs[0][0], [cont for _, cont in pairs]])
        lengths.append([max(1, len(c)) for c in q.choices] if ev.format == "cloze" else [1] * len(answers))
    text = tokenizer("\n\n".join(default_texts("heldout")[:16]), add_special_tokens=False)["input_ids"][: s.text_tokens]
    return {
        "prompts": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PARITY_PROMPTS],
        "new_tokens": (manifest.get("thresholds") or {}).get("greedy_tokens", 32),
        "text": text,
        "mmlu": mmlu,
        "lengths": lengths,
    }


def mmlu_sample(subjects: list[str], n: int, seed: int) -> list:
    """n test questions, as even over the subjects as n allows (a seeded draw of the subjects' equal shares)."""
    if not n:
        return []
    pool = sample_questions(load_mmlu(None, "test", subjects), -(-n // len(subjects)), seed)
    keep = sorted(random.Random(seed).sample(range(len(pool)), min(n, len(pool))))
    return [pool[i] for i in keep]


def compare(x86: Path, arm: Path, job: dict, reference: Path | None = None) -> dict:
    """What the two runs agree on: greedy tokens (the first differing position), logits, MMLU answers; and where the
    format has a float-activation copy (`reference`), how near each build's logits are to it."""
    import numpy as np
    import torch

    from vcompress.core.scoring import answer_agreement

    host, guest = (json.loads((d / "result.json").read_text()) for d in (x86, arm))
    first = [next((i for i, (a, b) in enumerate(zip(h, g)) if a != b), None) for h, g in zip(host["greedy"], guest["greedy"])]
    a, b = np.load(x86 / "logits.npy"), np.load(arm / "logits.npy")
    near = lambda x, y: {  # noqa: E731
        "max_abs_diff": float(np.abs(x - y).max()) if x.size else None,
        "top1_agreement": round(float((x.argmax(-1) == y.argmax(-1)).mean()), 4) if x.size else None,
    }
    out = {
        "runtime": guest["runtime"],
        "scoring_runtime": guest["scoring_runtime"],
        "host_runtime": host["runtime"],
        "cpu_features": guest["cpu_features"],
        "host_cpu_features": host["cpu_features"],
        "greedy": {"prompts": len(first), "identical": first.count(None), "first_difference": first, "tokens": job["new_tokens"]},
        "logits": {"positions": len(a), **near(a, b)},
    }
    if reference is not None:
        r = np.load(reference / "logits.npy")
        out["reference"] = {"target": near(b, r), "host": near(a, r)}
    if job["mmlu"]:
        lengths = torch.tensor(job["lengths"], dtype=torch.float64)
        scores = [torch.tensor(r["answers"], dtype=torch.float64) / lengths for r in (guest, host)]
        out["mmlu"] = answer_agreement(*scores)
    out["seconds"] = {"host": round(sum(host["seconds"].values()), 1), "emulated": round(sum(guest["seconds"].values()), 1)}
    out["emulated_seconds"] = {k: round(v, 1) for k, v in guest["seconds"].items()}
    return out


def qemu_version(qemu: str) -> str:
    done = subprocess.run([qemu, "--version"], capture_output=True, text=True)
    return done.stdout.split("\n")[0].removeprefix("qemu-aarch64 version ").strip()


def target_isa_device(profile: Profile, **overrides) -> EmulatedDevice | None:
    """The emulated device that checks a profile's artifact on its target's build of the runtime: where the profile
    budgets it (min_target_isa_agreement) and its device's architecture is not this machine's; else None."""
    arch = profile.device.arch
    if profile.budgets.min_target_isa_agreement is None or arch in (None, platform.machine()):
        return None
    return EmulatedDevice.configure(profile, {"arch": arch, **overrides})
