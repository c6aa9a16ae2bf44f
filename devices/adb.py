"""`adb`: an Android phone. An artifact with a LiteRT-LM bundle (model.litertlm) runs the way an app
runs it: push the bundle and run LiteRT-LM's own `litert_lm_main --benchmark` through `adb shell`
(--benchmark_prefill_tokens / --benchmark_decode_tokens), once per run; it reports time to first
token, prefill and decode tokens/s and, with --report_peak_memory_footprint, the peak RAM.
A plain .tflite runs LiteRT's `benchmark_model` instead, once per signature: `prefill` (the prompt,
its length fixed at export) gives the time to first token, `decode` (one token against the KV
cache) gives decode tokens/s. Either output is parsed into the same latency.json as the other devices.

benchmark_model prints aggregates, not per-run samples: each figure carries the tool's statistics
(count, avg, std, min, max and, in newer builds, median) instead of `samples`, and its value is
the median when printed, else the average. The binaries must be on the phone already
(default /data/local/tmp/benchmark_model and /data/local/tmp/litert_lm_main; LiteRT and LiteRT-LM
publish prebuilt ones for android_arm64).
"""

from __future__ import annotations

import re
import shlex
import shutil
import statistics
import subprocess
from pathlib import Path

from vcompress.core.errors import InputError
from vcompress.core.export_manifest import model_files, read_manifest
from vcompress.core.registry import DEVICES
from vcompress.core.units import UNIT, figure, mib

from .base import LatencyDevice, Settings, last_line

NUMBER = r"([-+]?\d[\d.]*(?:[eE][-+]?\d+)?)"
TIMINGS = re.compile(
    rf"Inference timings in us: Init: {NUMBER}, First inference: {NUMBER}, Warmup \(avg\): {NUMBER}, Inference \(avg\): {NUMBER}"
)
COUNT = re.compile(r"\bcount=\d+(?:[ \t]+\w+=\S+)*")
MODEL_SIZE = re.compile(rf"The input model file size \(MB\): {NUMBER}")
SESSION = re.compile(rf"Initialized session in {NUMBER}\s*ms")
DELTA = re.compile(rf"Memory footprint delta from the start of the tool \(MB\): init={NUMBER} overall={NUMBER}")
OLD_PEAK = re.compile(rf"Peak memory footprint \(MB\): init={NUMBER} overall={NUMBER}")  # older builds
PEAK = re.compile(rf"Overall peak memory footprint \(MB\) via periodic monitoring: {NUMBER}")
SIGNATURE = re.compile(r"Signature to run: \[(.*?)\]")
DELEGATE = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \((\w+)\)")


def parse_benchmark_model(text: str) -> dict:
    """Figures from one benchmark_model transcript (times in microseconds, memory in MiB: the tool
    prints KiB / 1024 and calls it MB).

    Lines starting with '#' are skipped: notes in a saved transcript (the tool's own
    "#threads used" line carries nothing parsed here)."""
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    timings = TIMINGS.search(text)
    if timings is None:
        raise InputError(
            f"benchmark_model printed no timings (last line: {last_line(text)}); check the model, the signature and the --benchmark-model path"
        )
    init, first, warmup, avg = (float(x) for x in timings.groups())
    # The tool prints one count= line for the warm-up and one for the timed runs, in that order.
    stats = [_stats(m.group(0)) for m in COUNT.finditer(text)]
    out = {
        "init_us": init,
        "first_inference_us": first,
        "warmup_avg_us": warmup,
        "inference_avg_us": avg,
        "runs": stats[-1] if stats else {"avg": avg},
        "warmup_runs": stats[0] if len(stats) > 1 else None,
    }
    for key, pattern in (("model_size_mb", MODEL_SIZE), ("session_init_ms", SESSION), ("peak_memory_mb", PEAK)):
        m = pattern.search(text)
        out[key] = float(m.group(1)) if m else None
    m = DELTA.search(text) or OLD_PEAK.search(text)
    out["memory_init_mb"], out["memory_overall_mb"] = (float(m.group(1)), float(m.group(2))) if m else (None, None)
    m = SIGNATURE.search(text)
    out["signature"] = m.group(1) if m else None
    m = DELEGATE.search(text)
    out["delegated_nodes"] = {"nodes": int(m.group(1)), "of": int(m.group(2)), "delegate": m.group(3)} if m else None
    return out


