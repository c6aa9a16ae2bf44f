"""Quantization: GPTQ / RTN / INT8 on tiny models, the saved GPTQ tensors, reload, and GPTQ against RTN."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vcompress.compress._gptq_core import Grid, Hessians, gptq, reconstruction_error, rtn
from vcompress.compress._gptq_pack import from_tensors, to_tensors
from vcompress.compress.quantize import SIDECAR, Quantize, choose_group_size
from vcompress.core.errors import InputError
from vcompress.core.models import load_model, weights_hash
from vcompress.core.quant_format import QUANT_GRID_FILE, dequantize, pack_rows, unpack_cols, unpack_rows
from vcompress.core.stage import execute

FAST = {"calib_samples": 8, "seq_len": 32, "batch_size": 4, "heldout_blocks": 2, "heldout_seq_len": 32, "eval_per_subject": 0}


def quantize(src, out, calib, **config):
    return execute(Quantize({**FAST, **config}), out, source=src, data=calib, seed=0, log=lambda _: None)


def reload(path):
    pytest.importorskip("gptqmodel", reason="transformers needs gptqmodel to load GPTQ checkpoints (pip install 'vcompress[gptq]')")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def fake_quantized(src, out):
    """The input model with every quantized weight replaced by the manifest's dequantized W."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    manifest = json.loads((out / QUANT_GRID_FILE).read_text())
    tensors = load_file(out / manifest["weights_file"])
    for name, spec in manifest["linears"].items():
        w = dequantize({k: tensors[v] for k, v in spec["tensors"].items()}, spec["bits"])  # [in, out]
        module = model.get_submodule(name)
        module.weight.data = w if spec["module"] == "Conv1D" else w.t().contiguous()
    return model


# --- the math -------------------------------------------------------------------------


