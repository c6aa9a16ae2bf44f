"""The road from checkpoint to verdict: a profile's recipe run stage by stage into one run folder.

Each stage writes its numbered folder atomically (see core/stage.py), so a folder that exists is
finished and `--resume` skips it; an interrupted stage continues from its work folder (distillation
checkpoints). run.json records the plan, the state of every stage, versions and timings.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vcompress import __version__
from vcompress.core.artifact import RunLayout, write_json
from vcompress.core.errors import InputError
from vcompress.core.models import Intake, source_hash
from vcompress.core.profiles import Profile
from vcompress.core.registry import EXPORTERS, STAGES
from vcompress.core.stage import Progress, Stage, execute, no_progress

# Modules whose import registers every stage (compress/, exporters/ and validate).
STAGE_MODULES = ("vcompress.compress", "vcompress.exporters", "vcompress.validate")


def load_stages() -> None:
    for name in STAGE_MODULES:
        importlib.import_module(name)


@dataclass
class Step:
    stage: Stage
    folder: str

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def config(self):
        return self.stage.config


def plan(profile: Profile, where: str = "profile", overrides: dict[str, dict] | None = None) -> list[Step]:
    """Every recipe step as a configured stage, before any work starts: unknown stages, settings, formats and
    device settings fail here, naming the key. `overrides` are settings per stage name that win over the
    profile's (a command's --device, say)."""
    load_stages()
    steps = []
    for step in profile.recipe:
        try:
            stage_class = STAGES.get(step.stage)
        except InputError as e:
            raise InputError(f"{where}: recipe: {e}") from None
        settings = {**step.settings, **(overrides or {}).get(step.stage, {})}
        stage = stage_class.from_profile(settings, profile, where=f"{where}: recipe.{step.stage}")
        steps.append(Step(stage, stage.run_folder))
    folders = [s.folder for s in steps]
    if folders != sorted(folders):
        order = [s.name for s in sorted(steps, key=lambda s: s.folder)]
        raise InputError(f"{where}: recipe stages out of order: {[s.name for s in steps]}; list them as {order}")
    return steps


@dataclass
class RunOptions:
    out: Path
    model: str | None = None
    data: str | None = None
    mmlu: str | None = None
    seed: int = 0
    resume: bool = False
    from_stage: str | None = None
    force: bool = False
    intake: Intake = field(default_factory=Intake)
    overrides: dict[str, dict] = field(default_factory=dict)  # settings per stage name over the profile's
    record: bool = False
    db: str | None = None


def run(
    profile: Profile,
    options: RunOptions,
    *,
    where: str = "profile",
    log: Callable[[str], None] = print,
    on_stage: Callable[[str, str, dict], None] | None = None,
    progress: Progress = no_progress,
) -> dict:
    """Run every stage of the profile's recipe; returns the verdict (dict, empty without a validate step)."""
    steps = plan(profile, where, options.overrides)
    layout = RunLayout(options.out)
    _check_out(layout.root, steps, options)
    options.intake.check(options.model)  # a bad --model or tokenizer fails before any folder is written
    try:
        layout.log_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write the run folder {layout.root} ({e.strerror}); choose a writable --out") from None
    log = _tee(log, layout.log_file)
    state = _run_record(profile, options, steps, where)
    state["model"]["hash"] = source_hash(options.model)
    state["tokenizer"] = options.intake.tokenizer_record(options.model)
    _check_same_recipe(layout, state, options)
    if options.from_stage:
        _clear_from(layout.root, steps, options.from_stage, log)
    write_json(layout.run_json, state)
    # the input checkpoint is the teacher (distill) and the reference (validate); the default too
    reference = options.model if options.model else str(options.intake.resolve(None).path)
    inputs = {"model": options.model, "analysis": None}
    for index, step in enumerate(steps):
        folder = layout.root / step.folder
        record = state["stages"][index]
        if folder.is_dir():
            log(f"{step.name}: {step.folder} is complete, skipped (resume)")
            record["state"] = "done"
        else:
            record.update(state="running", started=_now())
            write_json(layout.run_json, state)
            if on_stage:
                on_stage(step.name, "start", {})
            started = time.time()
            execute(
                _with_analysis(step.stage, inputs["analysis"]),
                folder,
                source=inputs["model"],
                force=True,
                reference=reference,
                seed=options.seed,
                data=options.data,
                mmlu=options.mmlu,
                subset=profile.evaluation.subset,
                resume=options.resume,
                intake=options.intake,
                profile=profile,
                log=lambda m, name=step.name: log(f"{name}: {m}"),
                progress=progress,
            )
            record.update(state="done", seconds=round(time.time() - started, 2))
            if on_stage:
                on_stage(step.name, "done", {"seconds": record["seconds"]})
        if step.stage.produces:
            inputs[step.stage.produces] = str(folder)
        write_json(layout.run_json, state)
    state["finished"] = _now()
    write_json(layout.run_json, state)
    verdict = layout.validation(RunLayout.VERDICT) if layout.folder("validate") else {}
    if options.record and verdict:
        from vcompress.history import record as record_history

        record_history(layout.root, db=options.db)
    return verdict


