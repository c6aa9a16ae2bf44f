"""ONNX export (decoder with KV cache; fp32, INT8 dynamic or INT4 MatMulNBits) and its ONNX Runtime Runner.

`export(model, out, quant=...)` writes an artifact folder:
  model.onnx + model.onnx.data   the decoder graph and its weights (see _onnx_graph.py for why the
                                 graph is built from the weights rather than traced)
  config.json, generation_config.json, tokenizer files   from the source checkpoint
  manifest.json                  "format": "onnx", files, inputs/outputs with dtypes and shapes,
                                 quantization, parity thresholds and results
  recipe.yaml, metrics.json      written by vcompress.core.stage.execute
Every export checks itself against PyTorch (see `parity`); a failed check raises CheckFailed and
leaves no artifact behind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from vcompress.core.artifact import MANIFEST, write_json
from vcompress.core.errors import CheckFailed, InputError
from vcompress.core.models import bytes_on_disk, load_model
from vcompress.core.registry import EXPORTERS
from vcompress.core.runner import RUNNERS, Runner
from vcompress.core.stage import Stage, StageConfig, StageContext, execute

from . import _onnx_gptq, _onnx_graph, _onnx_quant
from ._onnx_session import DecoderSession, KVState, SessionError

FORMAT = "onnx"
PARITY_PROMPTS = (
    "The heart pumps blood through",
    "A patient presents with fever and cough. The most likely diagnosis is",
    "The contract is void if either party",
    "Interest rates rose by two percent, and bond prices",
    "Question: which organ filters the blood?\nAnswer:",
)


class ParityConfig(StageConfig):
    """The parity check's thresholds, shared by every exporter (written into each manifest)."""
    new_tokens: int = Field(32, ge=1, description="greedy tokens compared with PyTorch per prompt")
    # fp32 sums in another order than PyTorch (MLAS vs ATen kernels): over 30 layers that moves
    # logits of magnitude ~10 by ~1e-4; a real bug moves them by far more than the threshold.
    max_abs_diff: float = Field(5e-3, gt=0, description="fp32: largest |logit difference| allowed")
    min_top1: float = Field(0.98, ge=0, le=1, description="fp32: top-1 agreement over prompt positions")
    # A gate against broken exports (a wrong layout agrees ~0%), not a quality budget: those are the
    # profile's, checked by validate. Measured on SmolLM2 ONNX: int4 RTN 0.52, HQQ 0.83.
    min_top1_quantized: float = Field(0.5, ge=0, le=1, description="int8/int4: top-1 agreement with PyTorch fp32")


class OnnxExportConfig(ParityConfig):
    quant: Literal["none", "int8", "int4"] = "none"
    method: Literal["rtn", "hqq", "rtn-float"] = Field("rtn", description="int4: ONNX Runtime's RTN (integer zero point), HQQ, or min/max with a float zero point (exact on Q4_1 grids, slow kernel)")
    int8_method: Literal["blockwise", "dynamic"] = Field("blockwise", description="int8: 8-bit MatMulNBits blocks, or ONNX Runtime dynamic quantization")
    block_size: int = Field(32, ge=16, description="int4/int8 block along the input dimension (power of two)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="MatMulNBits compute type; 4 = int8 activations")
    table_bits: Literal[0, 4, 8] = Field(4, description="bits of the embedding table (and tied head) under int4; 0 keeps it fp32")
    threads: int | None = Field(None, gt=0, description="ONNX Runtime intra-op threads for the parity check")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"{value} is not a power of two (16, 32, 64, 128)")
        return value


@EXPORTERS.register(FORMAT)
class OnnxExport(Stage):
    name = "export"
    Config = OnnxExportConfig

    def run(self, ctx: StageContext) -> dict:
        cfg: OnnxExportConfig = self.config
        model, tokenizer, grid = load_source(ctx.source)
        ctx.log(f"building the ONNX decoder graph ({model.config.model_type}, {cfg.quant})")
        proto, dims = _onnx_graph.build(model)
        fp32_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
        proto, carried = _quantize(proto, dims, cfg, ctx.source, grid, ctx.log)
        files = _onnx_quant.save(proto, ctx.out)
        del proto
        save_sidecars(model, tokenizer, ctx.out)
        manifest = _manifest(dims, cfg, files, ctx.out)
        if carried:
            manifest["quant"].update(method="carried", grid=carried)
        write_json(ctx.out / MANIFEST, manifest)
        result = gate(ctx, OnnxRunner, model, tokenizer, cfg, manifest, "ONNX", dequantized=bool(grid))
        size = bytes_on_disk(ctx.out / files[0]) + bytes_on_disk(ctx.out / files[1])
        metrics = {
            "format": FORMAT,
            "quant": cfg.quant,
            "grid": carried or None,
            "model_bytes": size,
            "fp32_weight_bytes": fp32_bytes,
            "size_ratio_to_fp32": round(size / fp32_bytes, 4),
            "parity": result,
        }
        return metrics


