"""Options shared by commands, so every command spells them the same way, and a stage's settings generated from its config."""

from __future__ import annotations

import functools
import importlib
import json
import types
import typing
from pathlib import Path

import click
from click.core import ParameterSource

from vcompress.core.units import MIB, UNIT


def intake_options(f):
    """The intake flags (--base, --allow-pickle, --trust-remote-code, --tokenizer), handed to the command as one
    `intake` (vcompress.core.models.Intake), so a flag added here reaches every stage without touching a command."""

    @functools.wraps(f)
    def with_intake(*args, base, allow_pickle, trust_remote_code, tokenizer, **kwargs):
        from vcompress.core.models import Intake  # here, not above: `--help` must not import torch

        intake = Intake(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, base=base, tokenizer=tokenizer)
        return f(*args, intake=intake, **kwargs)

    options = [
        click.option("--base", type=str, default=None, help="Base model of a LoRA adapter (else the adapter's base_model_name_or_path)."),
        click.option("--allow-pickle", is_flag=True, help="Accept pickle weights (.bin/.pt), which can run code when loaded."),
        click.option("--trust-remote-code", is_flag=True, help="Run the checkpoint's own model code (off by default)."),
        click.option(
            "--tokenizer",
            type=str,
            default=None,
            help="Folder of the tokenizer to use, for a checkpoint saved without its tokenizer files (else the checkpoint's own).",
        ),
    ]
    command = with_intake
    for option in reversed(options):
        command = option(command)
    return command


def model_options(f):
    """--model and the intake flags every command that reads a checkpoint takes (the command receives `model`, `intake`)."""
    f = intake_options(f)
    f = click.option(
        "--model",
        "model",
        type=str,
        default=None,
        help="HF folder, .gguf file, LoRA adapter folder or hf:org/name; default: the embedded SmolLM2-135M-Instruct.",
    )(f)
    return f


def out_option(required: bool = True):
    return click.option(
        "--out",
        type=click.Path(path_type=Path),
        required=required,
        help="Folder to write (written atomically; an existing one needs --force).",
    )


force_option = click.option("--force", is_flag=True, help="Replace an existing output folder (only after the new one is complete).")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random choice.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
mmlu_option = click.option(
    "--mmlu",
    type=str,
    default=None,
    help="MMLU copy: Hendrycks CSV folder, JSONL file or hf:cais/mmlu (default: $VCOMPRESS_MMLU, else the copy shipped with vcompress).",
)


def stage_options(f):
    """What every command that runs one stage on a checkpoint takes besides the stage's settings."""
    for option in (json_option, force_option, seed_option, out_option(), model_options):
        f = option(f)
    return f


def stage_command(name: str, config: str, exclude: tuple[str, ...] = ()):
    """`@click.command` for a stage whose settings are generated from its config model (see StageCommand)."""
    return click.command(name, cls=StageCommand, config=config, exclude=exclude)


def calibration_option(what: str = "Calibration text (JSONL/CSV/TXT)", flag: str = "--data"):
    """The calibration text a stage reads; without it, MMLU text outside the evaluated subset."""
    help_text = f"{what}; default: MMLU text outside the evaluated subset."
    return click.option(flag, "data", type=click.Path(dir_okay=False), default=None, help=help_text)


def subset_option(help_text: str):
    """--subset: the evaluated MMLU subset, by default the profiles' own default."""
    from vcompress.core.profiles import Evaluation

    return click.option("--subset", default=Evaluation().subset, show_default=True, help=help_text)


class RegistryChoice(click.ParamType):
    """A choice among the names of a registry (stages, exporters, devices), read when the option is used,
    so the registry stays the only place a name is written and `--help` does not import torch."""

    def __init__(self, registry: str):
        self.registry = registry  # "STAGES", "EXPORTERS" or "DEVICES" in vcompress.core.registry
        self.name = registry.lower()

    def names(self) -> list[str]:
        from vcompress import pipeline
        from vcompress.core import registry

        pipeline.load_stages()
        if self.registry == "DEVICES":
            import vcompress.devices  # noqa: F401  (registers the devices)
        return getattr(registry, self.registry).names()

    def get_metavar(self, param, ctx=None) -> str:
        return f"[{self.name.upper()}]"

    def convert(self, value, param, ctx):
        names = self.names()
        if value not in names:
            self.fail(f"{value!r} is not one of {', '.join(names)}", param, ctx)
        return value


def print_json(data) -> None:
    from vcompress.core.artifact import clean

    click.echo(json.dumps(clean(data), indent=2))


def make_console(stderr: bool = False):
    """A rich Console; when output is piped (CI logs, `| tee`) tables get 160 columns instead of
    rich's 80, which squeezed the wide ones into unreadable stacks."""
    import os
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, width=width)


def execute_stage(stage, out, summary, *, model, intake, as_json, **kwargs) -> None:
    """Run one stage for a command: its log on stderr (silent under --json), the intake flags passed on; then
    its metrics as JSON (--json) or `summary(out, metrics)`'s lines."""
    from vcompress.core.stage import execute
    from vcompress.progress import progress_bars

    log = (lambda _: None) if as_json else (lambda msg: click.echo(msg, err=True))
    intake.check(model)  # a bad --model or tokenizer fails before any work
    with progress_bars(quiet=as_json) as progress:
        metrics = execute(stage, out, source=model, log=log, intake=intake, progress=progress, **kwargs)
    if as_json:
        print_json(metrics)
    else:
        summary(out, metrics)


