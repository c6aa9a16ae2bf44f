"""vcompress package: a validated run's export as a deterministic release bundle (zip)."""

from __future__ import annotations

from pathlib import Path

import click

from vcompress.commands._options import RegistryChoice, force_option
from vcompress.core.units import MIB
from vcompress.package import package


@click.command("package")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=RegistryChoice("EXPORTERS"), required=True, help="Which export of the run to bundle.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The bundle file to write, e.g. bundle.zip.")
@click.option("--allow-failed", is_flag=True, help="Package a run whose verdict failed (the manifest says so).")
@force_option
def package_command(run_dir, fmt, out, allow_failed, force):
    """Bundle RUN_DIR's model, tokenizer, profile, verdict and recipes with a hashed manifest.json."""
    manifest = package(run_dir, fmt, out, allow_failed=allow_failed, force=force)
    total = sum(f.bytes for f in manifest.files)
    state = "passed" if manifest.verdict.passed else "FAILED (packaged with --allow-failed)"
    click.echo(f"wrote {out}: {len(manifest.files)} files, {total / MIB:.1f} MiB, {fmt}, verdict {state}")
