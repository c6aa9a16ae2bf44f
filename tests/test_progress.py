"""The one progress drawer: a bar per label on a terminal, gone when done; plain lines in a log; silent for --json."""

from __future__ import annotations

import io

import rich.progress
from rich.console import Console

from vcompress.core.stage import no_progress
from vcompress.progress import PlainLines, progress_bars


def test_one_bar_per_label_removed_when_done(monkeypatch):
    drawn = []

    class Recorded(rich.progress.Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            drawn.append(self)

    monkeypatch.setattr(rich.progress, "Progress", Recorded)
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with progress_bars(console=console) as progress:
        [bars] = drawn
        progress("GPTQ layers", 0, 30)
        progress("MMLU", 2, 8)
        progress("GPTQ layers", 3, 30)
        assert [(t.description, t.completed, t.total) for t in bars.tasks] == [("GPTQ layers", 3, 30), ("MMLU", 2, 8)]
        progress("GPTQ layers", 30, 30)
        assert [t.description for t in bars.tasks] == ["MMLU"]
        progress("GPTQ layers", 30, 30)  # an ended label does not come back
        progress("distill", 0, 0)
        assert [t.description for t in bars.tasks] == ["MMLU"]


def test_silent_when_asked():
    with progress_bars(quiet=True, console=Console(file=io.StringIO(), force_terminal=True)) as progress:
        assert progress is no_progress
    log_file = Console(file=io.StringIO(), force_terminal=False)
    with progress_bars(quiet=True, console=log_file) as progress:
        progress("MMLU", 1, 8)
    assert log_file.file.getvalue() == ""


def test_a_log_gets_plain_lines_not_bars():
    log_file = Console(file=io.StringIO(), force_terminal=False)
    with progress_bars(console=log_file) as progress:
        for done in range(9):
            progress("MMLU", done, 8)
    lines = log_file.file.getvalue().splitlines()
    assert lines[0] == "MMLU: 0/8 (0%) 0m00s"
    assert lines[-1].startswith("MMLU: 8/8 (100%) ")
    assert len(lines) == 9  # 1/8 is past 5% each time
    assert "\x1b" not in log_file.file.getvalue()  # no terminal codes


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_plain_lines_every_five_percent_or_every_thirty_seconds():
    lines, clock = [], FakeClock()
    progress = PlainLines(lines.append, clock=clock)
    progress("MMLU", 0, 800)
    for done in range(1, 100):  # 4 questions a second: 40 questions (5%) come before 30 s have passed
        clock.now += 0.25
        progress("MMLU", done, 800)
    assert [line.split()[1] for line in lines] == ["0/800", "40/800", "80/800"]
    assert lines[1] == "MMLU: 40/800 (5%) 0m10s"
    slow = []
    progress = PlainLines(slow.append, clock=clock)
    progress("distill", 0, 1000)
    for step in range(1, 20):  # 1 step every 10 s: 30 s come first
        clock.now += 10
        progress("distill", step, 1000)
    assert [line.split()[1] for line in slow] == ["0/1000", "3/1000", "6/1000", "9/1000", "12/1000", "15/1000", "18/1000"]
    assert slow[-1] == "distill: 18/1000 (1%) 3m00s"


def test_plain_lines_end_a_label_once_and_start_it_again():
    lines, clock = [], FakeClock()
    progress = PlainLines(lines.append, clock=clock)
    progress("MMLU reference", 0, 4)
    clock.now += 125
    progress("MMLU reference", 4, 4)
    progress("MMLU reference", 4, 4)  # ended: not said twice
    progress("distill", 0, 0)  # nothing to do: not news
    progress("MMLU reference", 0, 4)  # the next model's pass starts its own clock
    assert lines == ["MMLU reference: 0/4 (0%) 0m00s", "MMLU reference: 4/4 (100%) 2m05s", "MMLU reference: 0/4 (0%) 0m00s"]


def test_a_command_in_a_log_reports_its_long_step_in_plain_lines(cli, tiny_llama):
    code, _, err = cli("eval", "--model", tiny_llama, "--subset", "anatomy", "--per-subject", "6")
    assert code == 0, err
    mmlu_lines = [line for line in err.splitlines() if line.startswith("MMLU")]
    assert mmlu_lines[0].endswith(": 0/6 (0%) 0m00s") and "(100%)" in mmlu_lines[-1]
    assert "\x1b" not in err and "\r" not in err and "it/s" not in err  # no bar, ours or tqdm's