# litert_lm_main --benchmark (runtime/engine/litert_lm_lib.cc and io_types.cc of LiteRT-LM)
TURN = re.compile(r"(Prefill|Decode) Turn \d+: Processed (\d+) tokens in (\S+) duration")
SPEED = re.compile(rf"(Prefill|Decode) Speed: {NUMBER} tokens/sec")
LM_TTFT = re.compile(rf"Time to first token: {NUMBER} s")
INIT_PHASE = re.compile(rf"^\s*- (Init [^:]+): {NUMBER} ms$", re.MULTILINE)
LM_PEAK = re.compile(rf"Peak system ram usage: {NUMBER}\s*MB")
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|ms|h|m|s)")
SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_litert_lm(text: str) -> dict:
    """Figures from one `litert_lm_main --benchmark` transcript (seconds, tokens/s, MiB: the tool's MB is
    KiB / 1024). Where a line repeats (several iterations, then their median), the last one counts.

    Time to first token is computed as the tool does (the prefill turn plus one decode step, from the
    turn durations) at full precision: the line it prints has two decimals of a second."""
    turns = {kind: (int(n), _seconds(d)) for kind, n, d in TURN.findall(text)}
    speeds = {kind: float(v) for kind, v in SPEED.findall(text)}
    if "Decode" not in speeds and "Decode" not in turns:
        raise InputError(
            f"litert_lm_main printed no benchmark (last line: {last_line(text)}); check the bundle, --benchmark and the --litert-lm path"
        )
    if "Prefill" in turns and "Decode" in turns:
        (_, prefill_s), (decoded, decode_s) = turns["Prefill"], turns["Decode"]
        ttft_s = prefill_s + decode_s / decoded
    else:
        ttft_s = float(LM_TTFT.findall(text)[-1])
    peaks = LM_PEAK.findall(text)
    return {
        "ttft_s": ttft_s,
        "prefill_tokens": turns.get("Prefill", (None,))[0],
        "decode_tokens": turns.get("Decode", (None,))[0],
        "prefill_tokens_per_s": speeds.get("Prefill"),
        "decode_tokens_per_s": speeds.get("Decode") or turns["Decode"][0] / turns["Decode"][1],
        "init_ms": {name: float(ms) for name, ms in INIT_PHASE.findall(text)},
        "peak_memory_mb": float(peaks[-1]) if peaks else None,
    }


def _seconds(duration: str) -> float:
    """absl's duration text ("351.204817ms", "1.208443215s", "2m3.5s") in seconds."""
    parts = DURATION.findall(duration)
    if not parts or "".join(a + b for a, b in parts) != duration:
        raise InputError(f"litert_lm_main printed a duration vcompress cannot read: {duration!r}")
    return sum(float(value) * SECONDS[unit] for value, unit in parts)


def _stats(line: str) -> dict:
    return {k: float(v) for k, v in (item.split("=", 1) for item in line.split()) if _is_number(v)}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def typical_us(parsed: dict) -> float:
    """The timed runs' median when the build prints it, else their average."""
    runs = parsed["runs"] or {}
    return runs.get("median") or runs.get("avg") or parsed["inference_avg_us"]


class AdbSettings(Settings):
    serial: str | None = None
    adb: str = "adb"
    workdir: str = "/data/local/tmp/vcompress"
    benchmark_model: str = "/data/local/tmp/benchmark_model"
    # None: the names the export wrote into manifest.json (litert-torch names prefill `prefill_<P>`)
    prefill_signature: str | None = None
    decode_signature: str | None = None
    extra_args: list[str] = []  # e.g. ["--use_gpu=true"] for the GPU delegate
    litert_lm: str = "/data/local/tmp/litert_lm_main"  # LiteRT-LM's binary, for artifacts with model.litertlm
    litert_lm_backend: str = "cpu"  # its --backend (cpu, gpu)
    litert_lm_args: list[str] = []  # more of its flags