def echo_export(out, metrics: dict, fp32_what: str) -> None:
    """The two lines every export command prints: size against fp32, and the parity check."""
    p, quant = metrics["parity"], metrics["quant"]
    click.echo(f"wrote {out} ({quant}): {metrics['model_bytes'] / MIB:.1f} {UNIT}, {metrics['size_ratio_to_fp32']:.1%} of {fp32_what}")
    click.echo(
        f"parity on {p['prompts']} prompts: max |logit diff| {p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.3f}, "
        f"greedy {p['greedy_tokens']} tokens identical on {p['greedy_identical']}/{p['prompts']}"
    )


# --- options generated from a stage's config model ----------------------------------------------------------
# A stage's pydantic Config is the one place its settings are declared: name, type, default and help. A
# StageCommand turns each field into an option (`group_size` -> `--group-size`) when Click first asks for its
# options, so `vcompress --help` imports no stage (and no torch). A field's `json_schema_extra` may give the
# option another name (`{"option": "min-agreement"}`), fixed choices (`{"choices": [2, 4, 8]}`) or a registry
# (`{"registry": "DEVICES"}`).


class ConfigOption(click.Option):
    """An option made from a config field; `field` names the field, `values` maps a choice back to its value."""

    def __init__(self, decls, *, field: str, values: dict | None = None, **kwargs):
        super().__init__(decls, **kwargs)
        self.field = field
        self.values = values or {}

    def setting(self, value):
        if self.multiple:
            return [self.values.get(v, v) for v in value]
        return self.values.get(value, value)


class StageCommand(click.Command):
    """A command whose options include its stage's settings, generated from `config` ("module:Attr.Path" to the
    pydantic model) less `exclude`. The callback receives `settings`: only the values given on the command
    line, so a profile's or a recipe's own values are not replaced by defaults."""

    def __init__(self, *args, config: str, exclude: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.config_path, self.exclude, self.generated = config, exclude, False

    @property
    def config(self) -> type:
        module, _, attrs = self.config_path.partition(":")
        found = importlib.import_module(module)
        for attr in attrs.split("."):
            found = getattr(found, attr)
        return found

    def get_params(self, ctx):
        if not self.generated:
            after = next((i + 1 for i, p in reversed(list(enumerate(self.params))) if p.name in ("model", "out")), 0)
            self.params[after:after] = config_options(self.config, self.exclude)
            self.generated = True
        return super().get_params(ctx)

    def invoke(self, ctx):
        settings = {}
        for param in self.get_params(ctx):
            if isinstance(param, ConfigOption):
                value = ctx.params.pop(param.name)
                if ctx.get_parameter_source(param.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
                    settings[param.field] = param.setting(value)
        ctx.params["settings"] = settings
        return super().invoke(ctx)


def config_options(model, exclude: tuple[str, ...] = ()) -> list[ConfigOption]:
    """One option per field of a pydantic model, in the model's order, less the excluded fields."""
    unknown = set(exclude) - set(model.model_fields)
    if unknown:
        raise ValueError(f"{model.__name__} has no field {sorted(unknown)} to exclude")
    return [_field_option(name, field) for name, field in model.model_fields.items() if name not in exclude]


def _field_option(name: str, field) -> ConfigOption:
    hints = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    flag = "--" + hints.get("option", name).replace("_", "-")
    default = field.get_default(call_default_factory=True)
    kwargs = {"help": _sentence(field.description), "show_default": True, "default": default}
    kwargs.update(_option_type(name, _unwrap_optional(field.annotation), hints, default))
    values = kwargs.pop("values", None)
    if kwargs.pop("secondary", False):
        flag = f"{flag}/--no-{flag[2:]}"
    return ConfigOption([flag, name], field=name, values=values, **kwargs)


def _sentence(description: str | None) -> str | None:
    """A field's description as help: capitalized unless it starts with a name (fp32, int4, sensitivity.json)."""
    if not description:
        return None
    first = description.split(" ", 1)[0].rstrip(":,;")
    return description[:1].upper() + description[1:] if first.replace("-", "").isalpha() else description


def _unwrap_optional(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else annotation


def _option_type(name: str, annotation, hints: dict, default) -> dict:
    """Click's type (and flag, multiple) for a field's type; choices that are not strings map back to values."""
    if "registry" in hints:
        return {"type": RegistryChoice(hints["registry"])}
    origin = typing.get_origin(annotation)
    if origin is list:
        inner = _option_type(name, typing.get_args(annotation)[0], hints, None)
        return {**inner, "multiple": True, "default": tuple(str(v) for v in default or ())}
    choices = hints.get("choices") or (typing.get_args(annotation) if origin is typing.Literal else None)
    if choices:
        values = {str(v): v for v in choices}
        return {"type": click.Choice(list(values)), "values": values, "default": None if default is None else str(default)}
    if annotation is bool:
        return {"is_flag": True, "secondary": bool(default)}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"setting {name!r} of type {annotation} has no command-line form; exclude it from the command")
