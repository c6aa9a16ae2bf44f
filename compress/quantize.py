"""Weight quantization: GPTQ INT4 (group-wise, optional act-order), round-to-nearest INT4, INT8.

Every linear projection inside the decoder layers is quantized (embeddings, norms and the LM head
stay as they are). GPTQ runs layer by layer: the calibration blocks' hidden states enter a decoder
layer, hooks collect each projection's Hessian, the projections are quantized, and the layer's
output with the quantized weights becomes the next layer's input.

The GPTQ algorithm is ours (compress/_gptq_core.py), not gptqmodel's quantizer: it takes one group
size per model, asymmetric grids with integer or float zero points, is deterministic and leaves
the global RNG alone, and runs in minutes on 2 CPU cores. gptqmodel is what transformers needs to
reload the result: the checkpoint is the standard GPTQ layout (qweight/qzeros/scales/g_idx and a
`quantization_config`). quant_manifest.json describes every quantized linear for the exporters
(docs/quant_format.md describes the format).

Float zero points cannot be carried by the GPTQ layout; with `zero_point: float` the checkpoint
holds the dequantized float32 weights (which reload anywhere and compute exactly what the
quantized model computes) and the packed codes go to quant.safetensors for the exporters.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from vcompress.core.artifact import figure, read_json
from vcompress.core.errors import InputError
from vcompress.core.gguf_blocks import carried_grid
from vcompress.core.layer_stream import return_freed_memory, stream_source
from vcompress.core.models import source_gguf
from vcompress.core.profiles import DEFAULT_SCHEME
from vcompress.core.scoring import Judge, torch_logits_fn
from vcompress.core.stage import Stage, StageConfig, no_progress, track

from ._arch import decoder_layers, in_dim, layer_prefix, linear_modules, weight_bytes
from ._calib import calibration_summary, first_layer_inputs, stage_blocks
from ._gptq_core import Grid, Hessians, Quantized, gptq, reconstruction_error, rtn
from ._gptq_pack import to_tensors
from ._judge import judge_of
from ._quant_checkpoint import SIDECAR, gptq_reloadable, nbytes, save_quantized
from ._quantize_stream import StreamedLayers

GROUP_SIZES = (128, 64, 32)


class QuantizeConfig(StageConfig):
    method: Literal["gptq", "rtn", "int8"] = Field(DEFAULT_SCHEME.method, description="GPTQ, round-to-nearest, or 8-bit round-to-nearest")
    bits: int = Field(
        DEFAULT_SCHEME.bits, description="bits per weight for gptq and rtn (int8 is always 8)", json_schema_extra={"choices": [2, 4, 8]}
    )
    group_size: int = Field(
        DEFAULT_SCHEME.group_size, gt=0, description="weights per scale; falls back to 64 or 32 when it does not divide every layer"
    )
    sym: bool = Field(DEFAULT_SCHEME.sym, description="symmetric grid (zero point fixed at the middle)")
    zero_point: Literal["int", "float"] = Field(
        DEFAULT_SCHEME.zero_point,
        description="asymmetric zero point stored as an integer (GPTQ format) or a float (keeps grids with a float minimum, e.g. from GGUF Q4_1)",
    )
    act_order: bool = Field(DEFAULT_SCHEME.act_order, description="GPTQ: quantize columns in order of decreasing Hessian diagonal")
    damp: float = Field(0.01, gt=0, lt=1, description="GPTQ: damping, as a fraction of the mean Hessian diagonal")
    calib_samples: int = Field(128, gt=0, description="GPTQ calibration blocks")
    seq_len: int = Field(512, ge=8, description="tokens per calibration block")
    batch_size: int = Field(8, gt=0, description="calibration blocks per forward pass (fewer: less memory, same algorithm)")
    scores: str | None = Field(None, description="sensitivity.json (or the analyze folder) to keep the most sensitive linears unquantized")
    keep_sensitive: int = Field(0, ge=0, description="how many of the most quantization-sensitive linears stay unquantized")
    compare_rtn: bool = Field(False, description="also measure round-to-nearest at the same settings")
    heldout_blocks: int = Field(4, ge=0, description="held-out blocks for perplexity and top-1 agreement (0: skip)")
    heldout_seq_len: int = Field(512, ge=8, description="tokens per held-out block")
    eval_per_subject: int = Field(10, ge=0, description="MMLU questions per subject of the evaluated subset for answer agreement (0: skip)")
    stream: Literal["auto", "on", "off"] = Field(
        "auto", description="read and quantize one decoder layer at a time from disk (auto: when the model would not fit in memory)"
    )
    requantize_source: bool = Field(
        False,
        description="re-solve every linear of a GGUF source by `method`; by default those already at or below `bits` keep "
        "their own blocks (core/gguf_blocks.py) and only the rest are quantized",
    )

    wider_source: Literal["requantize", "carry"] = Field(
        "requantize",
        description="a GGUF source's blocks wider than `bits` (Q5_0, Q6_K, Q8_0): re-solved at `bits` by `method`, or carried "
        "exactly as 8-bit codes (a larger artifact, the source's own weights)",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.method != "int8" and self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, not {self.bits}")
        if self.zero_point == "float" and self.sym:
            raise ValueError("a symmetric grid has no zero point to store as a float; drop sym or zero_point")
        if self.keep_sensitive and not self.scores:
            raise ValueError("keep_sensitive needs scores (the analyze stage's sensitivity.json)")
        return self

    @property
    def grid_bits(self) -> int:
        return 8 if self.method == "int8" else self.bits


class Quantize(Stage):
    name = "quantize"
    folder = "04-quantize"
    Config = QuantizeConfig

    @classmethod
    def from_profile(cls, settings: dict, profile, where=None) -> Quantize:
        """The profile's quantization scheme fills in what the recipe step does not say itself."""
        scheme = profile.quantization_for(settings)
        if scheme.method == "none":
            raise InputError(f"{where}: the recipe quantizes but quantization.method is 'none'; set a method or drop the step")
        return cls(cls.parse_config({**settings, **dict(scheme)}, where))

    def run(self, ctx) -> dict:
        """One flow, GPTQ or RTN layer by layer, over either source of layers: the model whole in memory, or
        streamed from disk one decoder layer at a time (`stream`, compress/_quantize_stream.py)."""
        cfg: QuantizeConfig = self.config
        folder = stream_source(cfg.stream, ctx)
        source = StreamedLayers(folder, ctx, cfg) if folder is not None else InMemoryLayers(ctx)
        model = source.model
        targets = quantizable(model)
        kept = sensitive_linears(cfg.scores, cfg.keep_sensitive, model, targets) if cfg.keep_sensitive else []
        targets = {name: m for name, m in targets.items() if name not in kept}
        source.carried = source_blocks(ctx, cfg, source, kept)
        if source.carried is not None:
            targets = {name: m for name, m in targets.items() if name not in source.carried.manifest["linears"]}
        group_size = choose_group_size(cfg.group_size, targets, cfg.grid_bits)
        grid = Grid(cfg.grid_bits, group_size, sym=cfg.sym, float_zero=cfg.zero_point == "float")
        if group_size != cfg.group_size:
            ctx.log(f"group size {cfg.group_size} does not divide every layer's input features; using {group_size}")

        metrics: dict = {"method": cfg.method, "device": source.device, **({"streamed": True} if source.streamed else {})}
        judge = source.judge(cfg, ctx)  # the input model's side, taken now: the model is quantized in place
        if cfg.compare_rtn and cfg.method == "gptq":
            metrics["rtn"] = compare_rtn(model, targets, grid, judge, ctx)
        results: dict[str, Quantized] = {}
        source.start(grid, results, ctx.out)
        try:
            metrics.update(quantize_layers(source, targets, grid, cfg, ctx, results))
            written, quant_bytes = source.save(results, kept, grid, cfg, ctx.out)
        except BaseException:
            source.abort()
            raise
        reloadable = gptq_reloadable(model, grid) and source.carried is None
        metrics.update(describe(results, kept, grid, cfg, source.bytes_before, written, quant_bytes))
        if source.carried is not None:
            metrics["source_grid"] = source_grid_summary(source.carried)
        metrics["checkpoint_layout"] = "gptq" if reloadable else f"float32 weights + {SIDECAR}"
        metrics["notes"] = notes(cfg, grid, reloadable, carried=source.carried is not None)
        if judge is None:
            metrics.update({"perplexity": None, "top1_agreement": None, "answer_agreement": None, "heldout": source.held_out})
            metrics["notes"].append(f"held-out perplexity and answer agreement {source.held_out}")
        else:
            metrics.update(judge.score(torch_logits_fn(model)))
        if "rtn" in metrics and metrics["perplexity"] and metrics["rtn"]["perplexity"]:
            metrics["beats_rtn"] = metrics["perplexity"]["student"] < metrics["rtn"]["perplexity"]["student"]
        return metrics


