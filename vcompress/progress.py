"""The one place progress is drawn. Stages and scoring only report `progress(label, done, total)`
(core.stage.Progress); the CLI and the pipeline hand them the callback `progress_bars` gives."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vcompress.core.stage import Progress, no_progress

# A log gets a line every STEP of a label's total or every INTERVAL_S seconds, whichever comes first.
STEP = 0.05
INTERVAL_S = 30.0


@contextmanager
def progress_bars(quiet: bool = False, console=None) -> Iterator[Progress]:
    """A Progress callback drawing one rich bar per label on stderr, each removed when done == total;
    plain lines when stderr is not a terminal (a nightly log sees long steps move); silent when `quiet` (--json)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if quiet:
        yield no_progress
    elif not console.is_terminal:
        yield PlainLines(lambda line: print(line, file=console.file, flush=True))
    else:
        with _rich_bars(console) as progress:
            yield progress


@contextmanager
def _rich_bars(console) -> Iterator[Progress]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    bars = Bars(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def progress(label: str, done: int, total: int) -> None:
        if done >= total:
            if label in tasks:
                bars.remove_task(tasks.pop(label))
        elif label in tasks:
            bars.update(tasks[label], completed=done, total=total)
        else:
            tasks[label] = bars.add_task(label, total=total, completed=done)

    with bars:
        yield progress


@dataclass
class _Started:
    at: float  # when the label began
    said_at: float  # when its last line was written
    said_done: int  # the count that line gave


class PlainLines:
    """Progress as plain lines for a log: `MMLU: 120/800 (15%) 1m05s`, when a label starts, whenever it has
    moved `step` of its total or `interval_s` seconds have passed since its last line, and when it ends."""

    def __init__(
        self, write: Callable[[str], None], clock: Callable[[], float] = time.monotonic, step: float = STEP, interval_s: float = INTERVAL_S
    ):
        self.write, self.clock, self.step, self.interval_s = write, clock, step, interval_s
        self.started: dict[str, _Started] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        now = self.clock()
        started = self.started.get(label)
        if started is None:
            if done >= total:  # a label that ends as it starts (nothing to do) is not news
                return
            started = self.started[label] = _Started(at=now, said_at=now, said_done=done)
        elif done >= total:
            del self.started[label]
        elif done - started.said_done < self.step * total and now - started.said_at < self.interval_s:
            return
        started.said_at, started.said_done = now, done
        self.write(f"{label}: {done}/{total} ({100 * done // max(total, 1)}%) {_minutes(now - started.at)}")


def _minutes(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"
