"""Devices: roofline arithmetic, the host benchmark (runtime-only for exports), ssh against a real local sshd,
adb against a transcript, model files from the manifest, sizes in MiB."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.tiny import SIZES
from vcompress.core.errors import InputError
from vcompress.core.export_manifest import model_files
from vcompress.core.profiles import Device, load_profile
from vcompress.core.units import MIB
from vcompress.devices import adb, default_device, fingerprint, measure, open_device
from vcompress.devices import roofline_estimate as roofline
from vcompress.devices.bench import prompt_ids, run_benchmark

DATA = Path(__file__).parent / "data"
CONFIG = dict(
    model_type="llama", **SIZES, num_hidden_layers=2, head_dim=16, vocab_size=384, max_position_embeddings=256, tie_word_embeddings=True
)


def write_artifact(folder: Path, tied: bool = True) -> Path:
    """config.json + safetensors whose weight bytes are known by hand: 49152 + 1000 + 256 = 50408."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**CONFIG, "tie_word_embeddings": tied}))
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(384, 64, dtype=torch.float16),  # 49152 bytes
            "model.layers.0.mlp.down_proj.qweight": torch.zeros(1000, dtype=torch.int8),  # 1000 bytes
            "model.norm.weight": torch.zeros(64, dtype=torch.float32),  # 256 bytes
        },
        str(folder / "model.safetensors"),
    )
    return folder


DEVICE = Device(
    name="test board",
    family="test",
    backend="cpu",
    memory_gb=1,
    memory_bandwidth_gbs=10,
    peak_compute_gflops=100,
    prefill_efficiency=0.5,
    decode_efficiency=0.5,
    estimate_band_pct={"ttft": 30, "decode": 20},
)


# --- roofline -------------------------------------------------------------------------


def test_roofline_matches_hand_computed_figures(tmp_path):
    art = write_artifact(tmp_path / "art")
    est = roofline.estimate(art, DEVICE, prompt_tokens=32, decode_tokens=8)
    line = est["roofline"]
    assert line["weight_bytes_per_token"] == 50408  # tied: the fp16 table is read by the head
    # KV per context token: 2 (K, V) x 2 layers x 2 kv heads x 16 dims x 4 bytes = 512;
    # mean decode context 32 + (8 - 1) / 2 = 35.5 -> 18176 bytes; per token 50408 + 18176 = 68584
    assert line["kv_bytes_per_token_of_context"] == 512
    assert line["mean_decode_context_tokens"] == 35.5
    assert line["bytes_read_per_decode_token"] == 68584
    assert line["decode_ceiling_tokens_per_s"] == pytest.approx(1e10 / 68584)  # 145806.6
    # the compute roof is far: 2 x 98304 params + 4*2*4*16*35.5 attention = 214784 FLOP/token -> 465584 tokens/s
    assert line["decode_flops_per_token"] == 214784 and line["decode_bound"] == "memory"
    assert est["decode_tokens_per_s"]["value"] == pytest.approx(72903.30, abs=0.01)  # x efficiency 0.5
    # FLOPs: body 2 layers x (64*64 + 2*64*32 + 64*64 + 3*64*128) = 73728 params, x 2 x 32 tokens = 4718592;
    # head 384*64 = 24576 params, last position only, x 2 = 49152; attention 2*2*4*16*32*33 = 270336
    assert line["prompt_flops"] == 5038080
    assert line["ttft_bound"] == "compute"  # 50.38 us of compute vs 5.04 us to read the weights
    assert line["ttft_floor_ms"] == pytest.approx(0.0503808)
    assert est["ttft_ms"]["value"] == pytest.approx(0.101, abs=1e-3)  # / efficiency 0.5
    for key in ("ttft_ms", "decode_tokens_per_s", "peak_rss_mb"):
        assert est[key]["source"] == "estimated" and est[key]["device"] == "test board"
        assert "samples" not in est[key]
    assert est["source"] == "estimated" and est["device_kind"] == "roofline"
    # each latency figure carries the device's band either side: TTFT 30%, decode 20%
    assert (est["ttft_ms"]["low"], est["ttft_ms"]["high"]) == (round(0.7 * 0.1007616, 3), round(1.3 * 0.1007616, 3))
    assert (est["decode_tokens_per_s"]["low"], est["decode_tokens_per_s"]["high"]) == pytest.approx(
        (0.8 * 72903.30, 1.2 * 72903.30), abs=0.01
    )
    assert est["decode_tokens_per_s"]["band_pct"] == 20 and est["ttft_ms"]["calibrated_on"] == []  # no anchors for "test"
    # the model's part of peak RAM: weights 50408 + KV at 40 tokens 20480 + activations 4*(4*32*32 + 2*32*128 + 384) = 50688
    shape = roofline.shapes(CONFIG)
    assert roofline.peak_ram_bytes(shape, roofline.weight_bytes(model_files(art)), 32, 8) == 121576
    # the whole process: what PyTorch (an HF folder's runtime) was measured to hold on this host comes on top
    torch_memory = roofline.runtime_memory("torch")
    whole = 121576 + (torch_memory["baseline_mib"] + torch_memory["fixed_mib"]) * 2**20 + torch_memory["held_per_weight_byte"] * 50408
    ram = est["peak_rss_mb"]
    assert ram["value"] == round(whole / 2**20, 1) and ram["unit"] == "MiB" and ram["value"] > torch_memory["baseline_mib"]
    assert (ram["low"], ram["high"]) == (round(0.8 * ram["value"], 1), round(1.2 * ram["value"], 1))
    assert est["model_size_mb"] == {
        "value": round((art / "model.safetensors").stat().st_size / 2**20, 2),
        "unit": "MiB",
        "source": "measured",
    }


