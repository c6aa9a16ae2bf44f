"""vcompress profiles: the device budget profiles (list, show, validate)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import click
from rich.table import Table

from vcompress.commands._options import json_option, make_console, print_json
from vcompress.core.profiles import builtin_names, load_profile


@click.group("profiles")
def profiles_command():
    """Device budget profiles: list, show, validate."""


@profiles_command.command("list")
@json_option
def list_profiles(as_json):
    """The built-in profiles with their device, format and headline budgets."""
    profiles = [load_profile(n) for n in builtin_names()]
    if as_json:
        print_json([p.model_dump(mode="json") for p in profiles])
        return
    table = Table(title="vcompress profiles")
    for col in ("name", "device", "format", "quant", "GB/s", "GFLOP/s", "size MiB", "RAM MiB", "TTFT ms", "tok/s", "stages"):
        table.add_column(col, no_wrap=col in ("name", "stages"))
    for p in profiles:
        b = p.budgets
        table.add_row(
            p.name,
            p.device.name,
            p.target.format,
            f"{p.quantization.method}/{p.target.quant}",
            f"{p.device.memory_bandwidth_gbs:g}",
            f"{p.device.peak_compute_gflops:g}",
            f"<= {b.max_model_size_mb:g}",
            f"<= {b.max_peak_ram_mb:g}",
            f"<= {b.max_ttft_ms:g} @{b.prompt_tokens}",
            f">= {b.min_decode_tokens_per_s:g}",
            ">".join(s.stage for s in p.recipe),
        )
    make_console().print(table)


@profiles_command.command("show")
@click.argument("name")
@json_option
def show(name, as_json):
    """Print a profile (a built-in name or a YAML path), with its spec-source comments."""
    profile = load_profile(name)
    if as_json:
        print_json(profile.model_dump(mode="json"))
        return
    path = Path(name)
    text = path.read_text() if path.is_file() else (importlib.resources.files("vcompress.profiles") / f"{name}.yaml").read_text()
    click.echo(text.rstrip())


@profiles_command.command("validate")
@click.argument("file")
def validate(file):
    """Check a profile file (schema, contradictions, stage settings); exit 2 naming the key if bad."""
    from vcompress.pipeline import plan

    profile = load_profile(file)
    plan(profile, where=file)
    click.echo(f"ok: {file} is a valid profile ({profile.name}: {profile.target.format}, {len(profile.recipe)} stages)")
