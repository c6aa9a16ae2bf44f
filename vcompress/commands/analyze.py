"""vcompress analyze: which heads, layers and linear layers matter (sensitivity.json + heatmaps)."""

from __future__ import annotations

import click

from vcompress.commands._options import (
    execute_stage,
    force_option,
    json_option,
    mmlu_option,
    model_options,
    out_option,
    print_json,
    seed_option,
    stream_option,
)


@click.command("analyze")
@model_options
@out_option()
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    default=None,
    help="Calibration text (JSONL/CSV/TXT); default: MMLU text outside the evaluated subset.",
)
@click.option("--samples", type=int, default=4, show_default=True, help="Calibration blocks (more: less noise, proportionally slower).")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per calibration block.")
@stream_option
@mmlu_option
@seed_option
@force_option
@json_option
def command(model, intake, out, data, samples, seq_len, stream, mmlu, seed, force, as_json):
    """Score attention heads (Taylor, KV-group masking), layers (skip loss, angular distance) and each
    linear layer's 4-bit rounding sensitivity; write sensitivity.json and heatmaps/*.png into --out."""
    from vcompress.compress.sensitivity import Analyze

    stage = Analyze({"samples": samples, "seq_len": seq_len, "stream": stream})
    metrics = execute_stage(
        stage,
        out,
        model=model,
        intake=intake,
        as_json=as_json,
        force=force,
        seed=seed,
        data=data,
        mmlu=mmlu,
    )
    if as_json:
        print_json(metrics)
        return
    click.echo(f"wrote {out}/sensitivity.json and {', '.join(metrics['heatmaps'])}")
    click.echo(f"baseline loss {metrics['baseline_loss_nats']:.4f} nats/token on {metrics['calibration_tokens']} tokens")
    if "least_important_layers" in metrics:
        click.echo(f"least important layers (skip loss): {metrics['least_important_layers']}")
    if "most_quant_sensitive" in metrics:
        worst = metrics["most_quant_sensitive"]
        click.echo(f"most sensitive to 4-bit rounding: layer {worst['layer']} {worst['module']} (+{worst['loss_delta_nats']:.4f} nats)")
