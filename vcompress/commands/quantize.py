"""vcompress quantize: GPTQ INT4, round-to-nearest INT4 or INT8 weights; a GPTQ checkpoint transformers reloads."""

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
    stream_option,
)
from vcompress.core.units import MIB


@click.command("quantize")
@model_options
@click.option(
    "--method",
    type=click.Choice(["gptq", "rtn", "int8"]),
    default="gptq",
    show_default=True,
    help="GPTQ, round-to-nearest, or 8-bit round-to-nearest.",
)
@click.option("--bits", type=click.Choice(["2", "4", "8"]), default="4", show_default=True, help="Bits per weight for gptq and rtn.")
@click.option(
    "--group-size",
    type=int,
    default=128,
    show_default=True,
    help="Weights per scale; falls back to 64 or 32 when it does not divide every layer.",
)
@click.option("--sym", is_flag=True, help="Symmetric grid (default: asymmetric with a zero point).")
@click.option(
    "--zero-point",
    type=click.Choice(["int", "float"]),
    default="int",
    show_default=True,
    help="Asymmetric zero point as an integer (GPTQ format) or a float (keeps grids with a float minimum, e.g. from GGUF Q4_1).",
)
@click.option("--act-order", is_flag=True, help="GPTQ: quantize columns in order of decreasing activation energy.")
@click.option(
    "--calib",
    "calib",
    type=click.Path(dir_okay=False),
    default=None,
    help="Calibration text (the domain file formats); default: MMLU text outside the evaluated subset.",
)
@click.option("--calib-samples", type=int, default=128, show_default=True, help="GPTQ calibration blocks.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per calibration block.")
@click.option(
    "--scores", type=click.Path(path_type=Path), default=None, help="sensitivity.json or an analyze folder, for --keep-sensitive."
)
@click.option(
    "--keep-sensitive",
    type=int,
    default=0,
    show_default=True,
    help="Keep this many of the most quantization-sensitive linears unquantized.",
)
@click.option("--compare-rtn", is_flag=True, help="Also score round-to-nearest at the same settings.")
@stream_option
@click.option(
    "--batch-size", type=int, default=8, show_default=True, help="Calibration blocks per forward pass (fewer: less memory, same algorithm)."
)
@click.option(
    "--heldout-blocks", type=int, default=4, show_default=True, help="Held-out blocks for perplexity and top-1 agreement (0: skip)."
)
@click.option(
    "--eval-per-subject", type=int, default=10, show_default=True, help="MMLU questions per subject for answer agreement (0: skip)."
)
@click.option(
    "--subset", default="medical", show_default=True, help="MMLU subset scored for answer agreement (calibration text avoids it)."
)
@mmlu_option
@out_option()
@seed_option
@force_option
@json_option
def command(
    model,
    intake,
    method,
    bits,
    group_size,
    sym,
    zero_point,
    act_order,
    calib,
    calib_samples,
    seq_len,
    scores,
    keep_sensitive,
    compare_rtn,
    stream,
    batch_size,
    heldout_blocks,
    eval_per_subject,
    subset,
    mmlu,
    out,
    seed,
    force,
    as_json,
):
    """Quantize the weights of every linear layer; --out is a GPTQ checkpoint plus quant_manifest.json."""
    from vcompress.compress.quantize import Quantize

    stage = Quantize(
        {
            "method": method,
            "bits": int(bits),
            "group_size": group_size,
            "sym": sym,
            "zero_point": zero_point,
            "act_order": act_order,
            "calib_samples": calib_samples,
            "seq_len": seq_len,
            "scores": str(scores) if scores else None,
            "keep_sensitive": keep_sensitive,
            "compare_rtn": compare_rtn,
            "stream": stream,
            "batch_size": batch_size,
            "heldout_blocks": heldout_blocks,
            "eval_per_subject": eval_per_subject,
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
        data=calib,
        mmlu=mmlu,
        subset=subset,
    )
    if as_json:
        print_json(metrics)
        return
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
