"""vcompress export tensorrt: a standard-op ONNX decoder for TensorRT, checked on ONNX Runtime CPU, with its engine
where TensorRT and a CUDA GPU exist and the trtexec build plan elsewhere."""

from __future__ import annotations

import click

from vcompress.commands._options import execute_stage, force_option, json_option, model_options, out_option, print_json, seed_option


@click.command("tensorrt")
@model_options
@out_option()
@click.option(
    "--quant",
    type=click.Choice(["int4", "int8", "none"]),
    default="int4",
    show_default=True,
    help="Weights: INT4 / INT8 weight-only with symmetric block scales (DequantizeLinear), or float.",
)
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True, help="Activations and float weights.")
@click.option(
    "--block-size", type=int, default=128, show_default=True, help="INT4/INT8 block (32, 64, 128; smaller where it does not divide)."
)
@click.option("--prefill-tokens", type=int, default=256, show_default=True, help="Past length the engine profile is tuned for.")
@click.option("--max-tokens", type=int, default=None, help="Longest sequence the engine accepts (default: the model's positions).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime threads for the checks.")
@force_option
@seed_option
@json_option
def command(
    model,
    intake,
    out,
    quant,
    precision,
    block_size,
    prefill_tokens,
    max_tokens,
    threads,
    force,
    seed,
    as_json,
):
    """TensorRT graph (standard ONNX ops): checked against TensorRT 10's operator matrix and against PyTorch on ONNX Runtime CPU."""
    from vcompress.exporters.tensorrt import TensorRTExport

    stage = TensorRTExport(
        {
            "quant": quant,
            "precision": precision,
            "block_size": block_size,
            "prefill_tokens": prefill_tokens,
            "max_tokens": max_tokens,
            "threads": threads,
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
    p, f = metrics["parity"], metrics["fidelity"]
    click.echo(f"wrote {out} ({precision}, weights {quant}): TensorRT-ready (every node in TensorRT 10's operator matrix)")
    click.echo(
        f"parity on ONNX Runtime CPU, {p['prompts']} prompts: max |logit diff| {p['max_abs_diff']:.2e}, top-1 agreement "
        f"{p['top1_agreement']:.3f}, greedy {p['greedy_tokens']} tokens identical on {p['greedy_identical']}/{p['prompts']}"
    )
    if f:
        click.echo(
            f"held-out text: perplexity {f['perplexity']:.3f} vs {f['reference_perplexity']:.3f} in PyTorch, top-1 agreement {f['top1_agreement']:.3f}"
        )
    if metrics["engine_built"]:
        click.echo(f"built {out}/model.engine")
    else:
        click.echo(
            f"NO ENGINE BUILT (engine not built here: TensorRT needs a CUDA GPU); wrote {out}/build_plan.json and {out}/build_engine.sh"
        )
