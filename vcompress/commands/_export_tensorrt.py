"""vcompress export tensorrt: a TensorRT engine from an ONNX export, or, without TensorRT, its build plan."""

from __future__ import annotations

import click

from vcompress.commands._options import force_option, json_option, out_option, print_json


@click.command("tensorrt")
@click.option("--onnx", "onnx_dir", type=click.Path(file_okay=False), required=True, help="Folder written by `vcompress export onnx`.")
@out_option()
@click.option(
    "--precision", type=click.Choice(["fp16", "int8"]), default="fp16", show_default=True, help="TensorRT builder precision flags."
)
@click.option(
    "--prefill-tokens",
    type=int,
    default=256,
    show_default=True,
    help="Past length the profile is tuned for (decode after a prompt of this size).",
)
@click.option("--max-tokens", type=int, default=None, help="Longest sequence the engine accepts (default: the model's positions).")
@force_option
@json_option
def command(onnx_dir, out, precision, prefill_tokens, max_tokens, force, as_json):
    """Build a TensorRT engine where TensorRT and a CUDA GPU exist; elsewhere write the trtexec build plan (no engine)."""
    from vcompress.exporters.tensorrt import export

    log = (lambda _: None) if as_json else (lambda msg: click.echo(msg, err=True))
    result = export(onnx_dir, out, precision=precision, prefill_tokens=prefill_tokens, max_tokens=max_tokens, force=force, log=log)
    if as_json:
        print_json(result)
    elif result["engine_built"]:
        click.echo(f"built {out}/{result['files']['engine']} ({precision})")
    else:
        click.echo(f"NO ENGINE BUILT ({result['reason']}); wrote the build plan {out}/build_plan.json and {out}/build_engine.sh")
