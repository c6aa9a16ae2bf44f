"""The emulated aarch64 device: the artifact on the ARM build of its runtime under qemu-user, against this machine's."""

from __future__ import annotations

import platform
import shutil

import pytest

from vcompress.core.errors import InputError
from vcompress.core.profiles import load_profile
from vcompress.devices import emulated
from vcompress.devices.emulated import APT, target_isa_device
from vcompress.exporters.onnx import OnnxExport, export
from vcompress.validate import ValidateStage, isa_check

HAVE_QEMU = shutil.which("qemu-aarch64-static") is not None and shutil.which("debootstrap") is not None


def _profile(name: str = "raspberry-pi5", **budgets):
    profile = load_profile(name)
    return profile.model_copy(
        update={
            "budgets": profile.budgets.model_copy(update=budgets),
            "evaluation": profile.evaluation.model_copy(update={"subset": "anatomy"}),
        }
    )


def test_aarch64_profiles_budget_the_check_and_host_profiles_do_not():
    for name in ("raspberry-pi5", "phone-4gb"):
        device = target_isa_device(load_profile(name))
        assert device is not None and device.settings.arch == "aarch64" and not device.attached()
    assert target_isa_device(load_profile("raspberry-pi5")).cpu == "cortex-a76"  # isa [asimd, asimddp]: the Pi's own core
    assert target_isa_device(load_profile("phone-4gb")).cpu == "max"  # no isa named: every feature qemu has
    assert target_isa_device(load_profile("x86-cpu")) is None
    no_budget = _profile(min_target_isa_agreement=None)
    assert target_isa_device(no_budget) is None


def test_missing_qemu_is_one_line_naming_the_packages_before_any_work(monkeypatch):
    monkeypatch.setattr(emulated.shutil, "which", lambda name: None)
    with pytest.raises(InputError) as e:
        ValidateStage.from_profile({}, load_profile("raspberry-pi5"))
    assert APT in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2


def test_verdict_row_passes_on_agreement_and_fails_on_a_load_failure():
    ok = {
        "device": "aarch64 (qemu-user, -cpu max)",
        "arch": "aarch64",
        "cpu": "max",
        "loads": True,
        "runtime": {"module": "onnxruntime_genai", "version": "0.18.0"},
        "greedy": {"prompts": 5, "identical": 4, "first_difference": [None, 7, None, None, None]},
        "logits": {"positions": 128, "max_abs_diff": 0.05, "top1_agreement": 0.99},
        "cpu_features": ["asimd", "asimddp", "i8mm"],
        "seconds": {"emulated": 40},
    }
    row = isa_check(0.98, ok)
    assert row["passed"] and row["value"] == 0.99 and row["source"] == "emulated"
    assert "aarch64 build of onnxruntime_genai 0.18.0: loads, greedy tokens 4/5 identical to" in row["why"]
    assert "(prompt 2 at token 7)" in row["why"]
    assert not isa_check(0.995, ok)["passed"]
    # with a float reference, the target build is judged against it, not against this machine's build
    near = {"host": {"top1_agreement": 0.99, "max_abs_diff": 1.7}}
    faithful = ok | {
        "logits": ok["logits"] | {"top1_agreement": 0.93},
        "reference": near | {"target": {"top1_agreement": 0.97, "max_abs_diff": 2.0}},
    }
    row = isa_check(0.95, faithful)
    assert row["passed"] and row["value"] == 0.97
    assert "float reference 0.970" in row["why"] and "build 0.990" in row["why"] and "build 0.930" in row["why"]
    astray = ok | {"reference": near | {"target": {"top1_agreement": 0.9, "max_abs_diff": 6.0}}}
    assert not isa_check(0.95, astray)["passed"]  # the builds agree with each other (0.99), but not with the artifact
    broken = isa_check(
        0.5, {"arch": "aarch64", "loads": False, "error": "exit -11: Segmentation fault", "runtime": {"onnxruntime": "1.31.1"}}
    )
    assert not broken["passed"] and "does not load: exit -11" in broken["why"]


def test_mmlu_sample_is_the_size_asked_and_spread_over_the_subjects():
    subjects = ["anatomy", "virology", "nutrition", "college_biology"]
    eight = emulated.mmlu_sample(subjects, 8, seed=0)
    assert len(eight) == 8 and sorted({q.subject for q in eight}) == sorted(subjects)
    assert all(sum(q.subject == s for q in eight) == 2 for s in subjects)
    three = emulated.mmlu_sample(subjects, 3, seed=0)
    assert len(three) == 3 and len({q.question for q in three}) == 3
    assert emulated.mmlu_sample(subjects, 0, seed=0) == []


def test_float_reference_copy_computes_with_float_activations(tiny_llama, tmp_path):
    import onnx

    out = tmp_path / "onnx"
    export(tiny_llama, out, "int4", log=lambda _: None, threads=1, min_top1_quantized=0.0)
    copy = OnnxExport.float_reference(out, tmp_path / "reference")

    def levels(folder):
        nodes = onnx.load(folder / "model.onnx", load_external_data=False).graph.node
        return {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}

    assert levels(out) == {4} and levels(copy) == {0}  # the artifact itself untouched
    assert (copy / "model.onnx.data").read_bytes() == (out / "model.onnx.data").read_bytes()
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in out.iterdir())


@pytest.mark.skipif(platform.machine() == "aarch64", reason="this machine is aarch64: its own runs are the target's")
@pytest.mark.skipif(not HAVE_QEMU, reason=f"needs qemu-user and debootstrap ({APT}); .ci/run installs them")
def test_tiny_int4_export_answers_on_emulated_aarch64(tiny_llama, tmp_path):
    out = tmp_path / "onnx"
    export(tiny_llama, out, "int4", log=lambda _: None, threads=1, min_top1_quantized=0.0)
    device = target_isa_device(_profile(), mmlu_questions=2, text_tokens=32)
    record = device.check(out, log=lambda _: None)
    assert record["loads"], record.get("error")
    # -cpu cortex-a76 (the profile's isa): the int8 dot product, and neither i8mm nor SVE for the kernels to pick
    assert record["cpu"] == "cortex-a76" and "asimddp" in record["cpu_features"]
    assert not {"i8mm", "sve"} & set(record["cpu_features"])
    assert record["runtime"] == record["host_runtime"]  # the same runtime, the same version, the other build
    assert record["greedy"]["prompts"] == 5 and len(record["greedy"]["first_difference"]) == 5
    logits = record["logits"]
    assert logits["positions"] == 32 and 0 <= logits["top1_agreement"] <= 1
    # the same int4 weights: the builds differ by rounding in the kernels, not by a layout mistake (which moves logits by units)
    assert logits["max_abs_diff"] < 0.5
    assert record["mmlu"]["n"] == 2 and record["mmlu"]["agree"] <= 2
    # each build against the float-activation copy of the same artifact: the int8-activation rounding of each ISA
    reference = record["reference"]
    assert reference["host"]["max_abs_diff"] < 0.5 and reference["target"]["max_abs_diff"] < 0.5
