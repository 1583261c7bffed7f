"""Rich progress bars that switch themselves off for pipes, CI logs and `--no-progress`."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

# Progress and messages go to stderr so that stdout stays clean for --json / --csv output.
console = Console(stderr=True)


def progress_enabled(no_progress: bool = False) -> bool:
    """Bars are shown only on an interactive terminal and when the user did not opt out."""
    return not no_progress and sys.stderr.isatty()


def make_progress(enabled: bool, *extra_columns: TextColumn) -> Progress:
    """A Progress with the project's columns; `disable=True` when bars are off."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra_columns,
        console=console,
        disable=not enabled,
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate over `items` with a progress bar (a plain loop when disabled)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress(enabled) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
