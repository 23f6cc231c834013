"""The one progress bar of the command-line tools: name, bar, done / total, time remaining."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(name: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar for ``total`` items; yields ``advance(n)``. Disabled, it draws nothing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not enabled) as bar:
        task = bar.add_task(name, total=total)
        yield lambda n=1: bar.advance(task, n)
