"""Nightly regression report: the newest result per (model, profile, device) against a baseline.

A metric regressed when it moved in its bad direction by more than the run-to-run noise allows:
threshold = max(NOISE_K * pooled spread of both runs' repeated samples, a small floor). Metrics
measured once (size, accuracy) only have the floor. A budget failing in the newest run also counts.
Writes report.md (+ plots/*.png), a self-contained report.html and junit.xml.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import statistics
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vcompress.core.errors import InputError
from vcompress.history import Metric, RunRecord, db_url, load, shown

NOISE_K = 3.0  # how many pooled standard deviations a change must exceed


@dataclass(frozen=True)
class Rule:
    label: str
    bad: int  # +1: up is bad (latency, size), -1: down is bad (speed, accuracy)
    rel_floor: float = 0.0  # fraction of the baseline value
    abs_floor: float = 0.0  # in the metric's unit


RULES = {
    "ttft_ms": Rule("time to first token", +1, rel_floor=0.03),
    "decode_tokens_per_s": Rule("decode speed", -1, rel_floor=0.03),
    "peak_rss_mb": Rule("peak RAM", +1, rel_floor=0.05),
    "model_size_mb": Rule("model size", +1, rel_floor=0.01),
    # Accuracy is scored on the same questions every night: a one-answer flip (1/80) is within the floor.
    "accuracy": Rule("MMLU accuracy", -1, abs_floor=0.02),
    "answer_agreement": Rule("answer agreement", -1, abs_floor=0.02),
    "top1_agreement": Rule("top-1 agreement", -1, abs_floor=0.02),
    "perplexity": Rule("perplexity", +1, rel_floor=0.02),
}
# What the measuring host sets: compared only between runs with the same host fingerprint (devices/fingerprint.py).
HOST_METRICS = ("ttft_ms", "decode_tokens_per_s", "peak_rss_mb")
BUDGET_OF = {"ttft_ms": "max_ttft_ms", "decode_tokens_per_s": "min_decode_tokens_per_s", "model_size_mb": "max_model_size_mb"}
PLOTS = (
    ("ttft_ms", "TTFT (ms)"),
    ("decode_tokens_per_s", "decode (tokens/s)"),
    ("model_size_mb", "model size (MiB)"),
    ("accuracy", "MMLU accuracy"),
)


@dataclass
class Comparison:
    metric: str
    unit: str
    baseline: float
    newest: float
    threshold: float
    noise: float
    regressed: bool
    baseline_run: str = ""  # the run compared with: for latency, the group's baseline measured on the newest run's host

    @property
    def change_pct(self) -> float | None:
        return None if self.baseline == 0 else 100 * (self.newest - self.baseline) / abs(self.baseline)


@dataclass
class GroupReport:
    group: tuple[str, str, str]
    runs: list[RunRecord]  # in the window, oldest first (the trend)
    newest: RunRecord
    baseline: RunRecord | None
    note: str = ""  # why there is no baseline
    comparisons: list[Comparison] = field(default_factory=list)
    other_hosts: list[RunRecord] = field(default_factory=list)  # runs in the window left out of latency comparisons
    host_note: str = ""  # why latency was not compared at all

    def left_out(self) -> str:
        """One sentence: how many runs were left out of the latency comparisons and why ('' when none)."""
        if not self.other_hosts and not self.host_note:
            return ""
        newest = self.newest.host_fingerprint or "not recorded"
        others = sorted({r.host_fingerprint or "not recorded" for r in self.other_hosts})
        text = (
            f"latency compared only between runs on host {newest} ({describe_host(self.newest)}): "
            f"{len(self.other_hosts)} run(s) in the window left out, measured on host {', '.join(others) or 'none'}"
        )
        return text + (f"; {self.host_note}" if self.host_note else "")

    @property
    def label(self) -> str:
        return " / ".join(self.group)

    @property
    def failed_budgets(self):
        return [c for c in self.newest.checks if not c.passed]

    def regressions(self) -> list[str]:
        lines = []
        for c in self.comparisons:
            if c.regressed:
                pct = f"{c.change_pct:+.1f}%, " if c.change_pct is not None else ""
                lines.append(
                    f"REGRESSION {self.label}: {c.metric} {_num(c.baseline)} -> {_num(c.newest)} {c.unit} "
                    f"({pct}noise threshold {_num(c.threshold)}) in run {self.newest.run_id} vs baseline {c.baseline_run}"
                )
        for check in self.failed_budgets:
            lines.append(
                f"REGRESSION {self.label}: budget {check.budget} failed: {_num(check.value)} {check.unit or ''} "
                f"vs limit {_num(check.limit)} in run {self.newest.run_id}"
            )
        return lines


@dataclass
class Report:
    groups: list[GroupReport]
    baseline: str
    since: datetime | None
    db: str
    created: datetime

    def regressions(self) -> list[str]:
        return [line for g in self.groups for line in g.regressions()]


# --- comparing ----------------------------------------------------------------------------


def spread(samples: list[float]) -> float:
    """One run's noise: 1.4826 * MAD (a robust standard deviation), else the standard deviation."""
    if len(samples) < 2:
        return 0.0
    median = statistics.median(samples)
    mad = 1.4826 * statistics.median(abs(s - median) for s in samples)
    return mad if mad > 0 else statistics.stdev(samples)