def test_peak_ram_of_a_runtime_never_measured_is_no_pass(tmp_path, monkeypatch):
    """Without the runtime's own memory the estimate is the model's part only: the band's optimistic end, with no
    pessimistic end, so a maximum budget is never passed on it (only failed, or left to a measurement)."""
    from vcompress.core import roofline_math
    from vcompress.validate import latency_check

    measured = json.loads(roofline_math.RUNTIME_MEMORY.read_text())
    del measured["runtimes"]["torch"]
    (tmp_path / "memory.json").write_text(json.dumps(measured))
    monkeypatch.setattr(roofline_math, "RUNTIME_MEMORY", tmp_path / "memory.json")
    ram = roofline.estimate(write_artifact(tmp_path / "art"), DEVICE, prompt_tokens=32, decode_tokens=8)["peak_rss_mb"]
    assert ram["value"] == ram["low"] == round(121576 / 2**20, 1) and ram["high"] is None and "never measured" in ram["note"]
    latency = {"peak_rss_mb": ram}
    assert latency_check("max_peak_ram_mb", 1024, latency, 32)["result"] == "undecided"
    assert latency_check("max_peak_ram_mb", 0.01, latency, 32)["passed"] is False
    assert "result" not in latency_check("max_peak_ram_mb", 0.01, latency, 32)  # failed outright


def test_untied_input_embedding_is_not_read_per_token(tmp_path):
    art = write_artifact(tmp_path / "art", tied=False)
    weights = roofline.weight_bytes(model_files(art), tied=False)
    assert weights["stored_bytes"] == 50408 and weights["per_token_bytes"] == 1256
    est = roofline.estimate(art, DEVICE, prompt_tokens=32, decode_tokens=8)
    # 19432 bytes/token would allow 514615 tokens/s; the compute roof (214784 FLOP/token) binds first
    assert est["roofline"]["bytes_read_per_decode_token"] == 1256 + 18176
    assert est["roofline"]["decode_ceiling_tokens_per_s"] == pytest.approx(1e11 / 214784)
    assert est["roofline"]["decode_bound"] == "compute"


