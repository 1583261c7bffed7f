"""Terminal output, in one place: status lines (`say`), per-input errors (`say_error`), and rich
progress bars that switch themselves off for pipes, CI logs and `--no-progress`. Everything goes to
stderr, so that stdout stays clean for --json / --csv output."""

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
from rich.text import Text

T = TypeVar("T")

console = Console(stderr=True)


def say(text: str) -> None:
    """A status line on stderr, literal (no rich markup: file names may hold brackets), never wrapped."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def say_error(text: str) -> None:
    """`error: <text>` on stderr, one line per bad input."""
    console.print(Text.assemble(("error: ", "red"), text), soft_wrap=True)


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
