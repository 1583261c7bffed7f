"""`isnet train`: train an ISNet (or a baseline) and write the run folder runs/<name>/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from isnet_cli.commands.options import device_option, no_progress_option, window_option
from isnet_cli.errors import InputError
from isnet_cli.io.contract import RESIZE_MODES
from isnet_cli.objective.settings import METHODS, VARIANTS
from isnet_cli.train.config import ISNET_BG_SWAP, OPTIMIZERS, SCHEDULERS, SELECT_BY, TrainConfig

_DEFAULTS = TrainConfig()
_ARCHS = (
    "densenet121 (default), resnet18/34/50, vgg11_bn, vgg16_bn, efficientnet_b0, mobilenet_v3, tinycnn, module:callable"
)


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
@click.option(
    "--val-fraction",
    type=float,
    default=_DEFAULTS.val_fraction,
    show_default=True,
    help="Validation share when --val is not given.",
)
@click.option("--ood", help="Extra test set (no masks needed) scored every epoch: CE and accuracy.")
@click.option("--classes", help="Comma-separated class list and order (default: sorted labels of DATA).")
@click.option("--arch", default=_DEFAULTS.arch, show_default=True, help=f"Architecture: {_ARCHS}.")
@click.option(
    "--pretrained/--no-pretrained",
    default=_DEFAULTS.pretrained,
    show_default=True,
    help="Start from torchvision ImageNet weights (downloaded once; normalisation folded into layer 1).",
)
@click.option(
    "--img-size", type=int, default=_DEFAULTS.img_size, show_default=True, help="Input size (square, pixels)."
)
@click.option("--resize", type=click.Choice(RESIZE_MODES), default=_DEFAULTS.resize, show_default=True)
@window_option
@click.option(
    "--augment/--no-augment", default=_DEFAULTS.augment, show_default=True, help="Small affine + brightness jitter."
)
@click.option(
    "--bg-swap",
    type=float,
    default=_DEFAULTS.bg_swap,
    help="Probability that a training image gets the background (outside its mask) of another image of the batch "
    f"(default: {ISNET_BG_SWAP:g} for ISNet variants, 0 for --variant none and --method rrr).",
)
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True)
@click.option("--epochs", type=int, default=_DEFAULTS.epochs, show_default=True)
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True, help="Learning rate.")
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default=_DEFAULTS.optimizer,
    show_default=True,
    help="adamw (lr 1e-3) learns phantoms and X-rays reliably; sgd uses --momentum (try lr 1e-2).",
)
@click.option("--momentum", type=float, default=_DEFAULTS.momentum, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=_DEFAULTS.weight_decay, show_default=True)
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=_DEFAULTS.scheduler, show_default=True)
@click.option("--clip", type=float, default=_DEFAULTS.clip, show_default=True, help="Gradient-norm clipping.")
@click.option(
    "--variant",
    type=click.Choice(VARIANTS),
    default=_DEFAULTS.variant,
    show_default=True,
    help="Explained quantity; 'none' = standard classifier baseline (P = 0).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default=_DEFAULTS.method,
    show_default=True,
    help="'rrr' = Right for the Right Reasons (input-gradient penalty on the background).",
)
@click.option("--P", "P", type=float, default=_DEFAULTS.P, show_default=True, help="Loss = (1-P)·CE + P·heatmap loss.")
@click.option(
    "--ramp",
    type=int,
    default=_DEFAULTS.ramp,
    show_default=True,
    help="Epochs over which P rises linearly from 0 (plain CE) to --P; 0 = full P from the start.",
)
@click.option(
    "--d", "d", type=float, default=_DEFAULTS.d, show_default=True, help="Background GWRP decay (0 = max, 1 = mean)."
)
@click.option(
    "--E", "E", type=float, default=_DEFAULTS.E, show_default=True, help="Background activation log(1 + g/E)."
)
@click.option("--A", "A", type=float, default=_DEFAULTS.A, show_default=True, help="Background term weight.")
@click.option("--B", "B", type=float, default=_DEFAULTS.B, show_default=True, help="Foreground band weight.")
@click.option("--eps", type=float, default=_DEFAULTS.eps, show_default=True, help="LRP epsilon.")
@click.option(
    "--cut",
    default=_DEFAULTS.cut,
    show_default=True,
    help="Foreground band 'C1,C2', or 'auto' (plain warm-up + statistics).",
)
@click.option(
    "--cut-epochs", type=int, default=_DEFAULTS.cut_epochs, show_default=True, help="Warm-up epochs for --cut auto."
)
@click.option(
    "--warm-start/--no-warm-start",
    default=_DEFAULTS.warm_start,
    show_default=True,
    help="Start the ISNet from the weights of the plain (CE-only) warm-up instead of a fresh initialisation.",
)
@click.option(
    "--lds/--no-lds",
    default=_DEFAULTS.lds,
    show_default=True,
    help="LRP deep supervision: the heatmap loss also on hidden-layer relevance (own C1/C2 per layer).",
)
@click.option(
    "--lds-layers",
    help="Comma-separated module paths (or fx node names) for --lds (default: the architecture's stages).",
)
@click.option(
    "--lds-decay",
    type=float,
    default=_DEFAULTS.lds_decay,
    show_default=True,
    help="GWRP decay over the per-layer losses (1 = mean, 0 = max).",
)
@click.option("--rrr-lambda", type=float, default=_DEFAULTS.rrr_lambda, show_default=True, help="RRR penalty weight.")
@click.option(
    "--select-by",
    type=click.Choice(SELECT_BY),
    default=_DEFAULTS.select_by,
    show_default=True,
    help="Validation score that picks best.safetensors (loss = ISNet loss).",
)
@device_option
@click.option(
    "--devices",
    type=int,
    default=_DEFAULTS.devices,
    show_default=True,
    help="Processes for DDP (one per GPU; gloo on CPU).",
)
@click.option(
    "--amp/--no-amp",
    default=_DEFAULTS.amp,
    show_default=True,
    help="GPU autocast for the forward (relevance and loss stay fp32).",
)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option(
    "--deterministic/--no-deterministic",
    default=_DEFAULTS.deterministic,
    show_default=True,
    help="Deterministic algorithms (slower on GPU); a resumed run then matches an uninterrupted one.",
)
@click.option("--workers", type=int, default=_DEFAULTS.workers, show_default=True, help="Data-loading processes.")
@click.option("--cache", help="Folder for decoded images (default: OUT/.cache).")
@click.option("--out", default=_DEFAULTS.out, show_default=True, help="Parent folder of the run folder.")
@click.option("--name", help="Run folder name (default: run-NNN, the next free number).")
@click.option(
    "--precise-bn/--no-precise-bn",
    default=_DEFAULTS.precise_bn,
    show_default=True,
    help="Re-estimate batch-norm statistics on the training data after each epoch (reliable eval-mode outputs).",
)
@click.option(
    "--heatmaps", type=int, default=_DEFAULTS.heatmaps, show_default=True, help="Validation heatmaps drawn per epoch."
)
@click.option(
    "--max-bad-steps",
    type=int,
    default=_DEFAULTS.max_bad_steps,
    show_default=True,
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
    from isnet_cli.train import TrainConfig, train

    classes = options.pop("classes")
    options["classes"] = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if resume:
        given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
        result = train(TrainConfig(data=data or ""), resume=resume, resume_overrides=given)
    else:
        result = train(TrainConfig(data=data or "", **options))
    best = result.best or result.last or {}
    summary = ", ".join(
        f"{k} {float(best[k]):.4f}"
        for k in ("val_accuracy", "val_auroc", "val_share_inside")
        if best.get(k) not in (None, "")
    )
    click.echo(f"run folder: {result.run_dir}" + (f"  (best: {summary})" if summary else ""))
