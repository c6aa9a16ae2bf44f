"""ONNX export and its ONNX Runtime runner, on tiny Llama (GQA) / Qwen2 / GPT-2 checkpoints."""

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
import torch
from onnx import helper, numpy_helper
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vcompress.core import quant_format
from vcompress.core.errors import Refused
from vcompress.exporters import open_runner
from vcompress.exporters.onnx import OnnxRunner, export

QUIET = dict(log=lambda _: None, threads=1)
# Tiny random models have near-flat logits: their int4/int8 agreement says nothing, the real
# default is checked by bench/onnx_latency.py and the export's own parity figures.
LOOSE = dict(min_top1_quantized=0.0)


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(arch: str, quant: str = "none", **settings):
        key = (arch, quant, tuple(sorted(settings.items())))
        if key not in cache:
            out = root / f"{arch}-{quant}-{len(cache)}"
            metrics = export(tiny_models[arch], out, quant, **QUIET, **({} if quant == "none" else LOOSE), **settings)
            cache[key] = (out, metrics)
        return cache[key]

    return get


def _torch(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _initializers(folder) -> dict[str, np.ndarray]:
    model = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_fp32_export_matches_pytorch(exported, arch):
    out, metrics = exported(arch)
    parity = metrics["parity"]
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4
    assert parity["top1_agreement"] == 1.0
    assert parity["greedy_identical"] == parity["prompts"] == 5 and parity["greedy_tokens"] == 32
    assert json.loads((out / "metrics.json").read_text())["parity"]["passed"] is True


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_manifest_describes_the_files_and_graph(exported, arch):
    out, _ = exported(arch)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["quant"]["scheme"] == "none"
    for name in ("model", "weights", "config", "tokenizer", "tokenizer_config", "genai_config"):
        assert (out / manifest["files"][name]).is_file()
    assert (out / "recipe.yaml").is_file() and (out / "generation_config.json").is_file()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i["name"] for i in manifest["inputs"]] == [i.name for i in session.get_inputs()]
    assert [o["name"] for o in manifest["outputs"]] == [o.name for o in session.get_outputs()]
    types = {"int64": "tensor(int64)", "int32": "tensor(int32)", "float32": "tensor(float)"}
    assert [types[i["dtype"]] for i in manifest["inputs"]] == [i.type for i in session.get_inputs()]
    optional = [i.name for i in session.get_overridable_initializers()]
    assert [i["name"] for i in manifest["optional_inputs"]] == optional == ["logits_to_keep"]
    assert manifest["parity"]["passed"] and manifest["thresholds"]["greedy_tokens"] == 32
    from importlib.metadata import version

    assert manifest["app_runtime"] == {"name": "onnxruntime-genai", "version": version("onnxruntime-genai"), "config": "genai_config.json"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_kv_cache_decode_equals_full_recompute(exported, arch):
    out, _ = exported(arch)
    runner = OnnxRunner(out, threads=1)
    runner.session.headroom = 3  # force the cache to grow (and be re-bound) twice during the loop
    ids = torch.randint(5, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    logits, state = runner.prefill(ids)
    seq = ids[0].tolist()
    for step in range(10):
        full = runner.forward(torch.tensor([seq]))[0, -1]
        assert torch.allclose(logits, full, atol=1e-4), f"step {step}"
        token = int(logits.argmax()) if step % 2 else (step * 37) % 300  # also feed tokens greedy would not pick
        logits, state = runner.decode(token, state)
        seq.append(token)
    assert state.capacity >= state.length == len(seq) and state.capacity > 12


def test_open_runner_gives_onnx_runner_matching_torch(exported, tiny_models):
    out, _ = exported("llama")
    runner = open_runner(out, threads=1)
    assert isinstance(runner, OnnxRunner) and runner.backend == "onnx" and runner.tokenizer is not None
    ids = torch.randint(5, 300, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding: positions past it are not compared
    got = runner.forward(ids, mask)
    want = _torch(tiny_models["llama"])(input_ids=ids).logits
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.allclose(got[0], want[0], atol=1e-4) and torch.allclose(got[1, :7], want[1, :7], atol=1e-4)


def test_generation_greedy_and_sampling(exported, tiny_models):
    out, _ = exported("qwen2")
    runner = OnnxRunner(out, threads=1)
    ids = torch.tensor([runner.tokenizer("The heart pumps blood")["input_ids"]])
    model = _torch(tiny_models["qwen2"])
    want = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1] :].tolist()
    assert runner.generate(ids, 12) == want
    a = runner.generate(ids, 12, temperature=1.0, top_p=0.9, seed=3)
    assert a == runner.generate(ids, 12, temperature=1.0, top_p=0.9, seed=3) and len(a) == 12


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_int4_is_the_dequantized_model_and_small(exported, arch):
    fp32_dir, fp32 = exported(arch)
    out, metrics = exported(arch, "int4", accuracy_level=0)  # fp32 activations: exact to compare
    assert metrics["parity"]["top1_agreement"] > 0.3
    # The int4 graph computes exactly what fp32 MatMul/Gather compute on its dequantized weights.
    model = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "GatherBlockQuantized" in ops and "MatMul" not in ops and "Gemm" not in ops
    plain = ort.InferenceSession(dequantize(model).SerializeToString(), providers=["CPUExecutionProvider"])
    runner = OnnxRunner(out, threads=1)
    ids = torch.randint(5, 300, (1, 10), generator=torch.Generator().manual_seed(4))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 10), np.int64), "logits_to_keep": np.array([10])}
    if runner.session.uses_positions:
        feeds["position_ids"] = np.arange(10)[None]
    feeds.update(
        {past: np.zeros((1, runner.session.kv_heads, 0, runner.session.head_dim), np.float32) for past, _ in runner.session.kv_names}
    )
    assert np.abs(plain.run(["logits"], feeds)[0] - runner.forward(ids).numpy()).max() < 1e-4
    # ...and those weights are the fp32 export's, each within half a quantization step.
    original, quant = _initializers(fp32_dir), _initializers(out)
    table = original["embed_tokens.weight"]
    scales = quant["embed_tokens.weight_scales"]
    got = dequantize_blocks(
        quant["embed_tokens.weight_Q"],
        scales,
        quant["embed_tokens.weight_zero_points"],
        rows=table.shape[0],
        cols=table.shape[1],
        bits=4,
        block_size=32,
    )
    step = np.repeat(scales, 32, axis=1)
    assert np.all(np.abs(got - table) <= step / 2 + 1e-6)
    # Stored once, 4-bit: no fp32 copy of the table, no second copy for the tied head.
    assert not any(v.dtype == np.float32 and v.size >= table.size // 8 for k, v in quant.items() if k not in ("cos_cache", "sin_cache"))
    packed = quant["embed_tokens.weight_Q"]
    assert [k for k, v in quant.items() if v.shape == packed.shape] == ["embed_tokens.weight_Q"]

    # Weight bytes (files of tiny models are mostly onnx's 4 KB alignment of external data): 4-bit
    # codes plus a float scale and a 4-bit zero point per 32 weights is (0.5 + 4.5 / 32) / 4 = 16% of
    # fp32. The rotary tables (fp32, sized by max positions, not weights) are left out.
    def weight_bytes(inits):
        return sum(v.nbytes for k, v in inits.items() if k not in ("cos_cache", "sin_cache"))

    ratio = weight_bytes(quant) / weight_bytes(original)
    assert 0.12 < ratio < 0.25, ratio


def test_fp32_tied_table_is_stored_once(exported):
    out, _ = exported("llama")
    inits = _initializers(out)
    big = [k for k, v in inits.items() if v.shape == inits["embed_tokens.weight"].shape]
    assert big == ["embed_tokens.weight"]


@pytest.mark.parametrize("method", ["blockwise", "dynamic"])
def test_int8(exported, method):
    _, fp32 = exported("llama")
    out, metrics = exported("llama", "int8", int8_method=method)
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    if method == "dynamic":
        assert {"MatMulInteger", "DynamicQuantizeLinear"} & ops or "DynamicQuantizeMatMul" in ops
    else:
        assert "MatMul" not in ops and "MatMulNBits" in ops
    assert metrics["parity"]["top1_agreement"] > 0.9
    assert metrics["model_bytes"] / fp32["model_bytes"] < 0.5


@pytest.mark.parametrize("method", ["hqq", "rtn-float"])
def test_onnx_runtime_int4_quantizers(exported, method):
    out, metrics = exported("llama", "int4", method=method)
    assert json.loads((out / "manifest.json").read_text())["quant"]["method"] == method
    assert metrics["parity"]["top1_agreement"] > 0.3


def test_rtn_float_zero_recovers_a_q4_1_grid():
    from vcompress.exporters._onnx_quant import rtn_blocks

    # Blocks that already lie on a float-minimum grid (GGUF Q4_1: w = m + d * q, every code used)
    # come back exactly; an integer zero point cannot do that.
    rng = np.random.default_rng(0)
    codes = np.stack([rng.permutation(np.arange(32) % 16) for _ in range(8 * 3)]).reshape(8, 3, 32)
    d, m = rng.uniform(0.01, 0.1, (8, 3, 1)), rng.uniform(-1, 0, (8, 3, 1))
    w = (m + d * codes).astype(np.float32).reshape(8, 96).T  # [K=96, N=8]
    for float_zero, exact in ((True, True), (False, False)):
        packed, scales, zp = rtn_blocks(w, bits=4, block_size=32, float_zero=float_zero)
        got = dequantize_blocks(packed, scales, zp, rows=8, cols=96, bits=4, block_size=32).T
        assert (np.abs(got - w).max() < 1e-5) == exact


def test_failed_parity_raises_and_writes_nothing(tiny_llama, tmp_path):
    with pytest.raises(Refused, match="parity"):
        export(tiny_llama, tmp_path / "out", "none", max_abs_diff=1e-12, **QUIET)
    assert not (tmp_path / "out").exists()


def test_cli_export_onnx(cli, tiny_llama, tmp_path):
    out = tmp_path / "int4"
    code, stdout, stderr = cli("export", "onnx", "--model", tiny_llama, "--out", out, "--quant", "int8", "--threads", "1", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["parity"]["passed"] is True
    code, _, stderr = cli("export", "onnx", "--model", tiny_llama, "--out", out, "--quant", "int8")
    assert code == 2 and "--force" in stderr
    code, _, stderr = cli("export", "onnx", "--model", tiny_llama, "--out", tmp_path / "x", "--block-size", "48", "--force")
    assert code == 2 and "power of two" in stderr


@pytest.fixture(scope="module")
def quantized_llama(cli_module, tiny_models, tmp_path_factory):
    """A tiny Llama through the quantize stage (its hand-off folder with quant_manifest.json)."""
    out = tmp_path_factory.mktemp("quant") / "llama-rtn"
    code = cli_module("quantize", "--model", tiny_models["llama"], "--out", out, "--method", "rtn", "--group-size", "32")
    assert code == 0
    return out


@pytest.fixture(scope="module")
def cli_module():
    from vcompress.cli import main

    return lambda *args: main([str(a) for a in args])


def test_carried_grid_is_exact(quantized_llama, tmp_path):
    manifest = quant_format.read_quant_grid(quantized_llama)
    # fp32 activations and an fp32 table: the export computes exactly the quantized checkpoint.
    out = tmp_path / "carried"
    metrics = export(quantized_llama, out, "int4", accuracy_level=0, table_bits=0, **QUIET)
    assert metrics["grid"]["linears"] == len(manifest["linears"]) and metrics["parity"]["greedy_identical"] == 5
    model = onnx.load(str(out / "model.onnx"))
    assert {n.op_type for n in model.graph.node} >= {"MatMulNBits"} and "MatMul" not in {n.op_type for n in model.graph.node}
    # The MatMulNBits blocks are the checkpoint's codes repacked, not re-quantized: bit for bit its W.
    packed, inits = load_file(str(quantized_llama / manifest["weights_file"])), _initializers(out)
    for layer in range(2):
        spec, stem = manifest["linears"][f"model.layers.{layer}.self_attn.o_proj"], f"layers.{layer}.attn.o_proj"
        got = dequantize_blocks(
            inits[f"{stem}.weight_Q4"],
            inits[f"{stem}.weight_scales"],
            inits[f"{stem}.weight_zero_points"],
            rows=spec["out_features"],
            cols=spec["in_features"],
            bits=4,
            block_size=spec["group_size"],
        )
        assert np.array_equal(got.T, quant_format.dequantize(quant_format.linear_tensors(packed, spec), 4).numpy()), stem
    reference, _ = quant_format.load_dequantized(quantized_llama, manifest)
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(OnnxRunner(out, threads=1).forward(ids), reference(input_ids=ids).logits, atol=1e-4)
    assert json.loads((out / "manifest.json").read_text())["quant"]["method"] == "carried"


def test_carried_float_zero_points_stay_exact_on_the_fast_kernel(cli_module, tiny_models, tmp_path):
    """Float zero points (Q4_1-style) become the symmetric MatMulNBits (no zero points) plus an exact
    float correction, so ONNX Runtime keeps its fast kernels and the export still computes the checkpoint."""
    folder = tmp_path / "float-zero"
    assert (
        cli_module(
            "quantize", "--model", tiny_models["llama"], "--out", folder, "--method", "rtn", "--group-size", "32", "--zero-point", "float"
        )
        == 0
    )
    manifest = quant_format.read_quant_grid(folder)
    out = tmp_path / "carried"
    export(folder, out, "int4", accuracy_level=0, table_bits=0, **QUIET)
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.input) == 3 for n in nbits) and not any("zero_points" in name for name in inits)
    assert sum(n.name.endswith("zero_correction/MatMul") for n in model.graph.node) == len(nbits)
    reference, _ = quant_format.load_dequantized(folder, manifest)
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(OnnxRunner(out, threads=1).forward(ids), reference(input_ids=ids).logits, atol=1e-4)


