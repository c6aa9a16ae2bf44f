"""The history store: one row per recorded run, its metrics (unit, measured/estimated) and samples.

`record(run_dir, db)` reads a finished run folder (run.json and its validate folder's verdict, latency and eval JSON)
and writes it into a SQL database through SQLAlchemy Core: SQLite under the cache by default, or any
SQLAlchemy URL (postgresql://...) so a team can share one. Recording the same run again replaces
its rows, so it is idempotent per run id. `load(db)` reads the runs back for reports.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from vcompress.core.artifact import RunLayout
from vcompress.core.errors import InputError

metadata = sa.MetaData()
runs_table = sa.Table(
    "vcompress_runs",
    metadata,
    sa.Column("run_id", sa.String(200), primary_key=True),
    sa.Column("date", sa.DateTime, nullable=False, index=True),  # UTC, naive
    sa.Column("model_label", sa.String(300), nullable=False),
    sa.Column("model_hash", sa.String(128)),
    sa.Column("model_spec", sa.String(1000)),
    sa.Column("profile", sa.String(200), nullable=False),
    sa.Column("profile_sha256", sa.String(64)),
    sa.Column("device", sa.String(200), nullable=False),
    sa.Column("device_kind", sa.String(50)),
    sa.Column("backend", sa.String(50)),
    sa.Column("format", sa.String(50)),
    sa.Column("git_commit", sa.String(64)),
    sa.Column("vcompress", sa.String(50)),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("run_dir", sa.String(2000)),
    sa.Column("versions", sa.Text),  # JSON: runtime versions the run was validated with
    sa.Column("host_fingerprint", sa.String(32)),  # the measuring host's id (devices/fingerprint.py); null: estimated or older
    sa.Column("host", sa.Text),  # JSON: that host's CPU, cores, threads, ISA features, copy bandwidth and GEMM speed
    sa.Column("recorded", sa.DateTime, nullable=False),
)


def _child_table(name: str, key: str, *columns: sa.Column) -> sa.Table:
    """A table of one run's rows, keyed by the run's id and the string column `key` (and any key among `columns`)."""
    run_id = sa.Column("run_id", sa.String(200), sa.ForeignKey("vcompress_runs.run_id"), primary_key=True)
    return sa.Table(name, metadata, run_id, sa.Column(key, sa.String(200), primary_key=True), *columns)


metrics_table = _child_table(
    "vcompress_metrics",
    "name",
    sa.Column("value", sa.Float),
    sa.Column("unit", sa.String(50), nullable=False),
    sa.Column("source", sa.String(20), nullable=False),  # measured | estimated
    sa.Column("device", sa.String(200)),
)
samples_table = _child_table(
    "vcompress_samples",
    "metric",
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
)
checks_table = _child_table(
    "vcompress_checks",
    "budget",
    sa.Column("limit", sa.Float),
    sa.Column("value", sa.Float),
    sa.Column("unit", sa.String(50)),
    sa.Column("source", sa.String(20)),
    sa.Column("passed", sa.Boolean, nullable=False),
)
CHILD_TABLES = (samples_table, metrics_table, checks_table)


@dataclass
class Metric:
    name: str
    value: float | None
    unit: str
    source: str = "measured"
    device: str | None = None
    samples: list[float] = field(default_factory=list)


@dataclass
class Check:
    budget: str
    limit: float | None
    value: float | None
    unit: str | None
    source: str | None
    passed: bool


@dataclass
class RunRecord:
    run_id: str
    date: datetime
    model_label: str
    model_hash: str | None
    profile: str
    device: str
    backend: str | None
    passed: bool
    model_spec: str | None = None
    profile_sha256: str | None = None
    device_kind: str | None = None
    format: str | None = None
    git_commit: str | None = None
    vcompress: str | None = None
    run_dir: str | None = None
    versions: dict = field(default_factory=dict)
    host_fingerprint: str | None = None
    host: dict = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.model_label, self.profile, self.device)


# --- the database -----------------------------------------------------------------------


def default_db() -> Path:
    from vcompress.core.models import cache_dir

    return cache_dir() / "history.db"


def db_url(db: str | Path | None = None) -> str:
    """A SQLAlchemy URL for --db: a URL as given, a plain path as SQLite, None as the default file."""
    if db is None or str(db) == "":
        db = default_db()
    text = str(db)
    if "://" in text:
        return text
    path = Path(text).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def shown(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def connect(db: str | Path | None = None) -> sa.Engine:
    url = db_url(db)
    try:
        engine = sa.create_engine(url)
        metadata.create_all(engine)
        add_missing_columns(engine)
    except sa.exc.ArgumentError as e:
        raise InputError(
            f"--db {shown(url)} is not a valid database URL ({e}); pass a file path or a URL such as sqlite:///history.db or postgresql://user@host/db"
        ) from None
    except (sa.exc.NoSuchModuleError, ModuleNotFoundError) as e:
        raise InputError(
            f"--db {shown(url)}: no driver for this database ({e}); install its driver (PostgreSQL: `pip install psycopg2-binary`, or `pip install psycopg[binary]` with a postgresql+psycopg:// URL)"
        ) from None
    except sa.exc.OperationalError as e:
        raise InputError(
            f"cannot open database {shown(url)}: {str(e.orig).splitlines()[0]}; check the path or URL and its permissions"
        ) from None
    return engine


def add_missing_columns(engine: sa.Engine) -> None:
    """Bring a database written by an older vcompress up to this schema: create_all makes missing tables only, so
    each column added since (all nullable, such as host_fingerprint) is added in place; old rows read as null."""
    inspector = sa.inspect(engine)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        with engine.begin() as conn:
            for column in table.columns:
                if column.name not in present:
                    kind = column.type.compile(engine.dialect)
                    conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))


# --- reading a run folder ---------------------------------------------------------------


def parse_date(text: str | None) -> datetime | None:
    if not text:
        return None
    value = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def run_id_of(run: dict, device: str, backend: str | None) -> str:
    """A stable id for a run folder: its start time, profile, and a hash of what identifies it."""
    if run.get("run_id"):
        return str(run["run_id"])
    started = parse_date(run.get("started"))
    if started is None:
        raise InputError("run.json has no `started` time; it was not written by `vcompress run`")
    key = json.dumps([run.get("started"), run.get("profile"), run.get("model"), device, backend], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    profile = (run.get("profile") or {}).get("name", "profile")
    return f"{started:%Y%m%dT%H%M%SZ}-{profile}-{digest}"


def _figure(name: str, data: dict, default_source: str, device: str | None) -> Metric:
    return Metric(
        name,
        _float(data.get("value")),
        str(data.get("unit", "")),
        data.get("source", default_source),
        data.get("device", device),
        [float(s) for s in data.get("samples") or [] if s is not None],
    )


def _float(value) -> float | None:
    return None if value is None else float(value)


def latency_metrics(latency: dict) -> list[Metric]:
    """Every figure in latency.json ({value, unit, ...}); the roofline estimate's as `estimated.<name>`."""
    source, device = latency.get("source", "measured"), latency.get("device")
    out = [_figure(k, v, source, device) for k, v in latency.items() if isinstance(v, dict) and "value" in v]
    for key, value in (latency.get("estimate") or {}).items():
        if isinstance(value, dict) and "value" in value:
            out.append(_figure(f"estimated.{key}", value, "estimated", device))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            unit = "ratio" if key.startswith("ratio") else ""
            out.append(Metric(f"estimated.{key}", float(value), unit, "estimated", device))
    return out


