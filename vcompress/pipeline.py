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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vcompress import __version__
from vcompress.core.artifact import write_json
from vcompress.core.errors import InputError
from vcompress.core.models import source_hash
from vcompress.core.profiles import Profile
from vcompress.core.registry import STAGES

# Modules whose import registers stages, exporters and runners.
STAGE_MODULES = ("vcompress.compress", "vcompress.exporters")
FOLDERS = {"analyze": "01-analyze", "prune": "02-prune", "distill": "03-distill", "quantize": "04-quantize",
           "export": "05-export-{format}", "validate": "06-validate"}
MODEL_STAGES = ("prune", "distill", "quantize")  # stages whose output is the next stage's model


def load_stages() -> None:
    for name in STAGE_MODULES:
        importlib.import_module(name)


def validate_recipe(profile: Profile, where: str = "profile") -> list:
    """Parse every recipe step's settings with its stage's Config, before any work starts.

    Returns (stage name, config) pairs; a stage without a registered Config keeps its raw settings.
    """
    load_stages()
    steps = []
    for step in profile.recipe:
        settings = _stage_settings(profile, step.stage, step.settings)
        if step.stage == "export":
            from vcompress.exporters import export_stage

            config = export_stage(settings, where=f"{where}: recipe.export").config
            config = {"format": settings["format"], **config.model_dump()}
        elif step.stage in STAGES:
            config = STAGES.get(step.stage).parse_config(settings, where=f"{where}: recipe.{step.stage}")
        else:
            config = settings
        steps.append((step.stage, config))
    return steps


def _stage_settings(profile: Profile, stage: str, settings: dict) -> dict:
    """The profile's top-level scheme fills in what a step does not say itself."""
    if stage == "quantize":
        q = profile.quantization
        defaults = {"method": q.method, "bits": q.bits, "group_size": q.group_size, "act_order": q.act_order}
        config_cls = STAGES.get("quantize").Config if "quantize" in STAGES else None
        if config_cls is not None:
            defaults = {k: v for k, v in defaults.items() if k in config_cls.model_fields}
        return {**defaults, **settings}
    if stage == "export":
        return {"format": profile.target.format, "quant": profile.target.quant, **settings}
    return dict(settings)


@dataclass
class Step:
    stage: str
    folder: str
    config: Any


def plan(profile: Profile, where: str = "profile") -> list[Step]:
    steps = []
    for stage, config in validate_recipe(profile, where):
        folder = FOLDERS[stage].format(format=profile.target.format)
        steps.append(Step(stage, folder, config))
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
    device: str | None = None  # override the profile's connection kind (host, ssh, adb, roofline)
    device_overrides: dict | None = None
    record: bool = False
    db: str | None = None


def run(profile: Profile, options: RunOptions, *, where: str = "profile", log: Callable[[str], None] = print,
        on_stage: Callable[[str, str, dict], None] | None = None) -> dict:
    """Run every stage of the profile's recipe; returns the verdict (dict)."""
    steps = plan(profile, where)
    out = Path(options.out)
    _check_out(out, steps, options)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    log = _tee(log, out / "logs" / "run.log")
    state = _run_record(profile, options, steps, where)
    state["model"]["hash"] = source_hash(options.model)
    _check_same_recipe(out, state, options)
    if options.from_stage:
        _clear_from(out, steps, options.from_stage, log)
    write_json(out / "run.json", state)
    inputs = {"model": options.model, "analysis": None}
    verdict: dict = {}
    for index, step in enumerate(steps):
        folder = out / step.folder
        record = state["stages"][index]
        if folder.is_dir():
            log(f"{step.stage}: {step.folder} is complete, skipped (resume)")
            record["state"] = "done"
        else:
            record.update(state="running", started=_now())
            write_json(out / "run.json", state)
            if on_stage:
                on_stage(step.stage, "start", {})
            started = time.time()
            _execute(step, folder, inputs, profile, options, log)
            record.update(state="done", seconds=round(time.time() - started, 2))
            if on_stage:
                on_stage(step.stage, "done", {"seconds": record["seconds"]})
        _advance(step, folder, inputs)
        write_json(out / "run.json", state)
    state["finished"] = _now()
    write_json(out / "run.json", state)
    verdict_file = out / FOLDERS["validate"] / "verdict.json"
    if verdict_file.is_file():
        verdict = json.loads(verdict_file.read_text())
    if options.record and verdict:
        from vcompress.history import record as record_history

        record_history(out, db=options.db)
    return verdict


