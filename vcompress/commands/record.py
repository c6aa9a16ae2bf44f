"""vcompress record: put a finished run's results into the history store."""

from __future__ import annotations

from pathlib import Path

import click

from vcompress import history

db_option = click.option(
    "--db",
    type=str,
    default=None,
    envvar="VCOMPRESS_HISTORY_DB",
    help="History database: a SQLAlchemy URL (sqlite:///f.db, postgresql://...) or a file path; default: history.db in the vcompress cache ($VCOMPRESS_HISTORY_DB).",
)


@click.command("record")
@click.argument("run_dir", type=click.Path(path_type=Path))
@db_option
def record_command(run_dir, db):
    """Record RUN_DIR (run.json and 06-validate/*.json) in the history store; re-recording replaces it."""
    run_id = history.record(run_dir, db)
    click.echo(f"recorded {run_id} in {history.shown(history.db_url(db))}")
