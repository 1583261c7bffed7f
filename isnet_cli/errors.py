"""Errors that the CLI turns into one-line messages and meaningful exit codes."""

from __future__ import annotations

from pathlib import Path


class IsnetError(Exception):
    """A failure the user can act on; the CLI prints it on one line and exits with `exit_code`."""

    exit_code = 1


class InputError(IsnetError):
    """Bad input (unreadable file, wrong mask, bad manifest, bad option): exit code 2.

    The message names the file, the problem and, where there is one, the fix:
    ``scan.dcm: multi-frame DICOM (12 frames) is not supported; export a single frame``.
    """

    exit_code = 2

    def __init__(self, path: str | Path | None, problem: str, fix: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}" + (f"; {fix}" if fix else ""))

    def __reduce__(self) -> tuple[type[InputError], tuple[str | None, str, str | None]]:
        # DataLoader workers pickle exceptions back to the main process: keep the three parts.
        return (type(self), (self.path, self.problem, self.fix))


class ModelError(IsnetError):
    """A model the tool cannot use (untraceable graph, unsupported layer, bad checkpoint): exit 2."""

    exit_code = 2
