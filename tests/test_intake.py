import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from vcompress.core.errors import InputError
from vcompress.core.models import load_model, resolve, summarize


def test_loads_each_architecture(tiny_model):
    model, tok = load_model(tiny_model)
    info = summarize(model, resolve(tiny_model))
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["layers"] == 2 and info["query_heads"] == 4
    assert info["bytes_on_disk"] > 0
    assert tok("hello")["input_ids"]


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist; pass a Hugging Face folder"):
        resolve(tmp_path / "nope")


def test_corrupt_safetensors(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt safetensors file .*model.safetensors"):
        resolve(bad)


def test_pickle_refused_unless_allowed(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    folder = tmp_path / "pickled"
    model.save_pretrained(folder, safe_serialization=False)
    shutil.copy(tiny_llama / "tokenizer.json", folder)
    shutil.copy(tiny_llama / "tokenizer_config.json", folder)
    if not list(folder.glob("*.bin")):  # transformers 5 may always write safetensors
        state = model.state_dict()
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle weights .*--allow-pickle"):
        resolve(folder)
    loaded, _ = load_model(folder, allow_pickle=True)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


def test_wrong_format_and_unsupported_architecture(tmp_path, tiny_llama):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(InputError, match="not a .gguf"):
        resolve(tmp_path / "weights.npz")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(InputError, match="not a GGUF file"):
        resolve(fake)
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "mistral"
    config["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="architecture 'mistral' .* not supported; supported: llama, qwen2, gpt2"):
        load_model(other)


def test_lora_adapter_is_merged_into_its_base(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_llama)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=ids).logits
    merged, _ = load_model(adapter)
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter changed something


def test_lora_with_unreachable_base_says_use_base(tiny_llama, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/some-model"}))
    with pytest.raises(InputError, match="pass --base PATH"):
        resolve(adapter)
    assert resolve(adapter, base=tiny_llama).base.path == tiny_llama


@pytest.mark.slow
def test_embedded_default_matches_the_gguf():
    from vcompress.core.models import default_model_dir, rope_theta

    model, tok = load_model(None)
    info = summarize(model, resolve(None))
    assert info["parameters"] == 134_515_008
    assert (info["layers"], info["query_heads"], info["kv_heads"], info["head_dim"]) == (30, 9, 3, 64)
    assert rope_theta(model.config) == 100000.0
    assert (default_model_dir() / "model.safetensors").is_file()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


@pytest.mark.slow
def test_a_gguf_is_converted_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    from vcompress.core import models

    monkeypatch.setenv("VCOMPRESS_CACHE", str(tmp_path))
    gguf = models.default_gguf()
    first, _ = load_model(gguf)
    folders = list((tmp_path / "models").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()

    def no_conversion(path):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_load_gguf", no_conversion)
    again, tok = load_model(gguf)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(first(ids).logits, again(ids).logits)


def test_export_takes_the_adapter_base_from_the_command(cli, tiny_llama, tmp_path):
    """`vcompress export onnx --base` reaches the exporter's loading: an adapter whose named base is not local exports with it."""
    from peft import LoraConfig, get_peft_model

    from vcompress.exporters.onnx import OnnxRunner

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/some-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = cli("export", "onnx", "--model", adapter, "--out", tmp_path / "no-base", "--threads", "1")
    last = err.strip().splitlines()[-1]  # (above it: the progress bars of building the adapter here)
    assert code == 2 and last.startswith("error: ") and "--base PATH" in last and "Traceback" not in err
    assert not (tmp_path / "no-base").exists()
    out = tmp_path / "onnx"
    code, stdout, err = cli("export", "onnx", "--model", adapter, "--base", tiny_llama, "--out", out, "--threads", "1", "--json")
    assert code == 0, err
    assert json.loads(stdout)["parity"]["passed"] is True
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        merged = peft_model(input_ids=ids).logits
    assert torch.allclose(OnnxRunner(out, threads=1).forward(ids), merged, atol=1e-4)  # the adapter's weights, not the bare base's
