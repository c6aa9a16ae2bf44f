"""vcompress inspect: what a checkpoint is, before anything is done to it."""

from __future__ import annotations

import click
from rich.table import Table

from vcompress.commands._options import json_option, make_console, model_options, print_json
from vcompress.core.models import summarize


@click.command("inspect")
@click.argument("model_arg", metavar="[MODEL]", required=False)
@model_options
@json_option
def inspect_command(model_arg, model, intake, as_json):
    """Print architecture, parameters, layers, query/KV heads, head dim, dtype and bytes on disk."""
    if model_arg and model and model_arg != model:
        raise click.UsageError("give the model either as MODEL or as --model, not both")
    source = intake.resolve(model_arg or model)
    loaded, _ = intake.load(source)
    info = {**summarize(loaded, source), "tokenizer": str(source.tokenizer)}
    if as_json:
        print_json(info)
        return
    table = Table(title=f"{info['model']} ({info['source']})", show_header=False)
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > 9999:
            value = f"{value:,}"
        table.add_row(key.replace("_", " "), str(value))
    make_console().print(table)
