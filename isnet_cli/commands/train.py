"""`isnet train`: train an ISNet (or a baseline) and write the run folder runs/<name>/."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from isnet_cli.commands.options import device_option, no_progress_option, window_option
from isnet_cli.errors import InputError
from isnet_cli.io.contract import RESIZE_MODES
from isnet_cli.objective.settings import METHODS, VARIANTS
from isnet_cli.train.config import (
    ISNET_BG_SWAP,
    ISNET_RAMP,
    MASK_SOURCES,
    OPTIMIZERS,
    SCHEDULERS,
    SELECT_BY,
    TrainConfig,
)

_DEFAULTS = TrainConfig()
F = TypeVar("F", bound=Callable[..., Any])
_ARCHS = (
    "densenet121 (default), resnet18/34/50, vgg11_bn, vgg16_bn, efficientnet_b0, mobilenet_v3, tinycnn, module:callable"
)


def _option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """An option whose default is `TrainConfig`'s field of the same name (shown in --help)."""
    named = [d for d in decls if not d.startswith("-")]
    field = named[0] if named else decls[0].lstrip("-").split("/")[0].replace("-", "_")
    return click.option(*decls, default=getattr(_DEFAULTS, field), show_default=True, **attrs)


def _parse_channels(_ctx: click.Context, _param: click.Parameter, value: object) -> int | None:
    """`auto` (or a config's null) -> None (decided from the data), `1`/`3` -> int."""
    text = "auto" if value is None else str(value).strip().lower()
    if text == "auto":
        return None
    if text in ("1", "3"):
        return int(text)
    raise click.BadParameter(f"{value!r} is not 1, 3 or auto")


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--config file.yaml: its keys become the defaults of the other options (the command line wins)."""
    if not value:
        return value
    import yaml

    path = Path(value)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise InputError(path, "config file not found") from exc
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(path, "a training config must be a mapping of option: value")
    names = {p.name for p in ctx.command.params}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(path, f"unknown option(s) {unknown}", "use the option names of `isnet train --help`")
    if isinstance(data.get("classes"), list):
        data["classes"] = ",".join(map(str, data["classes"]))
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


@click.command("train")
@click.argument("data", required=False)
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help="YAML file with any of these options (keys as the option names); the command line wins.",
)
@click.option("--val", help="Validation data with masks (manifest or folder); default: a split of DATA.")
@_option("--val-fraction", type=float, help="Validation share when --val is not given.")
@_option(
    "--masks",
    type=click.Choice(MASK_SOURCES),
    help="given: every image needs its mask; auto: a lung segmenter fills in the missing ones (cached, QC-checked).",
)
@click.option(
    "--segmenter",
    help="Segmenter (checkpoint, run folder or .onnx) for --masks auto and --variant masked; "
    "default: the bundled demonstration segmenter.",
)
@click.option("--ood", help="Extra test set (no masks needed) scored every epoch: CE and accuracy.")
@click.option("--classes", help="Comma-separated class list and order (default: sorted labels of DATA).")
@click.option(
    "--mask-segment",
    help="Where masks are DICOM SEG files: the label of the segment to use (default: the lung-coded segments).",
)
@_option("--arch", help=f"Architecture: {_ARCHS}.")
@_option(
    "--pretrained/--no-pretrained",
    help="Start from torchvision ImageNet weights (downloaded once; normalisation folded into layer 1).",
)
@_option("--img-size", type=int, help="Input size (square, pixels).")
@click.option(
    "--channels",
    default="auto",
    show_default=True,
    callback=_parse_channels,
    help="Input channels: 1 (grey; colour files converted), 3 (RGB kept), auto (3 when the images are in colour).",
)
@_option(
    "--roi-name",
    help="What the masks outline (lung, face, lesion...): the wording of audits, legends and mask columns.",
)
@_option("--resize", type=click.Choice(RESIZE_MODES))
@window_option
@_option("--augment/--no-augment", help="Small affine + brightness jitter.")
@click.option(
    "--bg-swap",
    type=float,
    default=_DEFAULTS.bg_swap,
    help="Probability that a training image gets the background (outside its mask) of another image of the batch "
    f"(default: {ISNET_BG_SWAP:g} for ISNet variants, 0 for --variant none and --method rrr).",
)
@_option("--batch-size", type=int)
@_option("--epochs", type=int)
@_option("--lr", type=float, help="Learning rate.")
@_option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    help="adamw (lr 1e-3) learns phantoms and X-rays reliably; sgd uses --momentum (try lr 1e-2).",
)
@_option("--momentum", type=float, help="SGD momentum.")
@_option("--weight-decay", type=float)
@_option("--scheduler", type=click.Choice(SCHEDULERS))
@_option("--clip", type=float, help="Gradient-norm clipping.")
@_option(
    "--variant",
    type=click.Choice(VARIANTS),
    help="Explained quantity; 'none' = standard classifier baseline (P = 0); 'masked' = standard classifier on "
    "lung-masked images behind a segmenter (--segmenter; the segmenter-then-classifier baseline).",
)
@_option(
    "--method",
    type=click.Choice(METHODS),
    help="'rrr' = Right for the Right Reasons (input-gradient penalty on the background).",
)
@_option("--P", "P", type=float, help="Loss = (1-P)·CE + P·heatmap loss.")
@click.option(
    "--ramp",
    type=int,
    default=_DEFAULTS.ramp,
    help="Epochs over which P rises linearly from 0 (plain CE) to --P; 0 = full P from the start "
    f"(default: {ISNET_RAMP} for ISNet variants trained with the background swap, else 0).",
)
@_option("--d", "d", type=float, help="Background GWRP decay (0 = max, 1 = mean).")
@_option("--E", "E", type=float, help="Background activation log(1 + g/E).")
@_option("--A", "A", type=float, help="Background term weight.")
@_option("--B", "B", type=float, help="Foreground band weight.")
@_option("--eps", type=float, help="LRP epsilon.")
@_option("--cut", help="Foreground band 'C1,C2', or 'auto' (plain warm-up + statistics).")
@_option("--cut-epochs", type=int, help="Warm-up epochs for --cut auto.")
@click.option(
    "--warm-start/--no-warm-start",
    default=_DEFAULTS.warm_start,
    help="Start the ISNet from the weights of the plain (CE-only) C1/C2 warm-up instead of a fresh initialisation "
    "(default: on for ISNet variants with --cut auto and the background swap on).",
)
@_option(
    "--lds/--no-lds",
    help="LRP deep supervision: the heatmap loss also on hidden-layer relevance (own C1/C2 per layer).",
)
@click.option(
    "--lds-layers",
    help="Comma-separated module paths (or fx node names) for --lds (default: the architecture's stages).",
)
@_option("--lds-decay", type=float, help="GWRP decay over the per-layer losses (1 = mean, 0 = max).")
@_option("--rrr-lambda", type=float, help="RRR penalty weight.")
@_option(
    "--select-by",
    type=click.Choice(SELECT_BY),
    help="Validation score that picks best.safetensors (loss = ISNet loss).",
)
@device_option
@_option("--devices", type=int, help="Processes for DDP (one per GPU; gloo on CPU).")
@_option("--amp/--no-amp", help="GPU autocast for the forward (relevance and loss stay fp32).")
@_option("--seed", type=int)
@_option(
    "--deterministic/--no-deterministic",
    help="Deterministic algorithms (slower on GPU); a resumed run then matches an uninterrupted one.",
)
@_option("--workers", type=int, help="Data-loading processes.")
@click.option("--cache", help="Folder for decoded images (default: OUT/.cache).")
@_option("--out", help="Parent folder of the run folder.")
@click.option("--name", help="Run folder name (default: run-NNN, the next free number).")
@_option(
    "--precise-bn/--no-precise-bn",
    help="Re-estimate batch-norm statistics on the training data after each epoch (reliable eval-mode outputs).",
)
@_option("--heatmaps", type=int, help="Validation heatmaps drawn per epoch.")
@_option(
    "--max-bad-steps",
    type=int,
    help="Stop after this many non-finite losses in a row (each is skipped with a warning).",
)
@click.option("--resume", type=click.Path(exists=True), help="Continue a run folder (or its last checkpoint).")
@no_progress_option
@click.pass_context
def command(ctx: click.Context, data: str | None, resume: str | None, **options: Any) -> None:
    """Train an ISNet classifier on DATA (manifest CSV or images/<class>/ + masks/<class>/ folders).

    Writes runs/<name>/: best/last checkpoints, metrics.csv, curves.png, heatmaps/, config.yaml, card.md.
    Ctrl-C saves 'last'; --resume continues exactly where it stopped.

    \b
    Example:
      isnet train data/manifest.csv --arch tinyresnet --img-size 64 --epochs 30 --name demo
    """
    from isnet_cli.segment.auto import prepare_masks
    from isnet_cli.train import TrainConfig, train

    classes = options.pop("classes")
    options["classes"] = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if resume:
        given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
        result = train(TrainConfig(data=data or ""), resume=resume, resume_overrides=given)
    else:
        cfg = TrainConfig(data=data or "", **options)
        cfg.validate()
        result = train(prepare_masks(cfg))
    best = result.best or result.last or {}
    summary = ", ".join(
        f"{k} {float(best[k]):.4f}"
        for k in ("val_accuracy", "val_auroc", "val_share_inside")
        if best.get(k) not in (None, "")
    )
    click.echo(f"run folder: {result.run_dir}" + (f"  (best: {summary})" if summary else ""))
