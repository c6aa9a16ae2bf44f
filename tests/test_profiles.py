import pytest
import yaml

from vcompress.core.errors import InputError
from vcompress.core.profiles import builtin_names, load_profile, parse_profile
from vcompress.pipeline import plan

BUILTIN = {"snapdragon8g2", "snapdragon8g3", "pixel8", "phone-4gb", "jetson-orin-nano", "raspberry-pi5", "x86-cpu"}


def good() -> dict:
    return yaml.safe_load(open(__file__.replace("tests/test_profiles.py", "profiles/x86-cpu.yaml")))


def test_builtin_profiles_load():
    assert BUILTIN <= set(builtin_names())
    for name in BUILTIN:
        p = load_profile(name)
        assert p.name == name
        assert p.device.memory_bandwidth_gbs > 0 and p.budgets.prompt_tokens > 0
        assert p.recipe[-1].stage == "validate"


def test_real_device_figures():
    assert load_profile("snapdragon8g2").device.memory_bandwidth_gbs == pytest.approx(67.2)
    # the phones' adb device runs LiteRT-LM on the CPU (XNNPACK): the CPU's figures, not the Adreno GPU's 3.5 TFLOP/s
    assert {load_profile(p).device.backend for p in ("snapdragon8g2", "snapdragon8g3", "pixel8", "phone-4gb", "raspberry-pi5")} == {"cpu"}
    assert load_profile("snapdragon8g2").device.peak_compute_gflops < 1000 and load_profile("jetson-orin-nano").device.backend == "cuda"
    assert load_profile("jetson-orin-nano").device.memory_bandwidth_gbs == pytest.approx(68)
    assert load_profile("raspberry-pi5").device.memory_bandwidth_gbs == pytest.approx(17.1)


# Qwen2.5-Coder-0.5B-Instruct's config.json (the second real model), as its GGUF converts
QWEN_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}


def test_phone_4gb_forces_the_second_model_to_shrink():
    """The size-forcing profile: Qwen2.5-Coder-0.5B misses its size budget unpruned (so prune auto has work
    and the analysis runs), and pruning can meet it."""
    from vcompress.compress.prune_plan import analysis_unneeded, predict, pruned_config

    profile = load_profile("phone-4gb")
    assert predict(QWEN_05B, profile)["model_size_mb"] > profile.budgets.max_model_size_mb
    assert analysis_unneeded(QWEN_05B, profile) is None
    assert predict(pruned_config(QWEN_05B, layers=8), profile)["model_size_mb"] < profile.budgets.max_model_size_mb


def test_profile_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**good(), "name": "mine"}))
    assert load_profile(str(path)).name == "mine"


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d["budgets"].update(max_ttft_msec=3), "unknown key 'budgets.max_ttft_msec'"),
        (lambda d: d["budgets"].update(max_ttft_ms=-5), "budgets.max_ttft_ms"),
        (lambda d: d["budgets"].pop("min_decode_tokens_per_s"), "missing field 'budgets.min_decode_tokens_per_s'"),
        (lambda d: d["budgets"].update(max_peak_ram_mb=100, max_model_size_mb=500), "must fit in RAM"),
        (lambda d: d["target"].update(runtime="litert"), "target.runtime 'litert'"),
        (lambda d: d.update(recipe=[{"stage": "export"}, {"stage": "quantize"}]), "out of order"),
        (lambda d: d["recipe"].insert(1, {"stage": "distill"}), "distillation needs a pruned student"),
        (lambda d: d["device"].update(prefill_efficiency=1.5), "device.prefill_efficiency"),
        (lambda d: d["device"].update(efficiency=0.6), "unknown key 'device.efficiency'"),  # one factor for both is gone
        (lambda d: d["device"].update(backend="dsp"), "device.backend"),
        (lambda d: d["device"].pop("family"), "missing field 'device.family'"),
        (lambda d: d["device"].update(estimate_band_pct={"ttft": 20, "decode": 0}), "device.estimate_band_pct.decode"),
    ],
)
def test_bad_profiles_name_the_key_and_file(change, words):
    data = good()
    change(data)
    with pytest.raises(InputError) as e:  # the schema, or the registered stages when the plan is made
        plan(parse_profile(yaml.safe_dump(data), "my.yaml"), "my.yaml")
    message = str(e.value)
    assert message.startswith("my.yaml: ") and words in message and "\n" not in message


def test_unknown_profile_lists_known():
    with pytest.raises(InputError, match="unknown profile 'iphone'.*x86-cpu"):
        load_profile("iphone")


def test_invalid_yaml_names_line():
    with pytest.raises(InputError, match=r"bad.yaml: line 2 is not valid YAML"):
        parse_profile("name: x\n  device: [\n", "bad.yaml")
