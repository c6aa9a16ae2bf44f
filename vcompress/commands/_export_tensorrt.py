"""vcompress export tensorrt: a standard-op ONNX decoder for TensorRT, checked on ONNX Runtime CPU, with its engine
where TensorRT and a CUDA GPU exist and the trtexec build plan elsewhere."""

from __future__ import annotations

import click

from vcompress.commands._options import execute_stage, stage_command, stage_options


@stage_command("tensorrt", config="vcompress.exporters.tensorrt:TensorRTExportConfig")
@stage_options
def tensorrt_command(settings, out, **options):
    """TensorRT graph (standard ONNX ops): checked against TensorRT 10's operator matrix and against PyTorch on ONNX Runtime CPU."""
    from vcompress.exporters.tensorrt import TensorRTExport

    execute_stage(TensorRTExport(settings), out, echo_engine, **options)


def echo_engine(out, metrics: dict) -> None:
    precision, quant = metrics["precision"], metrics["quant"]
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
