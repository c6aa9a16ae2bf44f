"""The qnn exporter on tiny models: QNN's HTP backend (its x86 emulation) against the CPU EP on the same QDQ
graphs, the compiled context binaries loading back, and an op the HTP does not run refused at export by name."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime_qnn", reason="the QNN execution provider is the [qnn] extra: pip install -e '.[qnn]'")

from vcompress.core.errors import Refused  # noqa: E402
from vcompress.exporters import qnn  # noqa: E402
from vcompress.exporters._qnn_session import QnnSession, open_step  # noqa: E402

SMALL = {
    "chunk": 16,
    "cache": 64,
    "calibration_blocks": 2,
    "calibration_decode_tokens": 4,
    "new_tokens": 4,
    "evaluate_on": "htp",
    "fp16_mlp_above": 1e-3,
}


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    """The tiny Llama through `vcompress export qnn`, as a user runs it."""
    from vcompress.cli import main

    out = tmp_path_factory.mktemp("qnn") / "out"
    options = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert main(["export", "qnn", "--model", str(tiny_llama), "--out", str(out), *options]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_every_node_is_compiled_for_the_htp(exported):
    out, metrics = exported
    manifest = json.loads((out / "manifest.json").read_text())
    for graph in ("prefill", "decode"):
        placement = manifest["placement"][graph]
        assert placement["on_htp"] == placement["nodes"] > 100
        compiled = onnx.load(out / manifest["files"]["htp"][graph], load_external_data=False)
        assert {n.op_type for n in compiled.graph.node} == {"EPContext"}
        assert (out / manifest["files"]["binaries"][graph]).stat().st_size > 0
    assert metrics["parity"]["passed"]
    fp16 = manifest["quant"]["fp16"]  # fp16_mlp_above 1e-3: every MLP stays float, and the HTP still runs every node
    assert fp16["residual_stream"] and fp16["mlp_layers"] == list(range(json.loads((out / "config.json").read_text())["num_hidden_layers"]))
    check = manifest["fidelity"]["htp"]  # the sized HTP check every export runs
    assert check["positions"] > 1 and check["top1_agreement"] >= 0.75  # a random tiny model has near-ties


def test_htp_agrees_with_the_cpu_ep_on_the_qdq_graphs(exported, tiny_llama):
    """HTP and CPU EP run the same QDQ graphs: they differ by far less than quantization moves the logits from fp32."""
    from transformers import AutoModelForCausalLM

    out, _ = exported
    ids = np.random.default_rng(0).integers(5, 300, (1, 21))  # two prefill chunks, the second padded
    htp, cpu = (QnnSession(out, backend=b).logits(ids)[0] for b in ("htp", "cpu"))
    with torch.no_grad():
        fp32 = AutoModelForCausalLM.from_pretrained(tiny_llama)(torch.from_numpy(ids)).logits[0].numpy()
    quantization = np.abs(cpu - fp32).max()
    assert np.abs(htp - cpu).max() < 0.25 * quantization
    assert (htp.argmax(-1) == cpu.argmax(-1)).mean() >= 0.9
    # the decode graph (its own QDQ ranges), one token at a time after a prefill, on both backends
    steps = []
    for backend in ("htp", "cpu"):
        session = QnnSession(out, backend=backend)
        _, state = session.prefill(ids[0, :18])
        steps.append(np.stack([session.decode(int(ids[0, i]), state)[0].copy() for i in (18, 19, 20)]))
    assert np.abs(steps[0] - steps[1]).max() < 0.25 * quantization


def test_the_context_binary_loads_back_with_the_same_outputs(exported):
    """The EPContext model (its *_qnn.bin) gives what compiling the QDQ model in the session gives."""
    out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    compiled = open_step(out / manifest["files"]["htp"]["decode"], "htp", manifest["htp_arch"])
    fresh = open_step(out / manifest["files"]["qdq"]["decode"], "htp", manifest["htp_arch"])
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.normal(0, 0.3, i.shape).astype(np.float32) for i in compiled.get_inputs()}
    feeds |= {"input_ids": np.array([[42]], np.int32), "position_ids": np.array([[7]], np.int32)}
    for a, b in zip(compiled.run(None, feeds), fresh.run(None, feeds)):
        np.testing.assert_array_equal(a, b)


def test_an_op_the_htp_does_not_run_is_refused_at_export_by_name(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.tiny import build_config

    model = AutoModelForCausalLM.from_config(build_config("llama", len(tokenizer), hidden_act="gelu_pytorch_tanh"))
    model.save_pretrained(tmp_path / "gelu")
    tokenizer.save_pretrained(tmp_path / "gelu")
    with pytest.raises(Refused, match=r"layers\.0\.mlp\.act/FastGelu \(com\.microsoft:FastGelu\)"):
        qnn.export(tmp_path / "gelu", tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists()


def test_validate_scores_the_text_on_the_htp_and_the_answers_on_the_cpu_ep(exported, tiny_llama):
    """The profiles' split: MMLU answers through the QDQ graphs on the CPU EP (the emulation is too slow for them), the
    held-out text (perplexity, top-1 agreement) on the HTP emulation over its own small sample, the CPU EP beside it."""
    from rich.console import Console

    from vcompress.core.profiles import load_profile
    from vcompress.evaluate import Evaluator
    from vcompress.validate import budget_checks, eval_summary, print_verdict

    out, _ = exported
    runner = qnn.QnnRunner(out, backend="cpu")
    assert runner.text_positions == 3 * SMALL["chunk"]  # the export's text_chunks (3 by default)
    evaluator = Evaluator(per_subject=1, format="cloze")
    report = evaluator.evaluate(model=runner, reference=str(tiny_llama))
    text = report["text"]
    assert text["blocks"] * text["seq_len"] <= runner.text_positions
    assert text["scored_on"].startswith("QNN HTP backend") and report["runtime"]["backend"] == "QDQ on the CPU EP"
    check = text["against_cpu_ep"]
    assert check["positions"] == text["blocks"] * text["seq_len"] and check["top1_agreement"] >= 0.9
    listed = budget_checks(load_profile("snapdragon8g2-npu").budgets, eval_summary(report), {})
    checks = {c["budget"]: c for c in listed}
    assert f"over {text['tokens']} positions, on QNN HTP backend" in checks["max_perplexity_rise_pct"]["why"]
    assert "answers scored on QDQ on the CPU EP" in checks["max_mmlu_drop_points"]["why"]
    # the verdict says where the export's nodes were compiled for
    console = Console(file=io.StringIO(), width=300)
    placement = json.loads((out / "manifest.json").read_text())["placement"]
    print_verdict({"profile": "snapdragon8g2-npu", "checks": listed, "export_check": {"placement": placement}}, console)
    nodes = placement["prefill"]["nodes"]
    assert f"compiled for the NPU: prefill {nodes}/{nodes} nodes, decode" in console.file.getvalue()
