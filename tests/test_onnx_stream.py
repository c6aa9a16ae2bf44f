"""`vcompress export onnx --stream on`: the graph built one tensor at a time from disk, each weight's bytes
written to model.onnx.data as it is made, checked against a model read layer by layer. The artifact must be
the in-memory export's, byte for byte, from a float folder (--quant none) and from a quantize folder (its grid
carried, both layouts, tables at table_bits, tied and untied heads)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from tests.test_onnx import LOOSE, QUIET
from vcompress.compress.quantize import Quantize
from vcompress.core.errors import InputError
from vcompress.core.stage import execute
from vcompress.exporters.onnx import OnnxExport, OnnxRunner, export

FILES = ("model.onnx", "model.onnx.data", "config.json", "generation_config.json", "genai_config.json", "tokenizer.json")
QUANTIZE = {"method": "rtn", "group_size": 32, "heldout_blocks": 0, "eval_per_subject": 0, "stream": "off"}


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    """A quantize folder per (architecture, zero point), made once: llama int -> the GPTQ layout,
    llama float / gpt2 -> float weights + quant.safetensors, qwen2 -> GPTQ layout with an untied head."""
    root, cache = tmp_path_factory.mktemp("quantized"), {}

    def get(arch: str, zero_point: str = "int", bits: int = 4):
        key = (arch, zero_point, bits)
        if key not in cache:
            out = root / f"{arch}-{zero_point}-{bits}"
            execute(
                Quantize({**QUANTIZE, "zero_point": zero_point, "bits": bits}), out, source=tiny_models[arch], seed=0, log=lambda _: None
            )
            cache[key] = out
        return cache[key]

    return get


def both(source, root, quant: str, **settings) -> tuple[dict, dict]:
    """Metrics of the export in memory and streamed (folders root/off and root/on)."""
    extra = {} if quant == "none" else LOOSE
    return tuple(export(source, root / s, quant, stream=s, **QUIET, **extra, **settings) for s in ("off", "on"))


def assert_same_artifact(a, b) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (a, b)]
    for m in manifests:
        m.pop("parity")
    assert manifests[0] == manifests[1]
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    outputs = [OnnxRunner(f, threads=1).forward(ids) for f in (a, b)]
    assert torch.equal(outputs[0], outputs[1])


def assert_same_metrics(whole: dict, streamed: dict) -> None:
    assert whole["streamed"] is False and streamed["streamed"] is True
    for key in ("model_bytes", "fp32_weight_bytes", "size_ratio_to_fp32", "grid"):
        assert whole[key] == streamed[key], key
    # The streamed reference is the same weights; only float summation order may differ (one forward per prompt).
    p, q = whole["parity"], streamed["parity"]
    assert q["passed"] and q["max_abs_diff"] == pytest.approx(p["max_abs_diff"], abs=1e-5)
    assert q["greedy_identical"] == p["greedy_identical"] and q["greedy_prefix_matched"] == p["greedy_prefix_matched"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_float_folder_streams_to_the_same_artifact(tiny_models, tmp_path, arch):
    whole, streamed = both(tiny_models[arch], tmp_path, "none")
    assert_same_artifact(tmp_path / "off", tmp_path / "on")
    assert_same_metrics(whole, streamed)
    assert streamed["parity"]["max_abs_diff"] < 1e-4 and streamed["parity"]["greedy_identical"] == 5


@pytest.mark.parametrize(
    "arch,zero_point,table_bits",
    [
        ("llama", "int", 4),  # GPTQ layout, tied head reading the table's blocks
        ("llama", "float", 8),  # float weights + sidecar, float zero points (correction MatMuls), 8-bit tables
        ("qwen2", "int", 4),  # q/k/v biases, untied head quantized at table_bits
        ("qwen2", "int", 0),  # untied head kept fp32 (reported as kept float)
        ("gpt2", "int", 4),  # Conv1D (sidecar layout), position table
    ],
)
def test_quantize_folder_streams_to_the_same_artifact(quantized, tmp_path, arch, zero_point, table_bits):
    folder = quantized(arch, zero_point)
    whole, streamed = both(folder, tmp_path, "int4", table_bits=table_bits)
    assert_same_artifact(tmp_path / "off", tmp_path / "on")
    assert_same_metrics(whole, streamed)
    assert streamed["grid"]["linears"] == len(json.loads((folder / "quant_manifest.json").read_text())["linears"])
    if arch == "qwen2":
        assert streamed["grid"]["kept_float"] == ([] if table_bits else ["lm_head/MatMul"])


def test_quantize_folder_as_fp32_and_at_8_bits(quantized, tmp_path):
    _, streamed = both(quantized("llama"), tmp_path / "fp32", "none")  # its dequantized weights, fp32
    assert_same_artifact(tmp_path / "fp32" / "off", tmp_path / "fp32" / "on")
    assert streamed["parity"]["max_abs_diff"] < 1e-4
    both(quantized("qwen2", bits=8), tmp_path / "int8", "int8")
    assert_same_artifact(tmp_path / "int8" / "off", tmp_path / "int8" / "on")


def test_streamed_graph_holds_no_weight_data(tiny_models, tmp_path):
    """The proto built with a store keeps only where each weight lies; the data file has the bytes."""
    from vcompress.core.layer_stream import LayerStream, stream_tensors
    from vcompress.exporters import _onnx_graph

    stream = LayerStream(tiny_models["qwen2"])
    proto, _ = _onnx_graph.build(stream.model, _onnx_graph.Weights(stream_tensors(stream)), _onnx_graph.ExternalData(tmp_path, "w.data"))
    big = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and not any(t.HasField("raw_data") for t in big)
    assert sum(len(t.raw_data) for t in proto.graph.initializer) < 64 * 1024  # only small constants inline
    assert all(p.device.type == "meta" for p in stream.model.parameters())  # the skeleton never got weights
    onnx.save_model(proto, tmp_path / "m.onnx")
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    table = next(t for t in loaded.graph.initializer if t.name == "embed_tokens.weight")
    expected = stream.read("model.embed_tokens.weight").numpy()
    assert np.array_equal(onnx.numpy_helper.to_array(table), expected)


def test_streamed_reference_reads_one_layer_at_a_time(quantized):
    """Parity's reference from a quantize folder: its dequantized weights, each layer read for its forward
    and dropped after it, the logits of the whole dequantized model."""
    from vcompress.core.quant_format import load_dequantized, read_quant_grid
    from vcompress.exporters.base import open_stream, streamed_reference

    folder = quantized("llama", "float")
    stream = open_stream(folder, read_quant_grid(folder))
    model = streamed_reference(stream)
    seen = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, a: seen.append(sum(p.device.type != "meta" for p in model.model.layers.parameters())))
    ids = torch.randint(5, 300, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
        whole, _ = load_dequantized(folder, read_quant_grid(folder))
        want = whole(input_ids=ids, use_cache=False).logits
    per_layer = sum(1 for _ in model.model.layers[0].parameters())
    # after the stream's own pre-hook read the layer: only that layer's parameters are real
    assert seen == [per_layer] * len(model.model.layers)
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    assert torch.allclose(got, want, atol=1e-5)


def test_cli_stream_option(cli, tiny_models, quantized, tmp_path):
    code, out, err = cli(
        "export",
        "onnx",
        "--model",
        quantized("llama"),
        "--out",
        tmp_path / "q",
        "--quant",
        "int4",
        "--stream",
        "on",
        "--min-agreement",
        "0",
        "--threads",
        "1",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["streamed"] is True
    # a float source under int4 needs ONNX Runtime's whole-graph quantizer: refused in one line, nothing written
    code, out, err = cli("export", "onnx", "--model", tiny_models["llama"], "--out", tmp_path / "f", "--quant", "int4", "--stream", "on")
    assert code == 2 and "--stream on" in err and "vcompress quantize" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "f").exists()
    code, _, err = cli("export", "onnx", "--model", tiny_models["llama"], "--out", tmp_path / "g", "--stream", "sometimes")
    assert code == 2 and "sometimes" in err
    with pytest.raises(InputError, match="'stream'"):  # a recipe's export step is checked by the same config
        OnnxExport({"stream": "sometimes"})