def describe_host(run: RunRecord) -> str:
    if not run.host:
        return "host not recorded"
    isa = " ".join(run.host.get("isa") or []) or "no kernel ISA features"
    return f"{run.host.get('cpu')}, {run.host.get('cores')} cores, {isa}"


def compare_runs(base: RunRecord, newest: RunRecord, names) -> list[Comparison]:
    found = []
    for name in names:
        if name in base.metrics and name in newest.metrics:
            c = compare(name, base.metrics[name], newest.metrics[name])
            if c is not None:
                c.baseline_run = base.run_id
                found.append(c)
    return found


def compare(name: str, base: Metric, new: Metric) -> Comparison | None:
    rule = RULES.get(name)
    if rule is None or base.value is None or new.value is None or base.source != new.source:
        return None
    spreads = [spread(m.samples) for m in (base, new) if len(m.samples) >= 2]
    noise = math.sqrt(sum(s * s for s in spreads) / len(spreads)) if spreads else 0.0
    threshold = max(NOISE_K * noise, rule.rel_floor * abs(base.value), rule.abs_floor)
    regressed = rule.bad * (new.value - base.value) > threshold
    return Comparison(name, new.unit, base.value, new.value, threshold, noise, regressed)


def parse_since(text: str | None, now: datetime) -> datetime | None:
    if not text or text == "all":
        return None
    match = re.fullmatch(r"(\d+)\s*([hdw])", text.strip())
    if match:
        hours = {"h": 1, "d": 24, "w": 168}[match.group(2)]
        return now - timedelta(hours=int(match.group(1)) * hours)
    try:
        return _as_utc(datetime.fromisoformat(text))
    except ValueError:
        raise InputError(f"--since {text!r} is not a period; use e.g. 30d, 12h, 2w, a date (2026-11-01) or all") from None


def _as_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def choose_baseline(history: list[RunRecord], newest: RunRecord, spec: str) -> tuple[RunRecord | None, str]:
    """The baseline run of one group for --baseline last-good | DATE | RUN_ID, and a note if none."""
    earlier = [r for r in history if r.date < newest.date or (r.date == newest.date and r.run_id < newest.run_id)]
    if spec == "last-good":
        good = [r for r in earlier if r.passed]
        return (good[-1], "") if good else (None, "no earlier run passed its verdict")
    if re.match(r"\d{4}-\d{2}-\d{2}", spec):
        try:
            when = _as_utc(datetime.fromisoformat(spec))
        except ValueError:
            raise InputError(f"--baseline {spec!r} is not a date; use YYYY-MM-DD, an ISO time, last-good or a run id") from None
        if len(spec) == 10:
            when += timedelta(days=1)  # a day includes its own runs
        chosen = [r for r in earlier if r.date < when or (len(spec) > 10 and r.date == when)]
        return (chosen[-1], "") if chosen else (None, f"no run on or before {spec}")
    matches = [r for r in history if r.run_id == spec] or [r for r in history if r.run_id.startswith(spec)]
    if len(matches) == 1 and matches[0].run_id != newest.run_id:
        return matches[0], ""
    if len(matches) == 1:
        return None, "the baseline run is the newest run"
    return None, f"baseline run {spec} is for another model/profile/device"


