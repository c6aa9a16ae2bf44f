"""TensorRT: a decoder graph of standard ONNX operators that TensorRT 10's parser takes, checked here on ONNX Runtime
CPU, and its engine built where TensorRT and a CUDA GPU exist, else the exact build plan for the device.

Why an exporter of its own, from the checkpoint, rather than `export onnx --target tensorrt`: the ONNX
exporter's graph, its quantizers and its runner are ONNX Runtime's (GroupQueryAttention, MatMulNBits, the
in-place cache); this graph shares none of them (see _trt_graph.py), and a registered format gives the
profile, the Runner, the latency bench and the roofline their own name. The folder holds
  model.onnx + model.onnx.data   one graph for prefill and decode (dynamic seq and past_seq), fp16 activations,
                                 INT4 / INT8 weight-only through DequantizeLinear with symmetric block scales
  manifest.json                  "format": "tensorrt", the graph's inputs and outputs, quantization, the
                                 operator check (tensorrt_ready and any failing node), parity on ONNX Runtime
                                 CPU ("checked_on"), perplexity and top-1 agreement on held-out text
  build_plan.json, build_engine.sh   the trtexec command with the exact min/opt/max shapes (where no engine is built)
  model.engine                   only where TensorRT and a CUDA GPU exist (never on these CPU machines)
A quantize folder's grid cannot be carried as is: TensorRT takes zero points of zero only, so its dequantized
weights are re-solved symmetric per block by round-to-nearest (recorded as such).
"""

from __future__ import annotations

import shlex
from importlib import util
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from vcompress.core.artifact import MANIFEST, write_json
from vcompress.core.errors import InputError, Refused, Unsupported
from vcompress.core.quant_format import grid_bits
from vcompress.core.runner import RUNNERS
from vcompress.core.stage import StageContext

from . import _onnx_quant, _trt_graph, _trt_ops, base
from ._tensorrt_session import GraphSession, SessionError
from .base import Exporter, HeldoutConfig, PowerOfTwo, SessionRunner, gate, heldout_fidelity, load_source, save_sidecars, stored_weights

FORMAT = "tensorrt"
ENGINE_FILE = "model.engine"
NO_GPU = "engine not built here: TensorRT needs a CUDA GPU"


class TensorRTExportConfig(HeldoutConfig):
    quant: Literal["int4", "int8", "none"] = Field("int4", description="weights: INT4 / INT8 weight-only (symmetric blocks) or float")
    precision: Literal["fp16", "fp32"] = Field("fp16", description="the graph's float type: activations, float weights and the KV cache")
    block_size: PowerOfTwo = Field(
        128, ge=32, le=128, description="INT4/INT8 block along the input dimension (smaller where it does not divide)"
    )
    # fp16 against the fp32 PyTorch model: logits differ by ~1e-2 on real models; greedy tokens must still match.
    max_abs_diff_fp16: float = Field(0.5, gt=0, description="fp16 float weights: largest |logit difference| allowed")
    prefill_tokens: int = Field(256, ge=1, description="past length the optimization profile is tuned for")
    max_tokens: int | None = Field(None, ge=2, description="longest sequence the engine accepts (default: the model's positions)")
    threads: int | None = Field(None, gt=0, description="ONNX Runtime intra-op threads for the checks")


