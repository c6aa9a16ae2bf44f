"""GPTQ / RTN with the model never whole in memory: one decoder layer at a time from the checkpoint on disk.

The same algorithm in the same order as the in-memory path (quantize.py), so the streamed folder
holds the same tensors bit for bit (tests/test_quantize_stream.py). Memory is the largest layer,
its Hessians and the calibration activations, plus the embedding while the first layer's inputs
are computed. What needs the whole model (held-out perplexity and answer agreement of the result)
is left to `vcompress validate`, and the metrics say so.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import torch

from vcompress.core.artifact import write_json
from vcompress.core.errors import InputError
from vcompress.core.layer_stream import LayerStream, TensorFileWriter, return_freed_memory
from vcompress.core.quant_format import MANIFEST

from ._arch import decoder_layers, is_gpt2
from ._calib import calibration_summary, stage_blocks
from ._gptq_core import Grid, Quantized, rtn
from ._gptq_pack import to_tensors

NOT_MEASURED = "not measured: the model was streamed layer by layer and never whole in memory; `vcompress validate` measures the artifact"


class QuantizedFiles:
    """The quantize folder's weight files written as layers finish: model.safetensors and, for layouts
    transformers cannot reload, the codes in the sidecar (see save_quantized for the two layouts)."""

    def __init__(self, out: Path, reloadable: bool, sidecar: str):
        self.reloadable = reloadable
        self.model = TensorFileWriter(out / "model.safetensors")
        self.codes = self.model if reloadable else TensorFileWriter(out / sidecar)
        self.quant_bytes = 0

    def write(self, name: str, tensor: torch.Tensor, quantized: Quantized | None = None) -> None:
        if quantized is None:
            self.model.add(name, tensor)
            return
        packed = to_tensors(quantized)
        module = name.removesuffix(".weight")
        for key, t in packed.items():
            self.codes.add(f"{module}.{key}", t)
        self.quant_bytes += sum(t.numel() * t.element_size() for t in packed.values())
        if not self.reloadable:  # the float weights beside the codes, exactly W
            self.model.add(name, tensor)

    def close(self) -> None:
        self.model.close({"format": "pt"})
        if self.codes is not self.model:
            self.codes.close({"format": "pt"})

    def abort(self) -> None:
        self.model.abort()
        if self.codes is not self.model:
            self.codes.abort()


def quantize_streamed(stage_cfg, ctx, folder: Path) -> dict:
    from .quantize import (
        SIDECAR,
        choose_group_size,
        describe,
        gptq_config,
        gptq_reloadable,
        manifest,
        notes,
        quantizable,
        quantize_gptq,
        sensitive_linears,
        set_weight,
        summarize_errors,
        weight_of,
    )
    from .quantize import first_layer_inputs as capture

    cfg = stage_cfg
    if cfg.compare_rtn:
        raise InputError("compare_rtn needs the model in memory; drop it or pass --stream off")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # layers, Hessians and GPTQ on the GPU when there is one
    stream = LayerStream(folder, device=device)
    model, tokenizer = stream.model, ctx.load_tokenizer()
    ctx.log(f"streaming {folder} layer by layer (the model is never whole in memory)")
    targets = quantizable(model)
    kept = sensitive_linears(cfg.scores, cfg.keep_sensitive, model, targets) if cfg.keep_sensitive else []
    targets = {name: m for name, m in targets.items() if name not in kept}
    group_size = choose_group_size(cfg.group_size, targets, cfg.grid_bits)
    grid = Grid(cfg.grid_bits, group_size, sym=cfg.sym, float_zero=cfg.zero_point == "float")
    reloadable = gptq_reloadable(model, grid)
    files = QuantizedFiles(ctx.out, reloadable, SIDECAR)
    prefix = "transformer.h" if is_gpt2(model) else "model.layers"
    metrics: dict = {"method": cfg.method, "device": device, "streamed": True}
    results: dict[str, Quantized] = {}

    def write_layer(i: int, layer) -> None:
        for key, tensor in layer.state_dict().items():
            name = f"{prefix}.{i}.{key}"
            module = name.removesuffix(".weight")
            files.write(name, tensor, results.get(module) if name.endswith(".weight") else None)
            if module in results and name.endswith(".weight"):
                results[module] = _shape_only(results[module])
        stream.release(layer)

    started = time.time()
    try:
        if cfg.method == "gptq":
            blocks = stage_blocks(tokenizer, ctx, samples=cfg.calib_samples, seq_len=cfg.seq_len)
            del tokenizer  # ~140 MB for a 150k vocabulary; read again for saving once the layers are done
            return_freed_memory()
            positions = _position_embeddings(model)
            for module in positions:
                stream.load(module)
            embeddings = f"{stream.name_of(model.get_input_embeddings())}.weight"
            inputs = capture(model, blocks, cfg.batch_size, embed=lambda ids: stream.rows(embeddings, ids).to(device))
            for module in positions:
                stream.release(module)
            ctx.log(f"GPTQ on {device}, streamed: {blocks.shape[0]} calibration blocks of {blocks.shape[1]} tokens")
            _, errors = quantize_gptq(
                model,
                targets,
                blocks,
                grid,
                act_order=cfg.act_order,
                damp=cfg.damp,
                batch_size=cfg.batch_size,
                progress=ctx.progress,
                inputs=inputs,
                enter=lambda i, layer: stream.load(layer),
                leave=lambda i, layer: write_layer(i, layer),
                results=results,
            )
            metrics["calibration"] = calibration_summary(blocks, ctx)
            metrics["layer_error"] = summarize_errors(errors)
        else:
            for i, layer in enumerate(decoder_layers(model)):
                stream.load(layer)
                for name, module in targets.items():
                    if name.startswith(f"{prefix}.{i}."):
                        results[name] = rtn(weight_of(module), grid)
                        set_weight(module, results[name].dequantize())
                write_layer(i, layer)
        metrics["quantize_seconds"] = round(time.time() - started, 1)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        for name, tensor in model.state_dict().items():  # what lies outside the layers, copied in chunks
            if not name.startswith(f"{prefix}.") and name not in tied:
                if name in stream.files:
                    stream.copy_into(files.model, name)
                else:
                    files.write(name, tensor)
        files.close()
    except BaseException:
        files.abort()
        raise
    config = copy.deepcopy(model.config)
    if reloadable:
        config.quantization_config = gptq_config(grid, cfg, sorted(results), kept)
    config.save_pretrained(ctx.out)
    if (folder / "generation_config.json").is_file():
        shutil.copy(folder / "generation_config.json", ctx.out / "generation_config.json")
    ctx.load_tokenizer().save_pretrained(ctx.out)
    write_json(ctx.out / MANIFEST, manifest(model, results, kept, grid, cfg))
    other = files.model.nbytes - (0 if reloadable else sum(_float_bytes(q) for q in results.values()))
    written = (
        {"quantized model": files.model.nbytes}
        if reloadable
        else {"model.safetensors (float weights, for reload)": files.model.nbytes, "quantized model": other + files.quant_bytes}
    )
    metrics.update(describe(results, kept, grid, cfg, stream.source_bytes(), written, quant_bytes=files.quant_bytes))
    metrics["checkpoint_layout"] = "gptq" if reloadable else f"float32 weights + {SIDECAR}"
    metrics.update({"perplexity": None, "top1_agreement": None, "answer_agreement": None, "heldout": NOT_MEASURED})
    metrics["notes"] = [*notes(cfg, grid, reloadable), f"held-out perplexity and answer agreement {NOT_MEASURED}"]
    return metrics


def _position_embeddings(model) -> list[torch.nn.Module]:
    """Learned position embeddings, which the first layer's inputs add to the token embeddings."""
    return [model.transformer.wpe] if is_gpt2(model) else []


def _shape_only(q: Quantized) -> Quantized:
    """The layer's record without its codes (written already): shapes for the manifest and metrics."""
    meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")  # noqa: E731
    return Quantized(meta(q.codes), meta(q.scales), meta(q.zeros), q.g_idx, q.grid)


def _float_bytes(q: Quantized) -> int:
    return q.codes.numel() * 4
