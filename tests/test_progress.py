"""The one progress drawer: a bar per label on a terminal, gone when done; silent for --json and log files."""

from __future__ import annotations

import io

import rich.progress
from rich.console import Console

from vcompress.core.stage import no_progress
from vcompress.progress import progress_bars


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


def test_silent_when_asked_or_not_a_terminal():
    with progress_bars(quiet=True, console=Console(file=io.StringIO(), force_terminal=True)) as progress:
        assert progress is no_progress
    log_file = Console(file=io.StringIO(), force_terminal=False)
    with progress_bars(console=log_file) as progress:
        progress("MMLU", 1, 8)
        assert progress is no_progress
    assert log_file.file.getvalue() == ""
