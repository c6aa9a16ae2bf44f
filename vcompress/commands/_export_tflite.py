"""vcompress export tflite: a .tflite with prefill/decode signatures and a KV cache, checked against PyTorch."""

from __future__ import annotations

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
)


@click.command("tflite")
@model_options
@out_option()
@click.option(
    "--quant",
    type=click.Choice(["none", "int8", "int4"]),
    default="none",
    show_default=True,
    help="Weights: fp32, or INT8 / INT4 per channel with float activations (ai-edge-quantizer dynamic range).",
)
@click.option(
    "--prefill-tokens", type=int, default=256, show_default=True, help="Length of the prefill signature (prompts run in chunks of it)."
)
@click.option(
    "--short-prefill-tokens",
    type=int,
    default=32,
    show_default=True,
    help="Length of a second prefill signature for short prompts and a long one's tail (0: none).",
)
@click.option("--cache-length", type=int, default=1024, show_default=True, help="KV cache slots: the longest sequence the export holds.")
@click.option(
    "--min-agreement", type=float, default=0.5, show_default=True, help="INT8/INT4: top-1 agreement with PyTorch fp32 the check requires."
)
@click.option("--threads", type=int, default=None, help="LiteRT threads for the parity check (default: the interpreter's).")
@force_option
@seed_option
@json_option
def command(
    model,
    intake,
    out,
    quant,
    prefill_tokens,
    short_prefill_tokens,
    cache_length,
    min_agreement,
    threads,
    force,
    seed,
    as_json,
):
    """TFLite (LiteRT) for Android: fp32 must match PyTorch, INT8/INT4 must agree with it."""
    from vcompress.exporters.tflite import TFLiteExport

    stage = TFLiteExport(
        {
            "quant": quant,
            "prefill_tokens": prefill_tokens,
            "short_prefill_tokens": short_prefill_tokens,
            "cache_length": cache_length,
            "threads": threads,
            "min_top1_quantized": min_agreement,
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
    echo_export(out, quant, metrics, "the fp32 .tflite")
