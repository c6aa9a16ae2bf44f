"""vcompress run: the whole road in one resumable command, ending in a budget verdict."""

from __future__ import annotations

import time
from pathlib import Path

import click

from vcompress.commands._options import RegistryChoice, json_option, make_console, mmlu_option, model_options, print_json, seed_option
from vcompress.core.profiles import load_profile


@click.command("run")
@click.option("--profile", "profile_name", required=True, help="Profile name (see `vcompress profiles list`) or a YAML file.")
@model_options
@click.option(
    "--data",
    type=click.Path(),
    default=None,
    help="Domain data (JSONL/CSV) for calibration and distillation; default: MMLU text outside the evaluated subset.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder (one numbered subfolder per stage).")
@click.option("--resume", is_flag=True, help="Skip finished stages and continue an interrupted one.")
@click.option("--from", "from_stage", type=RegistryChoice("STAGES"), default=None, help="Re-run from this stage on.")
@click.option("--force", is_flag=True, help="Start over in an existing run folder.")
@click.option("--dry-run", is_flag=True, help="Print the plan (stages, settings, folders) and stop.")
@click.option(
    "--auto",
    is_flag=True,
    help="Search the prune ratio and bit width for the smallest artifact that passes the profile (RUN/auto.json lists every candidate).",
)
@click.option(
    "--device",
    type=RegistryChoice("DEVICES"),
    default=None,
    help="Where latency comes from (default: the profile's connection; roofline estimate when the device is not attached).",
)
@click.option("--host", "ssh_host", default=None, help="ssh: the board's address (overrides the profile).")
@click.option("--serial", default=None, help="adb: the phone's serial (overrides the profile).")
@click.option("--record", is_flag=True, help="Record the result in the history database (see `vcompress report`).")
@click.option("--db", default=None, help="History database: a SQLAlchemy URL or a SQLite file path.")
@mmlu_option
@seed_option
@json_option
def run_command(
    profile_name,
    model,
    intake,
    data,
    out,
    resume,
    from_stage,
    force,
    dry_run,
    auto,
    device,
    ssh_host,
    serial,
    record,
    db,
    mmlu,
    seed,
    as_json,
):
    """Run a profile's recipe: analyze > prune > distill > quantize > export > validate, then print the verdict.

    Exit code 0 when every budget passes, 1 when one fails, 2 on bad input, 3 on an internal error, 4 when an export
    refused its artifact (no verdict).
    """
    from vcompress import pipeline

    profile = load_profile(profile_name)
    overrides = _validate_overrides(device, ssh_host, serial)
    steps = pipeline.plan(profile, where=profile_name, overrides=overrides)
    console = make_console(stderr=as_json)
    if dry_run:
        _print_plan(profile, steps, out, console, as_json)
        return 0
    options = pipeline.RunOptions(
        out=out,
        model=model,
        data=data,
        mmlu=mmlu,
        seed=seed,
        resume=resume,
        from_stage=from_stage,
        force=force,
        intake=intake,
        overrides=overrides,
        record=record,
        db=db,
    )
    return _run(profile, options, profile_name, console, auto, as_json)


def _validate_overrides(device, ssh_host, serial) -> dict:
    """--device, --host and --serial as settings of the validate step over the profile's."""
    connection = {k: v for k, v in (("host", ssh_host), ("serial", serial)) if v}
    validate = {k: v for k, v in (("device", device), ("connection", connection)) if v}
    return {"validate": validate} if validate else {}


def _print_plan(profile, steps, out: Path, console, as_json: bool) -> None:
    """--dry-run: every step with its folder, settings and whether --resume would keep it."""
    if as_json:
        print_json(
            {
                "profile": profile.name,
                "out": str(out),
                "steps": [
                    {"stage": s.name, "folder": s.folder, "config": s.config.model_dump(mode="json"), "done": (out / s.folder).is_dir()}
                    for s in steps
                ],
            }
        )
        return
    console.print(f"[bold]plan[/bold] for profile {profile.name} -> {out}")
    for s in steps:
        done = " (done, kept by --resume)" if (out / s.folder).is_dir() else ""
        console.print(f"  {s.folder:<18} {s.name:<9} {s.config.model_dump(mode='json')}{done}")


def _run(profile, options, where: str, console, auto: bool, as_json: bool) -> int:
    """The recipe (or --auto's search) with a timed log and a rule per stage; the verdict's exit code."""
    from vcompress import pipeline

    started = time.time()

    def log(message: str) -> None:
        console.print(f"[dim]{time.time() - started:7.1f}s[/dim] {message}", highlight=False)

    def on_stage(stage: str, event: str, info: dict) -> None:
        if event == "start":
            console.rule(f"[bold]{stage}[/bold]")
        else:
            console.print(f"[green]done[/green] {stage} in {info['seconds']:.1f}s")

    if auto:
        return _auto(profile, options, where, log, on_stage, console, as_json)
    from vcompress.progress import progress_bars

    with progress_bars(quiet=as_json) as progress:
        verdict = pipeline.run(profile, options, where=where, log=log, on_stage=on_stage, progress=progress)
    if as_json:
        print_json(verdict)
    else:
        from vcompress.validate import print_verdict

        print_verdict(verdict, make_console())
        console.print(f"run folder: {options.out}  ({time.time() - started:.0f}s)")
    return 0 if verdict.get("passed") else 1


def _auto(profile, options, where, log, on_stage, console, as_json) -> int:
    from rich.table import Table

    from vcompress.auto import no_winner_error, search

    summary = search(profile, options, where=where, log=log, on_stage=on_stage)
    error = no_winner_error(summary)
    verdict = None
    if summary["winner"]:
        from vcompress.core.artifact import RunLayout

        verdict = RunLayout(options.out / summary["winner_folder"]).validation(RunLayout.VERDICT)
    if as_json:
        print_json({**summary, "verdict": verdict})
        if error:
            raise error
        return 0 if verdict else 1
    table = Table(title=f"--auto candidates for {profile.name}, smallest estimated artifact first")
    for col in ("candidate", "est. MiB", "predicted ppl", "status", "MiB", "why"):
        table.add_column(col)
    for c in summary["candidates"]:
        rise = c["predicted_ppl_rise_pct"]
        table.add_row(
            c["name"],
            f"{c['estimated_mb']:.0f}",
            "n/a" if rise is None else f"+{rise:.1f}%",
            c["status"],
            "" if c["size_mb"] is None else f"{c['size_mb']:.0f}",
            c["reason"],
        )
    console.print(table)
    if error:
        raise error
    if verdict is None:
        console.print("[red]no candidate passed the profile[/red]; the table says why each failed or was skipped")
        return 1
    from vcompress.validate import print_verdict

    print_verdict(verdict, make_console())
    console.print(f"smallest passing artifact: {options.out / summary['winner_folder']}")
    return 0