def _with_analysis(stage: Stage, analysis: str | None) -> Stage:
    """A stage that ranks by the analysis (`scores`) and was given none reads this run's."""
    config = stage.config
    if analysis is None or "scores" not in type(config).model_fields or config.scores is not None:
        return stage
    return type(stage)(config.model_copy(update={"scores": analysis}))


def _check_out(out: Path, steps: list[Step], options: RunOptions) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another --out")
    if options.from_stage and options.from_stage not in [s.name for s in steps]:
        raise InputError(f"--from {options.from_stage}: the profile's recipe has no such stage; stages: {', '.join(s.name for s in steps)}")
    finished = [s.folder for s in steps if (out / s.folder).is_dir()]
    if finished and not (options.resume or options.force or options.from_stage):
        raise InputError(
            f"{out} already holds finished stages ({', '.join(finished)}); pass --resume to continue, --from STAGE to redo from a stage, or --force to start over"
        )
    if options.force and not options.resume and not options.from_stage:
        for s in steps:
            # replaced one by one as the new run reaches them would mix runs; start over cleanly
            shutil.rmtree(out / s.folder, ignore_errors=True)


def _check_same_recipe(layout: RunLayout, state: dict, options: RunOptions) -> None:
    """Resuming under another profile, model or seed would mix two runs in one folder."""
    if not (options.resume and layout.run_json.is_file()):
        return
    previous = layout.read_run()
    before = {
        "profile": (previous.get("profile") or {}).get("sha256"),
        "model": (previous.get("model") or {}).get("spec"),
        "seed": previous.get("seed"),
        "data": previous.get("data"),
        "tokenizer": (previous.get("tokenizer") or state["tokenizer"])["sha256"],  # runs recorded before tokenizers were: unknown
    }
    now = {
        "profile": state["profile"]["sha256"],
        "model": state["model"]["spec"],
        "seed": state["seed"],
        "data": state["data"],
        "tokenizer": state["tokenizer"]["sha256"],
    }
    for key in now:
        if before[key] != now[key]:
            raise InputError(
                f"{layout.root} was started with another {key} ({before[key]!r}, now {now[key]!r}); resume with the same arguments, or pass --force to start over"
            )


def _clear_from(out: Path, steps: list[Step], stage: str, log) -> None:
    names = [s.name for s in steps]
    for s in steps[names.index(stage) :]:
        if (out / s.folder).exists():
            log(f"--from {stage}: removing {s.folder}")
            shutil.rmtree(out / s.folder)


def _run_record(profile: Profile, options: RunOptions, steps: list[Step], where: str) -> dict:
    text = json.dumps(profile.model_dump(mode="json"), sort_keys=True)
    return {
        "vcompress": __version__,
        "profile": {
            "name": profile.name,
            "path": where if Path(where).is_file() else None,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "data": profile.model_dump(mode="json"),
        },
        "model": {"spec": options.model, "label": Path(options.model).name if options.model else "SmolLM2-135M-Instruct"},
        "seed": options.seed,
        "data": options.data,
        "git_commit": _git_commit(),
        "started": _now(),
        "finished": None,
        "stages": [{"name": s.name, "folder": s.folder, "state": "pending", "seconds": None} for s in steps],
        "versions": versions(),
    }


def versions() -> dict:
    """Versions of Python, vcompress, torch/transformers and every registered exporter's runtime, read from
    the installed distributions (importing them would print banners and cost seconds)."""
    from importlib import metadata

    load_stages()
    exporters = [EXPORTERS.get(name) for name in EXPORTERS.names()]
    runtimes = {e.runtime_package for e in exporters} | {e.app_runtime_package for e in exporters if e.app_runtime_package}
    packages = ["torch", "transformers", "gptqmodel", *sorted(runtimes)]
    out = {"python": platform.python_version(), "vcompress": __version__}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        result = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tee(log: Callable[[str], None], path: Path) -> Callable[[str], None]:
    def both(message: str) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{_now()} {message}\n")
        log(message)

    return both