def export(model_path: str | Path | None, out: str | Path, quant: str = "none", *, force: bool = False, seed: int = 0,
           log=print, **settings) -> dict:
    """Export a checkpoint (None: the embedded default) to an ONNX artifact folder; returns metrics."""
    stage = OnnxExport({"quant": quant, **settings})
    return execute(stage, out, source=model_path, force=force, seed=seed, log=log)


def _quantize(proto, dims, cfg: OnnxExportConfig, source, grid: dict | None, log) -> tuple[Any, dict]:
    """The graph at the asked precision, and what was carried from a quantized checkpoint ({} if none)."""
    if grid is not None:
        bits = _onnx_gptq.grid_bits(grid)
        wanted = {4: "int4", 8: "int8"}.get(bits)
        if cfg.quant not in ("none", wanted):
            raise InputError(f"the checkpoint is quantized to {bits} bits; export it with --quant {wanted} (its grid is carried as is) or --quant none")
        if cfg.quant == "none":
            return proto, {}
        log(f"carrying the checkpoint's {grid.get('method')} grid ({bits}-bit) into MatMulNBits")
        proto, carried = _onnx_gptq.carry(proto, _source_path(source), grid, dims.arch, dims.layers, cfg.accuracy_level)
        table_bits = cfg.table_bits if bits == 4 or cfg.table_bits == 0 else 8
        if table_bits:
            proto = _onnx_quant.quantize_table(proto, dims, bits=table_bits, block_size=cfg.block_size, accuracy_level=cfg.accuracy_level)
        return proto, carried
    if cfg.quant == "int8":
        return _onnx_quant.quantize_int8(proto, dims, block_size=cfg.block_size, accuracy_level=cfg.accuracy_level,
                                         table_bits=8 if cfg.table_bits else 0, method=cfg.int8_method), {}
    if cfg.quant == "int4":
        return _onnx_quant.quantize_int4(proto, dims, block_size=cfg.block_size, method=cfg.method,
                                         accuracy_level=cfg.accuracy_level, table_bits=cfg.table_bits), {}
    return proto, {}


def load_source(source) -> tuple[Any, Any, dict | None]:
    """Model, tokenizer and quantize-stage grid (None if the source is not a quantize folder) to export.

    A quantize folder is loaded as its dequantized weights: what the exported graph must compute."""
    grid = _quant_manifest(source)
    if grid is not None:
        model, tokenizer = _onnx_gptq.load_dequantized(_source_path(source), grid)
    else:
        model, tokenizer = load_model(source)
    return model, tokenizer, grid


def save_sidecars(model, tokenizer, out: Path) -> None:
    """config.json, generation_config.json and the tokenizer files beside an exported model."""
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _source_path(source) -> Path | None:
    path = getattr(source, "path", source)
    return Path(str(path)) if path is not None else None


def _quant_manifest(source) -> dict | None:
    try:
        return _onnx_gptq.quant_manifest(_source_path(source))
    except ValueError as e:
        raise InputError(f"{e}; re-run `vcompress quantize` with this vcompress version") from None


def _manifest(dims, cfg: OnnxExportConfig, files: list[str], out: Path) -> dict:
    inputs, outputs = _onnx_graph.io_names(dims)
    kv_in = ["batch", dims.kv_heads, "past_seq", dims.head_dim]
    kv_out = ["batch", dims.kv_heads, "present_seq", dims.head_dim]
    shapes = {
        "input_ids": ("int64", ["batch", "seq"]),
        "seqlens_k": ("int32", ["batch"]),
        "total_sequence_length": ("int32", []),
        "logits_to_keep": ("int64", [1]),
        "position_ids": ("int64", ["batch", "seq"]),
        "logits": ("float32", ["batch", "logits_to_keep", dims.vocab]),
    }

    def describe(name, kv_shape):
        dtype, shape = shapes.get(name, ("float32", kv_shape))
        return {"name": name, "dtype": dtype, "shape": shape}

    return {
        "format": FORMAT,
        "runtime": "onnxruntime",
        "files": {"model": files[0], "weights": files[1], "config": "config.json", "tokenizer": "tokenizer.json"},
        "architecture": dims.arch,
        "layers": dims.layers,
        "heads": dims.heads,
        "kv_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "vocab_size": dims.vocab,
        "max_positions": dims.max_positions,
        "tied_embeddings": dims.tied,
        "quant": {"scheme": cfg.quant, **({} if cfg.quant == "none" else {
            "block_size": cfg.block_size, "accuracy_level": cfg.accuracy_level,
            "method": cfg.method if cfg.quant == "int4" else cfg.int8_method,
            "table_bits": cfg.table_bits if cfg.quant == "int4" or cfg.table_bits == 0 else 8})},
        "inputs": [describe(n, kv_in) for n in inputs],
        "outputs": [describe(n, kv_out) for n in outputs],
        "notes": {
            "seqlens_k": "per row: tokens in the cache after this call, minus one",
            "total_sequence_length": "tokens in the cache after this call",
            "past_key_values": "a buffer longer than the sequence is used in place when present.* is bound to the same memory",
            "ops": "needs ONNX Runtime (com.microsoft GroupQueryAttention, Skip*LayerNormalization, MatMulNBits, GatherBlockQuantized)",
        },
        "thresholds": {"max_abs_diff": cfg.max_abs_diff, "min_top1": cfg.min_top1, "min_top1_quantized": cfg.min_top1_quantized,
                       "greedy_tokens": cfg.new_tokens},
    }