def quantize_layers(source, targets: dict, grid: Grid, cfg: QuantizeConfig, ctx, results: dict) -> dict:
    """GPTQ on calibration blocks, or round-to-nearest, one decoder layer at a time from `source`; the metrics."""
    started, metrics = time.time(), {}
    if not targets:
        ctx.log("every linear keeps its source blocks: nothing to quantize")
    elif cfg.method == "gptq":
        blocks = stage_blocks(source.tokenizer, ctx, samples=cfg.calib_samples, seq_len=cfg.seq_len)
        inputs = source.first_layer_inputs(blocks, cfg.batch_size)
        streamed = ", streamed" if source.streamed else ""
        ctx.log(f"GPTQ on {source.device}{streamed}: {blocks.shape[0]} calibration blocks of {blocks.shape[1]} tokens")
        _, errors = quantize_gptq(
            source.model,
            targets,
            blocks,
            grid,
            act_order=cfg.act_order,
            damp=cfg.damp,
            batch_size=cfg.batch_size,
            progress=ctx.progress,
            inputs=inputs,
            enter=source.enter,
            leave=source.leave,
            results=results,
        )
        metrics["calibration"] = calibration_summary(blocks, ctx)
        metrics["layer_error"] = summarize_errors(errors)
    else:
        quantize_rtn(source, targets, grid, ctx.progress, results)
    metrics["quantize_seconds"] = round(time.time() - started, 1)
    return metrics