def test_packing_round_trips_and_dequantizes_like_the_layer():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    for grid in (Grid(4, 32), Grid(4, 32, sym=True), Grid(8, 64), Grid(2, 32), Grid(4, 32, float_zero=True)):
        q = rtn(w, grid)
        tensors = to_tensors(q)
        bits = grid.bits
        assert tensors["qweight"].dtype == torch.int32 and tuple(tensors["qweight"].shape) == (64 * bits // 32, 48)
        assert tensors["scales"].dtype == torch.float16 and tuple(tensors["scales"].shape) == (64 // grid.group_size, 48)
        assert torch.equal(tensors["g_idx"], torch.arange(64, dtype=torch.int32) // grid.group_size)
        if grid.float_zero:
            assert "qzeros" not in tensors and tensors["zeros"].dtype == torch.float32
        else:
            assert tuple(tensors["qzeros"].shape) == (64 // grid.group_size, 48 * bits // 32)
        assert int(q.codes.max()) <= 2**bits - 1
        back = from_tensors(tensors, grid)
        assert torch.equal(back.codes, q.codes) and torch.equal(back.zeros, q.zeros)
        assert torch.allclose(dequantize(tensors, bits).t(), q.dequantize(), atol=0, rtol=0)
    codes = torch.randint(0, 16, (64, 5))
    assert torch.equal(unpack_rows(pack_rows(codes, 4), 4), codes)
    assert int(pack_rows(torch.full((8, 1), 15), 4)) == -1  # 0xFFFFFFFF as int32, low nibble = first row


def test_float_zero_point_keeps_a_q4_1_grid_exactly():
    """Weights dequantized from GGUF Q4_1 (block 32, float16 scale and minimum) survive only a float zero point."""
    torch.manual_seed(0)
    d = (torch.rand(16, 4, 1) * 0.01 + 0.001).half().float()
    m = (-torch.rand(16, 4, 1) * 0.05).half().float()
    q = torch.randint(0, 16, (16, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's Q4_1 block spans min..max
    w = (d * q + m).reshape(16, 128)
    exact = rtn(w, Grid(4, 32, float_zero=True)).dequantize()
    assert (exact - w).abs().max() < 1e-6
    integer = rtn(w, Grid(4, 32)).dequantize()
    assert (integer - w).abs().max() > 1e-4


def test_group_size_falls_back_to_the_largest_that_divides_every_layer():
    layers = {"a": torch.nn.Linear(576, 64), "b": torch.nn.Linear(1536, 64)}
    assert choose_group_size(128, layers, 4) == 64
    assert choose_group_size(128, {"a": torch.nn.Linear(1536, 64)}, 4) == 128
    assert choose_group_size(128, {"a": torch.nn.Linear(96, 64)}, 4) == 32
    assert choose_group_size(32, layers, 4) == 32
    with pytest.raises(InputError, match="no group size"):
        choose_group_size(128, {"a": torch.nn.Linear(100, 64)}, 4)
    with pytest.raises(InputError, match="multiples of 8"):
        choose_group_size(128, {"a": torch.nn.Linear(64, 60)}, 4)


def test_gptq_reconstructs_a_real_layer_better_than_rtn(tiny_llama, calib, tokenizer):
    from transformers import AutoModelForCausalLM

    from vcompress.compress._calib import calibration_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    blocks = calibration_blocks(tokenizer, data=calib, samples=8, seq_len=32, log=lambda _: None)
    layer = model.model.layers[1]
    linears = {"down": layer.mlp.down_proj, "q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj}
    hessians = Hessians().watch(linears)
    with torch.no_grad():
        model(input_ids=blocks)
    hessians.close()
    assert hessians.alias["k"] == hessians.alias["q"]  # same input, one accumulator
    for name, module in linears.items():
        w, H = module.weight.data, hessians.get(name)
        for grid in (Grid(4, 32), Grid(4, 32, sym=True), Grid(4, 64, float_zero=True)):
            for act_order in (False, True):
                g = reconstruction_error(w, gptq(w, H, grid, act_order=act_order).dequantize(), H)
                r = reconstruction_error(w, rtn(w, grid).dequantize(), H)
                assert g < 0.9 * r, (name, grid, act_order, g, r)


def test_gptq_codes_stay_on_the_grid_with_act_order():
    torch.manual_seed(1)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    w = torch.randn(16, 64)
    q = gptq(w, 2 * x.t() @ x / 256, Grid(4, 32), act_order=True)
    assert torch.equal(q.g_idx, torch.arange(64, dtype=torch.int32) // 32)  # static groups: no permutation
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    assert torch.equal(q.zeros, q.zeros.round())


# --- the stage ------------------------------------------------------------------------


def test_gptq_checkpoint_layout_reload_and_generate(tiny_llama, calib, tmp_path):
    out = tmp_path / "q"
    metrics = quantize(tiny_llama, out, calib, method="gptq", group_size=128)
    assert metrics["group_size"] == 64 and set(metrics["group_sizes"].values()) == {64}  # hidden 64: 128 falls back
    assert metrics["quantized_linears"] == 14 and metrics["weights_bytes_after"] < metrics["weights_bytes_before"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["sym"]) == ("gptq", 4, 64, False)
    tensors = load_file(out / "model.safetensors")
    assert "model.layers.0.mlp.down_proj.weight" not in tensors
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (128 // 8, 64)  # in 128 -> 16 words, out 64
    assert tensors["model.layers.0.mlp.down_proj.qzeros"].shape == (2, 64 // 8)
    assert tensors["model.layers.0.mlp.down_proj.scales"].shape == (2, 64)
    assert tensors["model.layers.0.self_attn.k_proj.qweight"].shape == (64 // 8, 32)
    manifest = json.loads((out / QUANT_GRID_FILE).read_text())
    assert manifest["layout"] == "gptq_v2" and len(manifest["linears"]) == 14

    model = reload(out)
    expected = fake_quantized(tiny_llama, out)
    ids = torch.randint(5, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, expected(input_ids=ids).logits
    assert (got - want).abs().max() < 2e-2 * want.abs().max()  # the kernel rounds W to float16
    generated = model.generate(input_ids=ids[:1, :6], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 11)


def test_metrics_report_fidelity_and_gptq_beats_rtn(tiny_llama, calib, tmp_path, mmlu_root):
    metrics = execute(
        Quantize({**FAST, "eval_per_subject": 1, "compare_rtn": True}),
        tmp_path / "q",
        source=tiny_llama,
        data=calib,
        mmlu=mmlu_root,
        seed=0,
        log=lambda _: None,
    )
    rtn_scored = metrics["rtn"]
    assert metrics["tokens"] == 2 * 31 and 0 < metrics["top1_agreement"] <= 1 and metrics["kl_mean"] >= 0
    assert metrics["kl_mean"] < rtn_scored["kl_mean"]
    ppl = metrics["perplexity"]
    assert ppl["rise_pct"] == pytest.approx(100 * (ppl["student"] / ppl["reference"] - 1))
    assert rtn_scored["perplexity"]["reference"] == ppl["reference"]  # the input model, scored once before quantizing
    assert metrics["beats_rtn"] == (ppl["student"] < rtn_scored["perplexity"]["student"])
    assert metrics["layer_error"]["gptq_better_than_rtn_fraction"] == 1.0
    assert metrics["questions"] == 8 and rtn_scored["questions"] == 8 and 0 <= metrics["answer_agreement"] <= 1
    assert metrics["bits_per_weight"]["unit"] == "bits" and 4 < metrics["bits_per_weight"]["value"] < 6


def test_deterministic_and_leaves_the_global_rng_alone(tiny_llama, calib, tmp_path):
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    before = (torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy())
    quantize(tiny_llama, tmp_path / "a", calib, act_order=True)
    quantize(tiny_llama, tmp_path / "b", calib, act_order=True)
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert (before[2] == np.random.get_state()[1]).all()
    assert weights_hash(tmp_path / "a") == weights_hash(tmp_path / "b")


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_rtn_and_int8_reload_on_other_architectures(tiny_models, calib, tmp_path, arch):
    src = tiny_models[arch]
    for method, bits in (("rtn", 4), ("int8", 8)):
        out = tmp_path / method
        metrics = quantize(src, out, calib, method=method, group_size=32)
        assert metrics["bits"] == bits
        manifest = json.loads((out / QUANT_GRID_FILE).read_text())
        tensors = load_file(out / manifest["weights_file"])
        name = next(iter(manifest["linears"]))
        assert tensors[f"{name}.qweight"].shape[0] == 64 * bits // 32
        # transformers 5.23 cannot reload GPT-2 in the GPTQ layout: it gets exact float weights + quant.safetensors
        assert manifest["weights_file"] == (SIDECAR if arch == "gpt2" else "model.safetensors")
        model = load_model(out)[0] if arch == "gpt2" else reload(out)
        expected = fake_quantized(src, out)
        ids = torch.randint(5, 384, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, want = model(input_ids=ids).logits, expected(input_ids=ids).logits
        assert (got - want).abs().max() < 2e-2 * want.abs().max()


def test_float_zero_points_reload_as_exact_float_weights(tiny_llama, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fz"
    metrics = quantize(tiny_llama, out, calib, method="rtn", group_size=32, zero_point="float")
    assert metrics["zero_point"] == "float32"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    packed = load_file(out / SIDECAR)
    assert packed["model.layers.0.mlp.up_proj.zeros"].dtype == torch.float32
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(
        model.model.layers[0].mlp.up_proj.weight.data, fake_quantized(tiny_llama, out).model.layers[0].mlp.up_proj.weight.data
    )


def test_keep_sensitive_linears_from_scores(tiny_llama, calib, tmp_path):
    modules = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    scores = tmp_path / "analyze"
    scores.mkdir()
    rows = [[0.01, 0.02, 0.5, 0.0, 0.01, 0.01, 0.03], [0.01, 0.02, 0.0, 0.0, 0.01, 0.01, 0.9]]
    (scores / "sensitivity.json").write_text(json.dumps({"quant": {"modules": modules, "loss_delta_nats": rows}}))
    out = tmp_path / "mixed"
    metrics = quantize(tiny_llama, out, calib, method="rtn", scores=str(scores), keep_sensitive=2)
    assert metrics["kept_linears"] == ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.v_proj"]
    tensors = load_file(out / "model.safetensors")
    assert "model.layers.1.mlp.down_proj.weight" in tensors and "model.layers.1.mlp.down_proj.qweight" not in tensors
    manifest = json.loads((out / QUANT_GRID_FILE).read_text())
    assert set(manifest["kept"]) == set(metrics["kept_linears"]) and len(manifest["linears"]) == 12
    model = reload(out)
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_cli_quantize_and_bad_input(cli, tiny_llama, calib, tmp_path):
    code, out, err = cli("quantize", "--model", tiny_llama, "--method", "rtn", "--calib", calib, "--out", tmp_path / "q", "--json")
    assert code == 0, err
    assert json.loads(out)["method"] == "rtn" and (tmp_path / "q" / QUANT_GRID_FILE).is_file()
    code, _, err = cli("quantize", "--model", tiny_llama, "--keep-sensitive", "2", "--out", tmp_path / "bad")
    assert code == 2 and "keep_sensitive needs scores" in err
    code, _, err = cli(
        "quantize", "--model", tiny_llama, "--scores", tmp_path / "nowhere", "--keep-sensitive", "1", "--out", tmp_path / "bad"
    )
    assert code == 2 and "missing" in err


# --- the hand-off to ONNX Runtime -----------------------------------------------------


def matmulnbits_session(tensors: dict, in_features: int, out_features: int, bits: int, group_size: int):
    """One com.microsoft.MatMulNBits node built from saved GPTQ tensors as docs/quant_format.md says."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    K, N, G = in_features, out_features, in_features // group_size
    codes = unpack_rows(tensors["qweight"], bits).numpy().astype(np.uint8).T.reshape(N, G, group_size)
    per_byte = 8 // bits
    B = np.zeros((N, G, group_size // per_byte), np.uint8)
    for j in range(per_byte):
        B |= (codes[:, :, j::per_byte] << (bits * j)).astype(np.uint8)
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(tensors["scales"].float().numpy().T.reshape(-1).copy(), "scales")]
    if "zeros" in tensors:  # float zero points: same dtype as A, unpacked [N, G]
        zp = tensors["zeros"].numpy().T.astype(np.float32)
    else:  # integer zero points: uint8, two 4-bit blocks per byte (even block in the low nibble)
        z = unpack_cols(tensors["qzeros"], bits).numpy().T.astype(np.uint8)
        zp = z if bits == 8 else np.zeros((N, (G + 1) // 2), np.uint8)
        if bits == 4:
            for g in range(G):
                zp[:, g // 2] |= z[:, g] << (4 * (g % 2))
    inits.append(numpy_helper.from_array(np.ascontiguousarray(zp).reshape(-1), "zero_points"))
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=group_size
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_matmulnbits_computes_what_the_quantized_layer_computes(tiny_llama, calib, tmp_path):
    """The documented mapping of the saved tensors onto ONNX Runtime's MatMulNBits, on a real quantized layer."""
    for config in (
        {"method": "gptq", "group_size": 32},
        {"method": "rtn", "group_size": 64, "zero_point": "float"},
        {"method": "int8", "group_size": 32},
        {"method": "rtn", "group_size": 32, "sym": True},
    ):
        out = tmp_path / "-".join(map(str, config.values()))
        quantize(tiny_llama, out, calib, **config)
        manifest = json.loads((out / QUANT_GRID_FILE).read_text())
        saved = load_file(out / manifest["weights_file"])
        for name in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
            spec = manifest["linears"][name]
            tensors = {key: saved[t] for key, t in spec["tensors"].items()}
            session = matmulnbits_session(tensors, spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"])
            x = torch.randn(7, spec["in_features"], generator=torch.Generator().manual_seed(0))
            want = (x @ dequantize(tensors, spec["bits"])).numpy()
            got = session.run(None, {"A": x.numpy()})[0]
            assert np.abs(got - want).max() < 1e-5 * max(1.0, np.abs(want).max()), (config, name)


def test_vcompress_reads_a_quantize_folder_as_its_grid_computes_it(tiny_llama, calib, tmp_path, cli):
    """Every command that takes --model (eval, validate's reference, inspect) reads a quantize folder with its
    linears dequantized from the codes, in float32 and without gptqmodel: `vcompress eval --model <quantize
    folder>` stopped with an internal error where gptqmodel is installed (its layers refuse the float32 cast)."""
    from vcompress.core.models import load_model
    from vcompress.exporters.torch import TorchRunner

    out = tmp_path / "q"
    quantize(tiny_llama, out, calib, method="gptq", group_size=32)
    model, _ = load_model(out)
    expected = fake_quantized(tiny_llama, out)
    ids = torch.randint(5, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert TorchRunner(out, threads=1).forward(ids).shape == (2, 24, model.config.vocab_size)
    code, _, err = cli("inspect", out)
    assert code == 0, err