def test_onnx_weight_bytes_leave_out_gather_only_tables(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "embed_tokens.weight")  # 160 bytes, gathered
    weight = numpy_helper.from_array(np.zeros((4, 4), np.float32), "proj.weight")  # 64 bytes, read every token
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens.weight", "ids"], ["h"]), helper.make_node("MatMul", ["h", "proj.weight"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [table, weight],
    )
    folder = tmp_path / "onnx"
    folder.mkdir()
    onnx.save_model(
        helper.make_model(graph), folder / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    (folder / "manifest.json").write_text(json.dumps({"format": "onnx", "files": {"model": "model.onnx", "weights": "model.onnx.data"}}))
    weights = roofline.weight_bytes(model_files(folder))
    assert weights == {"stored_bytes": 224, "gather_only_bytes": 160, "per_token_bytes": 64, "files": ["model.onnx", "model.onnx.data"]}


def test_model_files_come_from_the_manifest_not_suffixes(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    for name, size in (("graph.onnx", 10), ("graph.onnx.data", 100), ("config.json", 7), ("tokenizer.json", 1000), ("stray.onnx", 5000)):
        (art / name).write_bytes(b"x" * size)
    (art / "manifest.json").write_text(
        json.dumps(
            {
                "format": "onnx",
                "files": {"model": "graph.onnx", "weights": "graph.onnx.data", "config": "config.json", "tokenizer": "tokenizer.json"},
            }
        )
    )
    assert model_files(art) == [art / "graph.onnx", art / "graph.onnx.data"]  # not the sidecars, not a stray .onnx
    (art / "graph.onnx.data").unlink()
    with pytest.raises(InputError, match="lacks graph.onnx.data, which its manifest.json lists"):
        model_files(art)
    hf = write_artifact(tmp_path / "hf")  # no manifest: an HF folder's safetensors
    (hf / "extra.onnx").write_bytes(b"x")
    assert model_files(hf) == [hf / "model.safetensors"]
    assert model_files(hf / "model.safetensors") == [hf / "model.safetensors"]
    empty = tmp_path / "empty"  # config.json but no weights
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(InputError, match="holds no model files"):
        roofline.estimate(empty, DEVICE, prompt_tokens=8)


def test_compare_gives_measured_over_estimated():
    measured = {"ttft_ms": {"value": 10.0}, "decode_tokens_per_s": {"value": 50.0}}
    estimated = {"device": "d", "ttft_ms": {"value": 5.0}, "decode_tokens_per_s": {"value": 100.0}, "peak_rss_mb": {}, "roofline": {}}
    assert roofline.compare(measured, estimated)["ratio_measured_to_estimated"] == {"ttft_ms": 2.0, "decode_tokens_per_s": 0.5}


def test_roofline_device_through_measure(tmp_path):
    art = write_artifact(tmp_path / "art")
    result = measure(art, "roofline", "snapdragon8g2", prompt_tokens=32, decode_tokens=8)
    assert result["source"] == "estimated" and "estimate" not in result
    assert result["ttft_ms"] == {**result["ttft_ms"], "source": "estimated", "device": "Snapdragon 8 Gen 2"}
    device = load_profile("snapdragon8g2").device
    assert result["roofline"]["memory_bandwidth_gbs"] == 67.2 and result["roofline"]["peak_compute_gflops"] == device.peak_compute_gflops
    assert (result["roofline"]["prefill_efficiency"], result["roofline"]["decode_efficiency"]) == (
        device.prefill_efficiency,
        device.decode_efficiency,
    )
    # its band and the anchors of its family and backend travel with each latency figure
    ttft = result["ttft_ms"]
    from vcompress.devices.calibration import anchors_for

    prefill_rows = [a["id"] for a in anchors_for(device) if a["prefill_tokens_per_s"] is not None]
    decode_rows = [a["id"] for a in anchors_for(device) if a["decode_tokens_per_s"] is not None]
    assert ttft["band_pct"] == device.estimate_band_pct.ttft and ttft["calibrated_on"] == prefill_rows
    assert result["decode_tokens_per_s"]["calibrated_on"] == decode_rows and len(decode_rows) > len(prefill_rows) >= 3
    assert ttft["low"] < ttft["value"] < ttft["high"] and any("gemma3-1b" in a and "cpu" in a for a in prefill_rows)
    assert result["model_size_mb"]["source"] == "measured" and result["model_size_mb"]["unit"] == "MiB"


def test_default_device_follows_the_profile_connection():
    assert default_device(load_profile("x86-cpu")) == "host"
    assert default_device(load_profile("raspberry-pi5")) == "roofline"  # ssh without a host
    if shutil.which("adb") is None:
        assert default_device(load_profile("snapdragon8g2")) == "roofline"


def test_unknown_setting_is_bad_input(tiny_llama):
    with pytest.raises(InputError, match="no setting 'bogus'"):
        measure(tiny_llama, "host", "x86-cpu", bogus=1)
    with pytest.raises(InputError, match="unknown device"):
        measure(tiny_llama, "phone", "x86-cpu")


# --- bench on the host ----------------------------------------------------------------


def test_prompt_ids_are_fixed_by_the_seed():
    a, b = prompt_ids(384, 16, seed=0), prompt_ids(384, 16, seed=0)
    assert a.shape == (1, 16) and a.dtype == np.int64 and np.array_equal(a, b) and int(a.max()) < 384
    assert not np.array_equal(a, prompt_ids(384, 16, seed=1))
    assert np.array_equal(a, np.random.default_rng(0).integers(0, 384, size=(1, 16)))  # numpy's generator, not torch's


def test_host_device_measures_through_the_runner(tiny_llama):
    result = measure(tiny_llama, "host", "x86-cpu", prompt_tokens=16, decode_tokens=4, runs=3, warmup=1, threads=1)
    assert (result["device"], result["device_kind"], result["backend"], result["source"]) == ("x86-64 host", "host", "torch", "measured")
    assert (result["prompt_tokens"], result["decode_tokens"], result["runs"], result["warmup"]) == (16, 4, 3, 1)
    for key, unit in (("ttft_ms", "ms"), ("decode_tokens_per_s", "tokens/s")):
        fig = result[key]
        assert fig["unit"] == unit and fig["source"] == "measured" and fig["device"] == "x86-64 host"
        assert len(fig["samples"]) == 3 and fig["value"] == sorted(fig["samples"])[1] and fig["value"] > 0
    rss = result["peak_rss_mb"]
    assert rss["source"] == "measured" and rss["unit"] == "MiB" and rss["value"] >= rss["runtime_baseline_mib"] > 0
    assert result["runtime"]["module"] == "torch" and "torch" in result["modules_imported"]  # an HF folder runs on torch, and says so
    assert result["model_size_mb"] == {
        "value": round((tiny_llama / "model.safetensors").stat().st_size / 2**20, 2),
        "unit": "MiB",
        "source": "measured",
    }
    host = result["host"]  # the machine that measured, from its /proc/cpuinfo, and its speeds measured then
    assert host == {**host, **fingerprint.cpu_facts(), "threads": 1} and host["id"] == fingerprint.fingerprint_id(host)
    assert host["copy_bandwidth_gbs"] > 0 and host["gemm_fp32_gflops"] > 0
    est = result["estimate"]
    assert est["source"] == "estimated" and est["ttft_ms"]["source"] == "estimated"
    assert est["roofline"]["memory_bandwidth_gbs"] == 36  # the host's own figures (x86-cpu)
    ratio = est["ratio_measured_to_estimated"]
    assert ratio["decode_tokens_per_s"] == pytest.approx(
        result["decode_tokens_per_s"]["value"] / est["decode_tokens_per_s"]["value"], rel=1e-3
    )


@pytest.fixture(scope="module")
def tiny_onnx(tiny_models, tmp_path_factory) -> Path:
    from vcompress.cli import main

    out = tmp_path_factory.mktemp("onnx") / "llama"
    assert main(["export", "onnx", "--model", str(tiny_models["llama"]), "--out", str(out), "--quant", "none"]) == 0
    return out


def test_host_measures_an_onnx_export_with_the_runtime_alone(tiny_onnx):
    """An ONNX folder is measured through ONNX Runtime GenAI's generator, what an app ships, in a process without torch."""
    result = measure(tiny_onnx, "host", "x86-cpu", prompt_tokens=16, decode_tokens=4, runs=2, warmup=1, threads=1)
    assert (result["backend"], result["source"], result["runtime"]["module"]) == ("onnx", "measured", "onnxruntime_genai")
    imported = set(result["modules_imported"])  # what the measuring process imported, as an app would
    assert {"numpy", "onnxruntime_genai"} <= imported and not imported & {"torch", "transformers", "yaml", "pydantic"}, imported
    rss = result["peak_rss_mb"]
    assert rss["unit"] == "MiB" and rss["value"] >= rss["runtime_baseline_mib"] > 0
    assert rss["model_share_mib"] == pytest.approx(rss["value"] - rss["runtime_baseline_mib"], abs=0.11)
    files = json.loads((tiny_onnx / "manifest.json").read_text())["files"]
    model_bytes = sum((tiny_onnx / files[k]).stat().st_size for k in ("model", "weights"))  # not config or tokenizer
    assert result["model_size_mb"] == {"value": round(model_bytes / MIB, 2), "unit": "MiB", "source": "measured"}


def test_our_loop_stays_measurable_and_genai_runs_the_same_model(tiny_onnx):
    ours = measure(tiny_onnx, "host", "x86-cpu", prompt_tokens=16, decode_tokens=4, runs=1, warmup=0, threads=1, backend="onnxruntime")
    assert ours["runtime"]["module"] == "onnxruntime" and "onnxruntime_genai" not in ours["modules_imported"]
    from vcompress.exporters._genai_session import Session
    from vcompress.exporters._onnx_session import DecoderSession

    ids = np.array([[5, 17, 33, 90, 4, 200, 11, 7]], np.int64)
    genai, loop = Session(tiny_onnx, threads=1), DecoderSession(tiny_onnx, threads=1)
    (a, a_state), (b, b_state) = genai.prefill(ids), loop.prefill(ids)
    for token in (3, 99, 250):  # the same logits step by step: the bench's greedy picks are the same tokens
        np.testing.assert_allclose(a, b, atol=1e-4)
        (a, a_state), (b, b_state) = genai.decode(token, a_state), loop.decode(token, b_state)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_session_runners_name_the_runtime_that_scores(tiny_onnx):
    """What the answer cache keys on (Runner.runtime), the same record the bench writes (core.export_manifest.session_runtime)."""
    import onnxruntime

    from vcompress.exporters.onnx import OnnxRunner

    runner = OnnxRunner(tiny_onnx, threads=1)
    try:
        assert runner.runtime == {"module": "onnxruntime", "version": onnxruntime.__version__}
    finally:
        runner.close()


def test_python_m_bench_measures_without_torch_too(tiny_onnx):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vcompress.devices.bench",
            str(tiny_onnx),
            "--prompt-tokens",
            "8",
            "--decode-tokens",
            "2",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr
    result = json.loads(done.stdout)
    assert result["backend"] == "onnx" and "torch" not in result["modules_imported"]


def test_bench_opens_the_session_the_exporter_named_in_the_manifest(tiny_onnx, tmp_path):
    """manifest.json's `sessions` (from OnnxExport.sessions) picks the module; the format's name asks for the first."""
    from vcompress.devices.bench import load_session, session_module
    from vcompress.exporters.onnx import OnnxExport

    sessions = json.loads((tiny_onnx / "manifest.json").read_text())["sessions"]
    assert sessions == OnnxExport.sessions and list(sessions)[0] == "onnxruntime_genai"
    assert session_module(tiny_onnx, None) == session_module(tiny_onnx, "onnx") == sessions["onnxruntime_genai"]
    assert session_module(tiny_onnx, "onnxruntime") == sessions["onnxruntime"]
    assert session_module(tiny_onnx, "torch") is None  # the Runner
    assert load_session(sessions["onnxruntime"]).RUNTIME == "onnxruntime"
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "onnx", "files": {}}))
    with pytest.raises(InputError, match="names no measurement sessions.*export it again"):
        session_module(old, None)
    with pytest.raises(InputError, match="not one of vcompress's"):
        load_session("os.path")


