"""One lifecycle for every stage: validate the config, run into a temp folder, save recipe and metrics.

A stage is registered under its `name` when its class declares its `folder` (its place on the road),
has a pydantic `Config` that rejects unknown keys, and implements `run(ctx) -> metrics`. `execute` owns the folder contract.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .artifact import stage_folder, write_metrics, write_recipe
from .errors import InputError
from .models import Intake, ModelSource, tokenizer_note, tokenizer_record
from .profiles import Profile
from .registry import STAGES
from .seeding import seeded


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


# progress(label, done, total): a stage reports how far a long loop is; the CLI draws it (once, in
# one place). `done == total` ends that label's bar.
Progress = Callable[[str, int, int], None]


def no_progress(label: str, done: int, total: int) -> None:
    pass


def track(items, label: str, progress: Progress, total: int | None = None):
    """Iterate `items`, reporting each one done to `progress`."""
    items = list(items) if total is None else items
    total = len(items) if total is None else total
    progress(label, 0, total)
    for done, item in enumerate(items, 1):
        yield item
        progress(label, done, total)


@dataclass
class StageContext:
    source: str | Path | None  # the input model / artifact folder (None: the embedded default)
    out: Path  # the temp folder the stage writes into; renamed into place when run() returns
    work: Path  # scratch that survives a crash (checkpoints for --resume); removed on success
    seed: int = 0
    reference: str | Path | None = None  # the uncompressed model, for agreement and drop figures
    data: str | Path | None = None  # the user's domain file
    mmlu: str | Path | None = None
    subset: str | list[str] = "medical"  # the evaluated MMLU subset (calibration text avoids it)
    resume: bool = False
    log: Callable[[str], None] = print
    progress: Progress = no_progress
    intake: Intake = field(default_factory=Intake)  # how source and reference are loaded
    profile: Profile | None = None  # the run's profile (validate reads budgets and device from it)
    tokenizer_used: dict | None = None  # which tokenizer the source was read with: metrics.json `tokenizer` (path, sha256)

    def load(self, spec="source", **kwargs):
        """(model, tokenizer) of the source (or of `spec`), with the command's intake flags."""
        return self.intake.load(self.read_source() if spec == "source" else spec, **kwargs)

    def load_tokenizer(self):
        """The tokenizer of the source alone (a streamed stage reads the weights itself)."""
        return self.intake.load_tokenizer(self.read_source())

    def read_source(self) -> ModelSource:
        """The source resolved with the intake flags; the first read records (and says) which tokenizer it takes."""
        source = self.intake.resolve(self.source)
        if self.tokenizer_used is None:
            if note := tokenizer_note(source):
                self.log(note)
            self.tokenizer_used = tokenizer_record(source)
        return source


class Stage:
    name: ClassVar[str]
    # The stage's folder in a run; its number is the stage's place on the full road (so `04-quantize` means
    # the same in every run) and fixes the order in which a recipe may list stages.
    folder: ClassVar[str]
    # What the stage's folder is for the next stages: "model" (their input model), "analysis" (the scores
    # later stages rank by) or "" (nothing they read).
    produces: ClassVar[str] = "model"
    Config: ClassVar[type[StageConfig]] = StageConfig
    # A recipe step this stage cannot do without, and why: (stage name, reason); checked before any work starts.
    needs: ClassVar[tuple[str, str] | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "folder" in cls.__dict__:  # a step of the road, which a recipe names; helpers and bases are not
            STAGES.register(cls.name)(cls)

    def __init__(self, config: StageConfig | dict | None = None):
        self.config = self.parse_config(config or {})

    @classmethod
    def from_profile(cls, settings: dict, profile: Profile, where: str | None = None) -> Stage:
        """The stage for a profile's recipe step: its settings parsed (and checked against the profile) before
        any work starts. A stage whose defaults come from the profile (the quantization scheme, the target
        format, the device) overrides this."""
        if cls.needs and profile.step(cls.needs[0]) is None:
            raise InputError(f"{where}: {cls.needs[1]}; add a {cls.needs[0]} step before it")
        return cls(cls.parse_config(settings, where))

    @property
    def run_folder(self) -> str:
        return self.folder

    @classmethod
    def parse_config(cls, config: StageConfig | dict, where: str | None = None) -> StageConfig:
        if isinstance(config, cls.Config):
            return config
        try:
            return cls.Config.model_validate(config)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            prefix = f"{where}: " if where else ""
            if err["type"] == "extra_forbidden":
                known = ", ".join(cls.Config.model_fields)
                raise InputError(f"{prefix}unknown {cls.name} setting {key!r}; known: {known}") from None
            if not key:  # a check across settings (a model validator): its own message says which
                raise InputError(f"{prefix}{cls.name}: {err['msg'].removeprefix('Value error, ')}") from None
            raise InputError(f"{prefix}{cls.name} setting {key!r}: {err['msg']}") from None

    def run(self, ctx: StageContext) -> dict:
        raise NotImplementedError


def execute(stage: Stage, out: Path | str, *, source=None, force: bool = False, **context) -> dict:
    """Run a stage into `out` atomically and write recipe.yaml and metrics.json beside its artifact."""
    out = Path(out)
    work = out.parent / f".{out.name}.work"
    started = time.time()
    try:
        with stage_folder(out, force=force) as tmp:
            work.mkdir(parents=True, exist_ok=True)
            ctx = StageContext(source=source, out=tmp, work=work, **context)
            with seeded(ctx.seed):
                metrics = stage.run(ctx)
            metrics = {"stage": stage.name, **metrics, "tokenizer": ctx.tokenizer_used, "seconds": round(time.time() - started, 2)}
            write_recipe(
                tmp,
                stage.name,
                stage.config.model_dump(mode="json"),
                source=str(source) if source else "default",
                seed=ctx.seed,
                data=ctx.data,
                reference=ctx.reference,
            )
            write_metrics(tmp, metrics)
    except BaseException:
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()  # nothing to resume from: leave no trace
        raise
    shutil.rmtree(work, ignore_errors=True)
    return metrics
