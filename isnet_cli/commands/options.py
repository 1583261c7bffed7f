"""Options shared by several commands, declared once so that their names, defaults and help agree."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from isnet_cli.errors import InputError
from isnet_cli.io.contract import WINDOW_POLICIES

F = TypeVar("F", bound=Callable[..., Any])


def model_option(onnx: bool = True):
    """`--model`: a checkpoint, a run folder (its best checkpoint) or, where `onnx`, an exported .onnx."""
    kinds = "Checkpoint or run folder"
    if onnx:
        kinds = "Checkpoint, run folder or exported .onnx (+ its .onnx.json sidecar)"
    return click.option("--model", "-m", default=None, help=f"{kinds}; default: the newest run under runs/.")


def report_folder(model_path: Path, folder: str) -> Path:
    """The default of `out_dir_option`: the run folder's `folder`/ for a checkpoint, ./`folder` for an export."""
    return model_path.parent / folder if model_path.suffix == ".safetensors" else Path(folder)


def out_dir_option(contents: str, folder: str) -> Callable[[F], F]:
    """`--out/-o`: the folder for a report's `contents`; default <run>/`folder` for a checkpoint, else ./`folder`."""
    return click.option(
        "--out",
        "-o",
        "out_dir",
        type=click.Path(file_okay=False),
        default=None,
        help=f"Folder for {contents} (default: <run>/{folder} or ./{folder}).",
    )


exist_ok_option = click.option(
    "--exist-ok",
    is_flag=True,
    help="Write into an --out folder that is not empty (or replace an --out file); files of the same name are "
    "replaced, others are kept.",
)


def refuse_existing_output(path: Path | None, exist_ok: bool) -> None:
    """Stop before any work when `path` (an output folder or file) already holds something, unless `exist_ok`.

    A report written over an earlier one silently mixes two runs (the old heatmaps stay beside the new
    summary.csv) or loses the earlier result; so the default is to refuse, and to say how to go on.
    An empty folder is accepted: that is what `mkdir out && isnet ... --out out` gives.
    """
    if path is None or exist_ok:
        return
    if path.is_dir():
        if next(path.iterdir(), None) is None:
            return
        raise InputError(path, "output folder exists and is not empty", "pass --exist-ok to write into it")
    if path.exists() or path.is_symlink():
        raise InputError(path, "output file exists", "pass --exist-ok to replace it")


def threshold_option(subject: str) -> Callable[[F], F]:
    """`--threshold`: for two-class models, the second class when `subject` (its probability) >= this."""
    return click.option(
        "--threshold",
        type=float,
        default=None,
        help=f"Two-class models: predict the second class when {subject} >= this (default: argmax).",
    )


label_column_option = click.option(
    "--label-column", default=None, help="Manifest column with the class names (default: label)."
)


def choice_option(*names: str, choices: Sequence[str], help: str) -> Callable[[F], F]:
    """An option (`names`: its flags, then optionally its parameter name) taking one of `choices`, the first
    by default, shown in --help."""
    return click.option(*names, type=click.Choice(choices), default=choices[0], show_default=True, help=help)


window_option = choice_option(
    "--window",
    choices=WINDOW_POLICIES,
    help="DICOM grey-level policy: the file's VOI LUT/window, min-max, or percentiles of the pixel data.",
)
batch_size_option = click.option("--batch-size", "-b", type=click.IntRange(min=1), default=16, show_default=True)
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")


def fail_fast_option(what: str = "input") -> Callable[[F], F]:
    """`--fail-fast`: stop at the first unreadable `what` instead of reporting it and going on."""
    return click.option("--fail-fast", is_flag=True, help=f"Stop at the first unreadable {what}.")


anonymize_option = click.option(
    "--anonymize",
    is_flag=True,
    help="DICOM output: replace the patient name/ID and study identifiers copied from the source "
    "(Study and source SOP Instance UIDs are kept so the object stays in its study).",
)
no_progress_option = click.option(
    "--no-progress", is_flag=True, help="No progress bar (also off when stderr is not a terminal)."
)


def dataset_run_options(what: str = "input") -> Callable[[F], F]:
    """--batch-size, --device, --fail-fast and --no-progress, in this order: a model run over a dataset."""

    def apply(command: F) -> F:
        for option in (no_progress_option, fail_fast_option(what), device_option, batch_size_option):
            command = option(command)
        return command

    return apply


@dataclass(frozen=True)
class ReportRequest:
    """What `report_options` hands a report command: DATA, --model, --out, --exist-ok, --json, and the name
    of the default --out folder."""

    data: str
    model: str | None
    out_dir: str | None
    exist_ok: bool
    as_json: bool
    folder: str

    def out(self, model_path: Path) -> Path:
        """The --out folder (default: `report_folder`); refused, unless --exist-ok, when it holds something."""
        out = Path(self.out_dir) if self.out_dir else report_folder(model_path, self.folder)
        refuse_existing_output(out, self.exist_ok)
        return out


def report_options(contents: str, folder: str, json_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """DATA, --model, --out, --exist-ok and --json, in this order: a report over a dataset. The command
    receives them together, as a `ReportRequest` before its own options."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)  # keeps the help text and the options declared below this decorator
        def with_report(
            data: str, model: str | None, out_dir: str | None, exist_ok: bool, as_json: bool, **rest: Any
        ) -> Any:
            return command(ReportRequest(data, model, out_dir, exist_ok, as_json, folder), **rest)

        for option in (
            click.option("--json", "as_json", is_flag=True, help=json_help),
            exist_ok_option,
            out_dir_option(contents, folder),
            model_option(),
            click.argument("data", type=click.Path(exists=True)),
        ):
            with_report = option(with_report)
        return with_report

    return apply


def format_option(choices: Sequence[str], help: str) -> Callable[[F], F]:
    """`--format`: one of `choices`, the first by default."""
    return choice_option("--format", "fmt", choices=choices, help=help)
