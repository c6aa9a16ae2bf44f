"""Sensitivity analysis: each score measures what it says, the output is deterministic, the figures are written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_quantize import fake_quantized
from vcompress.compress._arch import attention_out, decoder_layers, head_rows, shape
from vcompress.compress._calib import calibration_blocks
from vcompress.compress._gptq_core import Grid
from vcompress.compress._heads import masked_heads
from vcompress.compress.sensitivity import SENSITIVITY, Analyze, Probe, analyze, mean_loss, model_grid, quantized, taylor_scores
from vcompress.core.profiles import load_profile
from vcompress.core.stage import execute

FAST = {"samples": 2, "seq_len": 32}


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return calibration_blocks(tokenizer, samples=2, seq_len=32, log=lambda _: None)


def test_analysis_shapes_for_each_architecture(tiny_model, blocks):
    model = load(tiny_model)
    info = shape(model)
    result = analyze(model, blocks, log=lambda _: None)
    layers, heads, kv = info["layers"], info["query_heads"], info["kv_heads"]
    assert [len(r) for r in result["heads"]["taylor_query"]] == [heads] * layers
    assert [len(r) for r in result["heads"]["taylor_kv_group"]] == [kv] * layers
    assert [len(r) for r in result["heads"]["mask_loss_delta_nats"]] == [kv] * layers
    assert len(result["layers"]["skip_loss_delta_nats"]) == len(result["layers"]["angular_distance"]) == layers
    assert all(0 < a < 1 for a in result["layers"]["angular_distance"])
    assert [len(r) for r in result["mlp"]["taylor_channel"]] == [info["intermediate_size"]] * layers
    assert [len(r) for r in result["quant"]["loss_delta_nats"]] == [len(result["quant"]["modules"])] * layers
    expected = 4 if model.config.model_type == "gpt2" else 7
    assert len(result["quant"]["modules"]) == expected
    # a KV group's Taylor score holds its query heads' scores
    per = heads // kv
    for q_row, g_row in zip(result["heads"]["taylor_query"], result["heads"]["taylor_kv_group"]):
        for g in range(kv):
            assert g_row[g] >= sum(q_row[g * per : (g + 1) * per]) * 0.999


def test_probe_rerun_from_any_layer_is_the_full_loss(tiny_model, blocks):
    model = load(tiny_model)
    probe = Probe(model, blocks, batch_size=1)
    full = mean_loss(model, blocks)
    assert probe.baseline == pytest.approx(full, abs=1e-5)
    assert probe.loss(start=1) == pytest.approx(full, abs=1e-5)


def test_masking_a_group_is_zeroing_its_output_columns(tiny_llama, blocks):
    model = load(tiny_llama)
    probe = Probe(model, blocks)
    with masked_heads(decoder_layers(model)[1], [2, 3], 16):
        masked = probe.loss(start=1)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        attention_out(decoder_layers(zeroed)[1]).weight[:, head_rows([2, 3], 16)] = 0
    assert masked == pytest.approx(mean_loss(zeroed, blocks), abs=1e-5)
    assert masked != pytest.approx(probe.loss(start=1), abs=1e-4)  # the hook is gone after the block


def test_skipping_a_layer_is_making_it_the_identity(tiny_model, blocks):
    model = load(tiny_model)
    skip = Probe(model, blocks).loss(start=0, skip=0)
    identity = copy.deepcopy(model)
    layer = decoder_layers(identity)[0]
    down = layer.mlp.c_proj if hasattr(layer.mlp, "c_proj") else layer.mlp.down_proj
    with torch.no_grad():
        for module in (attention_out(layer), down):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    assert skip == pytest.approx(mean_loss(identity, blocks), abs=1e-5)


def test_taylor_of_a_head_without_weights_is_zero(tiny_llama, blocks):
    model = load(tiny_llama)
    rows = head_rows([1], 16)
    with torch.no_grad():
        layer = decoder_layers(model)[0]
        layer.self_attn.q_proj.weight[rows] = 0
        layer.self_attn.o_proj.weight[:, rows] = 0
    scores = taylor_scores(model, blocks)
    assert scores["query"][0][1] == 0
    assert all(s > 0 for i, row in enumerate(scores["query"]) for h, s in enumerate(row) if (i, h) != (0, 1))
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


@pytest.mark.parametrize("zero_point", ["int", "float"])
def test_the_rounded_weight_analyze_measures_is_what_quantize_rtn_writes(cli, tiny_llama, tmp_path, zero_point):
    out = tmp_path / "q"
    code, _, err = cli(
        "quantize", "--model", tiny_llama, "--method", "rtn", "--group-size", "32", "--zero-point", zero_point, "--out", out, "--json"
    )
    assert code == 0, err
    written = fake_quantized(tiny_llama, out)
    model = load(tiny_llama)
    grid = model_grid(model, Analyze({"group_size": 32, "zero_point": zero_point}).config.grid)
    for name in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
        module = model.get_submodule(name)
        original = module.weight.data.clone()
        with quantized(module, grid):
            measured = module.weight.data.clone()
        assert torch.equal(measured, written.get_submodule(name).weight.data), name
        assert not torch.equal(measured, original) and torch.equal(module.weight.data, original)


def test_the_grid_follows_the_profile_and_quantize_group_fallback(tiny_llama, blocks):
    profile = load_profile("x86-cpu")  # quantization group 32; its quantize step: zero_point float
    assert Analyze.from_profile({}, profile).config.grid == Grid(4, 32, float_zero=True)
    assert Analyze.from_profile({"group_size": 64}, profile).config.grid.group_size == 64  # the step's own settings win
    quant = analyze(load(tiny_llama), blocks, parts=["quant"], log=lambda _: None)["quant"]
    assert (quant["group_size"], quant["zero_point"]) == (64, "int")  # hidden size 64: 128 falls back, as quantize does


def test_same_seed_same_json_other_seed_other_blocks(tiny_llama, tmp_path):
    def run(seed, name):
        execute(Analyze(FAST), tmp_path / name, source=str(tiny_llama), seed=seed, log=lambda _: None)
        return json.loads((tmp_path / name / SENSITIVITY).read_text())

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first == again
    assert first["calibration"] == {**other["calibration"], "seed": 0}  # same sizes, another draw
    assert first["baseline_loss_nats"] != other["baseline_loss_nats"]
    for name in ("heads.png", "layers.png", "quant.png"):
        png = (tmp_path / "a" / "heatmaps" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_user_data_is_the_calibration_text(tmp_path, tokenizer):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(["The heart pumps blood through the body."] * 40))
    blocks = calibration_blocks(tokenizer, data=text, samples=3, seq_len=16, log=lambda _: None)
    assert blocks.shape == (3, 16)
    assert tokenizer.decode(blocks[0]).count("heart") >= 1


def test_cli_analyze(cli, tiny_models, tmp_path):
    code, out, _ = cli("analyze", "--model", tiny_models["qwen2"], "--samples", "2", "--seq-len", "32", "--out", tmp_path / "an", "--json")
    assert code == 0
    metrics = json.loads(out)
    assert metrics["heatmaps"] == ["heatmaps/heads.png", "heatmaps/layers.png", "heatmaps/quant.png"]
    assert sorted(metrics["least_important_layers"]) == [0, 1]
    saved = json.loads((tmp_path / "an" / SENSITIVITY).read_text())
    assert saved["shape"]["kv_heads"] == 2 and saved["calibration"]["tokens"] == 64
    code, _, err = cli("analyze", "--model", tiny_models["qwen2"], "--out", tmp_path / "an")
    assert code == 2 and "--force" in err