class TensorRTExport(Exporter):
    format = FORMAT
    runtime = "tensorrt"
    sessions = {FORMAT: f"{__package__}._tensorrt_session"}  # the graph on ONNX Runtime here; the engine is built on the board
    Config = TensorRTExportConfig

    def predicted_weights(self, shape: dict, quantization: dict, max_positions: int) -> dict:
        """What this export stores (`Exporter.predicted_weights`): the linears (an untied LM head among them) as
        INT4/INT8 codes with one `precision` float scale per block (zero points of zero), or floats; the
        embedding table in `precision` floats; the rotary cos and sin tables for every position (full head dim)."""
        cfg = self.config
        float_bits = 16 if cfg.precision == "fp16" else 32
        bits = float_bits if cfg.quant == "none" else _trt_graph.CODES[cfg.quant][0] + float_bits / cfg.block_size
        rotary = 2 * max_positions * shape["head_dim"] * float_bits / 8
        return stored_weights(shape, bits, float_bits, float_bits if shape["tied"] else bits, rotary)

    def run(self, ctx: StageContext) -> dict:
        cfg: TensorRTExportConfig = self.config
        model, tokenizer, grid = load_source(ctx)
        if grid is not None:
            bits = grid_bits(grid)
            if cfg.quant not in ("none", f"int{bits}"):
                raise InputError(f"the checkpoint is quantized to {bits} bits; export it with --quant int{bits} or --quant none")
            ctx.log(f"re-solving the checkpoint's {grid.get('method')} grid symmetric per block (TensorRT takes zero points of zero only)")
        uncarried = base.uncarried_source(
            ctx,
            cfg.quant,
            "TensorRT's DequantizeLinear takes zero points of zero only, so blocks are re-solved symmetric by round-to-nearest",
        )
        token_range(cfg.prefill_tokens, cfg.max_tokens, _trt_graph.dims_of(model.config).max_positions)  # before any work
        ctx.log(f"building the standard-op decoder graph ({model.config.model_type}, {cfg.precision}, weights {cfg.quant})")
        proto, dims, blocks = _trt_graph.build(model, precision=cfg.precision, weights=cfg.quant, block_size=cfg.block_size)
        check = _trt_ops.check(proto)
        ctx.log(_trt_ops.summary(check))
        files = _onnx_quant.save(proto, ctx.out)
        del proto
        save_sidecars(model, tokenizer, ctx.out)
        fields = _graph_fields(dims, cfg, blocks, grid)
        if uncarried:
            fields["quant"]["source_grid"] = uncarried
        shapes = profile_shapes(fields, prefill_tokens=cfg.prefill_tokens, max_tokens=cfg.max_tokens)
        manifest = self.manifest(
            {"model": files[0], "weights": files[1], "config": "config.json", "tokenizer": "tokenizer.json"},
            **fields,
            checked_on="onnxruntime-cpu",
            tensorrt_ready=check["tensorrt_ready"],
            operator_check=check,
            trtexec=trtexec_command(files[0], ENGINE_FILE, shapes),
            shapes=shapes,
        )
        write_json(ctx.out / MANIFEST, manifest)
        if not check["tensorrt_ready"]:
            raise Refused(f"the graph is not TensorRT-ready: {_trt_ops.summary(check)}; the export was not written")
        parity_cfg = cfg.model_copy(update={"max_abs_diff": cfg.max_abs_diff_fp16}) if cfg.precision == "fp16" else cfg
        result = gate(
            ctx, TensorRTRunner, model, tokenizer, parity_cfg, manifest, "TensorRT graph (ONNX Runtime CPU)", dequantized=bool(grid)
        )
        manifest["fidelity"] = _fidelity(ctx, cfg, model, tokenizer)
        manifest.update(_engine_or_plan(ctx, manifest, shapes))
        write_json(ctx.out / MANIFEST, manifest)
        return {
            "format": FORMAT,
            "quant": cfg.quant,
            "precision": cfg.precision,
            "tensorrt_ready": True,
            "engine_built": manifest["engine_built"],
            "parity": result,
            "fidelity": manifest["fidelity"],
        }


export = TensorRTExport.export  # the library API: export(model_path, out, quant=None, **settings) -> metrics


def _graph_fields(dims, cfg: TensorRTExportConfig, blocks: dict, grid: dict | None) -> dict:
    kv_dtype = _trt_graph.FLOATS[cfg.precision][2]
    kv = {"dtype": kv_dtype, "shape": ["batch", dims.kv_heads, "past_seq", dims.head_dim]}
    present = {"dtype": kv_dtype, "shape": ["batch", dims.kv_heads, "total_seq", dims.head_dim]}
    names = [f"{i}.{part}" for i in range(dims.layers) for part in ("key", "value")]
    quant = {"scheme": cfg.quant, "precision": cfg.precision}
    if cfg.quant != "none":
        quant |= {"method": "rtn-symmetric", "zero_point": 0, "block_size": cfg.block_size, "blocks": sorted(set(blocks.values()))}
        quant |= {"resolved_from": grid.get("method")} if grid else {}
    return {
        **dims.manifest_fields(),
        "kv_dtype": kv_dtype,
        "opset": _trt_graph.OPSET,
        "quant": quant,
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
        + [{"name": f"past_key_values.{n}", **kv} for n in names],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", dims.vocab]}]
        + [{"name": f"present.{n}", **present} for n in names],
        "notes": {
            "graphs": "one graph serves prefill (past_seq 0) and decode (seq 1); present = Concat(past, new)",
            "logits": "every position's logits (no shape-tensor input); an app reads the last row",
            "positions": "past_seq + seq must not exceed max_positions (rotary rows are sliced from a table)",
        },
    }


def _fidelity(ctx: StageContext, cfg: TensorRTExportConfig, model, tokenizer) -> dict | None:
    """Perplexity and top-1 next-token agreement of the graph (ONNX Runtime CPU) against PyTorch on held-out text."""
    figures = heldout_fidelity(
        ctx, lambda: TensorRTRunner(ctx.out, threads=cfg.threads), model, tokenizer, cfg.heldout_blocks, cfg.heldout_seq_len
    )
    return figures and {**figures, "checked_on": "onnxruntime-cpu"}


