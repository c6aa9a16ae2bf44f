"""vcompress prune: remove whole KV groups, MLP channels and layers; write a standard smaller checkpoint."""

from __future__ import annotations

import click

from vcompress.commands._options import calibration_option, execute_stage, mmlu_option, stage_command, stage_options
from vcompress.core.units import MIB


# auto needs a profile's budgets, which only `vcompress run` has
@stage_command("prune", config="vcompress.compress.prune:Prune.Config", exclude=("auto",))
@stage_options
@calibration_option("Calibration text for scores computed here")
@mmlu_option
def prune_command(settings, out, **options):
    """Prune by whole KV groups, MLP channels and layers; --out reloads with AutoModelForCausalLM."""
    from vcompress.compress.prune import Prune

    execute_stage(Prune(settings), out, echo_pruned, **options)


def echo_pruned(out, metrics: dict) -> None:
    h, m, layers = metrics["heads"], metrics["mlp"], metrics["layers"]
    click.echo(f"wrote {out}")
    click.echo(
        f"query/KV heads per layer {h['query_heads'][0]}/{h['kv_heads'][0]} -> {h['query_heads'][1]}/{h['kv_heads'][1]}, "
        f"MLP channels {m['intermediate_size'][0]} -> {m['intermediate_size'][1]}, layers {layers['count'][0]} -> {layers['count'][1]}"
        + (f" (dropped {layers['dropped']})" if layers["dropped"] else "")
    )
    click.echo(
        f"parameters {metrics['parameters_before']:,} -> {metrics['parameters_after']:,}, "
        f"weights {metrics['weights_bytes_before'] / MIB:.1f} MiB -> {metrics['weights_bytes_after'] / MIB:.1f} MiB "
        f"({metrics['size_reduction']['value']}% smaller)"
    )
    if metrics["perplexity"]:
        click.echo(
            f"held-out perplexity {metrics['perplexity']['reference']:.2f} -> {metrics['perplexity']['student']:.2f} "
            f"(top-1 agreement {metrics['top1_agreement']:.1%}, {metrics['tokens']} tokens)"
        )
