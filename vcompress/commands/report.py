"""vcompress report: the newest results against a baseline; exit 1 when something regressed."""

from __future__ import annotations

from pathlib import Path

import click

from vcompress import report as reporting
from vcompress.commands.record import db_option


@click.command("report")
@click.option(
    "--baseline",
    default="last-good",
    show_default=True,
    help="What to compare with: last-good (the newest earlier run whose verdict passed), a date (YYYY-MM-DD) or a run id.",
)
@click.option("--since", default="30d", show_default=True, help="Only runs this recent: 30d, 12h, 2w, a date, or all.")
@db_option
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for report.md, report.html, junit.xml and plots/.")
@click.option("--profile", default=None, help="Only this profile.")
@click.option("--model", default=None, help="Only this model (label, spec or hash prefix).")
def report_command(baseline, since, db, out, profile, model):
    """Compare the newest run of each (model, profile, device) with a baseline, beyond run-to-run noise."""
    result = reporting.build(db, baseline=baseline, since=since, profile=profile, model=model)
    reporting.write(result, out)
    regressions = result.regressions()
    for line in regressions:
        click.echo(line)
    if regressions:
        return 1
    click.echo(f"ok: no regressions in {len(result.groups)} model/profile/device group(s); report in {out}")
    return 0
