"""Gemma 3 (gemma3_text): intake, and errors that name what is not supported instead of blaming the installation."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import build_config
from vcompress.core import models, packages
from vcompress.core.errors import InputError
from vcompress.core.models import check_supported, load_model, rope_theta


def test_rope_theta_of_a_config_with_one_base_per_layer_type():
    config = build_config("gemma3", 384, 3)
    assert rope_theta(config) == 1e6  # the global layers' base, the one a GGUF's rope.freq_base names


def _meta(theta):
    return {"general.architecture": "gemma3", "gemma3.rope.freq_base": theta}


def test_rope_check_passes_gemma3_and_blames_the_installation_only_off_its_pin(monkeypatch):
    config = build_config("gemma3", 384, 3)
    models._check_rope_theta(config, _meta(1e6), Path("g.gguf"))  # what transformers 5.23 reads for Gemma 3
    # with the pinned transformers, a disagreement is ours to handle: named, no "install"
    with pytest.raises(InputError, match=r"^gemma3: this rope layout is not supported yet") as caught:
        models._check_rope_theta(config, _meta(5e5), Path("g.gguf"))
    assert "install" not in str(caught.value)
    monkeypatch.setattr(packages.metadata, "version", lambda dist: "5.0.0" if dist == "transformers" else "1")
    with pytest.raises(InputError, match=r"transformers 5\.0\.0 is installed but vcompress pins transformers==5\.23\.\*: install"):
        models._check_rope_theta(config, _meta(5e5), Path("g.gguf"))


def test_import_failure_blames_the_installation_only_when_a_package_is_absent_or_off_pin(monkeypatch):
    error = ImportError("libfoo.so: cannot open shared object file")
    pinned = packages.pin("transformers")
    assert pinned is not None and str(pinned.specifier) == "==5.23.*"
    said = packages.import_failure(error, ("transformers",), "`pip install -e .`")
    assert (
        said.startswith("importing it failed although transformers 5.23")
        and "libfoo.so" in said
        and "install" not in said.replace("installed", "")
    )
    monkeypatch.setattr(packages, "installed", lambda dist: None)
    assert packages.import_failure(error, ("transformers",), "`pip install -e .`") == (
        "transformers is not installed; install the pinned versions with `pip install -e .`"
    )


def test_unsupported_gemma_pieces_are_named(tiny_gemma):
    config = build_config("gemma3", 384, 3)
    check_supported(config)
    config.final_logit_softcapping = 30.0
    with pytest.raises(InputError, match=r"^gemma3_text: logit soft-capping \(30.0\) is not supported yet"):
        check_supported(config)
    config.final_logit_softcapping = None
    config.model_type = "gemma3"
    with pytest.raises(InputError, match=r"^gemma3: the multimodal checkpoint \(vision tower\) is not supported yet"):
        check_supported(config)


def test_loads_a_tiny_gemma3(tiny_gemma):
    model, tok = load_model(tiny_gemma)
    assert model.config.model_type == "gemma3_text" and model.config.layer_types[1] == "full_attention"
    ids = torch.tensor([tok.encode("The heart pumps blood through the body.")])
    assert torch.isfinite(model(ids).logits).all()


# --- prune: one KV head, so its query heads go -------------------------------------------------

FAST = {"samples": 2, "seq_len": 32, "heldout_blocks": 2, "heldout_seq_len": 32, "eval_per_subject": 0}
IDS = torch.arange(3, 43).view(2, 20)  # longer than the tiny config's window (16): the sliding layers drop old keys


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_a_masked_plan_with_one_kv_head_computes_what_the_cut_model_does(tiny_gemma):
    import copy

    from vcompress.compress._arch import shape
    from vcompress.compress.prune import Plan, apply_plan, plan_masked

    model, _ = load_model(tiny_gemma)
    info = shape(model)
    assert (info["query_heads"], info["kv_heads"]) == (4, 1)
    keep = [0, 1]  # layer 2 (sliding) goes
    plan = Plan(keep, {0: [1, 3], 1: [0, 2]}, {i: [0, 5, 9] for i in keep})  # two of the four query heads per layer
    with plan_masked(model, plan):
        masked = _logits(model)
    cut = copy.deepcopy(model)
    after = apply_plan(cut, plan)
    assert (after["query_heads"], after["kv_heads"], after["layers"]) == (2, 1, 2)
    assert cut.config.layer_types == ["sliding_attention", "full_attention"]
    assert cut.model.layers[0].self_attn.q_norm.weight.shape == (16,)  # QK-norm is per head width: untouched
    assert torch.allclose(masked, _logits(cut), atol=1e-5) and not torch.allclose(masked, _logits(model), atol=1e-3)


def test_prune_stage_on_gemma3_removes_query_heads_within_the_group(tiny_gemma, tmp_path):
    from transformers import AutoModelForCausalLM

    from vcompress.compress.prune import Prune
    from vcompress.core.stage import execute

    logs = []
    metrics = execute(Prune({"heads": 0.5, "mlp": 0.25, "layers": 1, **FAST}), tmp_path / "p", source=str(tiny_gemma), log=logs.append)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()  # plain transformers, no vcompress code
    config = after.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == (2, 1, 16, 96)
    assert config.num_hidden_layers == len(config.layer_types) == 2
    assert metrics["heads"]["unit"] == "query heads of the one KV group" and metrics["heads"]["query_heads"] == [4, 2]
    assert metrics["heads"]["removed_ratio"] == 0.5 and len(metrics["heads"]["kept_per_layer"][0]["query_heads"]) == 2
    assert any("one KV head per layer: it stays, and 2 of its 4 query heads go" in line for line in logs)
    assert metrics["reload_max_abs_logit_diff"] < 1e-4
    assert after.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_prune_plan_with_one_kv_head_counts_query_heads():
    from vcompress.compress.prune_plan import pruned_config

    config = build_config("gemma3", 384, 3).to_dict()
    out = pruned_config(config, kv_groups=1, mlp_channels=32, layers=1)
    assert (out["num_attention_heads"], out["num_key_value_heads"], out["intermediate_size"], out["num_hidden_layers"]) == (3, 1, 96, 2)


# --- ONNX: sliding-window layers through GroupQueryAttention's local window ----------------------


@pytest.fixture(scope="module")
def gemma_onnx(tiny_gemma, tmp_path_factory):
    from vcompress.exporters.onnx import export

    out = tmp_path_factory.mktemp("gemma-onnx") / "fp32"
    return out, export(str(tiny_gemma), out, "none", log=lambda _: None, threads=1)


def test_onnx_fp32_export_of_gemma3_matches_pytorch(gemma_onnx):
    out, metrics = gemma_onnx
    parity = metrics["parity"]
    # 5 prompts and 32 greedy tokens each: every continuation runs past the window (16)
    assert parity["passed"] and parity["greedy_identical"] == parity["prompts"] == 5 and parity["greedy_tokens"] == 32
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert genai["type"] == "gemma3_text" and genai["decoder"]["num_key_value_heads"] == 1


def test_onnx_gemma3_prompt_longer_than_the_window_matches_at_every_position(gemma_onnx, tiny_gemma):
    from transformers import AutoModelForCausalLM

    from vcompress.exporters.onnx import OnnxRunner

    out, _ = gemma_onnx
    ids = torch.arange(3, 53).view(1, 50)  # 50 tokens, window 16
    got = OnnxRunner(out, threads=1).forward(ids)
    for window, close in ((16, True), (15, False), (17, False)):  # the model's window, not one off
        reference = AutoModelForCausalLM.from_pretrained(tiny_gemma, sliding_window=window).eval()
        assert torch.allclose(got, _logits(reference, ids), atol=1e-4) is close


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai is not installed")
def test_onnxruntime_genai_generates_gemma3_as_our_loop(gemma_onnx):
    from vcompress.exporters.onnx import OnnxRunner

    out, _ = gemma_onnx
    runner = OnnxRunner(out, threads=1)
    texts = ["The heart pumps blood", "Water boils at", " ".join(["one two three four"] * 6)]  # the last: past the window
    prompts = [runner.tokenizer(text)["input_ids"] for text in texts]
    assert len(prompts[-1]) > 16
    eos = json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"]
    want = [runner.generate(torch.tensor([prompt]), 24, eos_token_id=eos) for prompt in prompts]
    request = {"folder": str(out), "prompts": prompts, "new_tokens": 24, "texts": texts}
    script = Path(__file__).with_name("genai_greedy.py")
    done = subprocess.run([sys.executable, str(script)], input=json.dumps(request), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tokens"] == want


# --- distill and quantize ------------------------------------------------------------------------


def test_distill_a_pruned_gemma3_from_its_teacher(tiny_gemma, tmp_path):
    from tests.tiny import CORPUS
    from vcompress.compress.distill import distill
    from vcompress.compress.prune import Prune
    from vcompress.core.stage import execute

    student = tmp_path / "02-prune"
    execute(Prune({"heads": 0.5, "layers": 1, **FAST}), student, source=str(tiny_gemma), log=lambda _: None)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in CORPUS * 2))
    config = dict(seq_len=32, batch_size=2, max_steps=8, save_every=4, warmup=2, lr=3e-3, eval_per_subject=0, eval_blocks=2, patience=100)
    metrics = distill(student, tmp_path / "03-distill", teacher=tiny_gemma, data=data, config=config, log=lambda _: None)
    assert metrics["validation"]["kl_mean"] < metrics["before"]["validation"]["kl_mean"]
    model, _ = load_model(tmp_path / "03-distill")
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2, 1)


def test_gptq_streamed_on_gemma3_then_carried_into_onnx(tiny_gemma, tmp_path):
    from tests.tiny import CORPUS
    from vcompress.compress.quantize import Quantize
    from vcompress.core.stage import execute
    from vcompress.exporters.onnx import export

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(CORPUS))
    fast = {"calib_samples": 8, "seq_len": 32, "batch_size": 4, "heldout_blocks": 2, "heldout_seq_len": 32, "eval_per_subject": 0}
    out = tmp_path / "q"
    metrics = execute(
        Quantize({**fast, "stream": "on", "group_size": 16}), out, source=str(tiny_gemma), data=calib, seed=0, log=lambda _: None
    )
    assert metrics["streamed"] and metrics["method"] == "gptq"
    model, _ = load_model(out)  # the grid's dequantized weights: a Gemma 3 still
    assert model.config.model_type == "gemma3_text" and torch.isfinite(_logits(model)).all()
    # fp32 activations and table: the carried grid computes the dequantized checkpoint
    metrics = export(str(out), tmp_path / "onnx", "int4", log=lambda _: None, threads=1, accuracy_level=0, table_bits=0)
    assert metrics["grid"] and metrics["parity"]["passed"] and metrics["parity"]["greedy_identical"] == 5


# --- TensorRT's standard-op graph ---------------------------------------------------------------


def test_tensorrt_standard_op_graph_of_gemma3_matches_pytorch_past_the_window(tiny_gemma, tmp_path):
    import numpy as np

    from vcompress.exporters._tensorrt_session import GraphSession
    from vcompress.exporters.tensorrt import export

    out = tmp_path / "trt"
    quiet = {"log": lambda _: None, "threads": 1, "max_tokens": 64, "prefill_tokens": 16, "heldout_blocks": 1, "heldout_seq_len": 64}
    export(str(tiny_gemma), out, "none", precision="fp32", **quiet)
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["parity"]["greedy_identical"] == 5 and m["tensorrt_ready"] is True
    session = GraphSession(out, threads=1)
    ids = np.arange(3, 43, dtype=np.int64)[None]  # 40 tokens, window 16: prefill 30, then decode past it
    model, _ = load_model(tiny_gemma)
    want = _logits(model, torch.from_numpy(ids))[0].numpy()
    np.testing.assert_allclose(session.logits(ids)[0], want, atol=1e-4)
    logits, state = session.prefill(ids[:, :30])
    for t in range(30, 40):
        logits, state = session.decode(int(ids[0, t]), state)
        np.testing.assert_allclose(logits, want[t], atol=1e-4)


def test_cli_names_the_unsupported_gemma3_piece_with_exit_2(cli, tiny_gemma, tmp_path):
    import shutil

    folder = tmp_path / "multimodal"
    shutil.copytree(tiny_gemma, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}))
    code, _, err = cli("inspect", "--model", folder)
    assert code == 2 and "gemma3: the multimodal checkpoint (vision tower) is not supported yet" in err and "Traceback" not in err


@pytest.mark.slow
def test_tflite_export_of_gemma3(tiny_gemma, tmp_path):
    """litert-torch's Gemma 3 patches: greedy parity past the window, and the .litertlm bundle loads in LiteRT-LM."""
    pytest.importorskip("litert_torch", reason="the tflite exporter needs litert-torch (pip install -e '.[tflite]')")
    from vcompress.exporters.tflite import export

    metrics = export(str(tiny_gemma), tmp_path / "tflite", "none", log=lambda _: None)
    assert metrics["parity"]["passed"] and metrics["parity"]["greedy_identical"] == 5 and metrics["parity"]["greedy_tokens"] == 32
    assert metrics["litertlm_loaded"].startswith("loaded by LiteRT-LM")


def test_gguf_export_refuses_gemma3_by_name_before_any_gptq(cli, tiny_gemma, tmp_path):
    out = tmp_path / "gguf"
    code, _, err = cli("export", "gguf", "--model", tiny_gemma, "--out", out)
    assert code == 2 and "gemma3_text: GGUF export is not supported yet" in err and "Traceback" not in err
    assert not (tmp_path / ".gguf.work").exists() and "GPTQ" not in err  # refused before the float model's GPTQ
