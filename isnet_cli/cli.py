"""The `isnet` command line: a Click group over the library; each command lives in `commands/`.

Command modules import torch lazily, so that `isnet predict --model m.onnx` never imports it.
"""

from __future__ import annotations

import os
import sys

import click

from isnet_cli import __version__
from isnet_cli.commands import audit, data, evaluate, explain, export, info, predict, segment, train
from isnet_cli.errors import IsnetError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="isnet")
def cli() -> None:
    """Train chest X-ray classifiers that look at the lungs (ISNet), explain them with LRP.

    \b
    Example:
      isnet data synth data/phantoms --n 400 --bias 1.0
      isnet train data/phantoms/manifest.csv --arch resnet18 --img-size 64
      isnet explain scan.dcm --out heatmap.png
    """


for module in (data, train, predict, explain, export, evaluate, audit, info, segment):
    cli.add_command(module.command)


def main() -> None:
    """Console entry point: library errors become one-line messages with their exit codes."""
    try:
        rc = cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except IsnetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    code = rc if isinstance(rc, int) else 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker: see distributed.exit_worker
        from isnet_cli.distributed import exit_worker

        exit_worker(code)
    sys.exit(code)
