"""vcompress prune: remove whole KV groups, MLP channels and layers; write a standard smaller checkpoint."""

from __future__ import annotations

from pathlib import Path

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
)
from vcompress.core.units import MIB


@click.command("prune")
@model_options
@click.option(
    "--heads",
    type=float,
    default=0.0,
    show_default=True,
    help="Fraction of KV groups (a KV head and the query heads sharing it) to remove in every layer.",
)
@click.option("--mlp", type=float, default=0.0, show_default=True, help="Fraction of MLP channels to remove in every layer.")
@click.option(
    "--layers", type=int, default=0, show_default=True, help="Number of least important layers (loss change when skipped) to drop."
)
@click.option(
    "--scores",
    type=click.Path(path_type=Path),
    default=None,
    help="sensitivity.json or an analyze folder to rank by; default: scores computed here.",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    default=None,
    help="Calibration text for scores computed here; default: MMLU text outside the evaluated subset.",
)
@click.option("--samples", type=int, default=8, show_default=True, help="Calibration blocks for scores computed here.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per calibration block.")
@mmlu_option
@out_option()
@seed_option
@force_option
@json_option
def command(model, intake, heads, mlp, layers, scores, data, samples, seq_len, mmlu, out, seed, force, as_json):
    """Prune by whole KV groups, MLP channels and layers; --out reloads with AutoModelForCausalLM."""
    from vcompress.compress.prune import Prune

    stage = Prune(
        {"heads": heads, "mlp": mlp, "layers": layers, "scores": str(scores) if scores else None, "samples": samples, "seq_len": seq_len}
    )
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
