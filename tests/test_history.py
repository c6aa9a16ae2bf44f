import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.runs import MODEL_HASH, VERSIONS, make_run
from vcompress import history
from vcompress.core.errors import InputError

STARTED = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(
        tmp_path / "run", started=STARTED, ttft_samples=[86.0, 87.1, 88.2, 87.0, 90.1], decode_samples=[140.2, 139.0, 141.5, 138.8, 140.9]
    )


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_record_writes_run_metrics_samples_and_checks(run, tmp_path):
    db = tmp_path / "history.db"
    run_id = history.record(run, db)
    assert run_id.startswith("20261120T020000Z-x86-cpu-")
    (row,) = rows(db, "select model_label, model_hash, profile, device, backend, git_commit, date, passed, versions from vcompress_runs")
    assert row[:6] == ("SmolLM2-135M-Instruct", MODEL_HASH, "x86-cpu", "x86-64 host", "onnx", "0123456789abcdef0123456789abcdef01234567")
    assert row[6].startswith("2026-11-20 02:30:00") and row[7] == 1 and json.loads(row[8]) == VERSIONS
    metrics = {
        name: (value, unit, source) for name, value, unit, source in rows(db, "select name, value, unit, source from vcompress_metrics")
    }
    assert metrics["ttft_ms"] == (87.1, "ms", "measured")
    assert metrics["decode_tokens_per_s"] == (140.2, "tokens/s", "measured")
    assert metrics["estimated.ttft_ms"] == (61.0, "ms", "estimated")
    assert metrics["model_size_mb"][1:] == ("MB", "measured")
    assert metrics["accuracy"] == (0.29, "fraction", "measured")
    assert metrics["perplexity"] == (17.9, "perplexity", "measured")
    assert metrics["mmlu_drop_points"][0] == pytest.approx(1.0) and metrics["accuracy.virology"][0] == 0.28
    samples = rows(db, "select value from vcompress_samples where metric = 'ttft_ms' order by idx")
    assert [v for (v,) in samples] == [86.0, 87.1, 88.2, 87.0, 90.1]
    checks = dict(rows(db, "select budget, passed from vcompress_checks"))
    assert len(checks) == 7 and all(checks.values())


def test_record_is_idempotent_per_run_id(run, tmp_path, cli):
    db = tmp_path / "h.db"
    first = history.record(run, db)
    counts = [
        rows(db, f"select count(*) from {t}")[0][0]
        for t in ("vcompress_runs", "vcompress_metrics", "vcompress_samples", "vcompress_checks")
    ]
    code, out, _ = cli("record", run, "--db", f"sqlite:///{db}")
    assert code == 0 and first in out
    assert [
        rows(db, f"select count(*) from {t}")[0][0]
        for t in ("vcompress_runs", "vcompress_metrics", "vcompress_samples", "vcompress_checks")
    ] == counts
    assert counts[0] == 1 and counts[2] == 10


def test_url_path_and_default_location(run, tmp_path, monkeypatch):
    monkeypatch.setenv("VCOMPRESS_CACHE", str(tmp_path / "cache"))
    run_id = history.record(run)
    assert (tmp_path / "cache" / "history.db").is_file()
    assert [r.run_id for r in history.load()] == [run_id]
    assert [r.run_id for r in history.load(f"sqlite:///{tmp_path / 'cache' / 'history.db'}")] == [run_id]


def test_load_round_trips_and_filters(run, tmp_path):
    db = tmp_path / "h.db"
    other = make_run(
        tmp_path / "other",
        started=STARTED,
        ttft_samples=[50.0, 51.0],
        decode_samples=[90.0, 91.0],
        profile="pixel8",
        device="Pixel 8",
        model_label="tiny",
        model_hash="ab" * 32,
    )
    history.record(run, db)
    history.record(other, db)
    assert len(history.load(db)) == 2
    (rec,) = history.load(db, profile="pixel8")
    assert rec.group == ("tiny", "pixel8", "Pixel 8") and rec.metrics["ttft_ms"].samples == [50.0, 51.0]
    (rec,) = history.load(db, model=MODEL_HASH[:12])
    assert rec.model_label == "SmolLM2-135M-Instruct" and rec.passed
    assert rec.metrics["ttft_ms"].samples == [86.0, 87.1, 88.2, 87.0, 90.1]
    assert {c.budget for c in rec.checks} >= {"max_ttft_ms", "min_decode_tokens_per_s"}
    assert history.load(db, model="nope") == []


def test_unfinished_run_and_bad_db_are_input_errors(run, tmp_path, cli):
    (run / "06-validate" / "verdict.json").unlink()
    code, _, err = cli("record", run, "--db", tmp_path / "h.db")
    assert code == 2 and "verdict.json" in err and err.count("\n") == 1
    with pytest.raises(InputError) as e:
        history.connect("postgresql://user:s3cret@127.0.0.1:1/none")
    assert "s3cret" not in str(e.value)


HOST = {"id": "0e46b4492348", "cpu": "Intel(R) Xeon(R) Processor", "machine": "x86_64", "cores": 2, "isa": ["avx2", "avx512_vnni"]}


def test_record_stores_the_measuring_hosts_fingerprint(tmp_path):
    run = make_run(tmp_path / "run", started=STARTED, ttft_samples=[87.0], decode_samples=[140.0], host={**HOST, "threads": 2})
    db = tmp_path / "h.db"
    history.record(run, db)
    ((fingerprint, host),) = rows(db, "select host_fingerprint, host from vcompress_runs")
    assert fingerprint == HOST["id"] and json.loads(host) == {**HOST, "threads": 2}
    (loaded,) = history.load(db)
    assert loaded.host_fingerprint == HOST["id"] and loaded.host["isa"] == HOST["isa"]


def test_a_database_from_before_the_fingerprint_is_migrated_in_place(run, tmp_path):
    """An older history.db (no host columns) keeps its rows: the columns are added, old runs read as host unknown."""
    db = tmp_path / "old.db"
    history.record(run, db)
    with sqlite3.connect(db) as conn:  # back to the schema before the fingerprint
        conn.execute("alter table vcompress_runs drop column host_fingerprint")
        conn.execute("alter table vcompress_runs drop column host")
    assert "host" not in [c for (_, c, *_) in rows(db, "pragma table_info(vcompress_runs)")]
    newer = make_run(tmp_path / "new", started=STARTED.replace(day=21), ttft_samples=[87.0], decode_samples=[140.0], host=HOST)
    history.record(newer, db)
    old, new = history.load(db)
    assert (old.host_fingerprint, old.host, old.model_label) == (None, {}, "SmolLM2-135M-Instruct")
    assert new.host_fingerprint == HOST["id"]
