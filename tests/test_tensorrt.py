"""TensorRT from an ONNX export: the build plan (everywhere) and the engine (where TensorRT and CUDA exist)."""

from __future__ import annotations

import json
import shlex

import onnxruntime as ort
import pytest

from vcompress.core.errors import Unsupported
from vcompress.exporters.tensorrt import export, tensorrt_available


@pytest.fixture(scope="module")
def onnx_export(tiny_models, tmp_path_factory):
    from vcompress.exporters import onnx

    out = tmp_path_factory.mktemp("trt") / "onnx"
    onnx.export(tiny_models["llama"], out, "none", log=lambda _: None, threads=1)
    return out


def _flag(command: list[str], name: str) -> dict[str, list[int]]:
    value = next(w for w in command if w.startswith(f"--{name}=")).split("=", 1)[1]
    return {spec.rsplit(":", 1)[0]: [int(d) for d in spec.rsplit(":", 1)[1].split("x")] for spec in value.split(",")}


@pytest.mark.skipif(tensorrt_available()[0], reason="TensorRT and CUDA are here: the engine is built instead of a plan")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_build_plan_matches_the_onnx_inputs(onnx_export, tmp_path, precision):
    out = tmp_path / "plan"
    messages = []
    result = export(onnx_export, out, precision=precision, prefill_tokens=16, max_tokens=64, log=messages.append)
    assert result["format"] == "tensorrt-plan" and result["engine_built"] is False and "tensorrt" in result["reason"]
    assert result["runtime"] == "tensorrt" and result["runtime_version"] is None
    assert not any(out.glob("*.engine")) and not any(out.glob("*.plan"))
    assert any("no TensorRT engine was built" in m for m in messages)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads((out / "build_plan.json").read_text()) == json.loads(json.dumps(result))
    # Every dynamic input of the ONNX graph gets a min/opt/max shape of its own rank, in the graph's dtypes' order.
    session = ort.InferenceSession(str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"])
    dynamic = {i.name: i.shape for i in session.get_inputs() if any(isinstance(d, str) for d in i.shape)}
    command = shlex.split((out / "build_engine.sh").read_text().split("set -e\n", 1)[1].replace("\\\n", " "))
    assert command[0] == "trtexec" and command == manifest["trtexec"]
    assert f"--onnx={(onnx_export / 'model.onnx').resolve()}" in command and "--saveEngine=model.engine" in command
    assert ("--int8" in command) == (precision == "int8") and "--fp16" in command
    kv = json.loads((onnx_export / "manifest.json").read_text())
    for which in ("min", "opt", "max"):
        shapes = _flag(command, f"{which}Shapes")
        assert set(shapes) == set(dynamic), which
        for name, shape in shapes.items():
            assert len(shape) == len(dynamic[name])
            static = [d for d, s in zip(shape, dynamic[name]) if not isinstance(s, str)]
            assert static == [s for s in dynamic[name] if not isinstance(s, str)]
    past = "past_key_values.0.key"
    assert _flag(command, "minShapes")[past] == [1, kv["kv_heads"], 0, kv["head_dim"]]
    assert _flag(command, "optShapes")[past] == [1, kv["kv_heads"], 16, kv["head_dim"]]
    assert _flag(command, "maxShapes")[past] == [1, kv["kv_heads"], 63, kv["head_dim"]]
    assert _flag(command, "minShapes")["input_ids"] == [1, 1] and _flag(command, "maxShapes")["input_ids"] == [1, 64]
    # The tiny export is ONNX Runtime's graph: the plan says its contrib ops block a plain TensorRT build.
    assert "GroupQueryAttention" in manifest["contrib_ops"] and any("plugins" in n for n in manifest["notes"])
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_cli_says_no_engine_was_built(cli, onnx_export, tmp_path):
    if tensorrt_available()[0]:
        pytest.skip("TensorRT and CUDA are here: the CLI builds an engine")
    code, stdout, stderr = cli(
        "export", "tensorrt", "--onnx", onnx_export, "--out", tmp_path / "e", "--max-tokens", "64", "--prefill-tokens", "16"
    )
    assert code == 0, stderr
    assert "NO ENGINE BUILT" in stdout and "build_engine.sh" in stdout
    code, _, stderr = cli("export", "tensorrt", "--onnx", tmp_path / "e", "--out", tmp_path / "f")
    assert code == 2 and "vcompress export onnx" in stderr
    code, _, stderr = cli("export", "tensorrt", "--onnx", onnx_export, "--out", tmp_path / "g", "--max-tokens", "99999")
    assert code == 2 and "positions" in stderr


def test_engine_is_built_where_tensorrt_and_cuda_exist(onnx_export, tmp_path):
    usable, why = tensorrt_available()
    if not usable:
        pytest.skip(f"needs `tensorrt` and a CUDA GPU: {why}")
    from vcompress.exporters.tensorrt import contrib_ops

    if contrib_ops(onnx_export / "model.onnx"):  # ONNX Runtime's GroupQueryAttention & co.: no parser support, no plugins here
        with pytest.raises(Unsupported, match="ONNX parser"):
            export(onnx_export, tmp_path / "engine", precision="fp16", prefill_tokens=16, max_tokens=64)
        assert not (tmp_path / "engine").exists()
        return
    result = export(onnx_export, tmp_path / "engine", precision="fp16", prefill_tokens=16, max_tokens=64)
    assert result["engine_built"] is True and (tmp_path / "engine" / "model.engine").stat().st_size > 0


def test_registered_exporter_takes_an_onnx_export_not_a_checkpoint(tiny_llama, tmp_path):
    from vcompress.core.registry import EXPORTERS
    from vcompress.exporters import export_stage

    stage = export_stage({"format": "tensorrt", "quant": "int8", "prefill_tokens": 16})  # a profile's target.quant is the precision
    assert type(stage) is EXPORTERS.get("tensorrt") and stage.config.precision == "int8"
    assert stage.runtime == "tensorrt" and stage.run_folder == "05-export-tensorrt"
    for checkpoint in (tiny_llama, None):  # what `run` hands an exporter: a model folder, or the default
        with pytest.raises(Unsupported, match="GroupQueryAttention.*vcompress export tensorrt --onnx"):
            export(checkpoint, tmp_path / "e")
        assert not (tmp_path / "e").exists()
