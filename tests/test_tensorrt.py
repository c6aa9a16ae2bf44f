"""TensorRT: the standard-op decoder graph against PyTorch on ONNX Runtime CPU, the operator check against TensorRT 10's
matrix, the build plan (everywhere) and the engine (where TensorRT and CUDA exist)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from vcompress.exporters import _trt_ops
from vcompress.exporters.tensorrt import export, tensorrt_available

QUIET = {"log": lambda _: None, "threads": 1, "max_tokens": 64, "prefill_tokens": 16, "heldout_blocks": 1, "heldout_seq_len": 64}


@pytest.fixture(scope="module")
def fp32_export(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "fp32"
    export(tiny_models["llama"], out, "none", precision="fp32", **QUIET)
    return out


def _manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_fp32_graph_matches_pytorch_and_is_tensorrt_ready(fp32_export):
    m = _manifest(fp32_export)
    p = m["parity"]
    assert p["passed"] and p["greedy_identical"] == p["prompts"] == 5 and p["max_abs_diff"] < 5e-3
    assert m["format"] == "tensorrt" and m["checked_on"] == "onnxruntime-cpu" and m["kv_dtype"] == "float32"
    assert m["tensorrt_ready"] is True and m["operator_check"]["unsupported"] == [] and m["operator_check"]["matrix"] == "TensorRT 10.15"
    graph = onnx.load(str(fp32_export / "model.onnx"), load_external_data=False)
    assert {n.domain for n in graph.graph.node} == {""} and [(o.domain, o.version) for o in graph.opset_import] == [("", 21)]
    assert not {"GroupQueryAttention", "MatMulNBits", "SimplifiedLayerNormalization"} & {n.op_type for n in graph.graph.node}
    assert m["fidelity"]["perplexity"] == pytest.approx(m["fidelity"]["reference_perplexity"], rel=1e-3)


def test_one_graph_serves_prefill_and_decode(fp32_export):
    from vcompress.exporters._tensorrt_session import GraphSession

    session = GraphSession(fp32_export, threads=1)
    ids = np.array([[5, 17, 33, 90, 4, 200, 11, 7]], np.int64)
    full = session.logits(ids)
    logits, state = session.prefill(ids[:, :5])
    np.testing.assert_allclose(logits, full[0, 4], atol=1e-4)
    for t in range(5, 8):
        logits, state = session.decode(int(ids[0, t]), state)
        np.testing.assert_allclose(logits, full[0, t], atol=1e-4)
    assert state.length == 8 and state.cache[0].shape == (1, 2, 8, 16)


def test_cloze_after_a_shared_prefix_matches_full_sequences(fp32_export):
    """The graph's Concat cache continues K padded rows from one prompt: the figures of K full runs."""
    from tests.test_scoring import assert_shared_prefix_scores_like_full_sequences
    from vcompress.exporters.tensorrt import TensorRTRunner

    assert_shared_prefix_scores_like_full_sequences(TensorRTRunner(fp32_export, threads=1), questions=4)


@pytest.mark.parametrize(("quant", "bits", "code_type"), [("int4", 4, TensorProto.INT4), ("int8", 8, TensorProto.INT8)])
def test_weight_only_quantized_graph_reports_agreement_and_perplexity(tiny_models, tmp_path, quant, bits, code_type):
    out = tmp_path / quant
    metrics = export(tiny_models["llama"], out, quant, block_size=32, **QUIET)
    m = _manifest(out)
    assert m["kv_dtype"] == "float16" and m["quant"] | {"blocks": [32]} == m["quant"] and m["quant"]["zero_point"] == 0
    assert metrics["parity"]["top1_agreement"] >= 0.5 and 0 < metrics["fidelity"]["top1_agreement"] <= 1
    assert metrics["fidelity"]["perplexity"] > 0 and "perplexity_rise_pct" in metrics["fidelity"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(len(n.input) == 2 for n in dq)  # no zero point: TensorRT wants it zero
    assert_predicted_size_is_written(tiny_models["llama"], out, quant)
    codes = {t.name: t for t in graph.graph.initializer}
    first = codes[dq[0].input[0]]
    assert first.data_type == code_type and {a.name: a.i for a in dq[0].attribute} == {"axis": 0, "block_size": 32}
    assert codes[dq[0].input[1]].dims == [first.dims[0] // 32, first.dims[1]]
    assert m["tensorrt_ready"] is True


def test_int4_codes_roundtrip_and_symmetric_grid():
    from vcompress.exporters._trt_graph import fitting_block, pack, symmetric_blocks

    w = torch.randn(64, 5)
    codes, scale = symmetric_blocks(w, 4, 32, np.float32)
    assert codes.min() >= -8 and codes.max() <= 7 and scale.shape == (2, 5)
    back = (codes.reshape(2, 32, 5) * scale[:, None]).reshape(64, 5)
    assert np.abs(back - w.numpy()).max() <= scale.max() / 2 + 1e-6
    tensor = helper.make_tensor("c", TensorProto.INT4, list(codes.shape), pack(codes, 4), raw=True)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), codes)
    assert fitting_block(576, 128) == 64 and fitting_block(1536, 128) == 128


