"""vcompress export FORMAT: write a deployable artifact and check it against PyTorch.

The group holds one subcommand per format. `onnx` is defined here; another format adds a module
`vcompress/commands/_export_<format>.py` exposing `<format>_command` (a Click command), which the group
picks up by itself (the underscore keeps cli.py from also adding it at the top level).
"""

from __future__ import annotations

import importlib
import pkgutil

import click

from vcompress.commands._options import echo_export, execute_stage, stage_command, stage_options


@click.group("export")
def export_command():
    """Export a checkpoint to a runtime format, with a parity check against PyTorch."""


@stage_command("onnx", config="vcompress.exporters.onnx:OnnxExportConfig")
@stage_options
def onnx_command(settings, out, **options):
    """Decoder with KV cache for ONNX Runtime; fp32 must match PyTorch, INT8/INT4 must agree with it.

    --stream on builds the graph one tensor at a time from disk (each weight written to model.onnx.data
    as it is made) and checks it against a model read layer by layer: --quant none from a Hugging Face
    folder or GGUF, or any --quant from a `vcompress quantize` folder (its grid carried). INT8/INT4 from a
    float model use ONNX Runtime's quantizers on the whole graph and are not streamed."""
    from vcompress.exporters.onnx import OnnxExport

    execute_stage(OnnxExport(settings), out, lambda out, metrics: echo_export(out, metrics, "the fp32 weights"), **options)


def _add_format_commands() -> None:
    import vcompress.commands as package

    export_command.add_command(onnx_command)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_export_"):
            module = importlib.import_module(f"vcompress.commands.{info.name}")
            export_command.add_command(getattr(module, f"{info.name.removeprefix('_export_')}_command"))


_add_format_commands()
