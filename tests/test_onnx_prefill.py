"""The int8 prompt graph (exporters/_onnx_prefill.py) beside the 4-bit decode graph, run as one ORT GenAI pipeline."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from safetensors.torch import load_file

from vcompress.core import quant_format
from vcompress.core.errors import InputError
from vcompress.exporters.onnx import export

GENAI_GREEDY = Path(__file__).with_name("genai_greedy.py")


@pytest.fixture(scope="module")
def paired(tiny_models, tmp_path_factory):
    """A tiny Llama quantized on a float-zero grid, exported 4-bit with the int8 prompt graph."""
    from vcompress.cli import main

    root = tmp_path_factory.mktemp("prefill")
    folder = root / "quant"
    args = ["quantize", "--model", tiny_models["llama"], "--out", folder, "--method", "rtn", "--group-size", "32", "--zero-point", "float"]
    assert main([str(a) for a in args]) == 0
    out = root / "export"
    metrics = export(folder, out, "int4", prefill_graph="int8", log=lambda _: None, threads=1, min_top1_quantized=0.0)
    return folder, out, metrics


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, ids: list[int], cache: list[np.ndarray] | None, layers: int, kv_heads: int, head_dim: int):
    empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    cache = cache or [empty] * (2 * layers)
    past = sum(c.shape[2] for c in cache[:1])
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, past + len(ids)), np.int64)}
    feeds.update({f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": c for i, c in enumerate(cache)})
    names = ["logits"] + [f"present.{i // 2}.{('key', 'value')[i % 2]}" for i in range(2 * layers)]
    logits, *present = session.run(names, feeds)
    return logits[0, -1], present


def test_prompt_graph_holds_the_grid_as_int8_per_channel(paired):
    folder, out, metrics = paired
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["prefill_model"] == "model_prefill.onnx"
    assert metrics["prefill_graph_bytes"] == sum((out / f).stat().st_size for f in ("model_prefill.onnx", "model_prefill.onnx.data"))
    assert metrics["model_bytes"] > metrics["prefill_graph_bytes"]
    model = onnx.load(str(out / "model_prefill.onnx"))
    grid = quant_format.read_quant_grid(folder)
    int8 = {n.name.rsplit("/", 1)[0] for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"}
    nbits = {n.name.rsplit("/", 1)[0] for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert len(int8) == 3 * manifest["layers"] and not any("down_proj" in n for n in int8)  # qkv, o, gate_up
    assert nbits == {f"layers.{i}.mlp.down_proj" for i in range(manifest["layers"])} | {"lm_head"}  # and the 8-bit head
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    packed = load_file(str(folder / grid["weights_file"]))
    spec = grid["linears"]["model.layers.0.self_attn.o_proj"]
    want = quant_format.dequantize(quant_format.linear_tensors(packed, spec), 4).numpy()
    q, scale = inits["layers.0.attn.o_proj.weight_int8"], inits["layers.0.attn.o_proj.weight_scale"]
    assert q.dtype == np.int8 and scale.shape == (want.shape[1],)
    # every weight within half an int8 step of its column: rounding, nothing else
    assert np.all(np.abs(q * scale - want) <= scale / 2 + 1e-7)


def test_prompt_graph_fills_the_cache_the_decode_graph_reads(paired):
    """The two graphs take the same inputs: the int8 graph's logits are the 4-bit graph's to int8 rounding,
    and its cache, handed to the 4-bit graph, continues the sequence as the 4-bit graph's own cache does."""
    _, out, _ = paired
    m = json.loads((out / "manifest.json").read_text())
    shape = (m["layers"], m["kv_heads"], m["head_dim"])
    prefill, decode = _session(out / "model_prefill.onnx"), _session(out / "model.onnx")
    ids = [5, 17, 90, 33, 251, 8, 64, 12]
    fast, fast_cache = _run(prefill, ids, None, *shape)
    slow, slow_cache = _run(decode, ids, None, *shape)
    assert np.corrcoef(fast, slow)[0, 1] > 0.99
    assert all(a.shape == b.shape for a, b in zip(fast_cache, slow_cache))
    after_fast, _ = _run(decode, [42], fast_cache, *shape)
    after_slow, _ = _run(decode, [42], slow_cache, *shape)
    assert np.corrcoef(after_fast, after_slow)[0, 1] > 0.99


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai is not installed")
def test_genai_runs_the_prompt_graph_then_the_decode_graph(paired):
    """ORT GenAI's pipeline: the first token is the int8 graph's pick on the prompt, the next the 4-bit graph's
    on that token with the int8 graph's cache."""
    _, out, _ = paired
    config = json.loads((out / "genai_config.json").read_text())["model"]
    assert config["type"] == "decoder-pipeline"
    stages = [next(iter(s)) for s in config["decoder"]["pipeline"]]
    assert stages == ["prompt", "token_gen"]
    m = json.loads((out / "manifest.json").read_text())
    shape = (m["layers"], m["kv_heads"], m["head_dim"])
    prompt = [5, 17, 90, 33, 251, 8, 64, 12]
    first, cache = _run(_session(out / "model_prefill.onnx"), prompt, None, *shape)
    second, _ = _run(_session(out / "model.onnx"), [int(first.argmax())], cache, *shape)
    request = {"folder": str(out), "prompts": [prompt], "new_tokens": 2}
    done = subprocess.run([sys.executable, str(GENAI_GREEDY)], input=json.dumps(request), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tokens"] == [[int(first.argmax()), int(second.argmax())]]


def test_prompt_graph_needs_a_4bit_decode_graph(tiny_models, tmp_path):
    from pydantic import ValidationError

    from vcompress.exporters.onnx import OnnxExportConfig

    with pytest.raises(ValidationError, match="--quant int4"):
        OnnxExportConfig(quant="int8", prefill_graph="int8")
    with pytest.raises(InputError, match="quantize folder"):
        export(tiny_models["llama"], tmp_path / "float", "int4", prefill_graph="int8", log=lambda _: None, threads=1)


def test_runner_runs_prompts_on_the_prompt_graph_as_genai_does(paired):
    """Our loop follows the pipeline (multi-token runs on the int8 graph, single tokens on the 4-bit one);
    prompt_graph=False scores the 4-bit graph alone."""
    import torch

    from vcompress.exporters.onnx import OnnxRunner

    _, out, _ = paired
    m = json.loads((out / "manifest.json").read_text())
    shape = (m["layers"], m["kv_heads"], m["head_dim"])
    prompt = [5, 17, 90, 33, 251, 8, 64, 12]
    ids = torch.tensor([prompt])
    for prompt_graph, file in ((True, "model_prefill.onnx"), (False, "model.onnx")):
        runner = OnnxRunner(out, threads=1, prompt_graph=prompt_graph)
        want, cache = _run(_session(out / file), prompt, None, *shape)
        got = runner.forward(ids)[0, -1].numpy()
        assert np.allclose(got, want, atol=1e-5), file
        logits, state = runner.session.prefill(np.array(prompt))
        assert np.allclose(logits, want, atol=1e-5)
        step, _ = runner.session.decode(7, state)
        assert np.allclose(step, _run(_session(out / "model.onnx"), [7], cache, *shape)[0], atol=1e-4)
