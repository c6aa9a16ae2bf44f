"""bench/peers.py's helpers on fake inputs: ratios, gaps, tables, the chart, the bandwidth probe,
MMLU record/replay through vcompress's scoring, and one worker run on a tiny model. No timings asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import load_bench
from vcompress.core import scoring
from vcompress.core.data import Question


@pytest.fixture(scope="module")
def peers():
    return load_bench("peers")


def fake_row(name, decode, ttft, size=100.0, rss=200.0, accuracy=0.3, agreement=0.9, roofline=0.5, wobble=(1.0, 1.0, 1.0)):
    """A measured row whose rounds are its figures times `wobble` (the host's speed, round by round)."""
    rounds = [{"decode_tokens_per_s": decode * w, "ttft_ms": ttft / w, "peak_rss_mb": rss, "load_s": 1.0} for w in wobble]
    row = {
        "name": name,
        "runtime": f"{name} runtime",
        "size_mb": size,
        "roofline_fraction": roofline,
        "mmlu": {"accuracy": accuracy, "agreement": agreement},
        "rounds": rounds,
    }
    for key in ("decode_tokens_per_s", "ttft_ms", "peak_rss_mb"):
        values = [r[key] for r in rounds]
        row[key], row[f"{key}_spread"] = sorted(values)[1], [min(values), max(values)]
    return row


ROWS = [
    fake_row("pytorch-fp32", 20.0, 400.0, size=513.0, rss=1000.0, agreement=1.0, roofline=0.3),
    fake_row("llama.cpp", 150.0, 600.0, size=86.0, rss=190.0, agreement=0.95, roofline=0.6),
    {"name": "optimum-onnx", "error": "no optimum-cli at /x; run with --setup"},
    fake_row("vcompress-int4", 100.0, 80.0, size=95.0, rss=250.0, agreement=0.9, roofline=0.4),
]


def test_ratios_put_vcompress_over_each_peer_and_skip_failed_rows(peers):
    ratios = {r["peer"]: r for r in peers.ratios(ROWS)}
    assert set(ratios) == {"pytorch-fp32", "llama.cpp"}  # the failed row has no ratio
    assert ratios["pytorch-fp32"]["decode_speedup"] == {"median": 5.0, "spread": [5.0, 5.0], "verdict": "win"}  # 100 / 20
    assert ratios["llama.cpp"]["decode_speedup"]["median"] == pytest.approx(0.667, abs=1e-3)  # slower than llama.cpp
    assert ratios["llama.cpp"]["decode_speedup"]["verdict"] == "loss"
    assert ratios["llama.cpp"]["ttft_speedup"]["median"] == 7.5  # 600 / 80: ours is faster to the first token
    assert ratios["pytorch-fp32"]["size_ratio"] == pytest.approx(5.4, abs=1e-2)
    assert ratios["llama.cpp"]["agreement_points"] == -5.0


def test_gaps_name_the_best_peer_and_the_roofline_share(peers):
    g = peers.gaps(ROWS)
    assert g["best_decode_peer"] == {"peer": "llama.cpp", "peer_over_ours": 1.5}
    assert g["best_ttft_peer"]["peer"] == "pytorch-fp32" and g["best_ttft_peer"]["ours_over_peer"] == 0.2
    assert g["roofline_fraction"] == 0.4
    assert peers.gaps([r for r in ROWS if r["name"] != "vcompress-int4"]) == {}  # no ours, no gap
    assert peers.ratios([r for r in ROWS if r["name"] != "vcompress-int4"]) == []


def test_tables_show_numbers_or_the_reason(peers):
    rows = peers.table_rows(ROWS)
    failed = next(r for r in rows if r[0] == "optimum-onnx")
    assert failed[-1] == "not run: no optimum-cli at /x; run with --setup" and failed[1] == "-"
    ours = next(r for r in rows if r[0] == "vcompress-int4")
    assert ours[1:10] == ["95.0", "80.0 [80.0-80.0]", "100.0 [100.0-100.0]", "40.0%", "250 [250-250]", "-", "-", "0.300", "0.900"]
    with_kl = peers.table_rows([{**ROWS[0], "mmlu": {"accuracy": 0.3, "agreement": 1.0, "answer_kl_mean": 0.0123}}])[0]
    assert with_kl[9] == "1.000 (KL 0.0123)"
    with_ppl = [{**ROWS[0], "perplexity": 20.0}, {**ROWS[3], "perplexity": 20.5}]
    peers.add_perplexity_rise(with_ppl)
    assert with_ppl[1]["perplexity_rise_pct"] == 2.5 and peers.table_rows(with_ppl)[1][6] == "20.500 (+2.50%)"
    with_top1 = [
        {**ROWS[0], "heldout_top1_ids": [1, 2, 3, 4]},
        {**ROWS[3], "heldout_top1_ids": [1, 2, 0, 4]},
        {**ROWS[2], "heldout_top1_ids": [1]},
    ]
    peers.add_top1_agreement(with_top1)
    assert [r.get("top1_agreement") for r in with_top1] == [1.0, 0.75, None]  # a row scored on other positions gets none
    assert not any("heldout_top1_ids" in r for r in with_top1) and peers.table_rows(with_top1)[1][7] == "0.750"
    text = peers.report_markdown(
        {
            "model": "m",
            "host": "h",
            "rows": ROWS,
            "ratios": peers.ratios(ROWS),
            "gaps": peers.gaps(ROWS),
            "bandwidth": {"copy_gbs": 20.0, "threads": 2, "buffer_gib": 1.0},
            "settings": {
                "threads": 2,
                "prompt_tokens": 256,
                "decode_tokens": 64,
                "runs": 5,
                "rounds": 3,
                "warmup": 1,
                "questions": 285,
                "per_subject": 5,
                "seed": 0,
            },
        }
    )
    assert "| llama.cpp | 0.67x [0.67-0.67] loss | 7.50x [7.50-7.50] win |" in text
    assert "fastest peer decode: llama.cpp, 1.50x ours" in text and "40.0% of the roofline" in text
    assert len({line.count("|") for line in text.splitlines() if line.startswith("| row")}) == 1


def test_a_ratio_is_a_win_only_when_every_round_agrees(peers):
    """The same medians, but one round where the host slowed ours alone: the decode ratio is undecided."""
    ours = fake_row("vcompress-int4", 100.0, 80.0, wobble=(1.0, 1.0, 0.5))
    peer = fake_row("llama.cpp", 90.0, 100.0)
    ratio = peers.ratios([ours, peer])[0]
    assert ratio["decode_speedup"]["median"] == pytest.approx(1.111, abs=1e-3) and ratio["decode_speedup"]["spread"][0] < 1
    assert ratio["decode_speedup"]["verdict"] == "undecided" and ratio["ttft_speedup"]["verdict"] == "undecided"


def test_race_visits_the_rows_in_turn_one_process_at_a_time(peers, monkeypatch, tmp_path):
    visits = []

    def fake_worker(python, job, work, timeout=1800):
        visits.append(job["target"])
        n = len(visits)
        return {"ttft_ms": 100.0 + n, "decode_tokens_per_s": 50.0 + n, "peak_rss_mb": 300.0, "load_s": 1.0}

    monkeypatch.setattr(peers, "run_worker", fake_worker)
    rows = [{"name": n, "engine": "onnx", "target": n, "python": "py", "roofline": {"decode_ceiling_tokens_per_s": 100.0}} for n in "ABC"]
    rows.append({"name": "D", "error": "not here"})
    ctx = {"rounds": 3, "runs": 2, "warmup": 1, "prompt": [1, 2], "prompt_tokens": 2, "decode_tokens": 4, "threads": 2, "work": tmp_path}
    peers.race(rows, ctx)
    assert visits == list("ABCABCABC")
    a = rows[0]
    assert [r["ttft_ms"] for r in a["rounds"]] == [101.0, 104.0, 107.0]
    assert a["ttft_ms"] == 104.0 and a["ttft_ms_spread"] == [101.0, 107.0] and a["roofline_fraction"] == 0.54
    assert "rounds" not in rows[3]


def test_floor_rows_score_what_ignoring_the_question_scores(peers):
    questions = _questions() * 4
    reference = torch.zeros(len(questions), 4)
    reference[:, 0] = 1.0  # fp32 always answers A: a constant-A row agrees with it fully
    floors = {r["name"]: r for r in peers.floor_rows(reference, questions)}
    assert floors["floor: always A"]["mmlu"]["agreement"] == 1.0
    want = sum(q.answer == 0 for q in questions) / len(questions)
    assert floors["floor: always A"]["mmlu"]["accuracy"] == pytest.approx(want)
    assert 0 <= floors["floor: random answer"]["mmlu"]["agreement"] < 1
    assert peers.table_rows(list(floors.values()))[0][2] == "-"


def test_chart_writes_a_png(peers, tmp_path):
    result = {"model": "m", "host": "h", "settings": {"threads": 2}, "rows": ROWS}
    path = peers.chart(result, tmp_path / "peers.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert peers.chart({**result, "rows": ROWS[:3]}, tmp_path / "none.png") is None  # nothing to compare with


def test_bandwidth_probe_reports_read_plus_write_bytes(peers):
    bw = peers.memory_bandwidth(threads=2, gib=1 / 64, repeats=2)
    assert bw["copy_gbs"] == max(bw["samples_gbs"]) > 0 and len(bw["samples_gbs"]) == 2


def _questions():
    words = "the heart pumps blood through the body"
    return [
        Question(s, f"Question {i}: {words}?", (f"liver {i}", "kidney", "lung", "heart"), i % 4)
        for i, s in enumerate(["anatomy", "virology", "anatomy"])
    ]


def test_recorded_calls_replayed_give_scorings_own_logprobs(peers, tiny_llama):
    from vcompress.exporters import open_runner

    runner = open_runner(tiny_llama)
    vocab = runner.model.config.vocab_size
    questions = _questions()
    calls = peers.mmlu_calls(runner.tokenizer, questions, vocab)
    assert calls and all(len(ids) > max(positions) for ids, positions in calls)
    logits = np.concatenate([runner.forward(torch.tensor([ids]), positions=torch.tensor(p))[0].numpy() for ids, p in calls])
    replayed = peers.mmlu_logprobs_from(logits, runner.tokenizer, questions, vocab)
    direct = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, batch_size=1, format="cloze")
    assert torch.allclose(replayed, direct, atol=1e-5)
    with pytest.raises(ValueError, match="replayed"):
        peers.mmlu_logprobs_from(np.concatenate([logits, logits[:1]]), runner.tokenizer, questions, vocab)


def test_worker_measures_speed_and_logits_in_its_own_process(peers, tiny_llama, tmp_path):
    job = {
        "engine": "torch",
        "target": str(tiny_llama),
        "threads": 1,
        "context": 32,
        "speed": {"prompt": [5, 6, 7, 8], "decode_tokens": 3, "runs": 2, "warmup": 1},
        "mmlu": {"calls": [[[5, 6, 7], [2]], [[9, 10, 11, 12], [2, 3]]], "out": str(tmp_path / "logits.npy")},
    }
    out = peers.run_worker(Path(sys.executable), job, tmp_path)
    assert len(out["ttft_ms_samples"]) == 2 and out["decode_tokens_per_s"] > 0 and out["peak_rss_mb"] > 0
    assert len(out["first_tokens"]) == 4 and out["mmlu_positions"] == 3
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape[0] == 3 and np.isfinite(logits).all()
    bad = {**job, "engine": "torch", "target": str(tmp_path / "missing")}
    with pytest.raises(RuntimeError):
        peers.run_worker(Path(sys.executable), bad, tmp_path)
    assert json.loads(json.dumps(out))  # the result is plain JSON


def test_worker_perplexity_is_the_models_own_cross_entropy(peers, tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    blocks = [[5, 9, 17, 30, 41, 7, 8, 2], [11, 12, 13, 14, 15, 16, 17, 18]]
    out = peers.run_worker(
        Path(sys.executable),
        {"engine": "torch", "target": str(tiny_llama), "threads": 1, "context": 16, "ppl": {"blocks": blocks}},
        tmp_path,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(blocks), labels=torch.tensor(blocks)).loss  # mean over the 2 x 7 next tokens
    assert out["ppl"]["tokens"] == 14 and out["ppl"]["nll"] / 14 == pytest.approx(float(loss), rel=1e-4)


def test_optimum_gets_a_config_that_transformers_4_reads_with_the_right_rope_theta(peers, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps({"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    )
    (hf / "model.safetensors").write_bytes(b"weights")
    out = peers.legacy_config_copy(hf, tmp_path / "legacy")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["rope_parameters"]["rope_theta"] == 100000.0
    assert (out / "model.safetensors").read_bytes() == b"weights" and (out / "model.safetensors").is_symlink()
    assert json.loads((hf / "config.json").read_text()).get("rope_theta") is None  # the source is left alone


def test_genai_engine_reads_the_positions_our_loop_reads(peers, tiny_llama, tmp_path):
    """The generator gives only the newest logits: logits_at steps through the prompt and must match a full pass."""
    from vcompress.exporters.onnx import export

    folder = tmp_path / "onnx"
    export(tiny_llama, folder, "none", log=lambda _: None, threads=1)
    genai, ours = peers.GenaiEngine(folder, 1, 32), peers.OnnxEngine(folder, 1, 32)
    ids, positions = [5, 17, 33, 90, 4, 200, 11], [2, 4, 6]
    np.testing.assert_allclose(genai.logits_at(ids, positions), ours.logits_at(ids, positions), atol=1e-4)
    np.testing.assert_allclose(genai.logits_at(ids, [6]), ours.logits_at(ids, [6]), atol=1e-4)
    # the plain-onnxruntime engine (optimum's graphs, no torch in the process) drives the same cache inputs
    plain = peers.OrtGraphEngine(folder, 1, 32)
    np.testing.assert_allclose(plain.prefill(ids), ours.prefill(ids), atol=1e-4)
    np.testing.assert_allclose(plain.decode(7), ours.decode(7), atol=1e-4)
