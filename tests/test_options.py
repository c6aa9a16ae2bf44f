"""Stage commands take their settings from the stage's config model: one declaration, the same defaults in --help."""

from typing import Literal

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field

from vcompress.commands._options import ConfigOption, StageCommand, stage_command
from vcompress.core.profiles import load_profile
from vcompress.core.roofline_math import shapes


def _cli():
    from vcompress.cli import _add_commands, cli

    _add_commands()
    return cli


def _stage_commands():
    """(registered stage class, its command) for every stage and exporter that ships with vcompress."""
    from vcompress import pipeline
    from vcompress.core.registry import EXPORTERS, STAGES

    pipeline.load_stages()
    cli = _cli()
    pairs = []
    for registry, group in ((STAGES, cli), (EXPORTERS, cli.commands["export"])):
        for name in registry.names():
            stage = registry.get(name)
            command = group.commands.get(name)
            if not stage.__module__.startswith("vcompress.") or isinstance(command, click.Group):
                continue  # a test plugin's exporter, or the export group (its formats are the exporters)
            pairs.append((stage, command))
    return pairs


def _shown_default(value) -> str | None:
    """What --help shows for a field's default: nothing for None and for an unset flag."""
    if value is None or value is False:
        return None
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def test_every_stage_command_shows_its_config_defaults():
    pairs = _stage_commands()
    assert {stage.name for stage, _ in pairs} >= {"analyze", "prune", "distill", "quantize", "validate", "export"}
    for stage, command in pairs:
        assert isinstance(command, StageCommand), stage.name
        assert command.config is stage.Config, stage.name
        ctx = click.Context(command, info_name=stage.name)
        options = {p.field: p for p in command.get_params(ctx) if isinstance(p, ConfigOption)}
        assert set(options) == set(stage.Config.model_fields) - set(command.exclude), stage.name
        for name, option in options.items():
            default = stage.Config.model_fields[name].get_default(call_default_factory=True)
            help_text = option.get_help_record(ctx)[1]
            shown = _shown_default(default)
            where = f"{stage.name} --{name}"
            if shown is None:
                assert "[default:" not in help_text, where
            else:
                assert f"[default: {shown}]" in help_text, where
            assert option.setting(option.default) == default, where  # the default parses back to the field's value


class Toy(BaseModel):
    group_size: int = Field(128, gt=0, description="weights per scale")
    bits: Literal[2, 4, 8] = 4
    sym: bool = False
    parts: list[Literal["heads", "mlp"]] = ["heads", "mlp"]
    threads: int | None = None
    min_top1_quantized: float = Field(0.5, json_schema_extra={"option": "min-agreement"})
    connection: dict = {}


@stage_command("toy", config=f"{__name__}:Toy", exclude=("connection",))
@click.option("--out", default="x")
def toy_command(settings, out):
    click.echo(repr(sorted(settings.items())))


@pytest.mark.parametrize(
    "args, settings",
    [
        ([], {}),  # nothing given: the model's (or a profile's) own values stay
        (["--group-size", "64", "--sym"], {"group_size": 64, "sym": True}),
        (["--bits", "8", "--parts", "mlp"], {"bits": 8, "parts": ["mlp"]}),
        (["--min-agreement", "0.75", "--threads", "2"], {"min_top1_quantized": 0.75, "threads": 2}),
        (["--group-size", "128"], {"group_size": 128}),  # given, even if equal to the default
    ],
)
def test_only_settings_given_on_the_command_line_reach_the_stage(args, settings):
    result = CliRunner().invoke(toy_command, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == repr(sorted(settings.items()))
    Toy.model_validate(settings)


def test_help_names_the_choices_and_a_renamed_option():
    result = CliRunner().invoke(toy_command, ["--help"])
    assert "--bits [2|4|8]" in result.output and "--min-agreement FLOAT" in result.output
    assert "--min-top1-quantized" not in result.output and "--connection" not in result.output
    assert "Weights per scale  [default: 128]" in result.output
    assert CliRunner().invoke(toy_command, ["--bits", "3"]).exit_code == 2


def test_a_setting_without_a_command_line_form_must_be_excluded():
    command = stage_command("toy", config=f"{__name__}:Toy")(lambda settings: None)
    with pytest.raises(TypeError, match="connection"):
        command.get_params(click.Context(command))


def test_quantize_analyze_and_the_prune_planner_read_the_step_group_size():
    from vcompress.compress.prune_plan import channel_step, predicted_weights
    from vcompress.compress.quantize import Quantize
    from vcompress.compress.sensitivity import Analyze

    profile = load_profile("x86-cpu")  # quantization.group_size 32; its quantize step sets zero_point float
    data = profile.model_dump(mode="json")
    next(s for s in data["recipe"] if s["stage"] == "quantize")["group_size"] = 128
    overridden = type(profile).model_validate(data)
    assert (profile.quantization_for().group_size, overridden.quantization_for().group_size) == (32, 128)
    assert overridden.quantization_for().zero_point == "float"
    step = overridden.step("quantize").settings
    assert Quantize.from_profile(step, overridden).config.group_size == 128
    assert Analyze.from_profile({}, overridden).config.group_size == 128
    assert (channel_step(1536 + 64, profile), channel_step(1536 + 64, overridden)) == (32, 1600 // 16)
    config = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30}
    config |= {"num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
    fine, coarse = (predicted_weights(shapes(config), p)["stored_bytes"] for p in (profile, overridden))
    assert coarse < fine  # a scale per 128 weights stores less than one per 32
