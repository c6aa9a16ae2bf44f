"""The roofline calibrated on published measurements: the anchors file, the fit, the bands the profiles
declare, and the table in docs/calibration.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vcompress.core.profiles import WIDE_BAND_PCT, builtin_names, load_profile
from vcompress.devices import calibration

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {
    "id", "device", "soc", "family", "runtime", "runtime_version", "backend", "threads", "model", "weight_bits", "precision",
    "prompt_tokens", "decode_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_mb", "source", "notes",
}  # fmt: skip
ANCHORS = calibration.load_anchors()
PROFILES = [load_profile(name) for name in builtin_names()]
CALIBRATED = [p for p in PROFILES if calibration.anchors_for(p.device, ANCHORS)]


def test_every_anchor_is_complete_and_names_a_model_config():
    assert len({a["id"] for a in ANCHORS}) == len(ANCHORS)
    for anchor in ANCHORS:
        assert set(anchor) == FIELDS, anchor["id"]
        assert anchor["backend"] in ("cpu", "gpu", "npu", "cuda") and anchor["source"]
        published = [anchor[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s") if anchor[k] is not None]
        assert published and all(x > 0 for x in published) and anchor["weight_bits"] in (4, 8, 16)
        config = json.loads((calibration.MODELS / f"{anchor['model']}.json").read_text())
        assert "vocab_size" in config and not any(k.endswith(("weights", "state_dict")) for k in config)


def test_the_issue_rows_are_anchors():
    rows = [(a["backend"], a["prefill_tokens_per_s"], a["decode_tokens_per_s"]) for a in ANCHORS if a["model"] == "gemma3-1b"]
    assert ("cpu", pytest.approx(243, abs=0.5), pytest.approx(43.6, abs=0.1)) in rows
    assert ("gpu", pytest.approx(1877, abs=1), pytest.approx(44.6, abs=0.1)) in rows


FIGURES = (("ttft", "ttft_ms", "prefill_efficiency"), ("decode", "decode", "decode_efficiency"))


@pytest.mark.parametrize("profile", CALIBRATED, ids=lambda p: p.name)
def test_every_anchor_falls_within_the_band_its_profiles_declare(profile):
    """Each anchor of the profile's family and backend, re-estimated from its config with the profile's figures
    and efficiencies, sits within the band the profile declares, for every figure the anchor publishes."""
    device = profile.device
    checked = 0
    for anchor in calibration.anchors_for(device, ANCHORS):
        row = calibration.ceilings(anchor, device)
        for band, figure, efficiency in FIGURES:
            if row[figure] is not None:
                error = calibration.error_pct(row[figure], calibration.estimated(row, figure, getattr(device, efficiency)))
                assert abs(error) <= getattr(device.estimate_band_pct, band), (anchor["id"], figure, error)
                checked += 1
    assert checked


@pytest.mark.parametrize("profile", CALIBRATED, ids=lambda p: p.name)
def test_profiles_declare_the_fit_and_at_least_its_band(profile):
    device = profile.device
    fits = calibration.calibrate(device, ANCHORS)
    for band, _, efficiency in FIGURES:
        fit = fits[band]
        if fit.efficiency is not None:
            assert getattr(device, efficiency) == pytest.approx(fit.efficiency, rel=0.01), efficiency
        assert getattr(device.estimate_band_pct, band) >= fit.band_pct, band


def test_profiles_without_anchors_keep_the_wide_band():
    for profile in PROFILES:
        if profile not in CALIBRATED:
            assert profile.device.estimate_band_pct.ttft >= WIDE_BAND_PCT and profile.device.estimate_band_pct.decode >= WIDE_BAND_PCT


def test_a_phone_profile_is_calibrated_on_its_cpu_rows_only():
    device = load_profile("snapdragon8g2").device
    ids = [a["id"] for a in calibration.anchors_for(device, ANCHORS)]
    assert len(ids) >= 3 and all(a["backend"] == "cpu" and a["weight_bits"] <= 8 for a in ANCHORS if a["id"] in ids)
    assert not any(a["id"] in ids for a in ANCHORS if a["backend"] == "gpu" or a["weight_bits"] > 8)


def _anchor(i: int, prefill: float | None, decode: float) -> dict:
    return {
        "id": f"a{i}", "family": "snapdragon-8", "backend": "cpu", "model": "gemma3-1b", "weight_bits": 4,
        "prompt_tokens": 512, "decode_tokens": 128, "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
    }  # fmt: skip


def test_the_fit_recovers_a_known_share_of_the_ceilings_and_leaves_each_anchor_out():
    device = load_profile("snapdragon8g3").device
    roof = calibration.ceilings(_anchor(0, 1.0, 1.0), device)
    prefill_rate = 512 / (roof["ttft_ms_roof"] / 1e3)  # tokens/s at the compute roof
    shares = [0.2, 0.25, 0.3]  # decode reaches these shares of its ceiling; prefill always 0.4 of its roof
    anchors = [_anchor(i, 0.4 * prefill_rate, s * roof["decode_roof"]) for i, s in enumerate(shares)]
    fits = calibration.calibrate(device, anchors)
    assert fits["ttft"].efficiency == pytest.approx(0.4) and fits["ttft"].band_pct == pytest.approx(0, abs=1e-9)
    assert fits["decode"].efficiency == pytest.approx((0.2 * 0.25 * 0.3) ** (1 / 3))
    # the worst row left out: 0.3 of the ceiling, estimated from the other two at sqrt(0.2 x 0.25)
    assert fits["decode"].band_pct == pytest.approx(100 * (0.3 - (0.2 * 0.25) ** 0.5) / (0.2 * 0.25) ** 0.5)
    assert fits["decode"].anchors == ["a0", "a1", "a2"]
    assert calibration.band_to_declare(fits["ttft"]) == calibration.MIN_BAND_PCT and calibration.band_to_declare(fits["decode"]) == 35
    # a row without a prefill speed calibrates decode only; fewer than three rows: the stated wide band
    fits = calibration.calibrate(device, [*anchors[:2], _anchor(3, None, 0.25 * roof["decode_roof"])])
    assert fits["ttft"].anchors == ["a0", "a1"] and fits["ttft"].band_pct == WIDE_BAND_PCT
    assert fits["decode"].anchors == ["a0", "a1", "a3"]


def test_the_table_lists_every_anchor_and_docs_hold_its_output():
    done = subprocess.run([sys.executable, "-m", "vcompress.devices.calibration"], capture_output=True, text=True, check=True)
    assert done.stderr == ""
    for anchor in ANCHORS:
        assert anchor["id"] in done.stdout
    assert (ROOT / "docs" / "calibration.md").read_text().endswith(done.stdout)


def test_runtime_memory_fit_meets_both_measurements_and_the_estimate_uses_it():
    from tests.conftest import load_bench
    from vcompress.core.roofline_math import runtime_memory

    fit = load_bench("runtime_ram").fit
    rows = [
        {"stored_weights_mib": 10.0, "held_beside_mib": 30.0, "baseline_mib": 35.0},
        {"stored_weights_mib": 30.0, "held_beside_mib": 40.0, "baseline_mib": 36.0},
    ]
    assert fit(rows) == {"baseline_mib": 36.0, "fixed_mib": 25.0, "held_per_weight_byte": 0.5}
    # what a runtime holds never shrinks as the model grows: a falling line is read as flat, at the larger figure
    assert fit([{**rows[0], "held_beside_mib": 50.0}, rows[1]])["fixed_mib"] == 50.0
    measured = json.loads((ROOT / "core" / "runtime_memory.json").read_text())["runtimes"]
    for session, row in measured.items():
        assert runtime_memory(session) == {"session": session, **{k: row[k] for k in ("baseline_mib", "fixed_mib", "held_per_weight_byte")}}
        assert all(r["peak_rss_mib"] > r["baseline_mib"] for r in row["measured"])
    # by format: the larger figures of the sessions that run it (never the smaller)
    onnx = runtime_memory(None, "onnx")
    assert onnx["baseline_mib"] == max(measured["genai"]["baseline_mib"], measured["onnx"]["baseline_mib"])
    assert runtime_memory(None, "tensorrt") is None  # never measured here: no TensorRT on this host


def test_a_bad_anchors_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "held-back.yaml"
    bad.write_text("anchors:\n  - " + json.dumps({**_anchor(0, 100.0, 10.0), "model": "no-such-model"}) + "\n")
    for anchors, named in ((bad, "no-such-model"), (tmp_path / "missing.yaml", "missing.yaml")):
        done = subprocess.run(
            [sys.executable, "-m", "vcompress.devices.calibration", "--anchors", str(anchors)], capture_output=True, text=True
        )
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and named in done.stderr, done.stderr