def eval_metrics(ev: dict) -> list[Metric]:
    """The quality figures of eval.json under flat names (accuracy is the student's)."""
    out: list[Metric] = []

    def add(name, value, unit):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(Metric(name, float(value), unit))

    student, teacher = ev.get("student") or {}, ev.get("teacher") or {}
    add("accuracy", student.get("accuracy"), "fraction")
    add("teacher_accuracy", teacher.get("accuracy"), "fraction")
    if isinstance(student.get("accuracy"), (int, float)) and isinstance(teacher.get("accuracy"), (int, float)):
        add("mmlu_drop_points", 100 * (teacher["accuracy"] - student["accuracy"]), "points")
    for subject, value in sorted((student.get("subjects") or {}).items()):
        add(f"accuracy.{subject}", value.get("accuracy") if isinstance(value, dict) else value, "fraction")
    ppl = ev.get("perplexity") or {}
    add("perplexity", ppl.get("student"), "perplexity")
    add("teacher_perplexity", ppl.get("teacher"), "perplexity")
    add("perplexity_rise_pct", ppl.get("rise_pct"), "%")
    add("answer_agreement", ev.get("answer_agreement"), "fraction")
    add("top1_agreement", ev.get("top1_agreement"), "fraction")
    add("answer_kl_mean", ev.get("answer_kl_mean"), "nats")
    add("kl_mean", ev.get("kl_mean"), "nats")
    return out


