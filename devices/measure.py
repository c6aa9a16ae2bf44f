"""`measure(artifact, device, profile, **overrides)`: the one entry the pipeline calls for latency.

A measured result also carries the roofline estimate for the same artifact on the same device
and the ratio measured / estimated, which is how the estimator is validated on the host.
"""

from __future__ import annotations

from pathlib import Path

from vcompress.core.errors import InputError
from vcompress.core.profiles import Profile, load_profile
from vcompress.core.registry import DEVICES

from . import roofline_estimate as roofline
from .base import LatencyDevice

HOST_PROFILE = "x86-cpu"  # the host's own bandwidth and compute figures


def default_device(profile: Profile) -> str:
    """The device a profile's connection names, or the roofline estimate when it cannot be reached from here."""
    kind = profile.device.connection.kind
    if kind is None:
        return roofline.RooflineDevice.kind
    device = DEVICES.get(kind).configure(profile, {})
    return kind if device.attached() else roofline.RooflineDevice.kind


def open_device(device_name: str | None, profile: Profile | str | Path | None = None, **overrides) -> LatencyDevice:
    profile = _profile(profile)
    name = device_name or default_device(profile)
    return DEVICES.get(name).configure(profile, overrides)


def measure(
    artifact: str | Path, device_name: str | None = None, profile: Profile | str | Path | None = None, *, estimate: bool = True, **overrides
) -> dict:
    """latency.json for `artifact` on a device (host, ssh, adb, roofline; default: the profile's).

    `overrides` are device settings that win over the profile's: prompt_tokens, decode_tokens,
    runs, warmup, threads, backend, seed, label, timeout_s; ssh: host, user, port, python, workdir,
    identity_file, ssh_options; adb: serial, adb, workdir, benchmark_model, extra_args.
    Values of None are ignored, so a CLI can pass its unset options through.
    """
    return measure_on(open_device(device_name, profile, **overrides), artifact, estimate=estimate)


def measure_on(device: LatencyDevice, artifact: str | Path, *, estimate: bool = True) -> dict:
    """latency.json for `artifact` on a configured device, with the roofline estimate beside a measurement."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise InputError(f"artifact {artifact} does not exist; pass an exported artifact folder")
    result = device.measure(artifact)
    if estimate and result.get("source") == "measured":
        result["estimate"] = _estimate_beside(artifact, device, result)
    return result


def _estimate_beside(artifact: Path, device: LatencyDevice, measured: dict) -> dict:
    figures = device.profile.device
    if device.this_machine and not DEVICES.get(figures.connection.kind).this_machine:
        figures = load_profile(HOST_PROFILE).device
    figures = figures.model_copy(update={"name": measured["device"]})
    try:
        estimated = roofline.estimate(artifact, figures, prompt_tokens=measured["prompt_tokens"], decode_tokens=measured["decode_tokens"])
    except InputError as e:  # an estimate is a bonus: never lose a measurement over it
        return {"error": str(e)}
    return roofline.compare(measured, estimated)


def _profile(profile: Profile | str | Path | None) -> Profile:
    if isinstance(profile, Profile):
        return profile
    return load_profile(profile or HOST_PROFILE)
