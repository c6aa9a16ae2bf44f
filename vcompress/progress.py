"""The one place progress is drawn. Stages and scoring only report `progress(label, done, total)`
(core.stage.Progress); the CLI and the pipeline hand them the callback `progress_bars` gives."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vcompress.core.stage import Progress, no_progress


@contextmanager
def progress_bars(quiet: bool = False, console=None) -> Iterator[Progress]:
    """A Progress callback drawing one rich bar per label on stderr, each removed when done == total;
    a silent one when `quiet` (--json) or when stderr is not a terminal (a log file gets no bars)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    console = console or Console(stderr=True)
    if quiet or not console.is_terminal:
        yield no_progress
        return
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
