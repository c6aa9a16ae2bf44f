"""Structured pruning: the intended KV groups / MLP channels / layers go, and the result is a standard checkpoint."""

from __future__ import annotations

import copy
import json
import math

import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import build_config, random_model
from vcompress.compress._arch import attention, attention_out, decoder_layers, group_heads, head_rows, shape
from vcompress.compress._heads import keep_kv_groups
from vcompress.compress.prune import Prune, drop_layers, make_plan, prune_mlp_channels
from vcompress.core.errors import InputError
from vcompress.core.stage import execute

FAST = {"samples": 2, "seq_len": 32, "heldout_blocks": 2, "heldout_seq_len": 32, "eval_per_subject": 0}


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory, tokenizer):
    """6 query heads sharing 3 KV heads, 4 layers: enough groups and layers to choose from."""
    config = build_config("llama", len(tokenizer), layers=4)
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 96, 6, 3
    model = random_model(config, 1)
    out = tmp_path_factory.mktemp("gqa") / "llama-6q3kv"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


IDS = torch.arange(3, 27).view(2, 12)


def zero_group(model, layer_index: int, group: int) -> None:
    """Zero the o_proj input columns of a KV group's query heads: its whole contribution."""
    info = shape(model)
    columns = head_rows(group_heads(group, info["query_heads"], info["kv_heads"]), info["head_dim"])
    with torch.no_grad():
        attention_out(decoder_layers(model)[layer_index]).weight[:, columns] = 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gqa"])
@pytest.mark.parametrize("group", [0, 1])
def test_removing_a_kv_group_equals_zeroing_its_contribution(arch, group, tiny_models, gqa_llama):
    path = gqa_llama if arch == "gqa" else tiny_models[arch]
    original = load(path)
    info = shape(original)
    zeroed, pruned = copy.deepcopy(original), copy.deepcopy(original)
    zero_group(zeroed, 1, group)
    keep = [g for g in range(info["kv_heads"]) if g != group]
    queries = keep_kv_groups(
        attention(decoder_layers(pruned)[1]), keep, query_heads=info["query_heads"], kv_heads=info["kv_heads"], head_dim=info["head_dim"]
    )
    per = info["query_heads"] // info["kv_heads"]
    assert queries == [g * per + j for g in keep for j in range(per)]
    attn = attention(decoder_layers(pruned)[1])
    assert attn.q_proj.weight.shape == (len(queries) * info["head_dim"], info["hidden_size"])
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (len(keep) * info["head_dim"], info["hidden_size"])
    assert attn.o_proj.weight.shape == (info["hidden_size"], len(queries) * info["head_dim"])
    if attn.q_proj.bias is not None:  # qwen2 has q/k/v biases
        assert attn.q_proj.bias.shape == (len(queries) * info["head_dim"],)
    assert torch.allclose(logits(zeroed, IDS), logits(pruned, IDS), atol=1e-5)
    assert not torch.allclose(logits(original, IDS), logits(pruned, IDS), atol=1e-3)  # the group did matter


