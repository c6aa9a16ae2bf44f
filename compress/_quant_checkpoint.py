"""The quantize folder's checkpoint: the standard GPTQ layout transformers reloads, or (float zero points, GPT-2)
exact float32 weights with the codes in a sidecar, and quant_manifest.json describing every quantized linear for
the exporters (core/quant_format.py, docs/quant_format.md). Written whole (`save_quantized`) or layer by layer
(`_quantize_stream.QuantizedFiles`) with the same names and bytes."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from vcompress.core.artifact import write_json
from vcompress.core.quant_format import QUANT_GRID_FILE, make_quant_grid

from ._arch import is_gpt2
from ._gptq_core import Grid, Quantized
from ._gptq_pack import to_tensors

SIDECAR = "quant.safetensors"


def save_quantized(
    model, tokenizer, results: dict[str, Quantized], kept: list[str], grid: Grid, cfg, out: Path, carried=None
) -> dict[str, int]:
    """Write the checkpoint, quant_manifest.json and (float zero points, or `carried`: a GGUF source's blocks kept,
    core/gguf_blocks.py) quant.safetensors.

    Returns bytes per file of the weights that make up the quantized model.
    """
    out = Path(out)
    state = _untied_state_dict(model)
    packed = {f"{name}.{key}": t for name, q in results.items() for key, t in to_tensors(q).items()}
    if carried is not None:
        packed.update(carried.tensors)
    config = copy.deepcopy(model.config)
    written = {}
    linears = set(results) | set(carried.manifest["linears"] if carried is not None else ())
    if carried is not None or not gptq_reloadable(model, grid):
        # The folder keeps exact float32 weights (W = scale * (q - zero) evaluated in float32),
        # which reload anywhere, and the codes go beside them for the exporters.
        save_file(_contiguous(state), out / "model.safetensors", metadata={"format": "pt"})
        save_file(_contiguous(packed), out / SIDECAR, metadata={"format": "pt"})
        others = {k: v for k, v in state.items() if not any(k == f"{n}.weight" for n in linears)}
        written = {"model.safetensors (float weights, for reload)": nbytes(state), "quantized model": nbytes(others) + nbytes(packed)}
    else:
        for name in results:
            del state[f"{name}.weight"]
        state.update(packed)
        save_file(_contiguous(state), out / "model.safetensors", metadata={"format": "pt"})
        config.quantization_config = gptq_config(grid, cfg, sorted(results), kept)
        written = {"quantized model": nbytes(state)}
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = quant_grid(model, results, kept, grid, cfg)
    if carried is not None:  # the source's blocks beside any linears re-quantized here, all in the sidecar
        manifest["linears"].update(carried.manifest["linears"])
        manifest.update(weights_file=SIDECAR, method=f"gguf+{cfg.method}" if results else "gguf")
    write_json(out / QUANT_GRID_FILE, manifest)
    return written


def gptq_reloadable(model, grid: Grid) -> bool:
    """Whether transformers can reload the GPTQ layout: not with float zero points (GPTQ stores
    integers), and not for GPT-2 (transformers 5.23 re-initializes its Conv1D projections after
    gptqmodel has swapped them, and fails)."""
    return not grid.float_zero and not is_gpt2(model)


def gptq_config(grid: Grid, cfg, quantized: list[str], kept: list[str]) -> dict:
    from vcompress import __version__

    config = {
        "quant_method": "gptq",
        "bits": grid.bits,
        "group_size": grid.group_size,
        "sym": grid.sym,
        "desc_act": False,  # act-order here uses static groups: g_idx stays k // group_size
        "format": "gptq_v2",
        "checkpoint_format": "gptq_v2",
        "pack_dtype": "int32",
        "backend": "torch",  # gptqmodel's float kernel; its CPU aten kernel would run activations in bfloat16
        "true_sequential": False,
        "lm_head": False,
        "meta": {
            "quantizer": [f"vcompress:{__version__}"],
            "method": cfg.method,
            "act_order": cfg.act_order,
            "static_groups": True,
            "damp_percent": cfg.damp,
        },
    }
    if kept:
        config["modules_in_block_to_quantize"] = [quantized]
    return config


def quant_grid(model, results: dict[str, Quantized], kept: list[str], grid: Grid, cfg) -> dict:
    linears = {}
    modules = dict(model.named_modules())
    for name, q in results.items():
        module = modules[name]
        tensors = {key: f"{name}.{key}" for key in to_tensors_keys(grid)}
        linears[name] = {
            "bits": grid.bits,
            "group_size": grid.group_size,
            "sym": grid.sym,
            "zero_point": "float" if grid.float_zero else "int",
            "in_features": q.codes.shape[1],
            "out_features": q.codes.shape[0],
            "bias": getattr(module, "bias", None) is not None,
            "module": type(module).__name__,
            "act_order": cfg.act_order,
            "tensors": tensors,
        }
    return make_quant_grid(
        method=cfg.method,
        weights_file="model.safetensors" if gptq_reloadable(model, grid) else SIDECAR,
        linears=linears,
        kept={name: "float (among the most quantization-sensitive)" for name in kept},
    )


def to_tensors_keys(grid: Grid) -> tuple[str, ...]:
    return ("qweight", "zeros" if grid.float_zero else "qzeros", "scales", "g_idx")


def _untied_state_dict(model) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied tensors (the LM head tied to the embeddings)."""
    seen, state = set(), {}
    for key, tensor in model.state_dict().items():
        ptr = (tensor.data_ptr(), tensor.shape)
        if tensor.numel() and ptr in seen:
            continue
        seen.add(ptr)
        state[key] = tensor.detach().cpu()
    return state


def _contiguous(tensors: dict) -> dict:
    return {k: v.contiguous() for k, v in tensors.items()}


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
