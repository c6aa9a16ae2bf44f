"""Device budget profiles: a pydantic schema, validated before any work starts.

A profile is the recipe: the target device (bandwidth and compute for the roofline estimate,
how to reach it), the export format, the quantization scheme, the budgets the verdict checks,
the MMLU subset to evaluate on, and which stages run with which settings.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Connection(BaseModel):
    """How the device is reached: `kind` names a registered device (DEVICES); the other keys are that device's
    own settings, checked by its settings model when a plan is made. No kind: nothing to reach, latency is estimated."""

    model_config = ConfigDict(extra="allow")
    kind: str | None = None

    @model_validator(mode="after")
    def _named(self) -> Connection:
        if self.kind is None and self.model_extra:
            raise ValueError(f"settings {sorted(self.model_extra)} name no device; add kind: <a registered device>")
        return self

    @property
    def settings(self) -> dict:
        return dict(self.model_extra or {})


WIDE_BAND_PCT = 50.0  # the stated band of an estimate calibrated on fewer than three published measurements


class EstimateBand(Strict):
    """How far a measurement may sit from the estimate, in % of the estimate, either side (devices/calibration.py
    derives it from the published measurements of the device's family and backend)."""

    # a measurement can sit several times above its estimate; a band of 100% or more leaves a pessimistic decode
    # speed of nothing (an estimate then never passes a speed budget: measure on the device)
    ttft: float = Field(WIDE_BAND_PCT, gt=0)
    decode: float = Field(WIDE_BAND_PCT, gt=0)


class Device(Strict):
    name: str
    soc: str | None = None
    family: str = Field(description="the SoC or board family its published measurements are filed under (devices/anchors.yaml)")
    backend: Literal["cpu", "gpu", "npu", "cuda"] = Field(description="the compute unit the profile's runtime actually runs the model on")
    memory_gb: float = Field(gt=0, description="RAM on the device")
    memory_bandwidth_gbs: float = Field(gt=0, description="peak DRAM bandwidth, GB/s")
    peak_compute_gflops: float = Field(gt=0, description="peak compute of the backend that runs the model, GFLOP/s")
    # The share of the compute roof prefill reaches and of the bandwidth roof decode reaches: fitted by
    # devices/calibration.py on the published measurements of this family and backend.
    prefill_efficiency: float = Field(0.65, gt=0, le=1)
    decode_efficiency: float = Field(0.65, gt=0, le=1)
    estimate_band_pct: EstimateBand = EstimateBand()
    threads: int | None = Field(None, gt=0)
    isa: list[str] | None = Field(
        None,
        description="CPU features the runtime's kernels use on the device (avx2, avx512_vnni, asimddp, i8mm...), as /proc/cpuinfo names them",
    )
    arch: Literal["aarch64", "x86_64"] | None = Field(
        None, description="the device's CPU architecture: an aarch64 one has its artifact checked on the aarch64 runtime, emulated"
    )
    connection: Connection = Connection()


class Target(Strict):
    # `format` names a registered exporter; `runtime`, when given, must be the one that exporter declares.
    # Both are checked against the registries when a plan is made (vcompress.pipeline.plan).
    format: str
    runtime: str | None = None
    quant: str = "none"  # the exporter's precision (none, int8, int4, fp16...), checked by its config


class Quantization(Strict):
    """The quantization scheme: a profile's `quantization`, whose defaults are quantize's and analyze's too."""

    method: Literal["gptq", "rtn", "int8", "none"] = "gptq"
    bits: Literal[4, 8, 16] = 4
    group_size: int = Field(128, gt=0)
    act_order: bool = False
    sym: bool = False
    zero_point: Literal["int", "float"] = "int"


DEFAULT_SCHEME = Quantization()


class Budgets(Strict):
    max_model_size_mb: float = Field(gt=0)
    max_peak_ram_mb: float = Field(gt=0)
    max_ttft_ms: float = Field(gt=0)
    prompt_tokens: int = Field(gt=0, description="prompt length the TTFT budget is stated at")
    min_decode_tokens_per_s: float = Field(gt=0)
    max_mmlu_drop_points: float = Field(ge=0, le=100)
    max_perplexity_rise_pct: float = Field(ge=0)
    min_answer_agreement: float = Field(ge=0, le=1)
    # top-1 agreement, over every position of a short text, of the artifact on the device's build of its runtime
    # (device.arch, emulated) with its float-activation reference: kernels differ by ISA (docs/emulated.md). None: not checked.
    min_target_isa_agreement: float | None = Field(None, ge=0, le=1)


class Evaluation(Strict):
    subset: str | list[str] = "medical"
    # Enough paired questions that the accuracy-drop interval decides a 2-point budget
    # (docs/accuracy.md, "Sizing: how many questions").
    per_subject: int | None = Field(100, gt=0)
    shots: int = Field(0, ge=0, le=5)
    seed: int = 0
    # letter: lm-eval's mmlu prompt, " A".." D" scored; cloze: lighteval's mmlu_cf, each answer's text scored
    # (small models answer the letter prompt near chance, SmolLM2-135M with "A" 79 times in 80).
    format: Literal["letter", "cloze"] = "letter"


class RecipeStep(BaseModel):
    # `stage` names a registered stage; it and the settings beyond it are validated by that stage's own
    # config when a plan is made (see vcompress.pipeline.plan).
    model_config = ConfigDict(extra="allow")
    stage: str

    @property
    def settings(self) -> dict:
        return dict(self.model_extra or {})


class Profile(Strict):
    name: str
    description: str = ""
    device: Device
    target: Target
    quantization: Quantization = Quantization()
    budgets: Budgets
    evaluation: Evaluation = Evaluation()
    recipe: list[RecipeStep]

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        b, d = self.budgets, self.device
        if b.max_peak_ram_mb < b.max_model_size_mb:
            raise ValueError(
                f"budgets.max_peak_ram_mb ({b.max_peak_ram_mb}) is below budgets.max_model_size_mb ({b.max_model_size_mb}): the model must fit in RAM"
            )
        if b.max_peak_ram_mb > d.memory_gb * 1024:
            raise ValueError(f"budgets.max_peak_ram_mb ({b.max_peak_ram_mb}) exceeds device.memory_gb ({d.memory_gb} GB)")
        stages = [s.stage for s in self.recipe]
        if not stages:
            raise ValueError("recipe is empty: list at least the export stage")
        if len(set(stages)) != len(stages):
            raise ValueError(f"recipe names a stage twice: {stages}")
        return self

    def step(self, stage: str) -> RecipeStep | None:
        return next((s for s in self.recipe if s.stage == stage), None)

    def quantization_for(self, settings: dict | None = None) -> Quantization:
        """The scheme the recipe quantizes with: `quantization` with the quantize step's own settings over it
        (`settings`: that step's settings with a command's overrides). Quantize, analyze and the prune planner
        read it, so a step that sets its own group size is seen by all three. Not validated here: the quantize
        stage's config checks the merged settings."""
        if settings is None:
            step = self.step("quantize")
            settings = step.settings if step else {}
        return self.quantization.model_copy(update={k: v for k, v in settings.items() if k in Quantization.model_fields})


def builtin_names() -> list[str]:
    folder = importlib.resources.files("vcompress.profiles")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A builtin profile by name, or a YAML file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        try:
            return parse_profile(path.read_text(encoding="utf-8"), str(path))
        except UnicodeDecodeError as e:
            raise InputError(f"{path} is not UTF-8 text (byte {e.start}); save the profile as UTF-8 YAML") from None
        except OSError as e:
            raise InputError(f"cannot read profile {path} ({e.strerror}); check the path and its permissions") from None
    if text.endswith((".yaml", ".yml")) or "/" in text:
        raise InputError(f"profile file {path} does not exist; pass an existing YAML file or one of: {', '.join(builtin_names())}")
    if text not in builtin_names():
        raise InputError(f"unknown profile {text!r}; choose one of: {', '.join(builtin_names())}, or pass a YAML file")
    resource = importlib.resources.files("vcompress.profiles") / f"{text}.yaml"
    return parse_profile(resource.read_text(), f"profiles/{text}.yaml")


def parse_profile(text: str, where: str) -> Profile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{where}:{line} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise InputError(
            f"{where}: a profile is a YAML mapping (name, device, target, budgets, recipe); see `vcompress profiles show x86-cpu`"
        )
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        raise InputError(f"{where}: {_describe(e)}") from None


def _describe(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key!r}; remove it or check its spelling"
    if kind == "missing":
        return f"missing field {key!r}; add it"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg}" if key != "(top level)" else msg
