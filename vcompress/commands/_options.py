"""Options shared by commands, so every command spells them the same way."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

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
stream_option = click.option(
    "--stream",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Read one decoder layer at a time from disk and drop it after (auto: when the model would not fit in memory).",
)
mmlu_option = click.option(
    "--mmlu",
    type=str,
    default=None,
    help="MMLU copy: Hendrycks CSV folder, JSONL file or hf:cais/mmlu (default: $VCOMPRESS_MMLU, else the copy shipped with vcompress).",
)


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


def execute_stage(stage, out, *, model, intake, as_json, **kwargs) -> dict:
    """Run one stage for a command: its log on stderr (silent under --json), the intake flags passed on."""
    from vcompress.core.stage import execute
    from vcompress.progress import progress_bars

    log = (lambda _: None) if as_json else (lambda msg: click.echo(msg, err=True))
    intake.check(model)  # a bad --model or tokenizer fails before any work
    with progress_bars(quiet=as_json) as progress:
        return execute(stage, out, source=model, log=log, intake=intake, progress=progress, **kwargs)


def echo_export(out, quant: str, metrics: dict, fp32_what: str) -> None:
    """The two lines every export command prints: size against fp32, and the parity check."""
    p = metrics["parity"]
    click.echo(f"wrote {out} ({quant}): {metrics['model_bytes'] / MIB:.1f} {UNIT}, {metrics['size_ratio_to_fp32']:.1%} of {fp32_what}")
    click.echo(
        f"parity on {p['prompts']} prompts: max |logit diff| {p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.3f}, "
        f"greedy {p['greedy_tokens']} tokens identical on {p['greedy_identical']}/{p['prompts']}"
    )