@DEVICES.register("adb")
class AdbDevice(LatencyDevice):
    kind = "adb"
    Settings = AdbSettings

    def attached(self) -> bool:
        if shutil.which(self.settings.adb) is None:
            return False
        try:
            out = subprocess.run([self.settings.adb, "devices"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
        attached = [line.split()[0] for line in out.splitlines()[1:] if line.strip().endswith("device")]
        return (self.settings.serial in attached) if self.settings.serial else bool(attached)

    def adb(self, *args: str) -> list[str]:
        prefix = [self.settings.adb] + (["-s", self.settings.serial] if self.settings.serial else [])
        return [*prefix, *args]

    def remote_model(self, model: Path) -> str:
        return f"{self.settings.workdir.rstrip('/')}/{model.name}"

    def benchmark_command(self, model: Path, signature: str) -> list[str]:
        s = self.settings
        flags = [
            f"--graph={self.remote_model(model)}",
            f"--signature_to_run_for={signature}",
            f"--num_runs={s.runs}",
            f"--warmup_runs={s.warmup}",
            "--min_secs=0",
            "--warmup_min_secs=0",
            "--report_peak_memory_footprint=true",
        ]
        if s.threads:
            flags.append(f"--num_threads={s.threads}")
        flags += s.extra_args
        # adb shell takes one command line, run by the phone's sh: quote each word for it.
        return self.adb("shell", " ".join(shlex.quote(w) for w in [s.benchmark_model, *flags]))

    def litert_lm_command(self, bundle: Path) -> list[str]:
        s = self.settings
        flags = [
            f"--backend={s.litert_lm_backend}",
            f"--model_path={self.remote_model(bundle)}",
            "--benchmark",
            f"--benchmark_prefill_tokens={s.prompt_tokens}",
            f"--benchmark_decode_tokens={s.decode_tokens}",
            "--async=false",  # the benchmark's fixed token counts need the synchronous path
            "--report_peak_memory_footprint=true",
        ]
        if s.threads and s.litert_lm_backend == "cpu":
            flags.append(f"--num_cpu_threads={s.threads}")
        flags += s.litert_lm_args
        return self.adb("shell", " ".join(shlex.quote(w) for w in [s.litert_lm, *flags]))

    def _run(self, command: list[str], what: str) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.settings.timeout_s)
        except FileNotFoundError:
            raise InputError(f"{command[0]} is not installed; install Android platform-tools (adb) or pass --adb PATH") from None
        except subprocess.TimeoutExpired:
            raise InputError(f"{what} on the phone ran past {self.settings.timeout_s:.0f} s; lower --runs or raise the timeout") from None
        if done.returncode != 0:
            raise InputError(f"{what} on the phone failed: {last_line(done.stderr or done.stdout)}; check `adb devices` and --serial")
        return done.stdout + done.stderr

    def push(self, path: Path) -> None:
        s = self.settings
        self._run(self.adb("shell", f"mkdir -p {shlex.quote(s.workdir)}"), "mkdir")
        self._run(self.adb("push", str(path), f"{s.workdir.rstrip('/')}/"), "adb push")

    def measure(self, artifact: Path) -> dict:
        artifact = Path(artifact)
        bundle = find_bundle(artifact)
        if bundle is not None:
            return self.measure_litert_lm(artifact, bundle)
        model = find_tflite(artifact)
        s = self.settings
        self.push(model)
        names = signature_names(artifact)
        prefill_name, decode_name = s.prefill_signature or names["prefill"], s.decode_signature or names["decode"]
        prefill = parse_benchmark_model(self._run(self.benchmark_command(model, prefill_name), "benchmark_model (prefill)"))
        decode = parse_benchmark_model(self._run(self.benchmark_command(model, decode_name), "benchmark_model (decode)"))
        return latency_from(
            prefill,
            decode,
            label=self.label,
            settings=s,
            prompt_tokens=prefill_tokens(artifact, s.prompt_tokens),
            model_bytes=model.stat().st_size,
        )

    def measure_litert_lm(self, artifact: Path, bundle: Path) -> dict:
        s = self.settings
        context = read_manifest(artifact).get("cache_length")
        if isinstance(context, int) and s.prompt_tokens + s.decode_tokens > context:
            raise InputError(
                f"{s.prompt_tokens} prompt + {s.decode_tokens} decode tokens exceed the bundle's context of {context}; "
                "lower them or re-export with a larger --cache-length"
            )
        self.push(bundle)
        # One process per run: each loads the bundle afresh, and its figures exclude that load.
        runs = [parse_litert_lm(self._run(self.litert_lm_command(bundle), "litert_lm_main")) for _ in range(s.warmup + s.runs)]
        return litert_lm_latency(runs[s.warmup :], label=self.label, settings=s, model_bytes=bundle.stat().st_size)


def litert_lm_latency(runs: list[dict], *, label: str, settings: AdbSettings, model_bytes: int) -> dict:
    """latency.json from the timed litert_lm_main runs of one phone (medians, with the samples)."""
    ttft = [round(r["ttft_s"] * 1e3, 3) for r in runs]
    decode = [round(r["decode_tokens_per_s"], 2) for r in runs]
    peaks = [r["peak_memory_mb"] for r in runs if r["peak_memory_mb"] is not None]
    tool = "litert_lm_main"
    return {
        "device": label,
        "device_kind": "adb",
        "backend": "litert",
        "runtime": {"module": tool, "version": None},  # the phone's binary does not print its version
        "source": "measured",
        "threads": settings.threads,
        "prompt_tokens": runs[0]["prefill_tokens"] or settings.prompt_tokens,
        "decode_tokens": runs[0]["decode_tokens"] or settings.decode_tokens,
        "runs": settings.runs,
        "warmup": settings.warmup,
        "ttft_ms": figure(statistics.median(ttft), "ms", measured=True, device=label, samples=ttft, tool=tool),
        "decode_tokens_per_s": figure(statistics.median(decode), "tokens/s", measured=True, device=label, samples=decode, tool=tool),
        "peak_rss_mb": figure(
            max(peaks) if peaks else None,
            UNIT,
            measured=True,
            device=label,
            tool=tool,
            note="LiteRT-LM's peak system RAM of the whole process (--report_peak_memory_footprint)",
        ),
        "model_size_mb": figure(mib(model_bytes), UNIT, measured=True),
        "litert_lm": runs,
    }


def latency_from(prefill: dict, decode: dict, *, label: str, settings: AdbSettings, prompt_tokens: int, model_bytes: int) -> dict:
    """latency.json from the prefill and decode transcripts of one phone."""
    ttft_ms = typical_us(prefill) / 1e3
    decode_tps = 1e6 / typical_us(decode)
    peaks = [p.get("peak_memory_mb") or p.get("memory_overall_mb") for p in (prefill, decode)]
    peaks = [p for p in peaks if p is not None]
    return {
        "device": label,
        "device_kind": "adb",
        "backend": "litert",
        "source": "measured",
        "threads": settings.threads,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": 1,  # benchmark_model times single decode steps
        "runs": settings.runs,
        "warmup": settings.warmup,
        "ttft_ms": figure(round(ttft_ms, 3), "ms", measured=True, device=label, stats_us=prefill["runs"], tool="benchmark_model"),
        "decode_tokens_per_s": figure(
            round(decode_tps, 2), "tokens/s", measured=True, device=label, stats_us=decode["runs"], tool="benchmark_model"
        ),
        "peak_rss_mb": figure(
            max(peaks) if peaks else None,
            UNIT,
            measured=True,
            device=label,
            tool="benchmark_model",
            note="benchmark_model's own footprint figure (approximate, includes the tool)",
        ),
        "model_size_mb": figure(mib(model_bytes), UNIT, measured=True),
        "benchmark_model": {"prefill": prefill, "decode": decode},
    }


def find_tflite(artifact: Path) -> Path:
    """The .tflite the artifact's manifest lists (or the .tflite file given)."""
    models = [p for p in model_files(artifact) if p.suffix == ".tflite"]
    if len(models) != 1:
        raise InputError(
            f"{artifact} lists no .tflite model; the adb device runs TFLite artifacts (a folder from `vcompress export tflite`, or a .tflite file)"
        )
    return models[0]


def find_bundle(artifact: Path) -> Path | None:
    """The LiteRT-LM bundle the artifact's manifest lists (or the .litertlm file given); None without one."""
    if artifact.is_file():
        return artifact if artifact.suffix == ".litertlm" else None
    name = (read_manifest(artifact).get("files") or {}).get("litertlm")
    return artifact / name if name and (artifact / name).is_file() else None


def signature_names(artifact: Path) -> dict:
    """The prefill and decode signature names from the artifact's manifest, else `prefill` / `decode`."""
    names = {"prefill": "prefill", "decode": "decode"}
    signatures = read_manifest(artifact).get("signatures", {})
    names.update({k: v["name"] for k, v in signatures.items() if k in names and isinstance(v, dict) and v.get("name")})
    return names


def prefill_tokens(artifact: Path, default: int) -> int:
    """The prompt length the prefill signature was exported for (the manifest says), else the profile's."""
    manifest = read_manifest(artifact)
    for key in ("prefill_tokens", "prefill_length", "prompt_tokens"):
        if isinstance(manifest.get(key), int):
            return manifest[key]
    return default