def _execute(step: Step, folder: Path, inputs: dict, profile: Profile, options: RunOptions, log) -> None:
    from vcompress.core.models import resolve
    from vcompress.core.stage import execute

    # the input checkpoint is the teacher (distill) and the reference (validate); the default too
    reference = options.model if options.model else str(resolve(None).path)
    common = dict(seed=options.seed, data=options.data, mmlu=options.mmlu, subset=profile.evaluation.subset,
                  resume=options.resume, log=lambda m: log(f"{step.stage}: {m}"))
    if step.stage == "export":
        from vcompress.exporters import export_stage

        execute(export_stage(step.config), folder, source=inputs["model"], force=True, reference=reference, **common)
        return
    if step.stage == "validate":
        from vcompress.validate import ValidateStage

        stage = ValidateStage(step.config if isinstance(step.config, dict) else {})
        execute(stage, folder, source=inputs["model"], force=True, reference=reference,
                extra={"profile": profile, "device": options.device, "device_overrides": options.device_overrides or {}},
                **common)
        return
    config = step.config
    if inputs["analysis"] is not None and "scores" in type(config).model_fields and getattr(config, "scores") is None:
        config = config.model_copy(update={"scores": str(inputs["analysis"])})
    # distill: the student is the pruned model, the teacher the input checkpoint
    execute(STAGES.get(step.stage)(config), folder, source=inputs["model"], force=True, reference=reference, **common)


def _advance(step: Step, folder: Path, inputs: dict) -> None:
    if step.stage == "analyze":
        inputs["analysis"] = folder
    elif step.stage in MODEL_STAGES or step.stage == "export":
        inputs["model"] = str(folder)


def _check_out(out: Path, steps: list[Step], options: RunOptions) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another --out")
    if options.from_stage and options.from_stage not in [s.stage for s in steps]:
        raise InputError(f"--from {options.from_stage}: the profile's recipe has no such stage; stages: {', '.join(s.stage for s in steps)}")
    finished = [s.folder for s in steps if (out / s.folder).is_dir()]
    if finished and not (options.resume or options.force or options.from_stage):
        raise InputError(f"{out} already holds finished stages ({', '.join(finished)}); pass --resume to continue, --from STAGE to redo from a stage, or --force to start over")
    if options.force and not options.resume and not options.from_stage:
        for s in steps:
            # replaced one by one as the new run reaches them would mix runs; start over cleanly
            shutil.rmtree(out / s.folder, ignore_errors=True)


def _check_same_recipe(out: Path, state: dict, options: RunOptions) -> None:
    """Resuming under another profile, model or seed would mix two runs in one folder."""
    previous_file = out / "run.json"
    if not (options.resume and previous_file.is_file()):
        return
    previous = json.loads(previous_file.read_text())
    for key, now in (("profile", state["profile"]["sha256"]), ("model", state["model"]["spec"]), ("seed", state["seed"]), ("data", state["data"])):
        before = previous.get(key, {}).get("sha256") if key == "profile" else previous.get(key)
        if key == "model":
            before = previous.get("model", {}).get("spec")
        if before != now:
            raise InputError(f"{out} was started with another {key} ({before!r}, now {now!r}); resume with the same arguments, or pass --force to start over")


def _clear_from(out: Path, steps: list[Step], stage: str, log) -> None:
    names = [s.stage for s in steps]
    for s in steps[names.index(stage):]:
        if (out / s.folder).exists():
            log(f"--from {stage}: removing {s.folder}")
            shutil.rmtree(out / s.folder)


def _run_record(profile: Profile, options: RunOptions, steps: list[Step], where: str) -> dict:
    text = json.dumps(profile.model_dump(mode="json"), sort_keys=True)
    return {
        "vcompress": __version__,
        "profile": {"name": profile.name, "path": where if Path(where).is_file() else None,
                    "sha256": hashlib.sha256(text.encode()).hexdigest(), "data": profile.model_dump(mode="json")},
        "model": {"spec": options.model, "label": Path(options.model).name if options.model else "SmolLM2-135M-Instruct"},
        "seed": options.seed,
        "data": options.data,
        "git_commit": _git_commit(),
        "started": _now(),
        "finished": None,
        "stages": [{"name": s.stage, "folder": s.folder, "state": "pending", "seconds": None} for s in steps],
        "versions": versions(),
    }


def versions() -> dict:
    out = {"python": platform.python_version(), "vcompress": __version__}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "gptqmodel", "ai_edge_litert", "tensorrt"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:
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
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tee(log: Callable[[str], None], path: Path) -> Callable[[str], None]:
    def both(message: str) -> None:
        with open(path, "a") as f:
            f.write(f"{_now()} {message}\n")
        log(message)

    return both