def test_keep_kv_groups_rejects_bad_groups(tiny_llama):
    attn = attention(decoder_layers(load(tiny_llama))[0])
    for keep in ([], [2], [0, 0], [-1]):
        with pytest.raises(ValueError):
            keep_kv_groups(attn, keep, query_heads=4, kv_heads=2, head_dim=16)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_removing_mlp_channels_equals_zeroing_them(arch, tiny_models):
    original = load(tiny_models[arch])
    channels = [0, 3, 17, 40]
    zeroed, pruned = copy.deepcopy(original), copy.deepcopy(original)
    layer = decoder_layers(zeroed)[0]
    with torch.no_grad():
        if arch == "gpt2":
            layer.mlp.c_proj.weight[channels, :] = 0  # Conv1D: [in, out]
        else:
            layer.mlp.down_proj.weight[:, channels] = 0
    method = prune_mlp_channels(pruned, {0: channels})
    assert method.startswith("torch-pruning") == (arch != "gpt2")
    inner = shape(original)["intermediate_size"]
    assert shape(pruned)["intermediate_size"] == inner - len(channels)
    assert shape(pruned)["layers"] == 2 and decoder_layers(pruned)[1].mlp is not None
    assert torch.allclose(logits(zeroed, IDS), logits(pruned, IDS), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_dropping_a_layer_equals_zeroing_its_outputs(arch, tiny_models):
    original = load(tiny_models[arch])
    zeroed, pruned = copy.deepcopy(original), copy.deepcopy(original)
    layer = decoder_layers(zeroed)[0]
    down = layer.mlp.c_proj if arch == "gpt2" else layer.mlp.down_proj
    with torch.no_grad():  # residual only: the layer becomes the identity
        for module in (attention_out(layer), down):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    drop_layers(pruned, [1])
    assert len(decoder_layers(pruned)) == 1
    assert all(m.layer_idx == 0 for m in decoder_layers(pruned)[0].modules() if hasattr(m, "layer_idx"))
    pruned.config.num_hidden_layers = 1
    assert torch.allclose(logits(zeroed, IDS), logits(pruned, IDS), atol=1e-5)


@pytest.mark.parametrize("arch", ["gqa", "qwen2", "gpt2"])
def test_a_masked_plan_computes_what_the_cut_model_does_and_is_restored(arch, tiny_models, gqa_llama):
    """prune auto measures each candidate with the removed parts zeroed in place instead of a cut copy."""
    from vcompress.compress.prune import Plan, apply_plan, plan_masked

    model = load(gqa_llama if arch == "gqa" else tiny_models[arch])
    info = shape(model)
    keep = list(range(1, info["layers"]))  # layer 0 goes
    groups = {i: list(range(1, info["kv_heads"])) if arch == "gqa" else list(range(info["kv_heads"])) for i in keep}
    plan = Plan(keep, groups, {i: [0, 5, 9] for i in keep})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with plan_masked(model, plan):
        masked = logits(model, IDS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    cut = copy.deepcopy(model)
    apply_plan(cut, plan)
    assert shape(cut)["layers"] == info["layers"] - 1
    assert torch.allclose(masked, logits(cut, IDS), atol=1e-5) and not torch.allclose(masked, logits(model, IDS), atol=1e-3)


def fake_scores(info: dict, *, weak_group: int, weak_layer: int) -> dict:
    """Scores that make one KV group per layer and one layer the least important."""
    layers, kv, inner = info["layers"], info["kv_heads"], info["intermediate_size"]
    return {
        "shape": info,
        "heads": {
            "mask_loss_delta_nats": [[0.0 if g == weak_group else 1.0 + g for g in range(kv)] for _ in range(layers)],
            "taylor_kv_group": [[1.0] * kv for _ in range(layers)],
        },
        "layers": {"skip_loss_delta_nats": [0.0 if i == weak_layer else 1.0 for i in range(layers)], "angular_distance": [0.5] * layers},
        "mlp": {"taylor_channel": [[float(c) for c in range(inner)] for _ in range(layers)]},
    }


def test_prune_stage_removes_the_ranked_groups_and_layer(gqa_llama, tmp_path, tokenizer, mmlu_root):
    original = load(gqa_llama)
    info = shape(original)
    scores = tmp_path / "sensitivity.json"
    scores.write_text(json.dumps(fake_scores(info, weak_group=1, weak_layer=2)))
    metrics = execute(
        Prune({"heads": 0.33, "layers": 1, "scores": str(scores), **FAST, "eval_per_subject": 1}),
        tmp_path / "p",
        source=str(gqa_llama),
        mmlu=mmlu_root,
        log=lambda _: None,
    )

    pruned = load(tmp_path / "p")
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.num_hidden_layers) == (4, 2, 16, 3)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["head_dim"] == 16
    assert metrics["layers"]["dropped"] == [2]
    assert [row["kv_groups"] for row in metrics["heads"]["kept_per_layer"]] == [[0, 2]] * 3
    assert metrics["heads"]["kept_per_layer"][0]["query_heads"] == [0, 1, 4, 5]
    assert [row["source_layer"] for row in metrics["heads"]["kept_per_layer"]] == [0, 1, 3]
    assert metrics["parameters_after"] < metrics["parameters_before"]
    assert metrics["weights_bytes_after"] < metrics["weights_bytes_before"]
    assert metrics["perplexity"]["reference"] > 0 and metrics["perplexity"]["student"] > 0 and metrics["tokens"] == 2 * 31
    assert 0 < metrics["top1_agreement"] < 1 and metrics["kl_mean"] > 0
    assert metrics["questions"] == 8 and 0 <= metrics["answer_agreement"] <= 1  # one per medical subject
    assert metrics["reload_max_abs_logit_diff"] < 1e-4

    # the proof end to end: the original with group 1 zeroed everywhere and layer 2's outputs zeroed
    for i in range(info["layers"]):
        zero_group(original, i, 1)
    with torch.no_grad():
        layer = decoder_layers(original)[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    assert torch.allclose(logits(original, IDS), logits(pruned, IDS), atol=1e-5)
    generated = pruned.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    assert AutoTokenizer.from_pretrained(tmp_path / "p").decode(generated[0])


def test_prune_stage_on_each_architecture(tiny_model, tmp_path):
    before = load(tiny_model)
    gpt2 = before.config.model_type == "gpt2"
    config = {"heads": 0.0 if gpt2 else 0.5, "mlp": 0.25, "layers": 1, **FAST}
    metrics = execute(Prune(config), tmp_path / "p", source=str(tiny_model), log=lambda _: None)
    after = load(tmp_path / "p")
    info, new = shape(before), shape(after)
    assert new["layers"] == info["layers"] - 1 == after.config.num_hidden_layers
    assert new["intermediate_size"] == info["intermediate_size"] * 3 // 4
    assert new["kv_heads"] == (info["kv_heads"] if gpt2 else info["kv_heads"] // 2)
    assert type(after.config) is type(before.config)
    if not gpt2:
        assert after.config.head_dim == info["head_dim"]
    assert metrics["mlp"]["intermediate_size"] == [info["intermediate_size"], new["intermediate_size"]]
    assert after.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)
    assert metrics["scores"] == "computed here"


def test_rounding_to_whole_groups_is_reported():
    info = {"layers": 2, "query_heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate_size": 10}
    scores = fake_scores(info, weak_group=0, weak_layer=0)
    plan = make_plan(scores, info, heads=0.33, mlp=0.25)
    assert plan.keep_groups == {0: [1], 1: [1]}
    assert len(plan.drop_channels[0]) == 2 and plan.drop_channels[0] == [0, 1]  # lowest Taylor first
    assert any("0.66" in note for note in plan.notes) and any("2.50" in note for note in plan.notes)
    assert "rounds to 0" in make_plan(scores, info, heads=0.2).notes[-1]
    with pytest.raises(InputError, match="all 2 KV groups"):
        make_plan(scores, info, heads=0.9)
    with pytest.raises(InputError, match="drop at most 1"):
        make_plan(scores, info, layers=2)


def test_cli_prune_json_and_errors(cli, tiny_models, tmp_path):
    code, out, _ = cli(
        "prune", "--model", tiny_models["llama"], "--mlp", "0.5", "--samples", "2", "--seq-len", "32", "--out", tmp_path / "p", "--json"
    )
    assert code == 0
    assert json.loads(out)["mlp"]["intermediate_size"] == [128, 64]
    code, _, err = cli("prune", "--model", tiny_models["gpt2"], "--heads", "0.5", "--out", tmp_path / "g")
    assert code == 2 and "GPT-2" in err and err.count("\n") == 1
    code, _, err = cli("prune", "--model", tiny_models["llama"], "--out", tmp_path / "n")
    assert code == 2 and "nothing to prune" in err
    code, _, err = cli("prune", "--model", tiny_models["llama"], "--heads", "1.5", "--out", tmp_path / "n")
    assert code == 2 and "heads" in err
    assert not (tmp_path / "g").exists() and not (tmp_path / "n").exists()


def test_scores_for_another_model_are_refused(cli, tiny_models, tmp_path):
    info = shape(load(tiny_models["llama"]))
    scores = tmp_path / "sensitivity.json"
    scores.write_text(json.dumps(fake_scores({**info, "layers": 5}, weak_group=0, weak_layer=0)))
    code, _, err = cli("prune", "--model", tiny_models["llama"], "--heads", "0.5", "--scores", scores, "--out", tmp_path / "p")
    assert code == 2 and "layers=5" in err


def test_unsupported_architecture_is_refused(cli, tmp_path, tokenizer):
    from transformers import MistralConfig

    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    code, _, err = cli("prune", "--model", tmp_path / "mistral", "--heads", "0.5", "--out", tmp_path / "p")
    assert code == 2 and "mistral" in err and "supported: llama, qwen2, gpt2" in err


def test_a_config_that_would_not_reload_is_refused_before_cutting(tokenizer):
    from vcompress.compress.prune import check_config

    config = build_config("llama", len(tokenizer))  # hidden 64
    check_config(config, {"num_attention_heads": 2, "num_key_value_heads": 1})
    with pytest.raises(InputError, match="would not reload"):
        check_config(config, {"num_attention_heads": 3, "num_key_value_heads": 1})


# --- budget-driven pruning (auto) -------------------------------------------------------


def with_budgets(name: str, **budgets):
    from vcompress.core.profiles import load_profile

    profile = load_profile(name)
    return profile.model_copy(update={"budgets": profile.budgets.model_copy(update=budgets)})


def mid_config(tokenizer) -> dict:
    """A Llama big enough that layers, KV groups and MLP steps differ in bytes: 8 layers, 8/4 heads."""
    config = build_config("llama", 4096, layers=8)
    config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim = (
        256,
        1024,
        8,
        4,
        32,
    )
    return config.to_dict()


def mid_scores(info: dict) -> dict:
    """Layer 5 nearly free to skip, the other layers and the KV groups costly, MLP channels cheap per byte."""
    scores = fake_scores(info, weak_group=1, weak_layer=5)
    scores["layers"]["skip_loss_delta_nats"] = [0.001 if i == 5 else 5.0 for i in range(info["layers"])]
    scores["heads"]["mask_loss_delta_nats"] = [[0.2 + 0.1 * g for g in range(info["kv_heads"])] for _ in range(info["layers"])]
    scores["mlp"]["taylor_channel"] = [[1e-5 * c for c in range(info["intermediate_size"])] for _ in range(info["layers"])]
    return scores


def test_prune_plan_prunes_nothing_when_the_budgets_are_met(tokenizer):
    from vcompress.compress.prune_plan import plan_pruning
    from vcompress.core.profiles import load_profile

    def no_scores():
        raise AssertionError("scores are not needed when nothing goes")

    plan = plan_pruning(mid_config(tokenizer), load_profile("snapdragon8g2"), no_scores)
    assert not plan.removes_anything and plan.steps == [] and plan.after == plan.before
    assert "meets every budget" in plan.reason and plan.to_json()["prunes"] is False


def test_prune_plan_weighs_every_way_to_meet_the_size_and_keeps_the_least_loss(tokenizer):
    from vcompress.compress.prune_plan import plan_pruning, predict, pruned_config

    config = mid_config(tokenizer)
    info = {**shape_of(config)}
    before = predict(config, with_budgets("snapdragon8g2"))["model_size_mb"]
    budget = round(before * 0.8, 2)
    profile = with_budgets("snapdragon8g2", max_model_size_mb=budget)
    plan = plan_pruning(config, profile, mid_scores(info))
    cuts = [(t["kv_groups"], t["mlp_channels"], len(t["layers"])) for t in plan.tried]
    assert len(cuts) > 2 and len(set(cuts)) == len(cuts)
    for cut in cuts:  # each meets the budget, and none cuts more of every kind than another
        assert predict(pruned_config(config, *cut), profile)["model_size_mb"] <= budget
        assert not any(other != cut and all(o <= c for o, c in zip(other, cut, strict=True)) for other in cuts)
        assert cut[1] % 32 == 0  # whole quantization groups (group_size 32 divides 1024)
    # by the summed scores alone: layer 5 costs 0.001 nats, channels little, the other layers and groups a lot
    assert plan.layers == [5] and plan.mlp_channels > 0 and plan.kv_groups == 0 and plan.measured_loss_rise_nats is None
    assert plan.steps[0]["unit"] == "layers [5]" and plan.steps[-1]["then_missed"] == [] and plan.steps[0]["then_missed"]
    assert plan.after["model_size_mb"] <= budget < plan.before["model_size_mb"]
    assert plan.perplexity_rise_pct > 0 and "max_model_size_mb" in plan.reason

    # measured: a model where whole layers cost nothing and every channel or group costs, whatever the scores say
    measured = plan_pruning(config, profile, mid_scores(info), measure=lambda p: p.kv_groups + 0.01 * p.mlp_channels)
    assert measured.mlp_channels == 0 and measured.kv_groups == 0 and len(measured.layers) > 1
    assert measured.measured_loss_rise_nats == 0.0 and "least loss measured of" in measured.reason
    assert all(t["measured_perplexity_rise_pct"] is not None for t in measured.tried)


def test_prune_plan_refuses_a_budget_no_pruning_can_meet(tokenizer):
    from vcompress.compress.prune_plan import plan_pruning

    with pytest.raises(InputError, match=r"max_model_size_mb 0.5 MiB cannot be met by pruning.*raise max_model_size_mb") as e:
        plan_pruning(mid_config(tokenizer), with_budgets("snapdragon8g2", max_model_size_mb=0.5), {})
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="min_decode_tokens_per_s"):
        plan_pruning(mid_config(tokenizer), with_budgets("snapdragon8g2", min_decode_tokens_per_s=1e9), {})


def shape_of(config: dict) -> dict:
    from vcompress.core.roofline_math import shapes

    s = shapes(config)
    return {k: s[k] for k in ("layers", "query_heads", "kv_heads", "head_dim", "hidden_size", "intermediate_size")}


def test_auto_and_fractions_together_are_refused():
    with pytest.raises(InputError, match="either auto or heads/mlp/layers"):
        Prune({"auto": True, "heads": 0.33})
    assert Prune({"auto": True}).config.auto and Prune({"heads": 0.33}).config.heads == 0.33


def test_prune_auto_stage_keeps_the_model_when_the_budgets_are_met_and_distill_skips(gqa_llama, tmp_path, tokenizer):
    from vcompress.compress.distill import Distill
    from vcompress.core.profiles import load_profile

    lines = []
    metrics = execute(
        Prune({"auto": True, **FAST}), tmp_path / "p", source=str(gqa_llama), profile=load_profile("snapdragon8g2"), log=lines.append
    )
    assert metrics["pruned"] is False and "nothing pruned" in lines[0]
    plan = json.loads((tmp_path / "p" / "prune_plan.json").read_text())
    assert plan["prunes"] is False and plan["before"]["model_size_mb"] > 0
    assert torch.equal(logits(load(gqa_llama), IDS), logits(load(tmp_path / "p"), IDS))

    lines.clear()
    distilled = execute(
        Distill({"max_minutes": 10}), tmp_path / "d", source=str(tmp_path / "p"), reference=str(gqa_llama), log=lines.append
    )
    assert "removed nothing" in distilled["skipped"] and len(lines) == 1
    assert torch.equal(logits(load(gqa_llama), IDS), logits(load(tmp_path / "d"), IDS))


def test_prune_auto_stage_cuts_just_enough_for_a_size_budget(gqa_llama, tmp_path, tokenizer):
    from vcompress.compress.prune_plan import predict, pruned_config

    original = load(gqa_llama)
    info = shape(original)
    config = original.config.to_dict()
    budget = predict(pruned_config(config, layers=1), with_budgets("snapdragon8g2"))["model_size_mb"]  # one layer less fits
    profile = with_budgets("snapdragon8g2", max_model_size_mb=budget)
    scores = tmp_path / "sensitivity.json"
    scores.write_text(json.dumps(fake_scores(info, weak_group=1, weak_layer=2)))
    lines = []
    metrics = execute(
        Prune({"auto": True, "scores": str(scores), "plan_blocks": 0, **FAST}),
        tmp_path / "p",
        source=str(gqa_llama),
        profile=profile,
        log=lines.append,
    )
    assert metrics["pruned"] is True and metrics["layers"]["dropped"] == [2] and metrics["layers"]["requested"] == 1
    assert metrics["heads"]["kv_heads"] == [3, 3] and metrics["mlp"]["intermediate_size"] == [128, 128]
    assert lines[0].startswith("plan: the unpruned model misses max_model_size_mb") and any(
        line.startswith("remove layers [2]") for line in lines
    )
    plan = json.loads((tmp_path / "p" / "prune_plan.json").read_text())
    assert plan["prunes"] is True and plan["layers"] == [2] and plan["after"]["model_size_mb"] <= budget
    assert load(tmp_path / "p").config.num_hidden_layers == 3


def test_prune_auto_stage_keeps_the_way_that_measures_least_loss(gqa_llama, tmp_path, tokenizer):
    """Each candidate is cut from a copy and measured on calibration blocks; the one written is the least
    loss, and its recorded rise is what the written checkpoint loses on those blocks."""
    from vcompress.compress._calib import calibration_blocks
    from vcompress.compress.prune_plan import predict, pruned_config
    from vcompress.compress.sensitivity import mean_loss

    original = load(gqa_llama)
    info = shape(original)
    budget = predict(pruned_config(original.config.to_dict(), layers=1), with_budgets("snapdragon8g2"))["model_size_mb"]
    scores = tmp_path / "sensitivity.json"
    scores.write_text(json.dumps(fake_scores(info, weak_group=1, weak_layer=2)))
    settings = {"auto": True, "scores": str(scores), "plan_blocks": 4, "plan_seq_len": 32, **FAST}
    lines = []
    execute(
        Prune(settings),
        tmp_path / "p",
        source=str(gqa_llama),
        profile=with_budgets("snapdragon8g2", max_model_size_mb=budget),
        log=lines.append,
        seed=0,
    )
    plan = json.loads((tmp_path / "p" / "prune_plan.json").read_text())
    rises = [t["measured_perplexity_rise_pct"] for t in plan["tried"]]
    assert len(rises) > 1 and None not in rises and len(set(rises)) == len(rises)
    assert min(rises) == round(100 * (math.exp(plan["measured_loss_rise_nats"]) - 1), 2)
    assert any("measuring each way to meet the budgets on 4 x 32" in line for line in lines)
    assert sum(line.startswith("  weighed:") for line in lines) == len(rises)

    blocks = calibration_blocks(tokenizer, samples=4, seq_len=32, seed=0, log=lambda _: None)
    with torch.no_grad():
        rise = mean_loss(load(tmp_path / "p"), blocks) - mean_loss(original, blocks)
    assert rise == pytest.approx(plan["measured_loss_rise_nats"], abs=1e-4)


@pytest.mark.parametrize(
    "arch,zero_point,table_bits,head_bits,compact",
    [
        ("llama", "float", 8, 8, False),
        ("qwen2", "int", 4, 4, False),
        ("qwen2", "float", 0, 0, False),
        ("qwen2", "float", 4, 8, False),
        ("llama", "int", 4, 8, False),
        ("llama", "float", 4, 8, True),
        ("llama", "int", 4, 4, True),
    ],
)
def test_predicted_size_is_what_the_onnx_export_writes(tiny_models, tmp_path, arch, zero_point, table_bits, head_bits, compact):
    """prune auto decides from the predicted size: it must match the exported file, tables, zero points and
    rotary tables included (the earlier rule said 483.6 MiB for a 570.0 MiB Qwen export)."""
    from vcompress.compress.prune_plan import predict
    from vcompress.compress.quantize import Quantize
    from vcompress.core.profiles import RecipeStep
    from vcompress.exporters.onnx import export

    quantize = {"method": "rtn", "group_size": 32, "zero_point": zero_point, "heldout_blocks": 0, "eval_per_subject": 0}
    execute(Quantize(quantize), tmp_path / "q", source=tiny_models[arch], seed=0, log=lambda _: None)
    export(
        tmp_path / "q",
        tmp_path / "onnx",
        "int4",
        table_bits=table_bits,
        head_bits=head_bits,
        compact=compact,
        min_top1_quantized=0.0,
        new_tokens=2,
        log=lambda _: None,
        threads=1,
    )
    profile = load_x86(group_size=32)
    export_step = {"stage": "export", "table_bits": table_bits, "head_bits": head_bits, "compact": compact}
    steps = [{"stage": "quantize", "zero_point": zero_point}, export_step]
    profile = profile.model_copy(update={"recipe": [RecipeStep(**s) for s in steps]})
    config = json.loads((tiny_models[arch] / "config.json").read_text())
    # and the initializers under 1 KB that stay inside model.onnx (a tiny model's float16 scales in a compact export)
    inline = sum(len(t.raw_data) for t in onnx.load(tmp_path / "onnx" / "model.onnx", load_external_data=False).graph.initializer)
    written = (tmp_path / "onnx" / "model.onnx.data").stat().st_size + inline
    predicted = predict(config, profile)["stored_bytes"]
    assert abs(predicted - written) / written < 0.03, (predicted, written)


def load_x86(**quantization):
    from vcompress.core.profiles import load_profile

    profile = load_profile("x86-cpu")
    return profile.model_copy(update={"quantization": profile.quantization.model_copy(update=quantization)})


def test_analysis_is_skipped_only_when_nothing_would_read_it(gqa_llama, tmp_path):
    """The run's analysis is read only by prune and quantize's keep_sensitive: when prune auto would remove
    nothing (the unpruned model meets every budget) or the recipe has no prune step, it ranks nothing and
    says why; a budget it misses, a fixed fraction, keep_sensitive, an analysis-only recipe or no profile
    runs the whole analysis."""
    from vcompress.compress.prune_plan import analysis_unneeded, predict
    from vcompress.compress.sensitivity import Analyze
    from vcompress.core.profiles import RecipeStep

    config = load(gqa_llama).config.to_dict()
    met = with_budgets("snapdragon8g2")
    assert "meets every budget of snapdragon8g2" in analysis_unneeded(config, met)
    size = predict(config, met)["model_size_mb"]
    assert analysis_unneeded(config, with_budgets("snapdragon8g2", max_model_size_mb=size / 2)) is None
    fixed = met.model_copy(update={"recipe": [RecipeStep(stage="analyze"), RecipeStep(stage="prune", heads=0.33)]})
    assert analysis_unneeded(config, fixed) is None and analysis_unneeded(config, None) is None
    keeps = met.model_copy(update={"recipe": [*met.recipe[:2], RecipeStep(stage="quantize", keep_sensitive=2)]})
    assert analysis_unneeded(config, keeps) is None
    # no prune step: nothing reads the scores (x86-cpu), unless quantize keeps sensitive linears or the
    # recipe is the analysis alone (run --auto's shared analysis)
    unread = met.model_copy(update={"recipe": [RecipeStep(stage="analyze"), RecipeStep(stage="quantize")]})
    assert "nothing in snapdragon8g2's recipe reads the scores" in analysis_unneeded(config, unread)
    kept = met.model_copy(update={"recipe": [RecipeStep(stage="analyze"), RecipeStep(stage="quantize", keep_sensitive=1)]})
    alone = met.model_copy(update={"recipe": [RecipeStep(stage="analyze")]})
    assert analysis_unneeded(config, kept) is None and analysis_unneeded(config, alone) is None

    small = {"samples": 1, "seq_len": 16, "parts": ["layers"]}
    skipped = execute(Analyze(small), tmp_path / "a", source=str(gqa_llama), profile=met, log=lambda _: None)
    written = json.loads((tmp_path / "a" / "sensitivity.json").read_text())
    assert skipped["skipped"] == written["skipped"] and "layers" not in written
    ranked = execute(Analyze(small), tmp_path / "b", source=str(gqa_llama), profile=fixed, log=lambda _: None)
    assert "skipped" not in ranked and "layers" in json.loads((tmp_path / "b" / "sensitivity.json").read_text())
