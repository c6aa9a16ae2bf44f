"""Roofline estimate of an artifact's latency on a device that is not attached.

Decode is memory bound: every generated token reads the weights once plus the KV cache so far, so
    decode tokens/s <= memory bandwidth / (weight bytes read per token + KV bytes at the context)
(and <= peak compute / FLOPs per token, which binds only on very slow compute units).
Prefill is compute bound for any useful prompt length, so
    TTFT >= max(prompt FLOPs / peak compute, weight bytes / bandwidth),
with prompt FLOPs = 2 * body params * prompt tokens + 2 * head params (only the last position's
logits are computed, as every runner here does) + attention (QK^T and AV over the causal triangle).
The profile's efficiencies turn ceilings into expectations: decode * decode_efficiency, TTFT /
prefill_efficiency, both fitted on published measurements of the device's family and backend
(devices/calibration.py). Each figure carries the profile's band (`band_pct`, its `low` and `high` ends) and the
anchors it was calibrated on. Peak RAM is the whole process's: the runtime's baseline and what it holds beside the
file (measured on the build host, core/runtime_memory.json) on top of weights, KV cache and activations.

Weight bytes are the bytes the artifact actually stores (int4 / int8 / fp16 / fp32 as written), read
from its model files (those the manifest lists, or an HF folder's safetensors): safetensors headers,
ONNX initializers, else the file sizes. Tables that are only gathered from (an untied input
embedding, GPT-2's position table) are read one row per token and are left out of the per-token
bytes. Sizes are reported in MiB.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from vcompress.core.errors import InputError
from vcompress.core.export_manifest import artifact_format, model_files, model_size_bytes, read_manifest
from vcompress.core.profiles import Device
from vcompress.core.roofline_math import (  # noqa: F401  (the arithmetic, shared with compress/)
    DEFAULT_DECODE_TOKENS,
    peak_ram_bytes,
    process_ram_bytes,
    roofline,
    runtime_memory,
    shapes,
)
from vcompress.core.units import UNIT, figure, mib

GATHER_OPS = {"Gather", "GatherBlockQuantized"}
RAM_BAND_PCT = 20.0  # stated, not calibrated: the runtime's figures are the build host's; a device's allocator differs


# --- what the artifact holds ----------------------------------------------------------


def read_config(artifact: Path | str) -> dict:
    """config.json of an artifact folder (exporters copy it beside the model)."""
    folder = Path(artifact)
    folder = folder.parent if folder.is_file() else folder
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(
            f"{folder} has no config.json, so its shapes are unknown; export it with vcompress (which copies config.json) or copy the source model's config.json beside it"
        )
    return json.loads(path.read_text())


def artifact_model_files(artifact: Path | str) -> list[Path]:
    files = model_files(artifact)
    if not files:
        raise InputError(
            f"{artifact} holds no model files (an exported folder lists them in manifest.json, an HF folder holds *.safetensors); pass an HF folder or an exported artifact"
        )
    return files


def weight_bytes(files: list[Path], tied: bool = True) -> dict:
    """Bytes of weights stored in `files` (an artifact's model files), and of those read for every
    token (gather-only tables left out)."""
    stored = gathered = 0
    graphs = [f for f in files if f.suffix == ".onnx"]
    external = [f for f in files if f not in graphs and any(f.name.startswith(g.name) for g in graphs)]
    for file in files:
        if file.suffix == ".safetensors":
            s, g = _safetensors_bytes(file, tied)
        elif file.suffix == ".onnx":
            s, g = _onnx_bytes(file, external)
        elif file.suffix == ".gguf":
            s, g = _gguf_bytes(file, tied)
        elif file in external:
            continue  # counted through the .onnx initializers that point into it
        else:
            s, g = file.stat().st_size, 0
        stored += s
        gathered += g
    return {"stored_bytes": stored, "gather_only_bytes": gathered, "per_token_bytes": stored - gathered, "files": [f.name for f in files]}


def _safetensors_bytes(file: Path, tied: bool) -> tuple[int, int]:
    # The format: 8-byte little-endian header length, then a JSON header of {name: {dtype, shape, data_offsets}}.
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    stored = gathered = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        stored += end - begin
        leaf = name.split(".")[-2] if "." in name else name
        if leaf == "wpe" or (not tied and leaf in ("embed_tokens", "wte")):
            gathered += end - begin
    return stored, gathered


def _gguf_bytes(file: Path, tied: bool) -> tuple[int, int]:
    """The tensors' bytes (not the tokenizer's metadata); an untied embedding table (token_embd) is only gathered."""
    import gguf

    tensors = gguf.GGUFReader(str(file)).tensors
    stored = sum(int(t.n_bytes) for t in tensors)
    return stored, 0 if tied else sum(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")


def _onnx_bytes(file: Path, data_files: list[Path]) -> tuple[int, int]:
    try:
        import onnx
        from onnx import helper
    except ImportError:  # a board without onnx: the files' sizes are the stored bytes
        return file.stat().st_size + sum(p.stat().st_size for p in data_files if p.name.startswith(file.name)), 0
    model = onnx.load(str(file), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, set()).add(node.op_type if position == 0 else f"{node.op_type}:{position}")
    stored = gathered = 0
    for init in model.graph.initializer:
        size = _initializer_bytes(init, onnx, helper)
        stored += size
        if consumers.get(init.name) and consumers[init.name] <= GATHER_OPS:
            gathered += size
    return stored, gathered


def _initializer_bytes(init, onnx, helper) -> int:
    if init.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in init.external_data}
        if "length" in info:
            return int(info["length"])
    if init.raw_data:
        return len(init.raw_data)
    count = 1
    for d in init.dims:
        count *= d
    return count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def kv_bytes_per_element(artifact: Path | str) -> int:
    """The KV cache's element size: the manifest's kv_dtype if given (TensorRT's exporter writes it), else fp32."""
    manifest = read_manifest(artifact)
    kv = str(manifest.get("kv_dtype", "")).lower()
    if kv:
        return {"float16": 2, "fp16": 2, "bfloat16": 2, "int8": 1, "float32": 4, "fp32": 4}.get(kv, 4)
    return 4


# --- the estimate ---------------------------------------------------------------------


def estimate(artifact: Path | str, device: Device, *, prompt_tokens: int, decode_tokens: int = DEFAULT_DECODE_TOKENS) -> dict:
    """latency.json for a device that is not attached: every latency figure labelled estimated."""
    if prompt_tokens <= 0 or decode_tokens <= 0:
        raise InputError(f"prompt_tokens ({prompt_tokens}) and decode_tokens ({decode_tokens}) must be positive")
    artifact = Path(artifact)
    shape = shapes(read_config(artifact))
    weights = weight_bytes(artifact_model_files(artifact), tied=shape["tied"])
    kv_bytes = kv_bytes_per_element(artifact)
    line = roofline(shape, weights, device, prompt_tokens, decode_tokens, kv_bytes)
    band = device.estimate_band_pct
    return {
        "device": device.name,
        "device_kind": "roofline",
        "backend": artifact_format(artifact),
        "source": "estimated",
        "threads": device.threads,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "ttft_ms": banded(line["ttft_ms"], "ms", band.ttft, device.name, 3, calibrated_on=calibrated_on(device, "prefill_tokens_per_s")),
        "decode_tokens_per_s": banded(
            line["decode_tokens_per_s"], "tokens/s", band.decode, device.name, 2, calibrated_on=calibrated_on(device, "decode_tokens_per_s")
        ),
        "peak_rss_mb": process_ram(artifact, shape, weights, prompt_tokens, decode_tokens, kv_bytes, device.name),
        "model_size_mb": figure(mib(model_size_bytes(artifact)), UNIT, measured=True),
        "roofline": {
            **line,
            "kv_bytes_per_element": kv_bytes,
            "weight_bytes_stored": weights["stored_bytes"],
            "params": {
                k: shape[k]
                for k in ("body_params", "head_params", "layers", "query_heads", "kv_heads", "head_dim", "hidden_size", "vocab_size")
            },
        },
    }


def banded(value: float, unit: str, band_pct: float, device: str, digits: int, **extra) -> dict:
    """An estimated figure with its band: `low` and `high` are band_pct% either side of the value (low never below 0)."""
    low, high = max(0.0, value * (1 - band_pct / 100)), value * (1 + band_pct / 100)
    return figure(
        round(value, digits),
        unit,
        measured=False,
        device=device,
        band_pct=band_pct,
        low=round(low, digits),
        high=round(high, digits),
        **extra,
    )


def calibrated_on(device: Device, published: str) -> list[str]:
    """The ids of the published measurements that give `published` (prefill_tokens_per_s or decode_tokens_per_s)
    and so calibrate the device's efficiency and band for it."""
    from .calibration import anchors_for  # not at import: `python -m vcompress.devices.calibration` runs it as a script

    return [a["id"] for a in anchors_for(device) if a[published] is not None]


def process_ram(artifact: Path, shape: dict, weights: dict, prompt_tokens: int, decode_tokens: int, kv_bytes: int, device: str) -> dict:
    """The whole process's peak RSS, banded; where the runtime's own memory was never measured, the model's part
    only, as the band's optimistic end with no pessimistic end (a maximum is then never met on it)."""
    session = session_name(artifact)
    runtime = runtime_memory(session, artifact_format(artifact))
    if runtime is None:
        model = mib(peak_ram_bytes(shape, weights, prompt_tokens, decode_tokens, kv_bytes), 1)
        note = f"the model's part only: what {session} holds itself was never measured (bench/runtime_ram.py)"
        return figure(model, UNIT, measured=False, device=device, band_pct=None, low=model, high=None, calibrated_on=[], note=note)
    whole = mib(process_ram_bytes(shape, weights, prompt_tokens, decode_tokens, kv_bytes, runtime), 1)
    note = (
        f"the whole process: the runtime's {runtime['baseline_mib']:g} MiB, {runtime['fixed_mib']:g} MiB and "
        f"{runtime['held_per_weight_byte']:g} bytes per weight byte it holds beside the file, weights, KV cache, activations"
    )
    return banded(
        whole, UNIT, RAM_BAND_PCT, device, 1, calibrated_on=[f"{runtime['session']} on the build host (bench/runtime_ram.py)"], note=note
    )


def session_name(artifact: Path) -> str:
    """The session an app runs the artifact through, as core/runtime_memory.json names it (`genai` for
    exporters/_genai_session.py); the format's name for an HF folder or an export whose manifest names no sessions."""
    from .bench import session_module  # not at import: `python -m vcompress.devices.bench` runs it as a script

    try:
        module = session_module(Path(artifact), None)
    except InputError:
        module = None
    return module.rpartition(".")[2].removeprefix("_").removesuffix("_session") if module else artifact_format(artifact)


def compare(measured: dict, estimated: dict) -> dict:
    """The estimate beside a measurement of the same artifact: ratio measured / estimated per figure.

    A decode ratio below 1 means the device reached less than the expected share of its bandwidth
    ceiling; a TTFT ratio above 1 means the prompt took longer than the estimate.
    """
    ratios = {}
    for key in ("ttft_ms", "decode_tokens_per_s"):
        m, e = (measured.get(key) or {}).get("value"), (estimated.get(key) or {}).get("value")
        ratios[key] = float(f"{m / e:.4g}") if m and e else None
    return {
        "device": estimated["device"],
        "source": "estimated",
        "ttft_ms": estimated["ttft_ms"],
        "decode_tokens_per_s": estimated["decode_tokens_per_s"],
        "peak_rss_mb": estimated["peak_rss_mb"],
        "roofline": estimated["roofline"],
        "ratio_measured_to_estimated": ratios,
    }


def validate_on_host(artifact: Path | str, measured: dict, device: Device | None = None) -> dict:
    """Estimate the artifact with the host's own figures (profile x86-cpu unless given) at the same
    prompt and decode lengths as `measured` (a host latency.json), and compare."""
    if device is None:
        from vcompress.core.profiles import load_profile

        device = load_profile("x86-cpu").device
    estimated = estimate(artifact, device, prompt_tokens=measured["prompt_tokens"], decode_tokens=measured["decode_tokens"])
    return compare(measured, estimated)


# --- the device -----------------------------------------------------------------------


from vcompress.core.registry import DEVICES  # noqa: E402

from .base import LatencyDevice  # noqa: E402


@DEVICES.register("roofline")
class RooflineDevice(LatencyDevice):
    """No device attached: estimate from the profile's bandwidth, compute and efficiency."""

    kind = "roofline"

    def measure(self, artifact: Path) -> dict:
        device = self.profile.device.model_copy(update={"name": self.label})
        return estimate(artifact, device, prompt_tokens=self.settings.prompt_tokens, decode_tokens=self.settings.decode_tokens)
