"""vcompress export FORMAT: write a deployable artifact and check it against PyTorch.

The group holds one subcommand per format. `onnx` is defined here; another format adds a module
`vcompress/commands/_export_<format>.py` exposing `command` (a Click command), which the group
picks up by itself (the underscore keeps cli.py from also adding it at the top level).
"""

from __future__ import annotations

import importlib
import pkgutil

import click

from vcompress.commands._options import (
    echo_export,
    execute_stage,
    force_option,
    json_option,
    model_options,
    out_option,
    print_json,
    seed_option,
    stream_option,
)


@click.group("export")
def command():
    """Export a checkpoint to a runtime format, with a parity check against PyTorch."""


@command.command("onnx")
@model_options
@out_option()
@click.option(
    "--quant",
    type=click.Choice(["none", "int8", "int4"]),
    default="none",
    show_default=True,
    help="Weights: fp32, INT8 dynamic (ONNX Runtime) or INT4 weight-only (MatMulNBits).",
)
@click.option(
    "--method",
    type=click.Choice(["rtn", "hqq", "rtn-float"]),
    default="rtn",
    show_default=True,
    help="INT4 quantizer: ONNX Runtime's RTN, its HQQ, or min/max with a float zero point (exact on GGUF Q4_1 grids; slow kernel).",
)
@click.option(
    "--int8-method",
    type=click.Choice(["blockwise", "dynamic"]),
    default="blockwise",
    show_default=True,
    help="INT8: 8-bit MatMulNBits blocks, or ONNX Runtime dynamic quantization (per-tensor activations).",
)
@click.option(
    "--block-size", type=int, default=32, show_default=True, help="INT4/INT8 block size along the input dimension (power of two, >= 16)."
)
@click.option(
    "--table-bits",
    type=click.Choice(["0", "4", "8"]),
    default="4",
    show_default=True,
    help="Bits of the embedding table and the LM head (tied or untied) under INT4 (INT8: 8); 0 keeps both fp32.",
)
@click.option(
    "--head-bits",
    type=click.Choice(["0", "4", "8"]),
    default=None,
    help="Bits of the LM head if not --table-bits (a tied table takes them too; an untied embedding keeps --table-bits).",
)
@click.option(
    "--min-agreement", type=float, default=0.5, show_default=True, help="INT8/INT4: top-1 agreement with PyTorch fp32 the check requires."
)
@click.option(
    "--compact",
    is_flag=True,
    help="Store block scales and zero-point corrections as float16 (cast at load) and compute the rotary tables in the graph: a smaller file.",
)
@click.option("--threads", type=int, default=None, help="ONNX Runtime threads for the parity check (default: all cores).")
@stream_option
@force_option
@seed_option
@json_option
def onnx(
    model,
    intake,
    out,
    quant,
    method,
    int8_method,
    block_size,
    table_bits,
    head_bits,
    min_agreement,
    compact,
    threads,
    stream,
    force,
    seed,
    as_json,
):
    """Decoder with KV cache for ONNX Runtime; fp32 must match PyTorch, INT8/INT4 must agree with it.

    --stream on builds the graph one tensor at a time from disk (each weight written to model.onnx.data
    as it is made) and checks it against a model read layer by layer: --quant none from a Hugging Face
    folder or GGUF, or any --quant from a `vcompress quantize` folder (its grid carried). INT8/INT4 from a
    float model use ONNX Runtime's quantizers on the whole graph and are not streamed."""
    from vcompress.exporters.onnx import OnnxExport

    stage = OnnxExport(
        {
            "quant": quant,
            "method": method,
            "int8_method": int8_method,
            "block_size": block_size,
            "table_bits": int(table_bits),
            "head_bits": None if head_bits is None else int(head_bits),
            "compact": compact,
            "threads": threads,
            "min_top1_quantized": min_agreement,
            "stream": stream,
        }
    )
    metrics = execute_stage(
        stage,
        out,
        model=model,
        intake=intake,
        as_json=as_json,
        force=force,
        seed=seed,
    )
    if as_json:
        print_json(metrics)
        return
    echo_export(out, quant, metrics, "the fp32 weights")


def _add_format_modules() -> None:
    import vcompress.commands as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_export_"):
            command.add_command(importlib.import_module(f"vcompress.commands.{info.name}").command)


_add_format_modules()
