"""vcompress verify: check a release bundle before it is unpacked or shipped."""

from __future__ import annotations

from pathlib import Path

import click

from vcompress.package import verify


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
def verify_command(bundle):
    """Check every hash and the manifest of BUNDLE; refuse unsafe paths, symlinks, unlisted or missing files."""
    manifest = verify(bundle)
    state = "passed" if manifest.verdict.passed else "FAILED (packaged with --allow-failed)"
    click.echo(
        f"ok: {bundle}: {len(manifest.files)} files match manifest.json ({manifest.format}, {manifest.model.label}, verdict {state})"
    )