def test_qwen2_graph_matches_pytorch(tiny_models, tmp_path):
    export(tiny_models["qwen2"], tmp_path / "q", "none", precision="fp32", **QUIET)
    p = _manifest(tmp_path / "q")["parity"]
    assert p["passed"] and p["greedy_identical"] == 5


def test_operator_check_names_the_node_it_refuses(tiny_llama):
    from transformers import AutoModelForCausalLM

    from vcompress.exporters import _onnx_graph

    proto, _ = _onnx_graph.build(AutoModelForCausalLM.from_pretrained(tiny_llama))  # ONNX Runtime's contrib-op graph
    report = _trt_ops.check(proto)
    assert report["tensorrt_ready"] is False
    failed = {f["node"]: f for f in report["unsupported"]}
    assert failed["layers.0.attn/GroupQueryAttention"]["domain"] == "com.microsoft"
    assert "layers.0.attn/GroupQueryAttention" in _trt_ops.summary(report) or "more nodes" in _trt_ops.summary(report)
    assert any("com.microsoft" in p for p in report["opset_problems"])


def _one_node_graph(node, inputs, output, initializers=(), opset=21):
    graph = helper.make_graph([node], "g", inputs, [output], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_operator_check_reads_dtypes_and_restrictions():
    x = helper.make_tensor_value_info("x", TensorProto.INT32, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])
    report = _trt_ops.check(_one_node_graph(helper.make_node("MatMul", ["x", "x"], ["y"], name="int_matmul"), [x], y))
    assert report["unsupported"][0]["node"] == "int_matmul" and "INT32" in report["unsupported"][0]["problems"][0]
    codes = helper.make_tensor("q", TensorProto.INT8, [4], [1, 2, 3, 4])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    out = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])
    for zero, ready in (
        (helper.make_tensor("z", TensorProto.INT8, [], [3]), False),
        (helper.make_tensor("z", TensorProto.INT8, [], [0]), True),
    ):
        node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], name="dq")
        report = _trt_ops.check(_one_node_graph(node, [], out, [codes, scale, zero]))
        assert report["tensorrt_ready"] is ready, report
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 3])
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    mean = helper.make_tensor_value_info("m", TensorProto.FLOAT, None)
    report = _trt_ops.check(_one_node_graph(helper.make_node("ReduceMean", ["v", "axes"], ["m"], name="rm"), [v, axes], mean))
    assert "must be a constant" in report["unsupported"][0]["problems"][0]
    report = _trt_ops.check(_one_node_graph(helper.make_node("Relu", ["v"], ["m"], name="r"), [v], mean, opset=8))
    assert report["tensorrt_ready"] is False and "outside" in report["opset_problems"][0]


def _flag(command: list[str], name: str) -> dict[str, list[int]]:
    value = next(w for w in command if w.startswith(f"--{name}=")).split("=", 1)[1]
    return {spec.rsplit(":", 1)[0]: [int(d) for d in spec.rsplit(":", 1)[1].split("x")] for spec in value.split(",")}