def build(
    db: str | Path | None = None,
    *,
    baseline: str = "last-good",
    since: str | None = "30d",
    profile: str | None = None,
    model: str | None = None,
    now: datetime | None = None,
) -> Report:
    now = _as_utc(now) if now else datetime.now(UTC).replace(tzinfo=None)
    start = parse_since(since, now)
    records = load(db, profile=profile, model=model)
    where = shown(db_url(db))
    if not records:
        filters = " matching --profile/--model" if profile or model else ""
        raise InputError(
            f"no runs{filters} recorded in {where}; record runs with `vcompress record RUN_DIR --db ...` (or `vcompress run --record`)"
        )
    if baseline not in ("last-good",) and not re.match(r"\d{4}-\d{2}-\d{2}", baseline):
        ids = [r for r in records if r.run_id == baseline or r.run_id.startswith(baseline)]
        if not ids:
            raise InputError(
                f"--baseline {baseline!r} is not last-good, a date or a recorded run id; see the run ids with `vcompress report` output or the database"
            )
        if len({r.run_id for r in ids}) > 1:
            raise InputError(f"--baseline {baseline!r} matches {len(ids)} runs; give more of the run id")
    groups: dict[tuple, list[RunRecord]] = {}
    for rec in records:
        groups.setdefault(rec.group, []).append(rec)
    reports = []
    for key, history in sorted(groups.items()):
        newest = history[-1]
        if start is not None and newest.date < start:
            continue
        base, note = choose_baseline(history, newest, baseline)
        window = [r for r in history if start is None or r.date >= start]
        group = GroupReport(key, window, newest, base, note)
        group.other_hosts = [r for r in window if r.host_fingerprint != newest.host_fingerprint]
        if base is not None:
            group.comparisons = compare_runs(base, newest, [n for n in RULES if n not in HOST_METRICS])
        host_base = base
        if base is not None and base.host_fingerprint != newest.host_fingerprint:
            same_host = [r for r in history if r.host_fingerprint == newest.host_fingerprint]
            host_base, _ = choose_baseline(same_host, newest, baseline)
            if host_base is None:
                group.host_note = (
                    f"the baseline {base.run_id} ran on host {base.host_fingerprint or 'not recorded'} and no run on the newest's "
                    f"host fits --baseline {baseline}, so latency was not compared"
                )
        if host_base is not None:
            group.comparisons += compare_runs(host_base, newest, HOST_METRICS)
        group.comparisons.sort(key=lambda c: list(RULES).index(c.metric))
        reports.append(group)
    if not reports:
        raise InputError(f"no run in {where} is newer than --since {since}; widen --since (e.g. --since 90d or all)")
    return Report(reports, baseline, start, where, now)


# --- writing --------------------------------------------------------------------------------


