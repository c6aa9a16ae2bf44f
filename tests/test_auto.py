"""`vcompress run --auto`: candidate estimates and order, the recipe each candidate runs, the search."""

import json

import pytest
import yaml

from tests.test_pipeline import FULL, write_profile
from tests.tiny import build_model
from vcompress.auto import Candidate, candidate_profile, candidates, predicted_rise_pct
from vcompress.core.profiles import load_profile

SHAPE = {"layers": 4, "query_heads": 8, "kv_heads": 4, "head_dim": 16, "hidden_size": 128, "intermediate_size": 256}
CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "hidden_size": 128,
    "intermediate_size": 256,
    "vocab_size": 1000,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def scores(mask=None, quant=None) -> dict:
    return {
        "shape": SHAPE,
        "config": CONFIG,
        "heads": {"mask_loss_delta_nats": mask or [[0.01, 0.02, 0.3, 0.4]] * 4},
        "quant": {"loss_delta_nats": quant or [[0.001, -0.002]] * 4},
    }


def test_estimates_are_prune_autos_predictions_and_shrink_with_pruning_and_bits():
    """One predictor for --auto and prune auto: each candidate's size is budget.predict of the pruned config
    under the candidate's own profile (its bits, zero points and export tables)."""
    from vcompress.compress.prune_plan import predict, pruned_config

    profile = load_profile("x86-cpu")
    sizes = {(c.heads, c.bits): c.estimated_mb for c in candidates(scores(), profile)}
    assert sizes[(0, 4)] < sizes[(0, 8)] and sizes[(0.5, 4)] < sizes[(0.25, 4)] < sizes[(0, 4)]
    c = Candidate(0.25, 4)
    predicted = predict(pruned_config(CONFIG, kv_groups=1), candidate_profile(profile, c))["model_size_mb"]
    assert sizes[(0.25, 4)] == pytest.approx(predicted, abs=0.005)
    with pytest.raises(Exception, match="run it again"):
        candidates({k: v for k, v in scores().items() if k != "config"}, profile)


def test_prediction_sums_the_groups_the_pruner_would_remove():
    # removing one of four groups per layer takes the smallest delta (0.01) in each of 4 layers
    assert predicted_rise_pct(scores(), 0.25, 8) == pytest.approx(100 * (2.718281828**0.04 - 1), abs=0.01)
    # 4-bit adds the rounding losses (a negative one is noise and counts as zero)
    assert predicted_rise_pct(scores(), 0, 4) == pytest.approx(100 * (2.718281828**0.004 - 1), abs=0.01)
    assert predicted_rise_pct({"shape": SHAPE}, 0.25, 4) is None


def test_candidates_are_ordered_smallest_first_and_capped_at_half_the_groups():
    profile = load_profile("x86-cpu")
    found = candidates(scores(), profile)
    assert [c.estimated_mb for c in found] == sorted(c.estimated_mb for c in found)
    assert {c.heads for c in found} == {0.0, 0.25, 0.5} and {c.bits for c in found} == {4, 8}
    assert found[0].name == "heads0.50-int4"


def test_candidate_profile_sets_prune_and_bits_and_stays_valid():
    snapdragon = load_profile("snapdragon8g2")
    unpruned = candidate_profile(snapdragon, Candidate(0.0, 4))
    assert [s.stage for s in unpruned.recipe] == ["analyze", "quantize", "export", "validate"]
    assert unpruned.quantization.method == "gptq" and unpruned.quantization.bits == 4 and unpruned.target.quant == "int4"
    x86 = load_profile("x86-cpu")
    pruned = candidate_profile(x86, Candidate(0.5, 8))
    assert [s.stage for s in pruned.recipe] == ["analyze", "prune", "quantize", "export", "validate"]
    assert pruned.step("prune").settings["heads"] == 0.5
    assert pruned.quantization.method == "int8" and pruned.target.quant == "int8"
    assert "zero_point" not in pruned.step("quantize").settings
    assert candidate_profile(snapdragon, Candidate(0.5, 8)).step("prune").settings == {"heads": 0.5}  # the profile's auto gives way


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory, tokenizer):
    return build_model("llama", tmp_path_factory.mktemp("auto") / "llama", tokenizer, layers=2)


def _profile(path, **budgets):
    recipe = [dict(FULL[0], parts=["heads", "layers", "quant"]), *FULL[1:]]
    recipe = [dict(step, zero_point="float") if step["stage"] == "quantize" else step for step in recipe]
    write_profile(path, recipe)
    data = yaml.safe_load(path.read_text())
    data["budgets"].update(budgets)
    path.write_text(yaml.safe_dump(data))
    return path


def test_auto_runs_the_smallest_candidate_that_passes(cli, tmp_path, tiny_src):
    profile = _profile(
        tmp_path / "p.yaml",
        max_mmlu_drop_points=100,
        max_perplexity_rise_pct=1e9,
        min_answer_agreement=0,
        max_ttft_ms=1e6,
        min_decode_tokens_per_s=0.001,
    )
    code, out, err = cli("run", "--profile", profile, "--model", tiny_src, "--out", tmp_path / "R", "--auto")
    summary = json.loads((tmp_path / "R" / "auto.json").read_text())
    assert code == 0, err[-2000:]
    first = summary["candidates"][0]
    assert summary["winner"] == first["name"] == "heads0.50-int4" and first["status"] == "passed"
    assert all(c["status"] == "not needed" for c in summary["candidates"][1:])
    verdict = json.loads((tmp_path / "R" / summary["winner_folder"] / "06-validate" / "verdict.json").read_text())
    assert verdict["passed"] and "smallest passing artifact" in out
    pruned = json.loads((tmp_path / "R" / summary["winner_folder"] / "02-prune" / "config.json").read_text())
    assert pruned["num_key_value_heads"] == 1


def test_auto_skips_what_the_estimates_rule_out_and_exits_1(cli, tmp_path, tiny_src):
    profile = _profile(tmp_path / "p.yaml", max_model_size_mb=0.001, max_peak_ram_mb=2048)
    code, out, _ = cli("run", "--profile", profile, "--model", tiny_src, "--out", tmp_path / "R", "--auto")
    summary = json.loads((tmp_path / "R" / "auto.json").read_text())
    assert code == 1 and summary["winner"] is None and "no candidate passed" in out
    assert all(c["status"] == "skipped" and "estimated" in c["reason"] for c in summary["candidates"])
    assert (tmp_path / "R" / "01-analyze" / "sensitivity.json").is_file() and not (tmp_path / "R" / "candidates").exists()
    # the shared analysis ranks the linears on the grid of the profile's quantize step (a float zero point here),
    # as it does inside a plain run: on its own it would have taken the analyze defaults (group 128, integer zero)
    grid = yaml.safe_load((tmp_path / "R" / "01-analyze" / "recipe.yaml").read_text())["config"]
    assert (grid["zero_point"], grid["group_size"]) == ("float", 32)