class InMemoryLayers:
    """The quantize flow's source of decoder layers when the model fits in memory: loaded whole (on the GPU when
    there is one), quantized in place, the checkpoint written at the end and the result scored."""

    streamed = False
    carried = None  # a GGUF source's blocks kept as they are (source_blocks)

    def __init__(self, ctx):
        self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = self.torch_device.type
        self.model, self.tokenizer = ctx.load()
        self.model.to(self.torch_device)
        self.bytes_before = weight_bytes(self.model)

    def judge(self, cfg: QuantizeConfig, ctx) -> Judge:
        return judge_of(
            self.model, self.tokenizer, ctx, blocks=cfg.heldout_blocks, seq_len=cfg.heldout_seq_len, per_subject=cfg.eval_per_subject
        )

    def start(self, grid: Grid, results: dict, out: Path) -> None:
        pass

    def first_layer_inputs(self, blocks: torch.Tensor, batch_size: int) -> list:
        return first_layer_inputs(self.model, blocks, batch_size)

    def enter(self, i: int, layer) -> None:
        pass

    def leave(self, i: int, layer) -> None:
        pass

    def save(self, results: dict, kept: list[str], grid: Grid, cfg: QuantizeConfig, out: Path) -> tuple[dict[str, int], None]:
        self.model.to("cpu")
        written = save_quantized(self.model, self.tokenizer, results, kept, grid, cfg, out, carried=self.carried)
        self.model.to(self.torch_device)
        return written, None

    def abort(self) -> None:
        pass


# --- a GGUF source's own blocks --------------------------------------------------------


