"""The run folder `runs/<name>/`: naming, metrics.csv and steps.csv, config files, curves.png,
diagnostics.png, heatmap grids, the checkpoint metadata, and finding a run to resume (card.md: `card`).

No torch here (metrics take numpy arrays): light commands and tests can read runs cheaply. Every file
is written atomically (temp file + rename) through `isnet_cli.io.atomic`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from isnet_cli.console import console
from isnet_cli.errors import InputError
from isnet_cli.io.atomic import atomic_write_bytes
from isnet_cli.io.contract import InputContract
from isnet_cli.objective.settings import Cuts
from isnet_cli.train.config import TrainConfig

# The resume state beside `last.safetensors` (see `isnet_cli.train.state`).
STATE_FILE = "last.state.pt"
STEPS_FILE = "steps.csv"

# metrics.csv columns, in order (a column is empty where it does not apply, e.g. ood_* without --ood).
METRIC_COLUMNS: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "train_ce",
    "train_background",
    "train_foreground",
    "val_loss",
    "val_ce",
    "val_background",
    "val_foreground",
    "val_accuracy",
    "val_macro_f1",
    "val_auroc",
    "val_share_inside",
    "ood_ce",
    "ood_accuracy",
    "lr",
    "skipped_steps",
    "seconds",
    "health",
)
# steps.csv columns: one row per training step (warm-up included), see `isnet_cli.train.health.step_diagnostics`.
STEP_COLUMNS: tuple[str, ...] = (
    "phase",
    "epoch",
    "step",
    "loss",
    "ce",
    "background",
    "foreground",
    "relevance_mass",
    "logit_range",
    "grad_norm",
    "grad_ce",
    "grad_heat",
)


def next_run_name(out: Path, prefix: str = "run") -> str:
    """`run-001`, `run-002`, ...: one more than the highest existing number under `out`."""
    numbers = [int(m.group(1)) for p in out.glob(f"{prefix}-*") if (m := re.fullmatch(rf"{prefix}-(\d+)", p.name))]
    return f"{prefix}-{max(numbers, default=0) + 1:03d}"


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, data: dict[str, Any], header: str = "") -> None:
    import yaml

    write_text(path, header + yaml.safe_dump(data, sort_keys=False))


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of an existing metrics.csv (empty list if absent)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_metrics(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] = METRIC_COLUMNS) -> None:
    """Rewrite metrics.csv (or steps.csv, with STEP_COLUMNS) with all rows (atomic; a resumed run keeps
    the earlier rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    write_text(path, buf.getvalue())


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ---------------------------------------------------------------------------------------------- figures


def plot_curves(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """curves.png: losses (train/val, with parts) and validation metrics per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for row in rows:
            v = row.get(key)
            if v not in (None, ""):
                xs.append(float(row["epoch"]))
                ys.append(float(v))
        return xs, ys

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (
        ("train_loss", "-"),
        ("val_loss", "-"),
        ("train_ce", "--"),
        ("val_ce", "--"),
        ("train_background", ":"),
        ("val_background", ":"),
        ("train_foreground", "-."),
        ("val_foreground", "-."),
        ("ood_ce", "--"),
    ):
        xs, ys = series(key)
        if xs:
            axes[0].plot(xs, ys, style, marker=".", label=key)
    axes[0].set(title="losses", xlabel="epoch", yscale="log")
    for key in ("val_accuracy", "val_macro_f1", "val_auroc", "val_share_inside", "ood_accuracy"):
        xs, ys = series(key)
        if xs:
            axes[1].plot(xs, ys, marker=".", label=key)
    axes[1].set(title="validation", xlabel="epoch", ylim=(0, 1.02))
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_steps(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """diagnostics.png: per training step, the loss terms, the relevance mass and logit range, and the
    gradient norms (total before clipping, CE part, heatmap part); the warm-up shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(i, float(r[key])) for i, r in enumerate(rows) if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [max(p[1], 1e-12) for p in pts]

    panels = (
        ("loss terms", ("ce", "background", "foreground")),
        ("scale", ("relevance_mass", "logit_range")),
        ("gradient norms", ("grad_norm", "grad_ce", "grad_heat")),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    warm = [i for i, r in enumerate(rows) if r.get("phase") != "train"]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, "." if key.startswith("grad_") and key != "grad_norm" else "-", label=key, lw=0.8)
        if warm:
            ax.axvspan(min(warm), max(warm), color="0.9", label="plain warm-up")
        ax.set(title=title, xlabel="step", yscale="log")
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def heatmap_grid(
    path: Path, images: np.ndarray, relevance: np.ndarray, masks: np.ndarray, titles: Sequence[str]
) -> None:
    """A row per sample: image (grey (S, S) or RGB (S, S, 3)) with the mask outline, and the signed
    relevance (red +, blue -)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for i in range(n):
        if images[i].ndim == 3:
            axes[0, i].imshow(np.clip(images[i], 0.0, 1.0))
        else:
            axes[0, i].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        if masks[i].any():
            axes[0, i].contour(masks[i], levels=[0.5], colors="lime", linewidths=0.8)
        axes[0, i].set_title(titles[i], fontsize=7)
        lim = float(np.abs(relevance[i]).max()) or 1.0
        axes[1, i].imshow(relevance[i], cmap="bwr", vmin=-lim, vmax=lim)
        if masks[i].any():
            axes[1, i].contour(masks[i], levels=[0.5], colors="k", linewidths=0.5)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure -> PNG at `path` (atomic); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- run folder and resume


class RunNaming(Protocol):
    """What names a run folder: `--out` (the parent) and `--name` (None: the next run-NNN)."""

    out: str
    name: str | None


def resolve_run_dir(cfg: RunNaming, resumable: bool = True) -> Path:
    """OUT/NAME (NAME: --name or the next run-NNN); an existing non-empty folder is refused (`resumable`:
    the fix offers --resume)."""
    out = Path(cfg.out)
    name = cfg.name or next_run_name(out)
    run_dir = out / name
    if run_dir.exists() and any(run_dir.iterdir()):
        fix = "pick another --name" + (", or continue it with --resume" if resumable else "")
        raise InputError(run_dir, "run folder already exists", fix)
    return run_dir


def find_resume(path: str | Path, command: str = "isnet train") -> Path:
    """`--resume` accepts the run folder or a checkpoint inside it; returns the run folder (`command`: the
    command that writes such runs, named in the error)."""
    p = Path(path)
    run_dir = p if p.is_dir() else p.parent
    if not (run_dir / STATE_FILE).is_file() or not (run_dir / "config.json").is_file():
        raise InputError(
            p, "not a resumable run (no last.state.pt / config.json)", f"pass a run folder written by `{command}`"
        )
    return run_dir


def load_resume_config(run_dir: Path, overrides: dict[str, Any], config: type[Any] = TrainConfig) -> Any:
    """The run's own config (a `config`: TrainConfig, or SegmentConfig for `isnet segment train`), with the
    runtime options (`config.RUNTIME`) the user gave again."""
    saved = json.loads((run_dir / "config.json").read_text())
    known = {f.name for f in dataclasses.fields(config)}
    cfg = config.from_dict({k: v for k, v in saved.items() if k in known})
    changed = {k: v for k, v in overrides.items() if k in config.RUNTIME}
    ignored = sorted(k for k, v in overrides.items() if k not in config.RUNTIME and getattr(cfg, k, v) != v)
    if ignored:
        console.print(f"[yellow]--resume: ignoring {', '.join(ignored)} (the run keeps its own settings)[/yellow]")
    return dataclasses.replace(cfg, out=str(run_dir.parent), name=run_dir.name, **changed)


def checkpoint_meta(
    cfg: TrainConfig,
    classes: list[str],
    contract: InputContract,
    cuts: Cuts,
    data_summary: dict[str, Any],
    row: dict[str, Any],
) -> dict[str, Any]:
    """The metadata of a checkpoint written after the epoch of metrics `row` (see `isnet_cli.infer.checkpoint`)."""
    isnet = {
        "variant": cfg.variant,
        "method": cfg.method,
        "P": cfg.P if cfg.uses_lrp_loss else 0.0,
        "d": cfg.d,
        "E": cfg.E,
        "A": cfg.A,
        "B": cfg.B,
        "eps": cfg.eps,
        **cuts.record(),
        "lds_decay": cfg.lds_decay if cuts.hidden else None,
        "rrr_lambda": cfg.rrr_lambda if cfg.method == "rrr" else None,
        "background_swap": cfg.background_swap,
        "warm_start": cfg.starts_from_warm_up,
        "ramp": cfg.ramp_epochs,
    }
    return {
        "arch": cfg.arch,
        "num_classes": len(classes),
        "in_channels": contract.channels,
        "pretrained": cfg.pretrained,
        "classes": classes,
        "contract": contract.to_dict(),
        "isnet": isnet,
        "metrics": row,
        "data": data_summary,
        "epoch": row.get("epoch"),
        **({"auto_masks": cfg.auto_masks} if cfg.auto_masks else {}),
    }