def test_compact_export_stores_side_tables_float16_and_computes_rotary(cli_module, tiny_models, tmp_path):
    """--compact: block scales and float-zero corrections as float16 (a Cast each, folded at load), the
    rotary tables computed by the graph; a smaller file that still computes the checkpoint (to float16
    rounding of the corrections) and still runs under ONNX Runtime GenAI's loop (our runner)."""
    folder = tmp_path / "float-zero"
    args = ["quantize", "--model", tiny_models["llama"], "--out", folder, "--method", "rtn", "--group-size", "32", "--zero-point", "float"]
    assert cli_module(*args) == 0
    plain, compact = tmp_path / "plain", tmp_path / "compact"
    export(folder, plain, "int4", accuracy_level=0, table_bits=8, **QUIET)
    export(folder, compact, "int4", accuracy_level=0, table_bits=8, compact=True, **QUIET)
    model = onnx.load(str(compact / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast" and n.input[0] in inits}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert all(inits[casts[n.input[2]]].data_type == onnx.TensorProto.FLOAT16 for n in nbits)  # scales, the head's too
    corrections = [n for n in model.graph.node if n.name.endswith("zero_correction/MatMul")]
    assert corrections and all(inits[casts[n.input[1]]].data_type == onnx.TensorProto.FLOAT16 for n in corrections)
    assert "cos_cache" not in inits and "sin_cache" not in inits
    size = lambda folder: (folder / "model.onnx.data").stat().st_size  # noqa: E731
    assert size(compact) < 0.8 * size(plain)
    ids = torch.randint(5, 300, (2, 40), generator=torch.Generator().manual_seed(6))
    want, got = OnnxRunner(plain, threads=1).forward(ids), OnnxRunner(compact, threads=1).forward(ids)
    assert torch.allclose(got, want, atol=2e-2) and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    assert json.loads((compact / "manifest.json").read_text())["quant"]["compact"] is True
    from vcompress.exporters.onnx import OnnxExportConfig

    with pytest.raises(ValueError, match="--quant int4 or int8"):  # an fp32 export has no scales to store
        OnnxExportConfig(compact=True)


def test_carried_grid_refuses_other_bits(quantized_llama, tmp_path):
    from vcompress.core.errors import InputError

    with pytest.raises(InputError, match="--quant int4"):
        export(quantized_llama, tmp_path / "x", "int8", **QUIET)


# --- reading quantized weights back: the oracle the int4/int8 graphs are checked against ----------


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Packed uint8 rows to integer codes, `count` per row, low bits first (ORT's order)."""
    rows = data.reshape(data.shape[0], -1)
    if bits == 8:
        return rows[:, :count].astype(np.float32)
    codes = np.stack([rows & 0xF, rows >> 4], axis=-1).reshape(rows.shape[0], -1)
    return codes[:, :count].astype(np.float32)


def dequantize_blocks(data, scales, zero_points, *, rows: int, cols: int, bits: int, block_size: int) -> np.ndarray:
    """[rows, cols] floats from blocks along cols (MatMulNBits: rows=N, cols=K; GatherBlockQuantized: rows=vocab)."""
    k_blocks = -(-cols // block_size)
    codes = unpack(data, bits, k_blocks * block_size).reshape(rows, k_blocks, block_size)
    scales = np.asarray(scales, np.float32).reshape(rows, k_blocks)
    if zero_points is None:
        zp = np.full((rows, k_blocks), 2 ** (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8:
        zp = unpack(zero_points, bits, k_blocks).reshape(rows, k_blocks)
    else:
        zp = np.asarray(zero_points, np.float32).reshape(rows, k_blocks)
    return ((codes - zp[..., None]) * scales[..., None]).reshape(rows, -1)[:, :cols]


def dequantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with MatMulNBits / GatherBlockQuantized turned back into fp32 MatMul / Gather.

    The int4 graph must compute what this one computes (tests check it), and its weights must lie
    within half a step of the originals.
    """
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # a Reshape of the shared table feeds the tied head's B
        if node.op_type == "Reshape" and node.input[0] in inits and node.input[1] in inits:
            inits[node.output[0]] = inits[node.input[0]].reshape(inits[node.input[1]])
    nodes, extra = [], []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            zp = inits.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            w = dequantize_blocks(
                inits[node.input[1]],
                inits[node.input[2]],
                zp,
                rows=attrs["N"],
                cols=attrs["K"],
                bits=attrs.get("bits", 4),
                block_size=attrs["block_size"],
            )
            name = f"{node.name}/dequantized"
            extra.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
            nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
            if len(node.input) > 5 and node.input[5]:
                raise ValueError("MatMulNBits bias is not expected in our graphs")
        elif node.op_type == "GatherBlockQuantized":
            data = inits[node.input[0]]
            zp = inits.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            bits = attrs.get("bits", 4)
            rows, cols = data.shape[0], data.shape[1] * 8 // bits
            w = dequantize_blocks(data, inits[node.input[2]], zp, rows=rows, cols=cols, bits=bits, block_size=attrs["block_size"])
            name = f"{node.name}/dequantized"
            extra.append(numpy_helper.from_array(w, name))
            nodes.append(helper.make_node("Gather", [name, node.input[1]], list(node.output), name=node.name))
        else:
            nodes.append(node)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + extra)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cloze_after_a_shared_prefix_matches_full_sequences(exported, arch):
    """GroupQueryAttention continuing each answer from one prompt's cache gives the figures of full runs."""
    from tests.test_scoring import assert_shared_prefix_scores_like_full_sequences

    out, _ = exported(arch)
    assert_shared_prefix_scores_like_full_sequences(OnnxRunner(out, threads=1))


GENAI_GREEDY = Path(__file__).with_name("genai_greedy.py")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai is not installed")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_onnxruntime_genai_generates_what_our_loop_generates(exported, arch):
    """The folder alone (genai_config.json, graph, tokenizer files) runs under ONNX Runtime GenAI, in a
    process without torch or vcompress, and greedy decoding gives our loop's tokens."""
    out, _ = exported(arch)
    runner = OnnxRunner(out, threads=1)
    texts = ["The heart pumps blood", "Water boils at", "A cat sat on the mat and", "Paris is the capital of", "one two three four"]
    prompts = [runner.tokenizer(text)["input_ids"] for text in texts]
    eos = json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"]
    want = [runner.generate(torch.tensor([prompt]), 24, eos_token_id=eos) for prompt in prompts]
    request = {"folder": str(out), "prompts": prompts, "new_tokens": 24, "texts": texts}
    done = subprocess.run([sys.executable, str(GENAI_GREEDY)], input=json.dumps(request), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["tokens"] == want and not got["torch_loaded"]
    assert got["encoded"] == prompts  # genai's tokenizer reads the files we wrote as transformers does
