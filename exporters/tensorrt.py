"""TensorRT from our ONNX export: a serialized engine where TensorRT and a CUDA GPU exist, else the
engine build plan (the exact `trtexec` command), clearly labelled as a plan.

The exporter's source is an ONNX artifact folder, not a model checkpoint (see CHECKPOINT_REFUSED).
`export(onnx_dir, out, precision=...)` reads the ONNX artifact's manifest.json (its inputs, with the
symbolic dims batch / seq / past_seq) and makes one optimization profile:
  batch     1 / 1 / 1
  seq       1 / 1 / max_tokens            (decode at opt; a prompt up to the context at max)
  past_seq  0 / prefill_tokens / max_tokens - 1
so the same engine serves prefill (seq = prompt, past 0) and decode (seq 1). Where TensorRT is
missing (these CPU machines: its libraries come from NVIDIA's own index) the folder holds
  build_plan.json   "format": "tensorrt-plan", "engine_built": false, shapes, flags, reasons
  build_engine.sh   the trtexec command to run on the target (Jetson engines are built on the device)
and no engine. The plan also lists the graph's ONNX Runtime contrib ops (GroupQueryAttention,
MatMulNBits, ...): TensorRT's ONNX parser has none of them, so a build needs plugins for them.
"""

from __future__ import annotations

import json
import shlex
import shutil
from importlib import util
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field

from vcompress.core.artifact import MANIFEST, read_json, write_json
from vcompress.core.errors import InputError, Unsupported
from vcompress.core.models import ModelSource
from vcompress.core.registry import EXPORTERS
from vcompress.core.stage import StageConfig, StageContext, execute

from .base import ExportStage

FORMAT = "tensorrt"
PLAN_FORMAT = "tensorrt-plan"
ENGINE_FILE = "model.engine"
SIDECARS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CHECKPOINT_REFUSED = (
    f"exporter {FORMAT!r} builds from an ONNX export, not from a model checkpoint, and TensorRT's ONNX parser does not take "
    "the ONNX Runtime fused operators our ONNX graph is built from (GroupQueryAttention, MatMulNBits); run an onnx profile, "
    "then `vcompress export tensorrt --onnx RUN/05-export-onnx --out E` for the labelled engine build plan"
)


class TensorRTExportConfig(StageConfig):
    # a profile's target.quant (fp16) names the builder precision
    precision: Literal["fp16", "int8"] = Field(
        "fp16",
        validation_alias=AliasChoices("precision", "quant"),
        description="TensorRT builder precision flags (int8 where it can, fp16 elsewhere)",
    )
    prefill_tokens: int = Field(256, ge=1, description="past length the optimization profile is tuned for")
    max_tokens: int | None = Field(None, ge=2, description="longest sequence the engine accepts (default: the model's positions)")


@EXPORTERS.register(FORMAT)
class TensorRTExport(ExportStage):
    format = FORMAT
    runtime = "tensorrt"
    runtime_package = "tensorrt"
    refuses_checkpoints = CHECKPOINT_REFUSED
    Config = TensorRTExportConfig

    def run(self, ctx: StageContext) -> dict:
        cfg: TensorRTExportConfig = self.config
        if _is_checkpoint(ctx.source):
            raise Unsupported(CHECKPOINT_REFUSED)
        onnx_dir = Path(ctx.source)
        onnx = read_onnx_manifest(onnx_dir)
        shapes = profile_shapes(onnx, prefill_tokens=cfg.prefill_tokens, max_tokens=cfg.max_tokens)
        onnx_file = onnx_dir / onnx["files"]["model"]
        blocking = contrib_ops(onnx_file)
        usable, why = tensorrt_available()
        for name in SIDECARS:
            if (onnx_dir / name).is_file():
                shutil.copyfile(onnx_dir / name, ctx.out / name)
        record = {
            "source_onnx": str(onnx_dir.resolve()),
            "onnx_quant": onnx.get("quant", {}).get("scheme"),
            "precision": cfg.precision,
            "profile": {"prefill_tokens": cfg.prefill_tokens, "max_tokens": cfg.max_tokens or onnx["max_positions"], "shapes": shapes},
            "contrib_ops": blocking,
            "trtexec": trtexec_command(str(onnx_file.resolve()), ENGINE_FILE, shapes, cfg.precision),
            "notes": _notes(blocking, cfg.precision),
        }
        if usable:
            ctx.log(f"building a TensorRT engine ({cfg.precision}) from {onnx_file}")
            (ctx.out / ENGINE_FILE).write_bytes(_build_engine(onnx_file, shapes, cfg.precision))
            manifest = self.manifest(
                {"engine": ENGINE_FILE},
                engine_built=True,
                **record,
                parity=None,
                latency=None,
                not_run="this version builds the engine only; parity and latency through TensorRT are not implemented",
            )
        else:
            _write_script(ctx.out / "build_engine.sh", record, why)
            manifest = self.manifest(
                {"plan": "build_plan.json", "script": "build_engine.sh"}, format=PLAN_FORMAT, engine_built=False, reason=why, **record
            )
            write_json(ctx.out / "build_plan.json", manifest)
            ctx.log(f"no TensorRT engine was built: {why}. Writing the build plan (build_plan.json) and build_engine.sh (trtexec) instead")
            if blocking:
                ctx.log(
                    f"warning: the ONNX graph uses {', '.join(blocking)} (ONNX Runtime contrib ops); TensorRT's ONNX parser has none of them, so the build needs plugins for them"
                )
        write_json(ctx.out / MANIFEST, manifest)
        return {"format": manifest["format"], "engine_built": usable, "precision": cfg.precision, "contrib_ops": blocking}


