"""An untied LM head (tiny Qwen2, tie_word_embeddings=False) in a quantized ONNX export: stored at
`table_bits` like the tied head and the embedding (MatMulNBits / GatherBlockQuantized), fp32 at 0.

Real models with an untied head (Qwen2.5-Coder-0.5B's GGUF: 151,936 x 896) kept it fp32, 545 MB of
a 939 MB INT4 artifact (issue 20)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from tests.test_onnx import LOOSE, QUIET, dequantize, dequantize_blocks
from vcompress.core import quant_format
from vcompress.exporters.onnx import OnnxRunner, export

ARCH = "qwen2"  # tests/tiny.py: tie_word_embeddings=False, q/k/v biases, GQA
BLOCK = 32


@pytest.fixture(scope="module")
def untied(tiny_models, tmp_path_factory):
    """(folder, metrics) of the tiny Qwen2 exported with these settings, each built once."""
    root, cache = tmp_path_factory.mktemp("untied"), {}

    def get(source: str = "fp32", quant: str = "int4", **settings):
        key = (source, quant, tuple(sorted(settings.items())))
        if key not in cache:
            out = root / f"{source}-{quant}-{len(cache)}"
            model = tiny_models[ARCH] if source == "fp32" else get_quantized(tiny_models, root)
            cache[key] = (out, export(model, out, quant, **QUIET, **LOOSE, **settings))
        return cache[key]

    return get


_QUANTIZED = {}


def get_quantized(tiny_models, root):
    """The tiny Qwen2 through `vcompress quantize --method rtn --group-size 32` (the hand-off folder)."""
    if "rtn" not in _QUANTIZED:
        from vcompress.cli import main

        out = root / "qwen2-rtn"
        assert main(["quantize", "--model", str(tiny_models[ARCH]), "--out", str(out), "--method", "rtn", "--group-size", "32"]) == 0
        _QUANTIZED["rtn"] = out
    return _QUANTIZED["rtn"]


def _graph(folder):
    model = onnx.load(str(folder / "model.onnx"))
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _head_node(model):
    (node,) = [n for n in model.graph.node if n.name.startswith("lm_head/MatMul")]
    return node


def _full_size_floats(inits, vocab: int, hidden: int) -> list[str]:
    return [k for k, v in inits.items() if v.dtype == np.float32 and sorted(v.shape) == sorted((vocab, hidden))]


def _head_weight(inits, node, vocab: int, hidden: int) -> np.ndarray:
    """The head's W [vocab, hidden] as its MatMulNBits blocks dequantize."""
    a = _attrs(node)
    zp = inits[node.input[3]] if len(node.input) > 3 else None
    return dequantize_blocks(
        inits[node.input[1]], inits[node.input[2]], zp, rows=vocab, cols=hidden, bits=a["bits"], block_size=a["block_size"]
    )


def _feeds(runner, ids):
    n = ids.shape[1]
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, n), np.int64), "logits_to_keep": np.array([n])}
    feeds.update(
        {past: np.zeros((1, runner.session.kv_heads, 0, runner.session.head_dim), np.float32) for past, _ in runner.session.kv_names}
    )
    return feeds


