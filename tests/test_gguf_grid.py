"""A quantized source keeps its grid: GGUF blocks read as codes, scales and float minimums (core/gguf_blocks.py)
equal gguf's own dequantization, and an ONNX export of a GGUF carries them into MatMulNBits as they are."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from gguf.quants import dequantize
from onnx import numpy_helper
from safetensors.torch import load_file

from tests.gguf_tiny import T, blocks_of, write_gguf
from tests.tiny import build_config, random_model
from vcompress.core.gguf_blocks import GGUFFile, read_blocks
from vcompress.exporters.onnx import OnnxRunner, export

QUIET = dict(log=lambda _: None, threads=1, new_tokens=4)
TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_blocks_are_gguf_dequantized_weights(qtype):
    rng = np.random.default_rng(int(qtype))
    w = rng.normal(0, 0.05, (6, 512)).astype(np.float32)
    raw = blocks_of(w, qtype, rng)
    blocks = read_blocks(raw, qtype, 512)
    want = dequantize(raw, qtype)
    assert blocks.codes.max() < 2**blocks.bits and blocks.block == {T.Q4_K: 32, T.Q5_K: 32, T.Q6_K: 16}.get(qtype, 32)
    np.testing.assert_allclose(blocks.dequantize(), want, rtol=1e-6, atol=1e-7)
    # wider codes and smaller blocks hold the same weights; a symmetric type stays symmetric on the wider grid
    wide = blocks.at(8, 16)
    np.testing.assert_allclose(wide.dequantize(), want, rtol=1e-6, atol=1e-7)
    if blocks.zero is not None:
        assert wide.zero == 128 and np.array_equal(wide.minimum, -wide.scale * 128)


# The tiny models' sizes are multiples of 256, a K-quant's superblock.
SIZES = {"llama": dict(hidden_size=256, intermediate_size=512, head_dim=64), "qwen2": dict(hidden_size=256, intermediate_size=512)}
# One linear type per projection, every block type read here among them (qkv share one MatMul: Q4_K with Q6_K lifts to 8 bits).
MIXED = {
    "attn_q": T.Q4_K,
    "attn_k": T.Q4_0,
    "attn_v": T.Q6_K,
    "attn_output": T.Q5_0,
    "ffn_gate": T.Q5_K,
    "ffn_up": T.Q8_0,
    "ffn_down": T.Q4_1,
}


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory, tokenizer):
    """{arch: (path, {types name: (gguf path, dequantized linears)})}: a tiny Llama and Qwen2 written as GGUF twice,
    every linear Q4_1 ("q4") and every block type at once ("mixed")."""

    root = tmp_path_factory.mktemp("gguf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VCOMPRESS_CACHE", str(root / "cache"))
        made = {}
        for arch in ("llama", "qwen2"):
            model = random_model(build_config(arch, len(tokenizer) + 1, 2, **SIZES[arch]))
            tokenizer.save_pretrained(root / arch)
            made[arch] = {
                name: (root / f"{arch}-{name}.gguf", write_gguf(model, root / arch, root / f"{arch}-{name}.gguf", types))
                for name, types in (("q4", {}), ("mixed", MIXED))
            }
        yield made


def _carried_weight(inits: dict, stem: str, k: int, n: int) -> np.ndarray:
    """W [N, K] as an exported MatMulNBits (plus its float-zero correction, if any) computes it."""
    key = next(name for name in inits if name.startswith(f"{stem}.weight_Q"))
    bits, rows = int(key.rsplit("_Q", 1)[1]), inits[key].reshape(n, -1)
    codes = np.stack([rows & 0xF, rows >> 4], -1).reshape(n, -1) if bits == 4 else rows
    scales = inits[f"{stem}.weight_scales"].reshape(n, -1)
    w = (codes.reshape(n, scales.shape[1], -1).astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
    correction = inits.get(f"{stem}.zero_correction.matrix")
    if correction is not None:
        w = w + correction.T[..., None]
    return w.reshape(n, k)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("types", ["q4", "mixed"])
def test_export_carries_the_gguf_blocks(tiny_ggufs, tmp_path, monkeypatch, arch, types):
    path, weights = tiny_ggufs[arch][types]
    monkeypatch.setenv("VCOMPRESS_CACHE", str(path.parent / "cache"))
    out = tmp_path / "o"
    quant = "int4" if types == "q4" else "int8"  # int8 holds every type's codes
    metrics = export(path, out, quant, accuracy_level=0, table_bits=0, **QUIET)
    grid = json.loads((out / "manifest.json").read_text())["quant"]["grid"]
    assert grid["source"] == "gguf" and grid["linears"] == 14 and grid["rerounded"] == {}
    model = onnx.load(str(out / "model.onnx"))
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and "zero_correction" not in n.name and "lm_head" not in n.name]
    inits = {t.name: numpy_helper.to_array(t, str(out)) for t in model.graph.initializer}
    # o_proj and down_proj are MatMuls of their own: their weights are the GGUF's dequantized weights to float rounding
    for layer in range(2):
        for stem, name in ((f"layers.{layer}.attn.o_proj", "self_attn.o_proj"), (f"layers.{layer}.mlp.down_proj", "mlp.down_proj")):
            want = weights[f"model.layers.{layer}.{name}"]
            got = _carried_weight(inits, stem, want.shape[1], want.shape[0])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=stem)
    assert metrics["parity"]["top1_agreement"] == 1.0 and metrics["parity"]["greedy_identical"] == 5
    from vcompress.core.models import load_model

    reference, _ = load_model(path)
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(OnnxRunner(out, threads=1).forward(ids), reference(input_ids=ids).logits, atol=1e-4)


def test_int4_rerounds_what_it_cannot_hold_and_says_so(tiny_ggufs, tmp_path, monkeypatch):
    path, _ = tiny_ggufs["qwen2"]["mixed"]
    monkeypatch.setenv("VCOMPRESS_CACHE", str(path.parent / "cache"))
    out = tmp_path / "o"
    export(path, out, "int4", accuracy_level=0, table_bits=0, min_top1_quantized=0, **QUIET)
    grid = json.loads((out / "manifest.json").read_text())["quant"]["grid"]
    rerounded = grid["rerounded"]
    # 5-, 6- and 8-bit codes do not fit 4 bits; q (Q4_K) and k (Q4_0) share a MatMul with v (Q6_K)
    assert "Q6_K holds 6-bit codes" in rerounded["model.layers.0.self_attn.v_proj"]
    assert "shares layers.0.attn.qkv_proj/MatMul" in rerounded["model.layers.0.self_attn.q_proj"]
    assert set(rerounded) == {
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
    }
    assert grid["linears"] == 2 and grid["types"]["Q4_1"] == 2  # down_proj (Q4_1) carried
    nodes = onnx.load(str(out / "model.onnx")).graph.node
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 8  # every body MatMul is 4-bit, carried or re-rounded
    assert not [n.name for n in nodes if n.op_type == "MatMul" and "zero_correction" not in n.name and "lm_head" not in n.name]


def test_llama_q_and_k_rows_come_back_in_hugging_face_order(tiny_ggufs):
    path, weights = tiny_ggufs["llama"]["mixed"]
    from transformers import LlamaConfig

    config = LlamaConfig(**build_config("llama", 10, 2, **SIZES["llama"]).to_dict())
    source = GGUFFile(path)
    for name in ("self_attn.q_proj", "self_attn.k_proj"):
        blocks = source.blocks(f"model.layers.1.{name}", config)
        np.testing.assert_allclose(blocks.dequantize(), weights[f"model.layers.1.{name}"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("types", ["q4", "mixed"])
def test_quantize_keeps_the_source_blocks_and_the_export_carries_them(tiny_ggufs, tmp_path, monkeypatch, types):
    from vcompress.cli import main
    from vcompress.core import quant_format

    path, weights = tiny_ggufs["qwen2"][types]
    monkeypatch.setenv("VCOMPRESS_CACHE", str(path.parent / "cache"))
    folder = tmp_path / "q"
    args = ["quantize", "--model", path, "--out", folder, "--method", "rtn", "--group-size", "32", "--heldout-blocks", "0"]
    assert main([str(a) for a in [*args, "--eval-per-subject", "0"]]) == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    manifest = quant_format.read_quant_grid(folder)
    kept = {n for n, s in manifest["linears"].items() if "mins" in s["tensors"]}
    if types == "q4":
        assert metrics["source_grid"]["kept_linears"] == 14 and metrics["quantized_linears"] == 0 and manifest["method"] == "gguf"
    else:  # Q4_K, Q4_0 and Q4_1 kept; 5-, 6- and 8-bit types re-quantized by the stage's method
        assert metrics["source_grid"]["types"] == {"Q4_0": 2, "Q4_1": 2, "Q4_K": 2} and metrics["quantized_linears"] == 8
        assert (
            manifest["method"] == "gguf+rtn"
            and "Q6_K holds 6-bit codes" in metrics["source_grid"]["requantized"]["model.layers.0.self_attn.v_proj"]
        )
    packed = load_file(str(folder / manifest["weights_file"]))
    for name in kept:  # the kept linears are the GGUF's weights
        w = quant_format.dequantize(quant_format.linear_tensors(packed, manifest["linears"][name]), 4).numpy().T
        np.testing.assert_allclose(w, weights[name], rtol=1e-6, atol=1e-7, err_msg=name)
    out = tmp_path / "o"
    exported = export(folder, out, "int4", accuracy_level=0, table_bits=0, **QUIET)
    assert exported["grid"]["linears"] == 14 and exported["parity"]["top1_agreement"] == 1.0
    reference, _ = quant_format.load_dequantized(folder, manifest)
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(OnnxRunner(out, threads=1).forward(ids), reference(input_ids=ids).logits, atol=1e-4)


def test_a_refused_export_of_a_float_source_names_gptq_first(tiny_llama, tmp_path):
    from vcompress.core.errors import Refused

    with pytest.raises(Refused, match=r"vcompress quantize --model .* --method gptq --bits 4 --out q.*export onnx --model q --quant int4"):
        export(tiny_llama, tmp_path / "out", "int4", min_top1_quantized=1.0, **QUIET)
    assert not (tmp_path / "out").exists()


def test_tensorrt_says_it_rerounds_a_gguf_source(tiny_ggufs, tmp_path, monkeypatch):
    from vcompress.exporters import tensorrt

    path, _ = tiny_ggufs["llama"]["q4"]
    monkeypatch.setenv("VCOMPRESS_CACHE", str(path.parent / "cache"))
    logged = []
    tensorrt.export(
        path, tmp_path / "t", "int4", block_size=32, threads=1, new_tokens=4, min_top1_quantized=0, heldout_blocks=0, log=logged.append
    )
    note = json.loads((tmp_path / "t" / "manifest.json").read_text())["quant"]["source_grid"]
    assert "not carried but re-rounded" in note and "zero points of zero only" in note and note in logged


def test_a_streamed_gguf_export_carries_the_same_bytes(tiny_ggufs, tmp_path, monkeypatch):
    import filecmp

    path, _ = tiny_ggufs["llama"]["q4"]
    monkeypatch.setenv("VCOMPRESS_CACHE", str(path.parent / "cache"))
    whole = export(path, tmp_path / "a", "int4", stream="off", accuracy_level=0, **QUIET)
    streamed = export(path, tmp_path / "b", "int4", stream="on", accuracy_level=0, **QUIET)
    assert streamed["streamed"] and streamed["grid"]["linears"] == whole["grid"]["linears"] == 14
    assert filecmp.cmp(tmp_path / "a" / "model.onnx.data", tmp_path / "b" / "model.onnx.data", shallow=False)


def test_a_table_stored_twice_at_two_grids_is_exported_once(tokenizer, tmp_path, monkeypatch):
    """A tied Qwen2 written as llama.cpp writes Qwen2.5: its one table twice, token_embd at Q5_0 and output at Q8_0
    (transformers loads it untied). The export stores the Q8_0 table once, exactly, with no zero points."""

    monkeypatch.setenv("VCOMPRESS_CACHE", str(tmp_path / "cache"))
    model = random_model(build_config("qwen2", len(tokenizer) + 1, 2, tie_word_embeddings=True, **SIZES["qwen2"]))
    tokenizer.save_pretrained(tmp_path / "tok")
    path = tmp_path / "twice.gguf"
    symmetric = {"attn_q": T.Q4_0, "attn_k": T.Q4_0, "attn_v": T.Q4_0, "attn_output": T.Q5_0, "ffn_gate": T.Q6_K, "ffn_up": T.Q6_K}
    weights = write_gguf(model, tmp_path / "tok", path, {**symmetric, "ffn_down": T.Q8_0}, table=T.Q5_0, head=T.Q8_0)
    assert not np.array_equal(weights["token_embd"], weights["output"])
    out = tmp_path / "o"
    metrics = export(path, out, "int8", accuracy_level=0, **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tied_embeddings"] and manifest["quant"]["shared_table"]["from"] == "lm_head.weight"
    assert manifest["quant"]["shared_table"]["steps"] < 1
    inits = {t.name: numpy_helper.to_array(t, str(out)) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert not [n for n in inits if n.startswith("lm_head.weight")]  # one table
    # symmetric grids (Q4_0, Q5_0, Q6_K, Q8_0 and the 8-bit table): no zero-point tensor, no float correction
    assert not [n for n in inits if "zero_points" in n or "zero_correction" in n]
    codes, scales = inits["embed_tokens.weight_Q"].astype(np.float32) - 128, inits["embed_tokens.weight_scales"]
    table = (codes.reshape(*scales.shape, -1) * scales[..., None]).reshape(codes.shape)
    np.testing.assert_allclose(table, weights["output"], rtol=1e-6, atol=1e-7)  # the Q8_0 table, exactly
    for layer in range(2):
        for stem, name in ((f"layers.{layer}.attn.o_proj", "self_attn.o_proj"), (f"layers.{layer}.mlp.down_proj", "mlp.down_proj")):
            want = weights[f"model.layers.{layer}.{name}"]
            np.testing.assert_allclose(_carried_weight(inits, stem, want.shape[1], want.shape[0]), want, rtol=1e-5, atol=1e-6)
    assert metrics["parity"]["top1_agreement"] > 0  # the gate compares with the source: Q5_0 embedding rows there
    # the artifact computes the source model with its embedding rows taken from the Q8_0 table
    from vcompress.core.models import load_model

    reference, _ = load_model(path)
    with torch.no_grad():
        reference.model.embed_tokens.weight.copy_(torch.from_numpy(weights["output"]))
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(OnnxRunner(out, threads=1).forward(ids), reference(input_ids=ids).logits, atol=1e-4)


def test_two_trained_tables_stay_two(tiny_ggufs, tmp_path, monkeypatch):
    path, _ = tiny_ggufs["qwen2"]["q4"]  # untied: its embedding and head are unrelated
    monkeypatch.setenv("VCOMPRESS_CACHE", str(path.parent / "cache"))
    out = tmp_path / "o"
    export(path, out, "int4", accuracy_level=0, table_bits=8, **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["tied_embeddings"] and "shared_table" not in manifest["quant"]
    names = {t.name for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert {"embed_tokens.weight_Q", "lm_head.weight_Q"} <= names


def test_quantize_can_carry_the_wider_blocks_and_an_int4_export_carries_them(tiny_ggufs, tmp_path, monkeypatch):
    from vcompress.cli import main
    from vcompress.core import quant_format
    from vcompress.core.models import load_model

    path, _ = tiny_ggufs["qwen2"]["mixed"]
    monkeypatch.setenv("VCOMPRESS_CACHE", str(path.parent / "cache"))
    folder = tmp_path / "q"
    args = ["quantize", "--model", path, "--out", folder, "--method", "gptq", "--bits", "4", "--wider-source", "carry"]
    assert main([str(a) for a in [*args, "--heldout-blocks", "0", "--eval-per-subject", "0"]]) == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    # every type is kept: 4-bit ones at 4 bits, Q5_0 / Q5_K / Q6_K / Q8_0 as 8-bit codes; nothing re-solved
    assert metrics["source_grid"]["kept_linears"] == 14 and metrics["quantized_linears"] == 0
    assert metrics["source_grid"]["requantized"] == {}
    manifest = quant_format.read_quant_grid(folder)
    assert {s["bits"] for s in manifest["linears"].values()} == {4, 8} and quant_format.carries_wider_source(manifest)
    out = tmp_path / "o"
    exported = export(folder, out, "int4", accuracy_level=0, table_bits=0, **QUIET)
    assert exported["grid"]["linears"] == 14 and exported["parity"]["top1_agreement"] == 1.0
    reference, _ = quant_format.load_dequantized(folder, manifest)
    source, _ = load_model(path)
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    logits = OnnxRunner(out, threads=1).forward(ids)
    assert torch.allclose(logits, reference(input_ids=ids).logits, atol=1e-4)
    assert torch.allclose(logits, source(input_ids=ids).logits, atol=1e-4)  # the GGUF's own weights