def source_blocks(ctx, cfg: QuantizeConfig, source, kept: list[str]):
    """The blocks of a GGUF source's linears at or below the grid's bits (any width the exporters hold, 8 at most, with
    `wider_source: carry`), kept as they are (core/gguf_blocks.py), or
    None: not a GGUF, `requantize_source` on, a streamed source (its layers are re-solved), or nothing to keep."""
    if cfg.requantize_source:
        return None
    path = source_gguf(ctx.read_source())
    if path is None:
        return None
    if source.streamed:
        ctx.log(f"{path.name}: a streamed quantize re-solves the source's blocks; pass --stream off to keep them")
        return None
    found = carried_grid(path, source.model, 8 if cfg.wider_source == "carry" else cfg.grid_bits)
    for name in kept:
        found.manifest["linears"].pop(name, None)
    if not found.manifest["linears"]:
        return None
    summary = source_grid_summary(found)
    ctx.log(
        f"keeping {summary['kept_linears']} linears' own GGUF blocks ({', '.join(summary['types'])}); "
        f"{len(found.rerounded)} re-quantized by {cfg.method}"
    )
    return found


def source_grid_summary(found) -> dict:
    types = [spec["source_type"] for spec in found.manifest["linears"].values()]
    return {
        "kept_linears": len(types),
        "types": {t: types.count(t) for t in sorted(set(types))},
        "requantized": found.rerounded,
    }


# --- which layers, which group size ---------------------------------------------------


def quantizable(model) -> dict[str, torch.nn.Module]:
    """Full name -> module of every linear projection inside the decoder layers."""
    prefix = layer_prefix(model)
    return {f"{prefix}.{i}.{name}": module for i, layer in enumerate(decoder_layers(model)) for name, module in linear_modules(layer)}


def choose_group_size(preferred: int, targets: dict, bits: int) -> int:
    """The preferred size if it divides every quantized layer's input features, else the largest of
    128/64/32 below it that does. One size for the whole model: transformers' GPTQ loader builds
    every quantized layer with the config's single group_size."""
    features = {weight_of(m).shape[1] for m in targets.values()}
    outputs = {weight_of(m).shape[0] for m in targets.values()}
    per_word = 32 // bits
    if any(n % per_word for n in outputs):
        raise InputError(
            f"output features {sorted(outputs)} are not all multiples of {per_word}, which {bits}-bit GPTQ packing needs; this model cannot be stored in the GPTQ layout"
        )
    for size in (preferred, *(s for s in GROUP_SIZES if s < preferred)):
        if all(k % size == 0 for k in features):
            return size
    raise InputError(
        f"no group size among {preferred}/64/32 divides every layer's input features {sorted(features)}; pass --group-size with a divisor of them"
    )


def sensitive_linears(scores: str | Path | None, count: int, model, targets: dict) -> list[str]:
    """The `count` linears whose 4-bit rounding changed the loss most, from the analyze stage's
    sensitivity.json ("quant": {"modules": [...], "loss_delta_nats": [[per layer]...]})."""
    path = Path(scores)
    if path.is_dir():
        path = path / "sensitivity.json"
    data = read_json(path)
    quant = data.get("quant") if isinstance(data, dict) else None
    modules = quant.get("modules") if isinstance(quant, dict) else None
    rows = (quant.get("loss_delta_nats") or quant.get("scores")) if isinstance(quant, dict) else None
    if not isinstance(modules, list) or not isinstance(rows, list):
        raise InputError(
            f"{path} has no per-linear quantization sensitivity (quant.modules and quant.loss_delta_nats); run `vcompress analyze` with the quant part"
        )
    layers = len(decoder_layers(model))
    if len(rows) != layers or any(not isinstance(r, list) or len(r) != len(modules) for r in rows):
        raise InputError(
            f"{path} scores {len(rows)} layers x {len(modules)} linears, but the model has {layers} layers; analyze this model again"
        )
    prefix = layer_prefix(model)
    ranked = sorted(
        (
            (float(d), f"{prefix}.{i}.{m}")
            for i, row in enumerate(rows)
            for m, d in zip(modules, row)
            if d is not None and not (isinstance(d, float) and math.isnan(d))
        ),
        reverse=True,
    )
    unknown = [name for _, name in ranked if name not in targets]
    if unknown:
        raise InputError(f"{path} names linears the model does not have (e.g. {unknown[0]}); analyze this model again")
    if count > len(ranked):
        raise InputError(f"--keep-sensitive {count} exceeds the {len(ranked)} scored linears; pass a smaller number")
    return [name for _, name in ranked[:count]]


