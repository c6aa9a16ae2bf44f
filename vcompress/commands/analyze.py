"""vcompress analyze: which heads, layers and linear layers matter (sensitivity.json + heatmaps)."""

from __future__ import annotations

import click

from vcompress.commands._options import calibration_option, execute_stage, mmlu_option, stage_command, stage_options


@stage_command("analyze", config="vcompress.compress.sensitivity:Analyze.Config")
@stage_options
@calibration_option()
@mmlu_option
def analyze_command(settings, out, **options):
    """Score attention heads (Taylor, KV-group masking), layers (skip loss, angular distance) and each
    linear layer's 4-bit rounding sensitivity; write sensitivity.json and heatmaps/*.png into --out."""
    from vcompress.compress.sensitivity import Analyze

    execute_stage(Analyze(settings), out, echo_analysis, **options)


def echo_analysis(out, metrics: dict) -> None:
    click.echo(f"wrote {out}/sensitivity.json and {', '.join(metrics['heatmaps'])}")
    click.echo(f"baseline loss {metrics['baseline_loss_nats']:.4f} nats/token on {metrics['calibration_tokens']} tokens")
    if "least_important_layers" in metrics:
        click.echo(f"least important layers (skip loss): {metrics['least_important_layers']}")
    if "most_quant_sensitive" in metrics:
        worst = metrics["most_quant_sensitive"]
        click.echo(f"most sensitive to 4-bit rounding: layer {worst['layer']} {worst['module']} (+{worst['loss_delta_nats']:.4f} nats)")