def read_run(run_dir: str | Path) -> RunRecord:
    """A finished run folder as a RunRecord (what `record` writes)."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    run = layout.read_run()
    verdict = layout.validation(RunLayout.VERDICT)
    latency = layout.validation(RunLayout.LATENCY, required=False)
    ev = layout.validation(RunLayout.EVAL, required=False)
    model, profile = run.get("model") or {}, run.get("profile") or {}
    device = latency.get("device") or verdict.get("device") or "unknown device"
    backend = latency.get("backend") or verdict.get("backend")
    date = parse_date(verdict.get("created")) or parse_date(run.get("finished")) or parse_date(run.get("started"))
    metrics = {m.name: m for m in latency_metrics(latency) + eval_metrics(ev)}
    host = latency.get("host") or verdict.get("host") or {}
    checks = [
        Check(c["budget"], _float(c.get("limit")), _float(c.get("value")), c.get("unit"), c.get("source"), bool(c.get("passed")))
        for c in verdict.get("checks") or []
    ]
    return RunRecord(
        run_id=run_id_of(run, device, backend),
        date=date,
        model_label=model.get("label") or (verdict.get("model") or {}).get("label") or str(model.get("spec") or "model"),
        model_hash=model.get("hash") or (verdict.get("model") or {}).get("hash"),
        model_spec=model.get("spec"),
        profile=profile.get("name") or verdict.get("profile") or "profile",
        profile_sha256=profile.get("sha256"),
        device=device,
        device_kind=latency.get("device_kind"),
        backend=backend,
        format=verdict.get("format"),
        git_commit=run.get("git_commit"),
        vcompress=run.get("vcompress"),
        passed=bool(verdict.get("passed")),
        run_dir=str(run_dir.resolve()),
        versions=run.get("versions") or {},
        host_fingerprint=host.get("id"),
        host=host,
        metrics=metrics,
        checks=checks,
    )


# --- writing and reading the store ------------------------------------------------------


def record(run_dir: str | Path, db: str | Path | None = None) -> str:
    """Record a finished run into the history store; returns its run id. Re-recording replaces it."""
    rec = read_run(run_dir)
    engine = connect(db)
    try:
        with engine.begin() as conn:
            for table in CHILD_TABLES:
                conn.execute(table.delete().where(table.c.run_id == rec.run_id))
            conn.execute(runs_table.delete().where(runs_table.c.run_id == rec.run_id))
            conn.execute(
                runs_table.insert().values(
                    run_id=rec.run_id,
                    date=rec.date,
                    model_label=rec.model_label,
                    model_hash=rec.model_hash,
                    model_spec=rec.model_spec,
                    profile=rec.profile,
                    profile_sha256=rec.profile_sha256,
                    device=rec.device,
                    device_kind=rec.device_kind,
                    backend=rec.backend,
                    format=rec.format,
                    git_commit=rec.git_commit,
                    vcompress=rec.vcompress,
                    passed=rec.passed,
                    run_dir=rec.run_dir,
                    versions=json.dumps(rec.versions, sort_keys=True),
                    host_fingerprint=rec.host_fingerprint,
                    host=json.dumps(rec.host, sort_keys=True),
                    recorded=datetime.now(UTC).replace(tzinfo=None),
                )
            )
            metric_rows = [
                dict(run_id=rec.run_id, name=m.name, value=m.value, unit=m.unit, source=m.source, device=m.device)
                for m in rec.metrics.values()
            ]
            sample_rows = [
                dict(run_id=rec.run_id, metric=m.name, idx=i, value=v) for m in rec.metrics.values() for i, v in enumerate(m.samples)
            ]
            check_rows = [
                dict(run_id=rec.run_id, budget=c.budget, limit=c.limit, value=c.value, unit=c.unit, source=c.source, passed=c.passed)
                for c in rec.checks
            ]
            for table, rows in ((metrics_table, metric_rows), (samples_table, sample_rows), (checks_table, check_rows)):
                if rows:
                    conn.execute(table.insert(), rows)
    finally:
        engine.dispose()
    return rec.run_id


def load(db: str | Path | None = None, *, profile: str | None = None, model: str | None = None) -> list[RunRecord]:
    """Every recorded run (optionally one profile / one model label, spec or hash prefix), oldest first."""
    where = []
    if profile:
        where.append(runs_table.c.profile == profile)
    if model:
        where.append(
            sa.or_(
                runs_table.c.model_label == model,
                runs_table.c.model_spec == model,
                runs_table.c.model_hash.startswith(model, autoescape=True),
            )
        )
    chosen = sa.select(runs_table.c.run_id).where(*where)
    engine = connect(db)
    try:
        with engine.connect() as conn:
            runs = {}
            for row in conn.execute(sa.select(runs_table).where(*where).order_by(runs_table.c.date, runs_table.c.run_id)).mappings():
                data = dict(row)
                data["versions"] = json.loads(data["versions"] or "{}")
                data["host"] = json.loads(data["host"] or "{}")
                data.pop("recorded")
                runs[row["run_id"]] = RunRecord(**data)
            samples: dict[tuple[str, str], list[float]] = {}
            query = sa.select(samples_table).where(samples_table.c.run_id.in_(chosen)).order_by(samples_table.c.idx)
            for row in conn.execute(query).mappings():
                samples.setdefault((row["run_id"], row["metric"]), []).append(row["value"])
            for row in conn.execute(sa.select(metrics_table).where(metrics_table.c.run_id.in_(chosen))).mappings():
                runs[row["run_id"]].metrics[row["name"]] = Metric(
                    row["name"], row["value"], row["unit"], row["source"], row["device"], samples.get((row["run_id"], row["name"]), [])
                )
            query = sa.select(checks_table).where(checks_table.c.run_id.in_(chosen)).order_by(checks_table.c.budget)
            for row in conn.execute(query).mappings():
                runs[row["run_id"]].checks.append(
                    Check(row["budget"], row["limit"], row["value"], row["unit"], row["source"], row["passed"])
                )
    finally:
        engine.dispose()
    return list(runs.values())
