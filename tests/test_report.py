import base64
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.runs import nightly
from vcompress import history, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def seeded(root: Path, **kwargs) -> tuple[Path, list[str]]:
    db = root / "history.db"
    ids = [history.record(run, db) for run in nightly(root / "runs", **kwargs)]
    return db, ids


@pytest.fixture(scope="module")
def slow_history(tmp_path_factory):
    """10 nightly runs, the last one with a 20% decode slowdown."""
    return seeded(tmp_path_factory.mktemp("slow"), nights=10, slow_night=9)


@pytest.fixture(scope="module")
def slow_report(slow_history, tmp_path_factory):
    import contextlib
    import io

    from vcompress.cli import main

    out = tmp_path_factory.mktemp("report")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["report", "--db", str(slow_history[0]), "--out", str(out), "--baseline", "last-good"])
    return code, stdout.getvalue(), out


def test_injected_decode_slowdown_exits_1_and_is_named(slow_report, slow_history):
    code, out, _ = slow_report
    lines = out.strip().splitlines()
    assert code == 1
    assert len(lines) == 1, out
    assert lines[0].startswith("REGRESSION SmolLM2-135M-Instruct / x86-cpu / x86-64 host: decode_tokens_per_s")
    assert slow_history[1][-1] in lines[0]  # the newest run is named


@pytest.mark.parametrize("seed", range(6))
def test_noise_alone_does_not_trigger(tmp_path, seed):
    db, _ = seeded(tmp_path, nights=6, seed=seed)
    result = report.build(db, baseline="last-good")
    (group,) = result.groups
    assert group.baseline is not None and len(group.comparisons) == len(report.RULES)
    assert result.regressions() == []


def test_noise_alone_exits_0(tmp_path, cli):
    db, _ = seeded(tmp_path, nights=4, seed=11)
    code, out, _ = cli("report", "--db", db, "--out", tmp_path / "r")
    assert code == 0 and out.startswith("ok: no regressions in 1 ")


def test_threshold_follows_the_spread_of_samples():
    from vcompress.history import Metric

    quiet = report.compare(
        "decode_tokens_per_s",
        Metric("d", 100, "tokens/s", samples=[100, 100.5, 99.5, 100.2, 99.8]),
        Metric("d", 93, "tokens/s", samples=[93, 93.4, 92.6, 93.1, 92.9]),
    )
    noisy = report.compare(
        "decode_tokens_per_s",
        Metric("d", 100, "tokens/s", samples=[100, 110, 90, 105, 95]),
        Metric("d", 93, "tokens/s", samples=[93, 103, 83, 98, 88]),
    )
    assert quiet.regressed and not noisy.regressed and noisy.threshold > 3 * quiet.threshold
    faster = report.compare(
        "decode_tokens_per_s",
        Metric("d", 100, "tokens/s", samples=[100, 100.5, 99.5]),
        Metric("d", 130, "tokens/s", samples=[130, 130.5, 129.5]),
    )
    assert not faster.regressed  # the good direction is never a regression
    bigger = report.compare("model_size_mb", Metric("s", 95.0, "MB"), Metric("s", 97.0, "MB"))
    assert bigger.regressed and bigger.threshold == pytest.approx(0.95)  # no samples: the floor
    worse = report.compare("accuracy", Metric("a", 0.30, "fraction"), Metric("a", 0.25, "fraction"))
    flip = report.compare("accuracy", Metric("a", 0.30, "fraction"), Metric("a", 0.2875, "fraction"))
    assert worse.regressed and not flip.regressed
    assert report.compare("ttft_ms", Metric("t", 80, "ms", "estimated"), Metric("t", 90, "ms", "measured")) is None


def test_junit_has_a_testcase_per_comparison_and_budget(slow_report):
    root = ET.parse(slow_report[2] / "junit.xml").getroot()
    assert root.tag == "testsuites" and root.get("failures") == "1"
    (suite,) = root.findall("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert len(cases) == len(report.RULES) + 7 and int(suite.get("tests")) == len(cases)
    assert cases["regression decode_tokens_per_s"].find("failure") is not None
    assert cases["regression ttft_ms"].find("failure") is None and cases["budget max_ttft_ms"].find("failure") is None


def test_markdown_and_self_contained_html(slow_report):
    out = slow_report[2]
    md = (out / "report.md").read_text()
    assert "| decode_tokens_per_s | tokens/s |" in md and "REGRESSED" in md
    plot = re.search(r"\]\((plots/[^)]+\.png)\)", md).group(1)
    assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert 'src="plots/' not in page and "http" not in page.replace("http-equiv", "")
    (image,) = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    png = base64.b64decode(image)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") >= 600  # width from the IHDR chunk


def test_baselines_last_good_date_and_run_id(tmp_path, cli):
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    root = tmp_path / "runs"
    runs = nightly(root, nights=5, end=end)
    from tests.runs import make_run

    # night 3 failed its TTFT budget: last-good must skip it and take night 2
    make_run(runs[3], started=end - timedelta(days=1), ttft_samples=[600.0, 610.0, 605.0], decode_samples=[140.0, 141.0, 139.0], seed=3)
    db = tmp_path / "h.db"
    ids = [history.record(r, db) for r in runs]
    (group,) = report.build(db, baseline="last-good").groups
    assert group.baseline.run_id == ids[2] and group.newest.run_id == ids[4]
    (group,) = report.build(db, baseline=(end - timedelta(days=3)).strftime("%Y-%m-%d")).groups
    assert group.baseline.run_id == ids[1]
    (group,) = report.build(db, baseline=ids[0]).groups
    assert group.baseline.run_id == ids[0]
    code, _, err = cli("report", "--db", db, "--out", tmp_path / "r", "--baseline", "no-such-run")
    assert code == 2 and "no-such-run" in err
    code, _, err = cli("report", "--db", db, "--out", tmp_path / "r", "--since", "1h")
    assert code == 2 and "--since" in err


def test_failing_budget_in_newest_counts(tmp_path, cli):
    from tests.runs import make_run

    root = tmp_path / "runs"
    runs = nightly(root, nights=3)
    make_run(
        runs[2],
        started=datetime.now(UTC) - timedelta(hours=1),
        ttft_samples=[510.0, 512.0, 515.0],
        decode_samples=[140.0, 141.0, 139.0],
        seed=2,
    )
    db = tmp_path / "h.db"
    for r in runs:
        history.record(r, db)
    code, out, _ = cli("report", "--db", db, "--out", tmp_path / "r")
    assert code == 1
    assert any("budget max_ttft_ms failed" in line for line in out.splitlines())
    assert any(line.startswith("REGRESSION") and "ttft_ms" in line and "budget" not in line for line in out.splitlines())


def test_empty_history_is_input_error(tmp_path, cli):
    code, _, err = cli("report", "--db", tmp_path / "empty.db", "--out", tmp_path / "r")
    assert code == 2 and "vcompress record" in err


PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(images);
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium); .ci/run installs it")
def test_html_plots_render_in_headless_chromium(slow_report, tmp_path):
    page = (slow_report[2] / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    run = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout)
    assert found, f"chromium printed no probe (rc {run.returncode}): {run.stderr[-500:]}"
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(images) == 1
    assert images[0]["complete"] and images[0]["width"] >= 600 and images[0]["height"] >= 400