def test_bench_refuses_a_prompt_past_the_context(tiny_models):
    context = json.loads((tiny_models["gpt2"] / "config.json").read_text())["n_positions"]
    with pytest.raises(InputError, match=f"exceeds the model's context of {context}"):
        run_benchmark(tiny_models["gpt2"], prompt_tokens=context - 4, decode_tokens=10, runs=1, warmup=0, threads=1)


def test_validate_on_host_uses_the_host_figures(tiny_llama):
    measured = {"prompt_tokens": 16, "decode_tokens": 4, "ttft_ms": {"value": 2.0}, "decode_tokens_per_s": {"value": 500.0}}
    out = roofline.validate_on_host(tiny_llama, measured)
    assert out["device"] == "x86-64 host" and out["roofline"]["peak_compute_gflops"] == 192
    assert out["ratio_measured_to_estimated"]["ttft_ms"] == pytest.approx(2.0 / out["ttft_ms"]["value"], rel=1e-3)


XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""
PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b
"""


def test_fingerprint_reads_the_kernel_features_and_hashes_what_the_host_is():
    xeon = fingerprint.cpu_facts(XEON, machine="x86_64")
    assert xeon["cpu"] == "Intel(R) Xeon(R) Platinum 8480+" and xeon["machine"] == "x86_64"
    assert xeon["isa"] == ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"]  # not sse2, fma...
    pi = fingerprint.cpu_facts(PI5, machine="aarch64")
    assert pi["isa"] == ["asimd", "asimddp"]  # Cortex-A76: NEON and dot product, no i8mm or SVE
    assert fingerprint.fingerprint_id(xeon) == fingerprint.fingerprint_id({**xeon, "copy_bandwidth_gbs": 1.0})  # speeds are not in it
    assert fingerprint.fingerprint_id(xeon) != fingerprint.fingerprint_id({**xeon, "isa": ["avx2"]})
    assert fingerprint.fingerprint_id(xeon) != fingerprint.fingerprint_id({**xeon, "cores": xeon["cores"] + 1})
    assert len(fingerprint.fingerprint_id(pi)) == 12


def test_fingerprint_says_how_the_host_differs_from_the_profile():
    host = {**fingerprint.cpu_facts(XEON, machine="x86_64"), "cores": 2}
    x86 = load_profile("x86-cpu").device  # budgets set on an AVX2-only host with 2 threads
    assert x86.isa == ["avx2"]
    found = fingerprint.differences(host, x86.isa, x86.threads)
    assert found == ["ISA +amx_bf16 +amx_int8 +amx_tile +avx512_vnni +avx512f +avx_vnni against the profile's"]
    assert fingerprint.differences({**host, "isa": ["avx2"]}, x86.isa, x86.threads) == []
    assert fingerprint.differences({**host, "isa": ["avx2"], "cores": 1}, x86.isa, x86.threads) == ["1 cores for the profile's 2 threads"]
    assert fingerprint.differences(host, None, None) == []  # a profile that does not say


def test_the_verdict_names_the_host_and_how_it_differs_from_the_profile(cli, tiny_llama, tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("VCOMPRESS_CACHE", str(tmp_path / "cache"))
    profile = yaml.safe_load(load_profile("x86-cpu").model_dump_json())
    profile["evaluation"].update(subset="anatomy", per_subject=1)
    profile["budgets"]["prompt_tokens"] = 8
    profile["recipe"] = [{"stage": "validate", "runs": 1, "warmup": 0, "decode_tokens": 2}]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(profile))
    args = ("validate", "--profile", tmp_path / "p.yaml", "--artifact", tiny_llama, "--reference", tiny_llama, "--device", "host")
    _, out, err = cli(*args, "--out", tmp_path / "v")
    verdict = json.loads((tmp_path / "v" / "verdict.json").read_text())
    latency = json.loads((tmp_path / "v" / "latency.json").read_text())
    assert verdict["host"] == latency["host"] and verdict["host"]["id"] == fingerprint.fingerprint_id(fingerprint.cpu_facts())
    assert verdict["host_differs"] == fingerprint.differences(fingerprint.cpu_facts(), ["avx2"], 2)  # x86-cpu: AVX2, 2 threads
    assert f"[fingerprint {verdict['host']['id']}]" in out and ("the profile's device x86-64 host differs" in out) == bool(
        verdict["host_differs"]
    )


def test_print_verdict_puts_the_profiles_device_beside_a_host_that_differs():
    from rich.console import Console

    from vcompress.validate import host_beside_profile, print_verdict

    host = {"id": "0e46b4492348", **fingerprint.cpu_facts(XEON, machine="x86_64"), "cores": 2, "threads": 2, "copy_bandwidth_gbs": 21.5}
    verdict = {
        "profile": "x86-cpu",
        "device": "x86-64 host",
        "checks": [],
        "passed": True,
        **host_beside_profile(host, load_profile("x86-cpu")),
    }
    console = Console(record=True, width=300)
    print_verdict(verdict, console)
    out = console.export_text()
    assert "measured on: Intel(R) Xeon(R) Platinum 8480+ (x86_64), 2 cores (2 used), avx2 avx512f avx512_vnni" in out
    assert "copy 21.5 GB/s" in out and "[fingerprint 0e46b4492348]" in out
    assert "the profile's device x86-64 host differs: ISA +amx_bf16 +amx_int8 +amx_tile +avx512_vnni +avx512f +avx_vnni" in out
    assert host_beside_profile(None, load_profile("x86-cpu")) == {}  # an estimate names no host


def test_ssh_runs_the_same_bench_and_reads_the_boards_fingerprint(tiny_llama, tmp_path, monkeypatch):
    """With ssh and scp that run on this machine (a board that is this host), the remote bench.py reports the
    fingerprint of the machine it ran on, as the host device does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text('#!/bin/sh\nfor last; do :; done\nexec sh -c "$last"\n')  # the remote command is the last word
    (bin_dir / "scp").write_text('#!/bin/sh\nsrc=""; for a; do src="$dst"; dst="$a"; done\nexec cp -r "$src" "${dst#*:}"\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    board = tmp_path / "board"
    result = measure(
        tiny_llama, "ssh", "raspberry-pi5", host="board", python=sys.executable, workdir=str(board), prompt_tokens=8, decode_tokens=2,
        runs=1, warmup=0, threads=1, estimate=False,
    )  # fmt: skip
    assert (board / tiny_llama.name / "config.json").is_file()  # the artifact was copied to the board's workdir
    assert result["device_kind"] == "ssh" and result["host"]["id"] == fingerprint.fingerprint_id(fingerprint.cpu_facts())
    assert result["host"]["threads"] == 1 and result["host"]["gemm_fp32_gflops"] > 0


# --- ssh against a real sshd on 127.0.0.1 ---------------------------------------------

SSHD = Path("/usr/sbin/sshd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    if not SSHD.exists() or shutil.which("ssh-keygen") is None or shutil.which("scp") is None:
        pytest.skip("needs openssh-server and openssh-client (apt-get install -y openssh-server)")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    shutil.copy(keys / "client_key.pub", keys / "authorized_keys")
    port = _free_port()
    config = keys / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {keys / 'host_key'}",
                f"PidFile {keys / 'sshd.pid'}",
                f"AuthorizedKeysFile {keys / 'authorized_keys'}",
                "PermitRootLogin yes",
                "StrictModes no",
                "UsePAM no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "Subsystem sftp /usr/lib/openssh/sftp-server",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 15
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    settings = dict(
        host="127.0.0.1",
        port=port,
        user=getpass.getuser(),
        identity_file=str(keys / "client_key"),
        ssh_options=["StrictHostKeyChecking=accept-new", f"UserKnownHostsFile={keys / 'known_hosts'}"],
    )
    yield settings
    proc.terminate()
    proc.wait(timeout=10)


def test_ssh_device_copies_runs_and_reads_back(sshd, tiny_onnx, tmp_path):
    board = tmp_path / "board"  # the board's workdir; the board's python is this venv's
    result = measure(
        tiny_onnx,
        "ssh",
        "raspberry-pi5",
        python=sys.executable,
        workdir=str(board),
        prompt_tokens=16,
        decode_tokens=4,
        runs=2,
        warmup=0,
        threads=1,
        **sshd,
    )
    copied = board / tiny_onnx.name / "model.onnx.data"
    assert copied.read_bytes() == (tiny_onnx / "model.onnx.data").read_bytes()
    assert (result["device"], result["device_kind"], result["source"]) == ("Raspberry Pi 5", "ssh", "measured")
    assert result["backend"] == "onnx" and "torch" not in result["modules_imported"]  # the board runs the runtime alone
    for key in ("ttft_ms", "decode_tokens_per_s", "peak_rss_mb"):
        assert result[key]["source"] == "measured" and result[key]["device"] == "Raspberry Pi 5"
    assert len(result["ttft_ms"]["samples"]) == 2 and len(result["decode_tokens_per_s"]["samples"]) == 2
    assert result["host"]["id"] and result["host"]["threads"] == 1  # the board's own fingerprint, from its bench.py
    est = result["estimate"]  # the board's own figures from the profile
    assert est["device"] == "Raspberry Pi 5" and est["roofline"]["memory_bandwidth_gbs"] == 17.1
    assert set(est["ratio_measured_to_estimated"]) == {"ttft_ms", "decode_tokens_per_s"}


def test_ssh_device_says_when_the_board_is_unreachable(sshd, tiny_llama, tmp_path):
    settings = {**sshd, "port": _free_port()}  # nothing listens there
    with pytest.raises(InputError, match="cannot reach .*127.0.0.1"):
        measure(tiny_llama, "ssh", "raspberry-pi5", workdir=str(tmp_path / "b"), prompt_tokens=8, **settings)


def test_ssh_device_needs_a_host(tiny_llama):
    with pytest.raises(InputError, match="needs a host"):
        measure(tiny_llama, "ssh", "raspberry-pi5", prompt_tokens=8)


# --- adb against a recorded benchmark_model transcript ---------------------------------


def test_parse_benchmark_model_transcript():
    out = adb.parse_benchmark_model((DATA / "benchmark_model_prefill.txt").read_text())
    assert (out["init_us"], out["first_inference_us"], out["warmup_avg_us"], out["inference_avg_us"]) == (412318, 398214, 398214, 287637)
    assert out["runs"] == {
        "count": 5,
        "first": 291877,
        "curr": 286540,
        "min": 284903,
        "max": 291877,
        "avg": 287637,
        "std": 2461,
        "p5": 284903,
        "median": 286981,
        "p95": 291877,
    }
    assert out["warmup_runs"]["count"] == 1
    assert (out["model_size_mb"], out["session_init_ms"], out["peak_memory_mb"]) == (139.861, 412.318, 184.918)
    assert (out["memory_init_mb"], out["memory_overall_mb"]) == (146.227, 178.652)
    assert out["signature"] == "prefill" and out["delegated_nodes"] == {"nodes": 1290, "of": 1302, "delegate": "TfLiteXNNPackDelegate"}
    assert adb.typical_us(out) == 286981  # the median when the build prints it


def test_parse_older_benchmark_model_output():
    # Builds without p5/median print avg in %g form and the older "Peak memory footprint" line.
    text = (
        "count=50 first=3001122 curr=2950011 min=2900400 max=3100200 avg=2.95034e+06 std=41000\n"
        "Inference timings in us: Init: 18000, First inference: 3100200, Warmup (avg): 3.1002e+06, Inference (avg): 2.95034e+06\n"
        "Peak memory footprint (MB): init=4.5 overall=120.25\n"
    )
    out = adb.parse_benchmark_model(text)
    assert out["inference_avg_us"] == 2950340 and adb.typical_us(out) == 2950340
    assert out["memory_overall_mb"] == 120.25 and out["peak_memory_mb"] is None


def test_parse_rejects_output_without_timings():
    with pytest.raises(InputError, match="no timings.*Segmentation fault"):
        adb.parse_benchmark_model("INFO: Loaded model x.tflite\nSegmentation fault\n")


def test_adb_command_line():
    device = open_device("adb", "snapdragon8g2", serial="R5CT1234", threads=4, runs=5, warmup=1, extra_args=["--use_gpu=true"])
    cmd = device.benchmark_command(Path("art/model.tflite"), "prefill")
    assert cmd == [
        "adb",
        "-s",
        "R5CT1234",
        "shell",
        "/data/local/tmp/benchmark_model --graph=/data/local/tmp/vcompress/model.tflite --signature_to_run_for=prefill "
        "--num_runs=5 --warmup_runs=1 --min_secs=0 --warmup_min_secs=0 --report_peak_memory_footprint=true "
        "--num_threads=4 --use_gpu=true",
    ]
    assert device.adb("push", "art/model.tflite", "/data/local/tmp/vcompress/") == [
        "adb",
        "-s",
        "R5CT1234",
        "push",
        "art/model.tflite",
        "/data/local/tmp/vcompress/",
    ]


# --- adb: LiteRT-LM's litert_lm_main on a .litertlm bundle ------------------------------
# tests/data/litert_lm_benchmark.txt is written by hand in litert_lm_main's print format (its header says
# from which source lines), not captured from a phone.


def test_parse_litert_lm_transcript():
    out = adb.parse_litert_lm((DATA / "litert_lm_benchmark.txt").read_text())
    # time to first token as the tool computes it: the prefill turn plus one of the 64 decode steps
    assert out["ttft_s"] == pytest.approx(0.351204817 + 1.208443215 / 64, abs=1e-12)
    assert (out["prefill_tokens"], out["decode_tokens"]) == (256, 64)
    assert (out["prefill_tokens_per_s"], out["decode_tokens_per_s"], out["peak_memory_mb"]) == (728.92, 52.96, 243.81)
    assert out["init_ms"]["Init Executor"] == 741.25 and len(out["init_ms"]) == 5
    assert adb._seconds("2m3.5s") == 123.5 and adb._seconds("850us") == pytest.approx(8.5e-4)


def test_parse_litert_lm_refuses_output_without_a_benchmark():
    with pytest.raises(InputError, match="no benchmark.*Failed to create engine"):
        adb.parse_litert_lm("I1203 litert_lm_lib.cc:588] Creating engine\nF1203 engine.cc:854] Failed to create engine\n")


def test_adb_litert_lm_command_line():
    device = open_device("adb", "snapdragon8g2", serial="R5CT1234", threads=4, decode_tokens=32, litert_lm_args=["--cache_dir=:nocache"])
    assert device.litert_lm_command(Path("art/model.litertlm")) == [
        "adb",
        "-s",
        "R5CT1234",
        "shell",
        "/data/local/tmp/litert_lm_main --backend=cpu --model_path=/data/local/tmp/vcompress/model.litertlm --benchmark "
        "--benchmark_prefill_tokens=256 --benchmark_decode_tokens=32 --async=false --report_peak_memory_footprint=true "
        "--num_cpu_threads=4 --cache_dir=:nocache",
    ]


def test_adb_runs_litert_lm_on_a_bundle_with_a_fake_adb(tmp_path):
    art = write_artifact(tmp_path / "art")
    (art / "model.safetensors").rename(art / "model.tflite")
    (art / "model.litertlm").write_bytes(b"LITERTLM" + bytes(2048))  # any bytes: the fake phone does not read them
    manifest = {"format": "tflite", "cache_length": 1024, "files": {"model": "model.tflite", "litertlm": "model.litertlm"}}
    (art / "manifest.json").write_text(json.dumps(manifest))
    log, fake = tmp_path / "adb.log", tmp_path / "adb"
    fake.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in\n  *litert_lm_main*) cat {DATA / "litert_lm_benchmark.txt"} ;;\n'
        '  *push*) echo "1 file pushed" ;;\nesac\n'
    )
    fake.chmod(0o755)
    result = measure(art, "adb", "snapdragon8g2", adb=str(fake), serial="R5CT1234", threads=4, runs=3, warmup=1)
    assert (result["device_kind"], result["backend"], result["runtime"]["module"]) == ("adb", "litert", "litert_lm_main")
    assert result["ttft_ms"]["value"] == 370.087 and result["ttft_ms"]["samples"] == [370.087] * 3
    assert result["decode_tokens_per_s"]["value"] == 52.96 and result["peak_rss_mb"]["value"] == 243.81
    assert (result["prompt_tokens"], result["decode_tokens"]) == (256, 64)
    assert result["model_size_mb"]["value"] == round(2056 / 2**20, 2)
    calls = log.read_text().splitlines()
    assert calls[1] == f"-s R5CT1234 push {art / 'model.litertlm'} /data/local/tmp/vcompress/"  # the bundle, not the .tflite
    assert sum("litert_lm_main" in c for c in calls) == 4 and not any("benchmark_model" in c for c in calls)  # warmup + runs
    manifest["cache_length"] = 200
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="exceed the bundle's context of 200"):
        measure(art, "adb", "snapdragon8g2", adb=str(fake), serial="R5CT1234")