@pytest.mark.parametrize("table_bits", [4, 8])
def test_int4_untied_head_is_matmulnbits_at_table_bits(untied, table_bits):
    fp32_dir, _ = untied(quant="none")
    out, metrics = untied(accuracy_level=0, table_bits=table_bits, block_size=BLOCK)
    model, inits = _graph(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tied_embeddings"] is False and manifest["quant"]["table_bits"] == table_bits
    vocab, hidden = manifest["vocab_size"], _graph(fp32_dir)[1]["embed_tokens.weight"].shape[1]

    head = _head_node(model)
    assert head.op_type == "MatMulNBits" and head.domain == "com.microsoft"
    assert {k: _attrs(head)[k] for k in ("K", "N", "bits", "block_size")} == dict(K=hidden, N=vocab, bits=table_bits, block_size=BLOCK)
    assert "accuracy_level" not in _attrs(head)  # as configured (0)
    (embed,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert _attrs(embed)["bits"] == table_bits
    # The body stays on the int4 grid; no fp32 [vocab, hidden] table is left anywhere.
    body = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n is not head]
    assert body and all(_attrs(n)["bits"] == 4 for n in body)
    assert "MatMul" not in {n.op_type for n in model.graph.node} and not _full_size_floats(inits, vocab, hidden)

    # The head's blocks are the fp32 head within half a step.
    w = _graph(fp32_dir)[1]["lm_head.weight"].T  # stored [hidden, vocab] for MatMul
    a = _attrs(head)
    got = _head_weight(inits, head, vocab, hidden)
    step = np.repeat(inits[head.input[2]].reshape(vocab, -1), a["block_size"], axis=1)
    assert np.all(np.abs(got - w) <= step / 2 + 1e-6)
    assert 0 < np.abs(got - w).max()  # really quantized

    # The graph computes what fp32 MatMul / Gather compute on those dequantized weights.
    import onnxruntime as ort

    plain = ort.InferenceSession(dequantize(model).SerializeToString(), providers=["CPUExecutionProvider"])
    runner = OnnxRunner(out, threads=1)
    ids = torch.randint(5, 300, (1, 10), generator=torch.Generator().manual_seed(4))
    assert np.abs(plain.run(["logits"], _feeds(runner, ids))[0] - runner.forward(ids).numpy()).max() < 1e-4

    # Smaller than the same export with both tables fp32.
    fp32_tables, _ = untied(accuracy_level=0, table_bits=0, block_size=BLOCK)
    assert metrics["model_bytes"] < untied(accuracy_level=0, table_bits=0, block_size=BLOCK)[1]["model_bytes"]
    table_bytes = sum(v.nbytes for k, v in inits.items() if k.startswith(("lm_head.weight", "embed_tokens.weight")))
    assert table_bytes <= 2 * vocab * hidden * (table_bits / 8 + 5 / BLOCK)  # codes, an fp32 scale and a zero point per block
    assert _graph(fp32_tables)[1]["lm_head.weight"].dtype == np.float32


def test_table_bits_0_keeps_the_untied_head_and_embedding_fp32(untied):
    out, _ = untied(accuracy_level=0, table_bits=0, block_size=BLOCK)
    model, inits = _graph(out)
    head = _head_node(model)
    assert head.op_type == "MatMul" and head.input[1] == "lm_head.weight" and inits["lm_head.weight"].dtype == np.float32
    assert "GatherBlockQuantized" not in {n.op_type for n in model.graph.node}
    assert json.loads((out / "manifest.json").read_text())["quant"]["table_bits"] == 0


@pytest.mark.parametrize("table_bits", [8, 0])
def test_int8_untied_head_follows_table_bits(untied, table_bits):
    out, metrics = untied(quant="int8", table_bits=table_bits)
    model, inits = _graph(out)
    head = _head_node(model)
    if table_bits:
        assert head.op_type == "MatMulNBits" and _attrs(head)["bits"] == 8 and head.input[1] == "lm_head.weight_Q"
        assert "lm_head.weight" not in inits
    else:
        assert head.op_type == "MatMul" and inits["lm_head.weight"].dtype == np.float32
    assert metrics["parity"]["top1_agreement"] > 0.9


def test_carried_grid_with_untied_head_matches_the_checkpoint_with_dequantized_tables(untied, tiny_models):
    """`vcompress quantize` leaves the head float; the export stores it at table_bits. The ONNX logits
    are the quantized checkpoint's with its embedding and head replaced by their ONNX blocks, dequantized."""
    out, metrics = untied(source="rtn", accuracy_level=0, table_bits=4, block_size=BLOCK)
    model, inits = _graph(out)
    assert metrics["grid"] and "lm_head/MatMul" not in metrics["grid"]["kept_float"]
    assert json.loads((out / "manifest.json").read_text())["quant"]["method"] == "carried"
    head = _head_node(model)
    assert head.op_type == "MatMulNBits" and _attrs(head)["bits"] == 4
    folder = get_quantized(tiny_models, None)
    reference, _ = quant_format.load_dequantized(folder, quant_format.read_quant_grid(folder))
    vocab, hidden = reference.config.vocab_size, reference.config.hidden_size
    assert not _full_size_floats(inits, vocab, hidden)
    (embed,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    e = _attrs(embed)
    table = dequantize_blocks(
        inits[embed.input[0]],
        inits[embed.input[2]],
        inits[embed.input[3]],
        rows=vocab,
        cols=hidden,
        bits=e["bits"],
        block_size=e["block_size"],
    )
    with torch.no_grad():
        assert reference.lm_head.weight is not reference.model.embed_tokens.weight
        reference.lm_head.weight.copy_(torch.from_numpy(_head_weight(inits, head, vocab, hidden)))
        reference.model.embed_tokens.weight.copy_(torch.from_numpy(table))
        ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(5))
        expected = reference(input_ids=ids).logits
    got = OnnxRunner(out, threads=1).forward(ids)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def _table_nodes(folder):
    model, inits = _graph(folder)
    (embed,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    return _attrs(embed)["bits"], _attrs(_head_node(model))["bits"], sum(v.nbytes for v in inits.values())


@pytest.mark.parametrize("source", ["fp32", "rtn"])
def test_head_bits_sets_the_untied_head_apart_from_the_gathered_table(untied, source):
    """table_bits 4 + head_bits 8: the embedding (one row gathered per token) at 4 bits, the head at 8,
    on a float source and on a carried grid; the file sits between the all-4 and all-8 exports."""
    mixed, _ = untied(source=source, accuracy_level=0, table_bits=4, head_bits=8, block_size=BLOCK)
    assert _table_nodes(mixed)[:2] == (4, 8)
    quant = json.loads((mixed / "manifest.json").read_text())["quant"]
    assert (quant["table_bits"], quant["head_bits"]) == (4, 8)
    sizes = [_table_nodes(untied(source=source, accuracy_level=0, table_bits=b, block_size=BLOCK)[0])[2] for b in (4, 8)]
    assert sizes[0] < _table_nodes(mixed)[2] < sizes[1]


def test_head_bits_gives_a_tied_table_the_heads_bits(tiny_models, tmp_path):
    """A tied table is the head's: head_bits decides it (table_bits alone would store it at 4)."""
    out = tmp_path / "tied"
    export(tiny_models["llama"], out, "int4", accuracy_level=0, table_bits=4, head_bits=8, block_size=BLOCK, **QUIET, **LOOSE)
    model, _ = _graph(out)
    (embed,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    (head,) = [n for n in model.graph.node if n.name == "lm_head/Gemm"]
    assert _attrs(embed)["bits"] == _attrs(head)["bits"] == 8
    quant = json.loads((out / "manifest.json").read_text())["quant"]
    assert (quant["table_bits"], quant["head_bits"]) == (8, 8)


def test_an_8bit_table_is_symmetric_and_gives_a_q8_0_table_back_exactly(tiny_models, tmp_path):
    """8-bit tables take GGUF Q8_0's grid (scale = block absmax / 127, no zero points): a table already on
    that grid (the embedded default's token_embd is Q8_0) is stored without loss, and no zero points are written."""
    from transformers import AutoModelForCausalLM

    checkpoint = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    table = checkpoint.get_input_embeddings().weight.data
    vocab, hidden = table.shape
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (vocab, hidden // 32, 32))
    codes[..., 0] = rng.choice([-127, 127], (vocab, hidden // 32))  # Q8_0: each block's absmax is code 127
    d = rng.uniform(1e-3, 2e-2, (vocab, hidden // 32, 1)).astype(np.float16).astype(np.float32)
    table.copy_(torch.from_numpy((codes * d).reshape(vocab, hidden).astype(np.float32)))
    source = tmp_path / "q8_0-table"
    shutil.copytree(tiny_models["llama"], source)
    checkpoint.save_pretrained(source)
    out = tmp_path / "onnx"
    export(source, out, "int4", accuracy_level=0, table_bits=4, head_bits=8, block_size=32, **QUIET, **LOOSE)
    model, inits = _graph(out)
    (embed,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    (head,) = [n for n in model.graph.node if n.name == "lm_head/Gemm"]  # tied: the head reads the same blocks
    assert len(embed.input) == 3 and len(head.input) == 3  # no zero points: both ops take 128
    got = dequantize_blocks(inits[embed.input[0]], inits[embed.input[2]], None, rows=vocab, cols=hidden, bits=8, block_size=32)
    assert np.allclose(got, table.numpy(), rtol=1e-6, atol=0)