def test_groups_are_compared_separately_and_filtered(tmp_path, cli):
    db = tmp_path / "h.db"
    for run in nightly(tmp_path / "host", nights=4, seed=1) + nightly(
        tmp_path / "phone", nights=4, seed=2, slow_night=3, profile="pixel8", device="Pixel 8"
    ):
        history.record(run, db)
    code, out, _ = cli("report", "--db", db, "--out", tmp_path / "all")
    assert code == 1 and out.count("\n") == 1 and "/ pixel8 / Pixel 8: decode_tokens_per_s" in out
    assert len(list((tmp_path / "all" / "plots").glob("*.png"))) == 2
    code, out, _ = cli("report", "--db", db, "--out", tmp_path / "host-only", "--profile", "x86-cpu")
    assert code == 0 and "1 model/profile/device group" in out


HOST_A = {"id": "aaaaaaaaaaaa", "cpu": "Intel(R) Xeon(R) Platinum 8480+", "machine": "x86_64", "cores": 2, "isa": ["avx2", "avx512_vnni"]}
HOST_B = {"id": "bbbbbbbbbbbb", "cpu": "AMD EPYC 7B13", "machine": "x86_64", "cores": 2, "isa": ["avx2"]}


def two_hosts(root: Path, hosts: bool = True) -> tuple[Path, list[str]]:
    """Six nights on a fast AVX-512 VNNI host, then two on an AVX2 host where the same artifact is 50% slower."""
    from tests.runs import make_run

    end = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    runs = nightly(root / "runs", nights=6, end=end - timedelta(days=2), hosts=[HOST_A if hosts else None] * 6)
    for day in (1, 0):
        runs.append(
            make_run(
                root / "runs" / f"b-{day}",
                started=end - timedelta(days=day),
                ttft_samples=[130.0, 131.5, 129.0, 130.4, 132.0],
                decode_samples=[95.0, 94.1, 96.2, 95.5, 94.8],
                seed=10 + day,
                host=HOST_B if hosts else None,
            )
        )
    db = root / "h.db"
    return db, [history.record(r, db) for r in runs]


def test_latency_is_compared_only_between_runs_on_the_same_host(tmp_path):
    db, ids = two_hosts(tmp_path)
    (group,) = report.build(db, baseline="last-good").groups
    assert group.baseline.run_id == ids[6] and not report.build(db).regressions()  # B against B: no regression
    assert len(group.other_hosts) == 6 and "6 run(s) in the window left out, measured on host aaaaaaaaaaaa" in group.left_out()
    (group,) = report.build(db, baseline=ids[5]).groups  # a baseline on host A: quality compared, latency not
    compared = {c.metric for c in group.comparisons}
    assert "accuracy" in compared and not compared & set(report.HOST_METRICS)
    assert f"the baseline {ids[5]} ran on host aaaaaaaaaaaa" in group.left_out() and not report.build(db, baseline=ids[5]).regressions()
    # the same runs without fingerprints: host B's slower figures read as a regression against host A
    plain, plain_ids = two_hosts(tmp_path / "plain", hosts=False)
    lines = report.build(plain, baseline=plain_ids[5]).regressions()
    assert any("ttft_ms" in line for line in lines) and any("decode_tokens_per_s" in line for line in lines)


def test_markdown_html_and_junit_say_which_runs_were_left_out_and_why(tmp_path):
    db, _ = two_hosts(tmp_path)
    out = report.write(report.build(db), tmp_path / "r")
    why = "6 run(s) in the window left out, measured on host aaaaaaaaaaaa"
    assert why in (out / "report.md").read_text() and why in (out / "report.html").read_text()
    (suite,) = ET.parse(out / "junit.xml").getroot().findall("testsuite")
    (case,) = [c for c in suite.findall("testcase") if c.get("name") == "host fingerprint"]
    assert why in case.find("skipped").get("message") and "AMD EPYC 7B13" in case.find("skipped").get("message")