def export(onnx_dir: str | Path, out: str | Path, *, force: bool = False, log=print, **settings) -> dict:
    """Build the engine (TensorRT + CUDA here) or write the build plan from an ONNX export; returns the written manifest."""
    execute(TensorRTExport(settings), out, source=onnx_dir, force=force, log=log)
    return read_json(Path(out) / MANIFEST)


def _is_checkpoint(source) -> bool:
    """A model (checkpoint folder, GGUF, LoRA adapter, hub id, the embedded default) rather than an artifact folder."""
    if source is None or isinstance(source, ModelSource) or str(source).startswith("hf:"):
        return True
    path = Path(source)
    if (path / MANIFEST).is_file():
        return False
    return path.suffix == ".gguf" or (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def read_onnx_manifest(onnx_dir: str | Path) -> dict:
    folder = Path(onnx_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder} has no manifest.json; pass a folder written by `vcompress export onnx`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "onnx":
        raise InputError(
            f"{folder} is a {manifest.get('format')!r} artifact; `export tensorrt` takes the folder of `vcompress export onnx`"
        )
    if not (folder / manifest["files"]["model"]).is_file():
        raise InputError(f"{folder / manifest['files']['model']} is missing; re-run `vcompress export onnx`")
    return manifest


def profile_shapes(manifest: dict, *, prefill_tokens: int = 256, max_tokens: int | None = None) -> dict[str, dict[str, list[int]]]:
    """{input: {"min": [...], "opt": [...], "max": [...]}} for every input with a symbolic dim."""
    max_tokens = max_tokens or manifest["max_positions"]
    if not 1 <= prefill_tokens < max_tokens:
        raise InputError(f"--prefill-tokens {prefill_tokens} must be at least 1 and below --max-tokens {max_tokens}")
    if max_tokens > manifest["max_positions"]:
        raise InputError(f"--max-tokens {max_tokens} exceeds the model's {manifest['max_positions']} positions")
    dims = {"batch": (1, 1, 1), "seq": (1, 1, max_tokens), "past_seq": (0, prefill_tokens, max_tokens - 1)}
    shapes = {}
    for tensor in manifest["inputs"]:
        symbolic = [d for d in tensor["shape"] if isinstance(d, str)]
        if not symbolic:
            continue
        unknown = [d for d in symbolic if d not in dims]
        if unknown:
            raise InputError(
                f"input {tensor['name']} of the ONNX manifest has dims {unknown} this exporter has no range for; re-export with `vcompress export onnx`"
            )
        shapes[tensor["name"]] = {
            key: [dims[d][i] if isinstance(d, str) else int(d) for d in tensor["shape"]] for i, key in enumerate(("min", "opt", "max"))
        }
    return shapes


def contrib_ops(onnx_file: Path) -> list[str]:
    """Ops outside the standard ONNX domain (com.microsoft): TensorRT's ONNX parser implements none of them."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    return sorted({node.op_type for node in model.graph.node if node.domain not in ("", "ai.onnx")})


def trtexec_command(onnx_file: str, engine_file: str, shapes: dict, precision: str) -> list[str]:
    def spec(which: str) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in shapes.items())

    command = [
        "trtexec",
        f"--onnx={onnx_file}",
        f"--saveEngine={engine_file}",
        f"--minShapes={spec('min')}",
        f"--optShapes={spec('opt')}",
        f"--maxShapes={spec('max')}",
    ]
    command += ["--fp16"] if precision == "fp16" else ["--int8", "--fp16"]  # int8 where it can, fp16 elsewhere
    return command


def tensorrt_available() -> tuple[bool, str]:
    """(usable, why not): the tensorrt module and a CUDA GPU."""
    if util.find_spec("tensorrt") is None:
        return False, "the `tensorrt` Python package is not installed (it comes from NVIDIA's index, e.g. JetPack on a Jetson)"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "`tensorrt` imports but there is no CUDA GPU"
    except ImportError:
        return False, "no torch to query CUDA"
    return True, ""


def _write_script(file: Path, record: dict, why: str) -> None:
    """build_engine.sh: the trtexec command, to run on the target, with why it was not run here."""
    file.write_text(
        "#!/bin/sh\n# vcompress TensorRT build plan: run on the target (TensorRT and its GPU), next to a copy of the ONNX folder.\n"
        f"# No engine was built where this was written: {why}.\n"
        + "".join(f"# note: {n}\n" for n in record["notes"])
        + "set -e\n"
        + " \\\n  ".join(shlex.quote(w) for w in record["trtexec"])
        + "\n"
    )
    file.chmod(0o755)


def _notes(blocking: list[str], precision: str) -> list[str]:
    notes = []
    if blocking:
        notes.append(
            f"the graph uses ONNX Runtime contrib ops ({', '.join(blocking)}) that TensorRT's ONNX parser does not implement; "
            "the build fails unless TensorRT plugins provide them"
        )
    if precision == "int8":
        notes.append(
            "--int8 without a calibration cache: the graph carries no Q/DQ scales, so TensorRT uses placeholder ranges; "
            "check accuracy before using the engine"
        )
    return notes


def _build_engine(onnx_file: Path, shapes: dict, precision: str) -> bytes:
    """The serialized engine, through the TensorRT Python API (ONNX parser, one profile, precision flags)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise Unsupported(f"TensorRT's ONNX parser rejected {onnx_file}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, s in shapes.items():
        profile.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise Unsupported(f"TensorRT could not build an engine from {onnx_file} (see its log above)")
    return bytes(engine)
