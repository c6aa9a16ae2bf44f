"""vcompress validate: an exported artifact against a profile's budgets, with a verdict."""

from __future__ import annotations

from pathlib import Path

import click

from vcompress.commands._options import (
    force_option,
    intake_options,
    json_option,
    make_console,
    mmlu_option,
    print_json,
    seed_option,
    stage_command,
)


# connection (the device's own settings) is a mapping, given in a profile
@stage_command("validate", config="vcompress.validate:ValidateConfig", exclude=("connection",))
@click.option("--profile", "profile_name", required=True, help="Profile name or YAML file whose budgets apply.")
@click.option(
    "--artifact", required=True, type=click.Path(path_type=Path), help="Exported artifact folder (or an HF folder, run by PyTorch)."
)
@click.option("--reference", default=None, help="The uncompressed model the artifact came from; default: the embedded default model.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for eval.json, latency.json and verdict.json.")
@click.option(
    "--data", type=click.Path(), default=None, help="Held-out domain text for perplexity (default: MMLU text outside the subset)."
)
@click.option("--record", is_flag=True, help="Record the verdict in the history database.")
@click.option("--db", default=None, help="History database (SQLAlchemy URL or SQLite path).")
@intake_options
@mmlu_option
@seed_option
@force_option
@json_option
def validate_command(settings, profile_name, artifact, reference, out, data, record, db, intake, mmlu, seed, force, as_json):
    """Score the artifact and its reference on the profile's MMLU subset, measure or estimate latency,
    and check every budget. Exit 0 all pass, 1 a budget failed or is undecided, 2 bad input, 3 an internal error."""
    from vcompress import pipeline
    from vcompress.core.artifact import RunLayout, read_json
    from vcompress.core.models import resolve
    from vcompress.core.profiles import load_profile
    from vcompress.core.registry import STAGES
    from vcompress.core.stage import execute
    from vcompress.progress import progress_bars
    from vcompress.validate import print_verdict

    profile = load_profile(profile_name)
    if not artifact.exists():
        raise click.UsageError(f"--artifact {artifact} does not exist")
    # the validate step of the profile's plan: the same stage, configured the same way, as in `vcompress run`
    steps = {s.name: s.stage for s in pipeline.plan(profile, where=profile_name, overrides={"validate": settings})}
    stage = steps.get("validate") or STAGES.get("validate").from_profile(settings, profile, where=profile_name)
    reference = reference or str(resolve(None).path)
    intake.check(reference)  # a reference without its tokenizer fails before any work
    console = make_console(stderr=as_json)
    with progress_bars(quiet=as_json) as progress:
        execute(
            stage,
            out,
            source=str(artifact),
            force=force,
            seed=seed,
            reference=reference,
            data=data,
            mmlu=mmlu,
            subset=profile.evaluation.subset,
            profile=profile,
            intake=intake,
            log=lambda m: console.print(m, highlight=False),
            progress=progress,
        )
    verdict = read_json(out / RunLayout.VERDICT)
    if record:
        from vcompress.history import record as record_history

        record_history(out, db=db)
    if as_json:
        print_json(verdict)
    else:
        print_verdict(verdict, make_console())
    return 0 if verdict["passed"] else 1