def weight_of(module) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    w = module.weight.data
    return w.t() if in_dim(module) == 0 else w


def set_weight(module, w: torch.Tensor) -> None:
    w = w.to(module.weight.device, module.weight.dtype)
    module.weight.data = w.t().contiguous() if in_dim(module) == 0 else w.contiguous()


# --- GPTQ, layer by layer -------------------------------------------------------------


@torch.no_grad()
def quantize_gptq(
    model,
    targets: dict,
    blocks: torch.Tensor,
    grid: Grid,
    *,
    act_order: bool = False,
    damp: float = 0.01,
    batch_size: int = 8,
    progress=no_progress,
    inputs: list | None = None,
    enter=None,
    leave=None,
    results: dict | None = None,
) -> tuple[dict[str, Quantized], dict[str, dict]]:
    """Quantize `targets` in place (dequantized weights), layer by layer; return the codes and, per
    linear, the reconstruction error of GPTQ and of RTN on the same Hessian.

    The source of layers passes the first layer's `inputs`, and `enter` / `leave` (i, layer): a streamed one
    reads each layer from disk before and writes and drops it after (compress/_quantize_stream.py)."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model)
    inputs = first_layer_inputs(model, blocks, batch_size) if inputs is None else inputs
    results = {} if results is None else results
    errors = {}
    for i, layer in track(enumerate(layers), "GPTQ layers", progress):
        if enter:
            enter(i, layer)
        mine = {name: m for name, m in targets.items() if name.startswith(f"{prefix}.{i}.")}
        hessians = Hessians().watch(mine)
        try:
            for hidden, args, kwargs in inputs:
                layer(hidden, *args, **kwargs)
        finally:
            hessians.close()
        return_freed_memory()  # the forward's activations, before the solves allocate their own
        for names in shared_inputs(hessians, mine):
            # Projections reading the same input share H: one GPTQ run over their stacked rows.
            H = hessians.take(names[0])
            weights = [weight_of(mine[name]).float() for name in names]
            stacked = gptq(torch.cat(weights), H, grid, act_order=act_order, damp=damp)
            for name, w, result in zip(names, weights, split_rows(stacked, [w.shape[0] for w in weights])):
                w_hat = result.dequantize().to(w.device)
                errors[name] = {
                    "gptq": reconstruction_error(w, w_hat, H),
                    "rtn": reconstruction_error(w, rtn(w, grid).dequantize().to(w.device), H),
                    "signal": reconstruction_error(w, torch.zeros_like(w), H),
                }
                set_weight(mine[name], w_hat)
                results[name] = result
            del H, weights, stacked
            return_freed_memory()
        del hessians
        inputs = [(_hidden_out(layer(hidden, *args, **kwargs)), args, kwargs) for hidden, args, kwargs in inputs]
        if leave:
            leave(i, layer)
    return results, errors


def shared_inputs(hessians: Hessians, modules: dict) -> list[list[str]]:
    """Names grouped by the Hessian they share (q/k/v, gate/up), in module order."""
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(hessians.alias[name], []).append(name)
    return list(groups.values())


def split_rows(q: Quantized, sizes: list[int]) -> list[Quantized]:
    out, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        out.append(Quantized(q.codes[rows].clone(), q.scales[rows].clone(), q.zeros[rows].clone(), q.g_idx, q.grid))
        start += size
    return out


def _hidden_out(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def quantize_rtn(source, targets: dict, grid: Grid, progress, results: dict) -> None:
    """Round-to-nearest, layer by layer through the source (the weights replaced by their dequantized values)."""
    prefix = layer_prefix(source.model)
    for i, layer in track(enumerate(decoder_layers(source.model)), "round-to-nearest", progress):
        source.enter(i, layer)
        for name, module in targets.items():
            if name.startswith(f"{prefix}.{i}."):
                results[name] = rtn(weight_of(module), grid)
                set_weight(module, results[name].dequantize())
        source.leave(i, layer)


def summarize_errors(errors: dict[str, dict]) -> dict:
    """Relative output error of each linear on the calibration inputs, GPTQ against RTN."""
    ratios = sorted(e["gptq"] / e["rtn"] for e in errors.values() if e["rtn"] > 0)
    rel = {name: round(e["gptq"] / e["signal"], 6) for name, e in errors.items() if e["signal"] > 0}
    return {
        "unit": "||(W - W_hat) X||^2 / ||W X||^2 on the calibration inputs, per linear",
        "gptq_relative": rel,
        "gptq_over_rtn_median": round(ratios[len(ratios) // 2], 4) if ratios else None,
        "gptq_better_than_rtn_fraction": round(sum(r < 1 for r in ratios) / len(ratios), 4) if ratios else None,
    }


# --- RTN at the same settings, for comparison -----------------------------------------


def compare_rtn(model, targets: dict, grid: Grid, judge: Judge, ctx) -> dict:
    originals = {name: module.weight.data.clone() for name, module in targets.items()}
    try:
        for module in targets.values():
            set_weight(module, rtn(weight_of(module), grid).dequantize())
        ctx.log("scoring round-to-nearest at the same settings")
        return judge.score(torch_logits_fn(model))
    finally:
        for name, module in targets.items():
            module.weight.data = originals[name]


# --- metrics --------------------------------------------------------------------------


def describe(
    results: dict[str, Quantized],
    kept: list[str],
    grid: Grid,
    cfg: QuantizeConfig,
    bytes_before: int,
    written: dict[str, int],
    quant_bytes: int | None = None,
) -> dict:
    weights = sum(q.codes.numel() for q in results.values())
    if quant_bytes is None:
        quant_bytes = sum(nbytes(to_tensors(q)) for q in results.values())
    after = written["quantized model"]
    return {
        "bits": grid.bits,
        "group_size": grid.group_size,
        "group_size_requested": cfg.group_size,
        "group_sizes": {name: q.grid.group_size for name, q in results.items()},
        "sym": grid.sym,
        "zero_point": "symmetric (fixed 2**(bits-1))" if grid.sym else ("float32" if grid.float_zero else f"int{grid.bits} (packed)"),
        "act_order": cfg.act_order if cfg.method == "gptq" else False,
        "quantized_linears": len(results),
        "kept_linears": kept,
        "bits_per_weight": figure(
            round(quant_bytes * 8 / weights, 4) if weights else None,
            "bits",
            note="quantized linears, counting codes, scales, zero points and g_idx",
        ),
        "weights_bytes_before": bytes_before,
        "weights_bytes_after": after,
        "weights_fraction_of_before": round(after / bytes_before, 4),
        "files_bytes": written,
    }


def notes(cfg: QuantizeConfig, grid: Grid, reloadable: bool, carried: bool = False) -> list[str]:
    out = []
    if grid.group_size != cfg.group_size:
        out.append(
            f"group size {cfg.group_size} does not divide every layer's input features: {grid.group_size} is used for all layers "
            "(transformers' GPTQ loader takes one group size per model)"
        )
    if not reloadable:
        why = (
            "the source's GGUF blocks (float minimums) do not fit the GPTQ layout"
            if carried
            else "float zero points do not fit the GPTQ layout"
            if grid.float_zero
            else "transformers cannot reload GPT-2 GPTQ checkpoints"
        )
        out.append(f"{why}: model.safetensors holds the dequantized float32 weights (exact), {SIDECAR} the codes")
    else:
        out.append("reloading this folder with transformers needs gptqmodel (pip install 'vcompress[gptq]')")
    return out
