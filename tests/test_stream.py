"""Streamed stages (one decoder layer at a time from disk): quantize writes the in-memory checkpoint bit for bit,
analyze gives the in-memory scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vcompress.compress.quantize import Quantize
from vcompress.compress.sensitivity import SENSITIVITY, Analyze
from vcompress.core.errors import InputError
from vcompress.core.layer_stream import TensorFileWriter
from vcompress.core.quant_format import QUANT_GRID_FILE
from vcompress.core.stage import execute

FAST = {"calib_samples": 8, "seq_len": 32, "batch_size": 4, "heldout_blocks": 0, "eval_per_subject": 0}


def quantize(src, out, calib, **config):
    return execute(Quantize({**FAST, **config}), out, source=src, data=calib, seed=0, log=lambda _: None)


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    return out


@pytest.mark.parametrize(
    "arch,config",
    [
        ("llama", {"method": "gptq", "group_size": 32}),  # GPTQ layout (integer zero points), GQA
        ("llama", {"method": "gptq", "group_size": 32, "zero_point": "float", "act_order": True}),  # float weights + sidecar
        ("qwen2", {"method": "gptq", "group_size": 32}),  # q/k/v biases
        ("gpt2", {"method": "rtn", "group_size": 32}),  # Conv1D, tied head, position table
    ],
)
def test_streamed_checkpoint_is_bit_identical(tiny_models, calib, tmp_path, arch, config):
    src = tiny_models[arch]
    whole = quantize(src, tmp_path / "whole", calib, stream="off", **config)
    streamed = quantize(src, tmp_path / "streamed", calib, stream="on", **config)
    assert streamed["streamed"] is True and "streamed" not in whole
    a, b = tensors_of(tmp_path / "whole"), tensors_of(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    manifest = lambda p: json.loads((p / QUANT_GRID_FILE).read_text())  # noqa: E731
    assert manifest(tmp_path / "whole") == manifest(tmp_path / "streamed")
    for key in ("bits_per_weight", "weights_bytes_before", "weights_bytes_after", "files_bytes", "quantized_linears"):
        assert whole[key] == streamed[key], key
    if config["method"] == "gptq":
        assert whole["layer_error"]["gptq_relative"] == streamed["layer_error"]["gptq_relative"]
    assert streamed["perplexity"] is None and "vcompress validate" in streamed["heldout"]


def test_streamed_folder_reloads_and_exports_like_the_whole_one(tiny_llama, calib, tmp_path):
    from vcompress.exporters.onnx import export

    config = {"method": "gptq", "group_size": 32, "zero_point": "float"}
    quantize(tiny_llama, tmp_path / "whole", calib, stream="off", **config)
    quantize(tiny_llama, tmp_path / "streamed", calib, stream="on", **config)
    for name in ("whole", "streamed"):
        export(tmp_path / name, tmp_path / f"{name}-onnx", "int4", log=lambda _: None)
    onnx_bytes = [(tmp_path / f"{n}-onnx" / "model.onnx").read_bytes() for n in ("whole", "streamed")]
    assert onnx_bytes[0] == onnx_bytes[1]


def test_streaming_a_quantized_folder_or_a_lora_source_is_refused(tiny_llama, calib, tmp_path):
    quantize(tiny_llama, tmp_path / "q", calib, method="rtn", group_size=32)
    with pytest.raises(InputError, match="already quantized"):
        quantize(tmp_path / "q", tmp_path / "again", calib, method="rtn", group_size=32, stream="on")
    with pytest.raises(InputError, match="compare_rtn"):
        quantize(tiny_llama, tmp_path / "c", calib, stream="on", compare_rtn=True)
    assert not (tmp_path / "again").exists() and not (tmp_path / "c").exists()


def test_tensor_file_writer_matches_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.half": torch.randn(3, 5, generator=g).half(),
        "a.float": torch.randn(7, generator=g),
        "c.bytes": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "d.int": torch.randint(-9, 9, (2, 3), generator=g, dtype=torch.int32),
        "e.bf16": torch.randn(4, generator=g).bfloat16(),
        "f.empty": torch.zeros(0, 4),
    }
    writer = TensorFileWriter(tmp_path / "ours.safetensors")
    for name, t in tensors.items():  # out of dtype order on purpose: close() must still align them
        writer.add(name, t)
    writer.close({"format": "pt"})
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    ours = load_file(tmp_path / "ours.safetensors")
    assert sorted(ours) == sorted(tensors)
    for name, t in tensors.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.tmp"))


def test_stream_reads_table_rows_and_copies_tensors_without_holding_them(tiny_llama, tmp_path):
    from vcompress.core.layer_stream import LayerStream

    stream = LayerStream(tiny_llama)
    table = stream.read("model.embed_tokens.weight")
    ids = torch.tensor([[5, 3, 5, 0], [table.shape[0] - 1, 3, 7, 7]])
    assert torch.equal(stream.rows("model.embed_tokens.weight", ids), table[ids])
    writer = TensorFileWriter(tmp_path / "copy.safetensors")
    stream.copy_into(writer, "model.embed_tokens.weight")  # stored fp32: copied byte for byte
    stream.copy_into(writer, "model.norm.weight")
    writer.close({"format": "pt"})
    copied = load_file(tmp_path / "copy.safetensors")
    assert torch.equal(copied["model.embed_tokens.weight"], table)
    assert torch.equal(copied["model.norm.weight"], stream.read("model.norm.weight"))


def flat(data, path=""):
    """(path, number) of every number in a nested result."""
    if isinstance(data, dict):
        return [x for k, v in sorted(data.items()) for x in flat(v, f"{path}.{k}")]
    if isinstance(data, list):
        return [x for i, v in enumerate(data) for x in flat(v, f"{path}[{i}]")]
    return [(path, data)] if isinstance(data, float) else []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_analysis_gives_the_in_memory_scores(tiny_models, tmp_path, arch):
    config = {"samples": 4, "seq_len": 32, "batch_size": 2, "group_size": 32}
    for name in ("whole", "streamed"):
        stream = "off" if name == "whole" else "on"
        metrics = execute(Analyze({**config, "stream": stream}), tmp_path / name, source=tiny_models[arch], seed=0, log=lambda _: None)
        assert metrics["streamed"] is (stream == "on")
    a, b = (json.loads((tmp_path / n / SENSITIVITY).read_text()) for n in ("whole", "streamed"))
    fa, fb = flat({k: v for k, v in a.items() if k != "model"}), flat({k: v for k, v in b.items() if k != "model"})
    assert [p for p, _ in fa] == [p for p, _ in fb] and len(fa) > 100
    # the same chain rule and the same probes; only float summation order may differ
    for (path, x), (_, y) in zip(fa, fb):
        assert x == pytest.approx(y, rel=1e-3, abs=1e-6), path
