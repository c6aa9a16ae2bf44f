"""ONNX export (decoder with KV cache; fp32, INT8 dynamic or INT4 MatMulNBits) and its ONNX Runtime Runner.

`export(model, out, quant=...)` writes an artifact folder:
  model.onnx + model.onnx.data   the decoder graph and its weights (see _onnx_graph.py for why the
                                 graph is built from the weights rather than traced)
  config.json, generation_config.json, tokenizer files   from the source checkpoint
  genai_config.json              what ONNX Runtime GenAI reads: `onnxruntime_genai.Model(folder)`
                                 generates from the folder as is (see _onnx_genai.py)
  manifest.json                  "format": "onnx", runtime and its version, files, inputs/outputs with
                                 dtypes and shapes, quantization, parity thresholds and results
  recipe.yaml, metrics.json      written by vcompress.core.stage.execute
Every export checks itself against PyTorch (base.parity); a failed check raises Refused and
leaves no artifact behind.

Streamed (`stream` on, or auto when the fp32 model would not fit in memory): the graph is built from
the files on disk one tensor at a time (a quantize folder's linears from their own codes, one linear at
a time), each initializer's bytes are appended to model.onnx.data as it is made (the proto holds none),
and the parity reference reads one decoder layer per forward. Memory is then about one layer, the
embedding / LM head and ONNX Runtime's session, and the files are byte for byte the in-memory export's
(tests/test_onnx_stream.py). A float source under int4/int8 is not streamed: ONNX Runtime's quantizers
take the whole graph (quantize it with `vcompress quantize` and export that folder instead).

A GGUF source (the embedded default too) under int4/int8 keeps its own blocks (core/gguf_blocks.py): each linear
whose type the target holds goes into MatMulNBits as it is, through the same carried path as a quantize folder;
the others (e.g. Q6_K under int4) are re-rounded by ONNX Runtime and listed, with the reason, in the manifest's
quant.grid.rerounded (`vcompress quantize --method gptq` on the GGUF re-quantizes them with GPTQ instead).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from pydantic import Field, model_validator

from vcompress.core.artifact import MANIFEST, write_json
from vcompress.core.errors import InputError
from vcompress.core.gguf_blocks import carried_grid, table_type
from vcompress.core.layer_stream import LazyTensors, file_tensors, stream_source, stream_tensors
from vcompress.core.models import bytes_on_disk, source_gguf
from vcompress.core.quant_format import carries_wider_source, grid_bits, read_quant_grid
from vcompress.core.runner import RUNNERS
from vcompress.core.stage import StageContext

from . import _onnx_genai, _onnx_gptq, _onnx_graph, _onnx_prefill, _onnx_quant
from ._onnx_session import DecoderSession, SessionError
from .base import (
    Exporter,
    ParityConfig,
    PowerOfTwo,
    SessionRunner,
    gate,
    load_source,
    open_stream,
    package_version,
    save_sidecars,
    source_folder,
    stored_weights,
    stream_folder,
)

FORMAT = "onnx"


class OnnxExportConfig(ParityConfig):
    quant: Literal["none", "int8", "int4"] = Field(
        "none", description="weights: fp32, INT8 (see int8_method) or INT4 weight-only (MatMulNBits)"
    )
    method: Literal["rtn", "hqq", "rtn-float"] = Field(
        "rtn",
        description="int4: ONNX Runtime's RTN (integer zero point), HQQ, or min/max with a float zero point (exact on Q4_1 grids, slow kernel)",
    )
    int8_method: Literal["blockwise", "dynamic"] = Field(
        "blockwise", description="int8: 8-bit MatMulNBits blocks, or ONNX Runtime dynamic quantization"
    )
    block_size: PowerOfTwo = Field(32, ge=16, description="int4/int8 block along the input dimension (power of two)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="MatMulNBits compute type; 4 = int8 activations")
    table_bits: Literal[0, 4, 8] | None = Field(
        None,
        description="bits of the embedding table and the LM head (tied or untied) under int4 (int8: 8); 0 keeps both fp32; "
        "default 4, or 8 for a GGUF source whose table is Q8_0 (its own blocks come back exactly at 8 bits)",
    )
    head_bits: Literal[0, 4, 8] | None = Field(
        None,
        description="bits of the LM head if not table_bits; a tied embedding is the head's table and takes them too, "
        "an untied one (only gathered, a row per token) keeps table_bits",
    )
    compact: bool = Field(
        False,
        description="store block scales and float-zero corrections as float16 (cast to float32 when ONNX Runtime loads the "
        "model) and compute the rotary tables in the graph: a smaller file (SmolLM2 x86-cpu: 108.7 -> 92.4 MiB) for "
        "scales rounded to float16 (exact for GGUF Q4_0/Q4_1/Q5_0/Q8_0 scales, which are float16; K-quant sub-block scales and float-minimum corrections round) and a higher load-time peak RSS",
    )
    prefill_graph: Literal["none", "int8"] = Field(
        "none",
        description="int8: a second graph for the prompt (model_prefill.onnx) with the same weights as int8 per channel on ONNX "
        "Runtime's int8 GEMM, run by ONNX Runtime GenAI on the prompt while the 4-bit graph generates, one KV cache between "
        'them: a faster prefill for a second copy of the body on disk and in memory (docs/peers.md, "The int8 prompt graph")',
    )
    threads: int | None = Field(None, gt=0, description="ONNX Runtime intra-op threads for the parity check")
    stream: Literal["auto", "on", "off"] = Field(
        "auto",
        description="build the graph one tensor at a time from disk and check it against a model read layer by layer "
        "(auto: when the model would not fit in memory); a float source's int4/int8 needs the whole graph",
    )

    @model_validator(mode="after")
    def _compact_needs_quantization(self):
        if self.compact and self.quant == "none":
            raise ValueError(
                "compact stores quantization scales as float16 and an fp32 export has none; use --quant int4 or int8, or drop compact"
            )
        if self.prefill_graph != "none" and self.quant != "int4":
            raise ValueError(
                "prefill_graph int8 pairs an int8 prompt graph with a 4-bit decode graph; use --quant int4, or --prefill-graph none"
            )
        return self


class OnnxExport(Exporter):
    format = FORMAT
    runtime = "onnxruntime"
    app_runtime_package = "onnxruntime-genai"  # what an app ships to run the folder (genai_config.json)
    sessions = {"onnxruntime_genai": f"{__package__}._genai_session", "onnxruntime": f"{__package__}._onnx_session"}
    Config = OnnxExportConfig

    def predicted_weights(self, shape: dict, quantization: dict, max_positions: int) -> dict:
        """What this export stores (`Exporter.predicted_weights`): a GPTQ/RTN body as MatMulNBits codes with a
        scale and a packed zero point per group, or for float zero points (quantize's zero_point: float) a
        correction per group instead; the tables in blocks at table_bits / head_bits (4-bit blocks with a zero
        point, 8-bit ones symmetric; 0: fp32); scales and corrections fp32, float16 when compact; the rotary
        cos/sin tables for every position (fp32, half the head dim each) unless compact computes them in the graph.
        int8 / no quantization: 8 / 32 bits everywhere. The x86-cpu export of Qwen2.5-Coder-0.5B (untied, table
        bits 8) was 570.0 MiB where an earlier rule, ignoring the tables' blocks, said 483.6."""
        cfg = self.config
        tables = {"gpt2": 0, "gemma3_text": 2}.get(shape["model_type"], 1)  # Gemma 3: a rotary base per layer type
        rotary = max_positions * shape["head_dim"] * 4 * tables if not cfg.compact else 0
        if cfg.quant == "none" or quantization["method"] in ("none", "int8"):
            bits = 32 if cfg.quant == "none" or quantization["method"] == "none" else 8
            return stored_weights(shape, bits, bits, bits, rotary)
        side = 16 if cfg.compact else 32
        float_zero = quantization.get("zero_point", "int") == "float"
        body = quantization["bits"] + (side + (side if float_zero else quantization["bits"])) / quantization["group_size"]
        in_blocks = lambda b: b + (side + (b if b < 8 else 0)) / cfg.block_size if b else 32  # noqa: E731
        stored = stored_weights(shape, body, in_blocks(_table_bits(cfg)), in_blocks(_head_bits(cfg)), rotary)
        if cfg.prefill_graph == "int8":  # the prompt graph: the body at 8 bits and a scale per column, the same tables again
            stored["stored_bytes"] += stored_weights(shape, 8, in_blocks(_table_bits(cfg)), in_blocks(_head_bits(cfg)), rotary)[
                "stored_bytes"
            ]
        return stored

    @classmethod
    def float_reference(cls, artifact: Path, dest: Path) -> Path:
        """Every graph with MatMulNBits at accuracy level 0 (float activations, the weights dequantized: equal to the
        quantized checkpoint in PyTorch within 1e-3 on SmolLM2); the weight files shared by hard link where possible.
        At level 4 the kernels quantize activations to int8 in their own ISA-specific way (docs/emulated.md)."""
        dest.mkdir(parents=True, exist_ok=True)
        for path in Path(artifact).iterdir():
            if path.suffix == ".onnx":
                proto = onnx.load(path, load_external_data=False)
                for node in proto.graph.node:
                    for attribute in node.attribute if node.op_type == "MatMulNBits" else ():
                        if attribute.name == "accuracy_level":
                            attribute.i = 0
                onnx.save(proto, dest / path.name)
            elif path.is_file():
                try:  # ONNX Runtime refuses external data reached through a symbolic link
                    os.link(path, dest / path.name)
                except OSError:
                    shutil.copy2(path, dest / path.name)
        return dest

    def run(self, ctx: StageContext) -> dict:
        cfg: OnnxExportConfig = self.config
        folder = source_folder(ctx.source)
        grid = read_quant_grid(folder)
        _check_grid(cfg, grid)
        if cfg.prefill_graph != "none" and grid is None:
            raise InputError(
                "--prefill-graph int8 takes its weights from a quantize folder's grid; run `vcompress quantize` and export that folder, or pass --prefill-graph none"
            )
        gguf = source_gguf(ctx.read_source()) if grid is None and cfg.quant != "none" else None
        if cfg.table_bits is None:
            cfg = cfg.model_copy(update={"table_bits": 8 if gguf is not None and table_type(gguf) == "Q8_0" else 4})
        stream_from, stream = stream_source(cfg.stream, ctx) if gguf is not None else _stream_folder(cfg, ctx, grid), None
        if stream_from is None:
            model, tokenizer, _ = load_source(ctx)
            tensors = model.state_dict()
        else:
            stream, tokenizer = open_stream(stream_from, grid), ctx.load_tokenizer()
            model, tensors = stream.model, stream_tensors(stream)
            ctx.log(f"streaming {stream_from} tensor by tensor (the model is never whole in memory)")
        source_grid = _gguf_grid(ctx, cfg, gguf, model, streamed=stream is not None) if gguf is not None else None
        if gguf is not None and source_grid is None and stream is not None:
            raise InputError(
                f"{gguf.name} has no blocks that can be carried at {cfg.quant}, and ONNX Runtime's {cfg.quant} quantizer needs the "
                "whole graph; pass --stream off, or run `vcompress quantize` first"
            )
        tensors, shared = _share_tables(ctx, cfg, model, tensors)
        weights = _weights(tensors, cfg, folder, grid, _onnx_graph.dims_of(model.config).tied, source_grid)
        ctx.log(f"building the ONNX decoder graph ({model.config.model_type}, {cfg.quant})")
        if isinstance(weights, _onnx_gptq.CarriedWeights) and source_grid is None:
            ctx.log(f"carrying the checkpoint's {grid.get('method')} grid ({grid_bits(grid)}-bit) into MatMulNBits")
        files, dims = _write_graph(model, weights, cfg, ctx.out, streamed=stream is not None)
        prefill = _write_prefill(model, tensors, cfg, folder, grid, dims.tied, ctx.out) if cfg.prefill_graph == "int8" else []
        if prefill:
            ctx.log(
                f"wrote the int8 prompt graph {prefill[0]} (ONNX Runtime GenAI runs it on the prompt, the 4-bit graph on each new token)"
            )
        carried = getattr(weights, "carried", {})
        save_sidecars(model, tokenizer, ctx.out)
        write_json(
            ctx.out / _onnx_genai.FILE, _onnx_genai.genai_config(model, dims, files[0], prefill_file=prefill[0] if prefill else None)
        )
        manifest = self.manifest(
            {
                "model": files[0],
                "weights": files[1],
                **({"prefill_model": prefill[0], "prefill_weights": prefill[1]} if prefill else {}),
                "config": "config.json",
                "tokenizer": "tokenizer.json",
                "tokenizer_config": "tokenizer_config.json",
                "genai_config": _onnx_genai.FILE,
            },
            **_graph_fields(dims, cfg),
            app_runtime={
                "name": self.app_runtime_package,
                "version": package_version(self.app_runtime_package),
                "config": _onnx_genai.FILE,
            },
        )
        if carried:
            manifest["quant"].update(method="carried", grid=carried)
        if shared:
            manifest["quant"]["shared_table"] = shared
        write_json(ctx.out / MANIFEST, manifest)
        result = gate(
            ctx,
            OnnxRunner,
            model,
            tokenizer,
            cfg,
            manifest,
            "ONNX",
            dequantized=bool(grid),
            stream=stream,
            next_step=_next_step(ctx, cfg, weights),
        )
        size = sum(bytes_on_disk(ctx.out / f) for f in files + prefill)
        metrics = {
            "format": FORMAT,
            "quant": cfg.quant,
            "grid": carried or None,
            "streamed": stream is not None,
            "model_bytes": size,
            "prefill_graph_bytes": sum(bytes_on_disk(ctx.out / f) for f in prefill) if prefill else None,
            "fp32_weight_bytes": weights.fp32_bytes,
            "size_ratio_to_fp32": round(size / weights.fp32_bytes, 4),
            "parity": result,
        }
        return metrics


export = OnnxExport.export  # the library API: export(model_path, out, quant=None, **settings) -> metrics


def _check_grid(cfg: OnnxExportConfig, grid: dict | None) -> None:
    """A quantize folder exports at its own bits (its grid carried) or as fp32; one that carried a GGUF's wider blocks
    (quantize --wider-source carry) under int4 too, its grid carried as it is."""
    if grid is None:
        return
    bits = grid_bits(grid)
    wanted = {4: "int4", 8: "int8"}.get(bits)
    if cfg.quant not in ("none", wanted) and not (cfg.quant == "int4" and carries_wider_source(grid)):
        raise InputError(
            f"the checkpoint is quantized to {bits} bits; export it with --quant {wanted} (its grid is carried as is) or --quant none"
        )


def _stream_folder(cfg: OnnxExportConfig, ctx: StageContext, grid: dict | None) -> Path | None:
    """The folder to stream from, or None to load the source whole. A float source under int4/int8 goes
    through ONNX Runtime's quantizers, which take the whole graph: never streamed."""
    if grid is None and cfg.quant != "none":
        if cfg.stream == "on":
            raise InputError(
                f"--stream on exports --quant {cfg.quant} from a quantize folder only (its grid is carried layer by layer); "
                f"from a float model ONNX Runtime's {cfg.quant} quantizer needs the whole graph: run `vcompress quantize` first, or pass --stream off"
            )
        return None
    return stream_folder(cfg.stream, ctx, grid)


def _next_step(ctx: StageContext, cfg: OnnxExportConfig, weights) -> str | None:
    """What a refused quantized export of a source rounded here (a float model, or a GGUF's linears it could not
    carry) should try: GPTQ on calibration text first, then export that folder with its grid carried."""
    if cfg.quant == "none" or (isinstance(weights, _onnx_gptq.CarriedWeights) and not weights.rerounded):
        return None
    model = f" --model {ctx.source}" if ctx.source else ""
    bits = "4" if cfg.quant == "int4" else "8"
    return (
        f"quantize with GPTQ first, then export that folder: `vcompress quantize{model} --method gptq --bits {bits} --out q` "
        f"and `vcompress export onnx --model q --quant {cfg.quant}`"
    )


def _gguf_grid(ctx: StageContext, cfg: OnnxExportConfig, gguf: Path, model, streamed: bool):
    """A GGUF source's blocks to carry at --quant's bits (core/gguf_blocks.py), or None when none can be."""
    found = carried_grid(gguf, model, 4 if cfg.quant == "int4" else 8)
    if not found.manifest["linears"]:
        ctx.log(f"{gguf.name}: no linear is in a block type that can be carried; quantizing the float weights")
        return None
    types = sorted({found.types[n] for n in found.manifest["linears"]})
    ctx.log(f"carrying {len(found.manifest['linears'])} linears' GGUF blocks ({', '.join(types)}) into MatMulNBits as they are")
    if found.rerounded:
        if streamed:
            raise InputError(
                f"{len(found.rerounded)} linears of {gguf.name} cannot be carried at {cfg.quant} and ONNX Runtime re-rounds them on the "
                "whole graph; pass --stream off, or `vcompress quantize --method gptq` the GGUF first and export that folder"
            )
        ctx.log(
            f"{len(found.rerounded)} linears cannot be carried at {cfg.quant} (e.g. {next(iter(found.rerounded.values()))}): "
            f"ONNX Runtime's {cfg.method if cfg.quant == 'int4' else cfg.int8_method} re-rounds them; for GPTQ on calibration text "
            "run `vcompress quantize --method gptq` on the GGUF (it keeps the blocks it can) and export that folder"
        )
    return found


EMBEDDING, HEAD = "model.embed_tokens.weight", _onnx_quant.HEAD_WEIGHT


def _share_tables(ctx: StageContext, cfg: OnnxExportConfig, model, tensors):
    """(tensors, note): an untied embedding that is a second rounding of its head's matrix (a GGUF that stores a
    tied table twice, at two grids: `_onnx_quant.one_matrix_steps`) is exported tied, the head's table (the one
    every logit reads; the finer grid in such a GGUF) gathered for the embedding too, and the note says so. Two
    trained tables stay two (note None)."""
    config = model.config
    if cfg.quant == "none" or getattr(config, "tie_word_embeddings", False) or "lm_head.bias" in tensors:
        return tensors, None
    if not {EMBEDDING, HEAD} <= set(tensors) or not _head_bits(cfg):
        return tensors, None
    block = _onnx_quant._table_block(config.hidden_size, cfg.block_size)
    steps = _onnx_quant.one_matrix_steps(tensors[EMBEDDING], tensors[HEAD], block)
    if steps > _onnx_quant.ONE_MATRIX_STEPS:
        return tensors, None
    config.tie_word_embeddings = True  # the artifact's: the source model itself keeps both tables
    note = {
        "from": HEAD,
        "steps": round(steps, 3),
        "why": f"the embedding differs from the LM head by at most {steps:.2f} of a 4-bit step per block: two roundings of "
        "one matrix, stored once (the head's), read by the embedding's GatherBlockQuantized and the head",
    }
    ctx.log(f"{note['why']}; the embedding rows are the head's")
    return LazyTensors(list(tensors), lambda name: tensors[HEAD if name == EMBEDDING else name]), note


def _table_settings(cfg: OnnxExportConfig, tied: bool) -> dict:
    return dict(
        block_size=cfg.block_size,
        accuracy_level=cfg.accuracy_level,
        bits=_table_bits(cfg),
        head_bits=_head_bits(cfg),
        tied=tied,
        compact=cfg.compact,
    )


def _weights(tensors, cfg: OnnxExportConfig, folder: Path | None, grid: dict | None, tied: bool, source_grid=None) -> _onnx_graph.Weights:
    """The form each weight takes in the graph: fp32; a quantize folder's (or a GGUF's) grid carried per linear; the
    embedding / LM head at table_bits (the body of a float source is quantized after, by ONNX Runtime)."""
    if cfg.quant == "none":
        return _onnx_graph.Weights(tensors)
    settings = _table_settings(cfg, tied)
    if source_grid is not None:
        weights = _onnx_gptq.CarriedWeights(tensors, source_grid.tensors, source_grid.manifest, **settings)
        weights.rerounded = dict(source_grid.rerounded)
        rounder = f"onnxruntime {cfg.method if cfg.quant == 'int4' else cfg.int8_method}"
        weights.carried.update(source="gguf", types=_counts(source_grid.types), rerounded=weights.rerounded, rerounded_by=rounder)
        return weights
    if grid is not None:
        codes = file_tensors(folder / grid["weights_file"])
        return _onnx_gptq.CarriedWeights(tensors, codes, grid, **settings)
    return _onnx_quant.TableWeights(tensors, **settings)


def _counts(types: dict[str, str]) -> dict[str, int]:
    return {t: list(types.values()).count(t) for t in sorted(set(types.values()))}


def _table_bits(cfg: OnnxExportConfig, bits: int | None = None) -> int:
    bits = cfg.table_bits if bits is None else bits
    bits = 4 if bits is None else bits
    return bits if cfg.quant == "int4" or bits == 0 else 8


def _head_bits(cfg: OnnxExportConfig) -> int:
    return _table_bits(cfg, cfg.head_bits)


def _write_graph(model, weights: _onnx_graph.Weights, cfg: OnnxExportConfig, out: Path, streamed: bool) -> tuple[list[str], Any]:
    """Build the graph and write model.onnx + model.onnx.data; returns the file names and the graph's dims.
    Streamed: each initializer's bytes go to the data file as it is made. In memory: one proto, the body
    of a float source quantized by ONNX Runtime under int4/int8, then one save (the same files)."""
    name = "model.onnx"
    if streamed:
        proto, dims = _onnx_graph.build(model, weights, _onnx_graph.ExternalData(out, f"{name}.data"))
        onnx.save_model(proto, out / name)
        return [name, f"{name}.data"], dims
    proto, dims = _onnx_graph.build(model, weights)
    only = None  # a carried grid's MatMuls left float that ONNX Runtime re-rounds (a GGUF's); None: the whole body
    if isinstance(weights, _onnx_gptq.CarriedWeights):
        only = weights.carried["kept_float"] if getattr(weights, "rerounded", None) else []
    if only == [] or cfg.quant == "none":
        return _onnx_quant.save(proto, out, name), dims
    if cfg.quant == "int8":
        proto = _onnx_quant.quantize_int8(
            proto, block_size=cfg.block_size, accuracy_level=cfg.accuracy_level, method=cfg.int8_method, only=only
        )
    else:
        proto = _onnx_quant.quantize_int4(proto, block_size=cfg.block_size, method=cfg.method, accuracy_level=cfg.accuracy_level, only=only)
    return _onnx_quant.save(proto, out, name), dims


def _write_prefill(model, tensors, cfg: OnnxExportConfig, folder: Path | None, grid: dict | None, tied: bool, out: Path) -> list[str]:
    """The int8 prompt graph (_onnx_prefill.py), its bytes written to its own data file as it is built."""
    name = _onnx_prefill.FILE
    weights = _onnx_prefill.PrefillWeights(tensors, file_tensors(folder / grid["weights_file"]), grid, **_table_settings(cfg, tied))
    proto, _ = _onnx_graph.build(model, weights, _onnx_graph.ExternalData(out, f"{name}.data"))
    onnx.save_model(proto, out / name)
    return [name, f"{name}.data"]


def _graph_fields(dims, cfg: OnnxExportConfig) -> dict:
    """The manifest's description of the graph: shape, quantization, inputs and outputs with dtypes."""
    inputs, outputs = _onnx_graph.io_names(dims)
    kv_in = ["batch", dims.kv_heads, "past_seq", dims.head_dim]
    kv_out = ["batch", dims.kv_heads, "present_seq", dims.head_dim]
    shapes = {
        "input_ids": ("int64", ["batch", "seq"]),
        "attention_mask": ("int64", ["batch", "total_seq"]),
        "position_ids": ("int64", ["batch", "seq"]),
        "logits_to_keep": ("int64", [1]),
        "logits": ("float32", ["batch", "logits_to_keep", dims.vocab]),
    }

    def describe(name, kv_shape):
        dtype, shape = shapes.get(name, ("float32", kv_shape))
        return {"name": name, "dtype": dtype, "shape": shape}

    return {
        **dims.manifest_fields(),
        "quant": {
            "scheme": cfg.quant,
            **(
                {}
                if cfg.quant == "none"
                else {
                    "block_size": cfg.block_size,
                    "accuracy_level": cfg.accuracy_level,
                    "method": cfg.method if cfg.quant == "int4" else cfg.int8_method,
                    "table_bits": _head_bits(cfg) if dims.tied else _table_bits(cfg),
                    "head_bits": _head_bits(cfg),
                    "compact": cfg.compact,
                }
            ),
        },
        "inputs": [describe(n, kv_in) for n in inputs],
        "optional_inputs": [{**describe("logits_to_keep", None), "default": [1]}],
        "outputs": [describe(n, kv_out) for n in outputs],
        "notes": {
            "attention_mask": "ones, one per token in the cache after this call (rows are left-aligned: no left padding)",
            "logits_to_keep": "the last N positions get logits; the graph declares 1, its default, which ORT GenAI reads as last-token logits",
            "past_key_values": "a buffer longer than the sequence is used in place when present.* is bound to the same memory",
            "genai": "genai_config.json lets onnxruntime_genai.Model(folder) run the folder (search.past_present_share_buffer true)",
            "ops": "needs ONNX Runtime (com.microsoft GroupQueryAttention, Skip*LayerNormalization, MatMulNBits, GatherBlockQuantized)",
        },
    }


# --- the runner -----------------------------------------------------------------------


@RUNNERS.register(FORMAT)
class OnnxRunner(SessionRunner):
    """ONNX Runtime on CPU: prefill + decode with a preallocated KV cache and I/O binding.

    A torch-facing adapter over `_onnx_session.DecoderSession`, the numpy loop the latency bench
    also runs. `decode` returns the state it was given, updated (see KVState).
    """

    backend = FORMAT
    session_error = SessionError

    def __init__(self, path: str | Path, *, threads: int | None = None, optimization: str = "all", prompt_graph: bool = True, **_):
        self.optimization, self.prompt_graph = optimization, prompt_graph
        super().__init__(path, threads=threads)
        self.threads = self.session.threads

    def open_session(self) -> DecoderSession:
        return DecoderSession(self.path, threads=self.threads, optimization=self.optimization, prompt_graph=self.prompt_graph)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(self._call(self.session.logits, input_ids.cpu().numpy()))