# --- parity ---------------------------------------------------------------------------


def gate(ctx: StageContext, runner_class, model, tokenizer, cfg, manifest: dict, label: str, dequantized: bool) -> dict:
    """Check the written artifact against PyTorch, record the result in its manifest, refuse a failed one."""
    ctx.log("checking the export against PyTorch" + (" (the dequantized checkpoint)" if dequantized else ""))
    runner = runner_class(ctx.out, threads=cfg.threads)
    try:
        result = parity(model, tokenizer, runner, cfg)
    finally:
        runner.close()
    manifest["parity"] = result
    write_json(ctx.out / MANIFEST, manifest)
    if not result["passed"]:
        raise CheckFailed(f"{label} parity check failed: {result['failure']}; the export was not written (loosen the thresholds only if the figures are acceptable)")
    return result


@torch.no_grad()
def parity(model, tokenizer, runner: Runner, cfg: OnnxExportConfig) -> dict:
    """Logits and greedy continuations of the export against the PyTorch model on fixed prompts.

    fp32 must match: max |diff| of logits, top-1 agreement over prompt positions, and identical
    greedy tokens. int8/int4 are judged by top-1 agreement only; their greedy match is reported.
    """
    prompts = [torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]]) for p in PARITY_PROMPTS]
    max_diff, agree, positions, identical, matched = 0.0, 0, 0, 0, []
    for ids in prompts:
        ref = model(input_ids=ids, use_cache=False).logits.float()
        got = runner.forward(ids)
        max_diff = max(max_diff, float((ref - got).abs().max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        positions += ids.shape[1]
        want = _torch_greedy(model, ids, cfg.new_tokens)
        have = runner.generate(ids, cfg.new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), len(want))
        matched.append(same)
        identical += int(want == have)
    top1 = agree / positions
    result: dict[str, Any] = {
        "prompts": len(prompts),
        "max_abs_diff": max_diff,
        "top1_agreement": round(top1, 4),
        "greedy_identical": identical,
        "greedy_tokens": cfg.new_tokens,
        "greedy_prefix_matched": matched,
    }
    if cfg.quant == "none":
        failures = []
        if max_diff > cfg.max_abs_diff:
            failures.append(f"max |logit diff| {max_diff:.2e} > {cfg.max_abs_diff:.0e}")
        if top1 < cfg.min_top1:
            failures.append(f"top-1 agreement {top1:.3f} < {cfg.min_top1}")
        if identical < len(prompts):
            failures.append(f"greedy continuations identical on {identical}/{len(prompts)} prompts")
    else:
        failures = [f"top-1 agreement {top1:.3f} < {cfg.min_top1_quantized}"] if top1 < cfg.min_top1_quantized else []
    result["passed"] = not failures
    result["failure"] = "; ".join(failures) or None
    return result


def _torch_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model(input_ids=ids, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


# --- the runner -----------------------------------------------------------------------


@RUNNERS.register(FORMAT)
class OnnxRunner(Runner):
    """ONNX Runtime on CPU: prefill + decode with a preallocated KV cache and I/O binding.

    A torch-facing adapter over `_onnx_session.DecoderSession`, the numpy loop the latency bench
    also runs. `decode` returns the state it was given, updated (see KVState).
    """

    backend = FORMAT

    def __init__(self, path: str | Path, *, threads: int | None = None, optimization: str = "all", **_):
        from transformers import AutoTokenizer

        super().__init__(path, threads=threads)
        try:
            self.session = DecoderSession(self.path, threads=threads, optimization=optimization)
        except SessionError as e:
            raise InputError(str(e)) from None
        self.threads = self.session.threads
        self.manifest = self.session.manifest
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))

    @property
    def headroom(self) -> int:
        return self.session.headroom

    @headroom.setter
    def headroom(self, value: int) -> None:
        self.session.headroom = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(self._call(self.session.logits, input_ids.cpu().numpy()))

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, KVState]:
        logits, state = self._call(self.session.prefill, input_ids.cpu().numpy())
        return torch.from_numpy(logits.copy()), state

    def decode(self, token_id: int, state: KVState) -> tuple[torch.Tensor, KVState]:
        logits, state = self._call(self.session.decode, token_id, state)
        return torch.from_numpy(logits.copy()), state

    def close(self) -> None:
        self.session = None

    @staticmethod
    def _call(fn, *args):
        try:
            return fn(*args)
        except SessionError as e:
            raise InputError(str(e)) from None
