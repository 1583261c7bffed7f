"""Why a run stops early: Ctrl-C (`StopFlag`; the run saves `last` and can be resumed) or divergence."""

from __future__ import annotations

import signal
import threading
from typing import Any

from isnet_cli.console import console
from isnet_cli.errors import IsnetError


class TrainingInterrupted(IsnetError):
    """Ctrl-C: `last` was saved; exit code 130 as for any interrupted command."""

    exit_code = 130


class TrainingDiverged(IsnetError):
    """Too many consecutive non-finite losses or gradients."""


class StopFlag:
    """Set by SIGINT (first Ctrl-C); a second Ctrl-C raises KeyboardInterrupt immediately."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        console.print("[yellow]Ctrl-C: finishing this step and saving 'last' (press again to abort)[/yellow]")


def ignore_sigint(_: int) -> None:
    """DataLoader worker init: Ctrl-C is handled by the main process (finish the step, save); workers must
    not die on it first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