def test_adb_signature_names_come_from_the_manifest(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    assert adb.signature_names(art) == {"prefill": "prefill", "decode": "decode"}
    (art / "manifest.json").write_text(
        json.dumps({"format": "tflite", "signatures": {"prefill": {"name": "prefill_256"}, "decode": {"name": "decode"}}})
    )
    assert adb.signature_names(art) == {"prefill": "prefill_256", "decode": "decode"}


def test_adb_device_end_to_end_with_a_fake_adb(tmp_path):
    art = write_artifact(tmp_path / "art")
    (art / "model.safetensors").rename(art / "model.tflite")  # any bytes: the fake phone does not read them
    (art / "manifest.json").write_text(json.dumps({"format": "tflite", "files": {"model": "model.tflite", "config": "config.json"}}))
    log = tmp_path / "adb.log"
    fake = tmp_path / "adb"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'case "$*" in\n'
        f"  *signature_to_run_for=prefill*) cat {DATA / 'benchmark_model_prefill.txt'} ;;\n"
        f"  *signature_to_run_for=decode*) cat {DATA / 'benchmark_model_decode.txt'} ;;\n"
        '  *push*) echo "1 file pushed" ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    result = measure(art, "adb", "snapdragon8g2", adb=str(fake), serial="R5CT1234", threads=4)
    assert (result["device"], result["device_kind"], result["backend"], result["source"]) == (
        "Snapdragon 8 Gen 2",
        "adb",
        "litert",
        "measured",
    )
    assert result["ttft_ms"]["value"] == 286.981 and result["ttft_ms"]["device"] == "Snapdragon 8 Gen 2"
    assert result["decode_tokens_per_s"]["value"] == pytest.approx(1e6 / 8641, abs=0.01)
    assert result["peak_rss_mb"]["value"] == 184.918 and result["peak_rss_mb"]["unit"] == "MiB"
    assert result["model_size_mb"]["value"] == round((art / "model.tflite").stat().st_size / 2**20, 2)
    assert result["estimate"]["source"] == "estimated" and result["estimate"]["roofline"]["memory_bandwidth_gbs"] == 67.2
    calls = log.read_text().splitlines()
    assert calls[0] == "-s R5CT1234 shell mkdir -p /data/local/tmp/vcompress"
    assert calls[1] == f"-s R5CT1234 push {art / 'model.tflite'} /data/local/tmp/vcompress/"
    assert "--signature_to_run_for=prefill" in calls[2] and "--signature_to_run_for=decode" in calls[3]
