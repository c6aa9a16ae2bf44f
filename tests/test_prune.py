"""Structured pruning: the intended KV groups / MLP channels / layers go, and the result is a standard checkpoint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import build_config
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
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
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