@pytest.mark.skipif(tensorrt_available()[0], reason="TensorRT and CUDA are here: the engine is built instead of a plan")
def test_build_plan_has_the_graphs_exact_shapes(fp32_export):
    m, plan = _manifest(fp32_export), json.loads((fp32_export / "build_plan.json").read_text())
    assert m["engine_built"] is False and m["engine_note"] == plan["engine_note"] == "engine not built here: TensorRT needs a CUDA GPU"
    assert not any(fp32_export.glob("*.engine"))
    command = shlex.split((fp32_export / "build_engine.sh").read_text().split('cd "$(dirname "$0")"\n', 1)[1].replace("\\\n", " "))
    assert command == plan["trtexec"] == m["trtexec"] and command[:3] == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine"]
    assert "--stronglyTyped" in command
    graph = onnx.load(str(fp32_export / "model.onnx"), load_external_data=False)
    names = [i.name for i in graph.graph.input]
    kv = (m["kv_heads"], m["head_dim"])
    for which, (seq, past) in {"min": (1, 0), "opt": (1, 16), "max": (64, 63)}.items():
        shapes = _flag(command, f"{which}Shapes")
        assert list(shapes) == names
        assert shapes["input_ids"] == [1, seq] and shapes["past_key_values.1.value"] == [1, kv[0], past, kv[1]]


def test_cli_exports_and_says_no_engine_was_built(cli, tiny_llama, tmp_path):
    code, stdout, stderr = cli(
        "export",
        "tensorrt",
        "--model",
        tiny_llama,
        "--out",
        tmp_path / "e",
        "--quant",
        "int8",
        "--block-size",
        "32",
        "--max-tokens",
        "64",
        "--prefill-tokens",
        "16",
        "--threads",
        "1",
    )
    assert code == 0, stderr
    assert "TensorRT-ready" in stdout and "parity on ONNX Runtime CPU" in stdout and "held-out text: perplexity" in stdout
    assert ("NO ENGINE BUILT" in stdout) != tensorrt_available()[0]
    code, _, stderr = cli("export", "tensorrt", "--model", tiny_llama, "--out", tmp_path / "f", "--max-tokens", "99999")
    assert code == 2 and stderr.strip().splitlines() == [
        "error: --max-tokens 99999 exceeds the model's 1024 positions; pass --max-tokens 1024 or less"
    ]
    code, _, stderr = cli("export", "tensorrt", "--model", tiny_llama, "--out", tmp_path / "g", "--block-size", "48")
    assert code == 2 and "power of two" in stderr


def test_gpt2_is_refused_with_the_way_out(tiny_models, tmp_path):
    from vcompress.core.errors import InputError

    with pytest.raises(InputError, match="vcompress export onnx"):
        export(tiny_models["gpt2"], tmp_path / "g", "none", **QUIET)
    assert not (tmp_path / "g").exists()


def test_host_bench_runs_the_graph_without_torch(fp32_export):
    bench = [sys.executable, "-m", "vcompress.devices.bench", str(fp32_export), "--prompt-tokens", "8", "--decode-tokens", "4"]
    done = subprocess.run(bench + ["--runs", "1", "--warmup", "0", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["decode_tokens_per_s"]["value"] > 0 and "onnxruntime" in result["modules_imported"]
    assert "torch" not in result["modules_imported"]


def test_jetson_profile_plans_a_run(cli, tmp_path):
    code, stdout, stderr = cli("run", "--profile", "jetson-orin-nano", "--out", tmp_path / "R", "--dry-run")
    assert code == 0, stderr
    assert "05-export-tensorrt" in stdout and "'quant': 'int8'" in stdout and "'precision': 'fp16'" in stdout


def test_engine_is_built_where_tensorrt_and_cuda_exist(fp32_export, tmp_path):
    usable, why = tensorrt_available()
    if not usable:
        pytest.skip(f"needs `tensorrt` and a CUDA GPU: {why}")
    m = _manifest(fp32_export)
    assert m["engine_built"] is True and (fp32_export / "model.engine").stat().st_size > 0


def assert_predicted_size_is_written(source, out, quant):
    """What the prune planner asks the exporter (codes, block scales, float table, rotary tables) is what the graph
    holds (its initializers: the graph's nodes, a few KB, are not weights)."""
    from vcompress.core.roofline_math import shapes
    from vcompress.exporters.tensorrt import TensorRTExport

    config = json.loads((source / "config.json").read_text())
    exporter = TensorRTExport(TensorRTExport.parse_config({"quant": quant, "block_size": 32}))
    predicted = exporter.predicted_weights(
        shapes(config), {"method": "rtn", "bits": 4, "group_size": 32}, config["max_position_embeddings"]
    )
    written = sum(len(t.raw_data) for t in onnx.load(str(out / "model.onnx")).graph.initializer)
    assert abs(predicted["stored_bytes"] - written) / written < 0.03, (predicted, written)
