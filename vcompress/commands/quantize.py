"""vcompress quantize: GPTQ INT4, round-to-nearest INT4 or INT8 weights; a GPTQ checkpoint transformers reloads."""

from __future__ import annotations

import click

from vcompress.commands._options import calibration_option, execute_stage, mmlu_option, stage_command, stage_options, subset_option
from vcompress.core.units import MIB


@stage_command("quantize", config="vcompress.compress.quantize:QuantizeConfig")
@stage_options
@calibration_option("Calibration text (the domain file formats)", flag="--calib")
@subset_option("MMLU subset scored for answer agreement (calibration text avoids it).")
@mmlu_option
def quantize_command(settings, out, **options):
    """Quantize the weights of every linear layer; --out is a GPTQ checkpoint plus quant_manifest.json."""
    from vcompress.compress.quantize import Quantize

    execute_stage(Quantize(settings), out, echo_quantized, **options)


def echo_quantized(out, metrics: dict) -> None:
    click.echo(f"wrote {out}")
    click.echo(
        f"{metrics['method']}: {metrics['quantized_linears']} linears at {metrics['bits']} bits, group size {metrics['group_size']}, "
        f"zero point {metrics['zero_point']}, {metrics['bits_per_weight']['value']} bits per weight; "
        f"weights {metrics['weights_bytes_before'] / MIB:.1f} MiB -> {metrics['weights_bytes_after'] / MIB:.1f} MiB "
        f"({metrics['weights_fraction_of_before']:.1%}) in {metrics['quantize_seconds']:.0f} s"
    )
    for label, scored in (("", metrics), ("rtn: ", metrics.get("rtn") or {})):
        ppl = scored.get("perplexity")
        if ppl:
            click.echo(
                f"{label}held-out perplexity {ppl['reference']:.2f} -> {ppl['student']:.2f} "
                f"({ppl['rise_pct']:+.2f}%), top-1 agreement {scored['top1_agreement']:.1%}, "
                f"KL {scored['kl_mean']:.4f} nats/token"
            )
        if scored.get("answer_agreement") is not None:
            click.echo(f"{label}MMLU answer agreement {scored['answer_agreement']:.1%} of {scored['questions']}")
    if metrics["kept_linears"]:
        click.echo(f"kept unquantized: {', '.join(metrics['kept_linears'])}")
    for note in metrics["notes"]:
        click.echo(f"note: {note}")