def _engine_or_plan(ctx: StageContext, manifest: dict, shapes: dict) -> dict:
    """The engine where TensorRT and a CUDA GPU exist; elsewhere build_plan.json and build_engine.sh."""
    usable, why = tensorrt_available()
    if usable:
        ctx.log("building the TensorRT engine (strongly typed: the graph's own dtypes)")
        (ctx.out / ENGINE_FILE).write_bytes(_build_engine(ctx.out / manifest["files"]["model"], shapes))
        manifest["files"]["engine"] = ENGINE_FILE
        return {"engine_built": True}
    plan = {
        "format": "tensorrt-plan",
        "engine_built": False,
        "engine_note": NO_GPU,
        "reason": why,
        "graph": manifest["files"]["model"],
        "tensorrt_ready": manifest["tensorrt_ready"],
        "matrix": manifest["operator_check"]["matrix"],
        "shapes": shapes,
        "trtexec": manifest["trtexec"],
        "notes": PLAN_NOTES,
    }
    write_json(ctx.out / "build_plan.json", plan)
    _write_script(ctx.out / "build_engine.sh", plan)
    manifest["files"] |= {"plan": "build_plan.json", "script": "build_engine.sh"}
    ctx.log(f"{NO_GPU} ({why}); wrote build_plan.json and build_engine.sh (trtexec, to run on the device)")
    return {"engine_built": False, "engine_note": NO_GPU, "reason": why}


PLAN_NOTES = [
    "run build_engine.sh on the device (Jetson engines are built where they run), in a copy of this folder",
    "--stronglyTyped: the graph fixes every dtype (fp16 activations, fp32 RMSNorm and softmax, INT4/INT8 weight-only DequantizeLinear)",
    "one profile: decode (seq 1) at opt; prefill runs inside the same profile (seq up to max_tokens, past 0)",
]


def profile_shapes(manifest: dict, *, prefill_tokens: int = 256, max_tokens: int | None = None) -> dict[str, dict[str, list[int]]]:
    """{input: {"min": [...], "opt": [...], "max": [...]}} for every input with a symbolic dim."""
    max_tokens = token_range(prefill_tokens, max_tokens, manifest["max_positions"])
    dims = {"batch": (1, 1, 1), "seq": (1, 1, max_tokens), "past_seq": (0, prefill_tokens, max_tokens - 1)}
    shapes = {}
    for tensor in manifest["inputs"]:
        if any(isinstance(d, str) for d in tensor["shape"]):
            shapes[tensor["name"]] = {
                key: [dims[d][i] if isinstance(d, str) else int(d) for d in tensor["shape"]] for i, key in enumerate(("min", "opt", "max"))
            }
    return shapes


def token_range(prefill_tokens: int, max_tokens: int | None, max_positions: int) -> int:
    """The engine's longest sequence, checked against the prefill length and the model's positions."""
    max_tokens = max_tokens or max_positions
    if not 1 <= prefill_tokens < max_tokens:
        raise InputError(
            f"--prefill-tokens {prefill_tokens} must be at least 1 and below --max-tokens {max_tokens}; pass a smaller --prefill-tokens"
        )
    if max_tokens > max_positions:
        raise InputError(
            f"--max-tokens {max_tokens} exceeds the model's {max_positions} positions; pass --max-tokens {max_positions} or less"
        )
    return max_tokens


def trtexec_command(onnx_file: str, engine_file: str, shapes: dict) -> list[str]:
    def spec(which: str) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in shapes.items())

    return [
        "trtexec",
        f"--onnx={onnx_file}",
        f"--saveEngine={engine_file}",
        f"--minShapes={spec('min')}",
        f"--optShapes={spec('opt')}",
        f"--maxShapes={spec('max')}",
        "--stronglyTyped",
    ]


def tensorrt_available() -> tuple[bool, str]:
    """(usable, why not): the tensorrt module and a CUDA GPU."""
    if util.find_spec("tensorrt") is None:
        return False, "the `tensorrt` Python package is not installed (it comes from NVIDIA's index, e.g. JetPack on a Jetson)"
    if not torch.cuda.is_available():
        return False, "`tensorrt` imports but there is no CUDA GPU"
    return True, ""


def _write_script(file: Path, plan: dict) -> None:
    """build_engine.sh: the trtexec command, run from the folder it sits in."""
    file.write_text(
        "#!/bin/sh\n# vcompress TensorRT build plan: run on the target (TensorRT and its GPU), in a copy of this folder.\n"
        f"# {plan['engine_note']} (where this was written: {plan['reason']}).\n"
        + "".join(f"# note: {n}\n" for n in plan["notes"])
        + 'set -e\ncd "$(dirname "$0")"\n'
        + " \\\n  ".join(shlex.quote(w) for w in plan["trtexec"])
        + "\n"
    )
    file.chmod(0o755)


def _build_engine(onnx_file: Path, shapes: dict) -> bytes:
    """The serialized engine through the TensorRT Python API: ONNX parser, strongly typed network, one profile."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise Unsupported(f"TensorRT's ONNX parser rejected {onnx_file}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, s in shapes.items():
        profile.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise Unsupported(f"TensorRT could not build an engine from {onnx_file} (see its log above)")
    return bytes(engine)


# --- the runner -----------------------------------------------------------------------


@RUNNERS.register(FORMAT)
class TensorRTRunner(SessionRunner):
    """The TensorRT graph on ONNX Runtime CPU (no engine runs here): evaluation's figures say so in `backend`."""

    backend = "onnxruntime-cpu (tensorrt graph)"
    session_error = SessionError

    def open_session(self) -> GraphSession:
        return GraphSession(self.path, threads=self.threads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(self._call(self.session.logits, input_ids.cpu().numpy()))