def _num(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.6g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


def trend_png(group: GroupReport) -> bytes:
    """TTFT, tokens/s, size and accuracy over time: samples as dots, values as a line, baseline and newest marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    regressed = {c.metric for c in group.comparisons if c.regressed}
    for i, (name, title) in enumerate(PLOTS):
        ax = fig.add_subplot(2, 2, i + 1)
        runs = [r for r in group.runs if r.metrics.get(name) and r.metrics[name].value is not None]
        if name in HOST_METRICS:  # another host's latency is not this trend
            runs = [r for r in runs if r.host_fingerprint == group.newest.host_fingerprint]
        budget = next((c for c in group.newest.checks if c.budget == BUDGET_OF.get(name)), None)
        ax.set_title(
            title + (f"  (budget {'≥' if budget.budget.startswith('min_') else '≤'} {_num(budget.limit)})" if budget else ""), fontsize=10
        )
        if not runs:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        for r in runs:
            samples = r.metrics[name].samples
            if samples:
                ax.scatter([r.date] * len(samples), samples, s=8, color="0.6", zorder=1)
        ax.plot([r.date for r in runs], [r.metrics[name].value for r in runs], "-o", color="tab:blue", ms=4, zorder=2)
        failed = [r for r in runs if not r.passed]
        if failed:
            ax.plot(
                [r.date for r in failed],
                [r.metrics[name].value for r in failed],
                "x",
                color="tab:red",
                ms=9,
                mew=2,
                zorder=3,
                label="verdict failed",
            )
        if group.baseline is not None and group.baseline in runs:
            ax.plot([group.baseline.date], [group.baseline.metrics[name].value], "s", color="tab:green", ms=9, zorder=3, label="baseline")
        ax.plot(
            [group.newest.date],
            [group.newest.metrics[name].value],
            "D",
            color="tab:red" if name in regressed else "tab:blue",
            ms=9,
            zorder=3,
            label="newest (regressed)" if name in regressed else "newest",
        )
        if runs[-1].metrics[name].unit == "fraction":  # one flipped answer should not fill the whole axis
            low, high = ax.get_ylim()
            middle = (low + high) / 2
            ax.set_ylim(min(low, middle - 0.05), max(high, middle + 0.05))
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(group.label, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _rows(group: GroupReport) -> list[list[str]]:
    rows = []
    for c in group.comparisons:
        pct = f"{c.change_pct:+.1f}%" if c.change_pct is not None else "n/a"
        rows.append(
            [c.metric, c.unit, _num(c.baseline), _num(c.newest), pct, f"±{_num(c.threshold)}", "REGRESSED" if c.regressed else "ok"]
        )
    return rows


def _budget_rows(group: GroupReport) -> list[list[str]]:
    return [
        [c.budget, c.unit or "", _num(c.limit), _num(c.value), c.source or "", "ok" if c.passed else "FAILED"] for c in group.newest.checks
    ]


COMPARE_HEAD = ["metric", "unit", "baseline", "newest", "change", "noise threshold", "status"]
BUDGET_HEAD = ["budget", "unit", "limit", "newest", "source", "status"]


def _run_line(run: RunRecord | None, note: str = "") -> str:
    if run is None:
        return f"none ({note})"
    commit = (run.git_commit or "")[:10] or "n/a"
    return f"{run.run_id} ({run.date:%Y-%m-%d %H:%M} UTC, commit {commit}, verdict {'passed' if run.passed else 'failed'})"


def write_markdown(report: Report, out: Path, images: dict[str, bytes]) -> Path:
    since = f"{report.since:%Y-%m-%d %H:%M} UTC" if report.since else "all"
    lines = [
        "# vcompress regression report",
        "",
        f"Created {report.created:%Y-%m-%d %H:%M} UTC from {report.db}; baseline: {report.baseline}; since: {since}.",
        "",
    ]
    regressions = report.regressions()
    lines += [f"**{len(regressions)} regression(s)**", ""] + [f"- {r}" for r in regressions] if regressions else ["**No regressions.**"]
    for group in report.groups:
        lines += [
            "",
            f"## {group.label}",
            "",
            f"- newest: {_run_line(group.newest)}",
            f"- baseline: {_run_line(group.baseline, group.note)}",
            f"- runs in window: {len(group.runs)}",
            *([f"- {group.left_out()}"] if group.left_out() else []),
            "",
        ]
        for head, rows in ((COMPARE_HEAD, _rows(group)), (BUDGET_HEAD, _budget_rows(group))):
            if rows:
                lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]
        lines.append(f"![trend of {group.label}](plots/{_slug(group.label)}.png)")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for group in report.groups:
        (plots / f"{_slug(group.label)}.png").write_bytes(images[group.label])
    return path


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="{_cls(v)}">{html.escape(v)}</td>' for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _cls(value: str) -> str:
    return "bad" if value in ("REGRESSED", "FAILED") else "good" if value == "ok" else ""


def write_html(report: Report, out: Path, images: dict[str, bytes]) -> Path:
    regressions = report.regressions()
    since = f"{report.since:%Y-%m-%d %H:%M} UTC" if report.since else "all"
    parts = [
        f"<p>Created {report.created:%Y-%m-%d %H:%M} UTC from <code>{html.escape(report.db)}</code>; baseline: "
        f"<b>{html.escape(report.baseline)}</b>; since: {since}.</p>"
    ]
    if regressions:
        parts.append(
            f'<div class="summary bad"><b>{len(regressions)} regression(s)</b><ul>'
            + "".join(f"<li>{html.escape(r)}</li>" for r in regressions)
            + "</ul></div>"
        )
    else:
        parts.append('<div class="summary good"><b>No regressions.</b></div>')
    for group in report.groups:
        image = base64.b64encode(images[group.label]).decode()
        parts += [
            f"<h2>{html.escape(group.label)}</h2>",
            f"<p>newest: {html.escape(_run_line(group.newest))}<br>baseline: {html.escape(_run_line(group.baseline, group.note))}"
            f"<br>runs in window: {len(group.runs)}" + (f"<br>{html.escape(group.left_out())}" if group.left_out() else "") + "</p>",
        ]
        if group.comparisons:
            parts.append(_table(COMPARE_HEAD, _rows(group)))
        if group.newest.checks:
            parts.append(_table(BUDGET_HEAD, _budget_rows(group)))
        parts.append(f'<img class="trend" alt="trend of {html.escape(group.label)}" src="data:image/png;base64,{image}">')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vcompress regression report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.bad {{ color: #b00; font-weight: bold; }} .good {{ color: #070; }}
.summary {{ padding: 0.5em 1em; border: 1px solid; margin: 1em 0; }}
img.trend {{ max-width: 100%; border: 1px solid #eee; }}
</style></head>
<body><h1>vcompress regression report</h1>
{chr(10).join(parts)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def write_junit(report: Report, out: Path) -> Path:
    """One testsuite per (model, profile, device); each metric comparison and budget is a testcase."""
    suites = ET.Element("testsuites", name="vcompress report")
    total = failures = skipped = 0
    for group in report.groups:
        suite = ET.SubElement(suites, "testsuite", name=group.label, timestamp=report.created.strftime("%Y-%m-%dT%H:%M:%S"))
        classname = "vcompress." + ".".join(_slug(p) for p in group.group)
        cases = fails = skips = 0
        if group.baseline is None:
            case = ET.SubElement(suite, "testcase", classname=classname, name="baseline", time="0")
            ET.SubElement(case, "skipped", message=f"no baseline: {group.note}")
            cases, skips = cases + 1, skips + 1
        if group.left_out():
            case = ET.SubElement(suite, "testcase", classname=classname, name="host fingerprint", time="0")
            ET.SubElement(case, "skipped", message=group.left_out())
            cases, skips = cases + 1, skips + 1
        for c in group.comparisons:
            case = ET.SubElement(suite, "testcase", classname=classname, name=f"regression {c.metric}", time="0")
            cases += 1
            if c.regressed:
                fails += 1
                failure = ET.SubElement(
                    case,
                    "failure",
                    type="regression",
                    message=f"{c.metric} {_num(c.baseline)} -> {_num(c.newest)} {c.unit}, beyond noise threshold {_num(c.threshold)}",
                )
                failure.text = f"newest {group.newest.run_id}; baseline {c.baseline_run}; noise (pooled robust sd) {_num(c.noise)}"
        for check in group.newest.checks:
            case = ET.SubElement(suite, "testcase", classname=classname, name=f"budget {check.budget}", time="0")
            cases += 1
            if not check.passed:
                fails += 1
                ET.SubElement(
                    case,
                    "failure",
                    type="budget",
                    message=f"{check.budget}: {_num(check.value)} {check.unit or ''} vs limit {_num(check.limit)} in run {group.newest.run_id}",
                )
        suite.set("tests", str(cases))
        suite.set("failures", str(fails))
        suite.set("errors", "0")
        suite.set("skipped", str(skips))
        total, failures, skipped = total + cases, failures + fails, skipped + skips
    suites.set("tests", str(total))
    suites.set("failures", str(failures))
    suites.set("errors", "0")
    suites.set("skipped", str(skipped))
    ET.indent(suites)
    path = out / "junit.xml"
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
    return path


def write(report: Report, out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    images = {g.label: trend_png(g) for g in report.groups}
    write_markdown(report, out, images)
    write_html(report, out, images)
    write_junit(report, out)
    return out
