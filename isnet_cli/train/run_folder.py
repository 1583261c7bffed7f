"""The run folder `runs/<name>/`: naming, metrics.csv, config files, curves.png, heatmap grids, card.md.

No torch here (metrics take numpy arrays): `isnet info` and other light commands can read runs cheaply.
Every file is written atomically (temp file + rename) through `checkpoint.atomic_write_bytes`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.io.atomic import atomic_write_bytes

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
# steps.csv columns: one row per training step (warm-up included), see `isnet_cli.train.step_diagnostics`.
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
    _save_figure(fig, path)


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
    _save_figure(fig, path)


def heatmap_grid(
    path: Path, images: np.ndarray, relevance: np.ndarray, masks: np.ndarray, titles: Sequence[str]
) -> None:
    """A row per sample: image with the lung outline, and the signed relevance (red +, blue -)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for i in range(n):
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
    _save_figure(fig, path)


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- card


def model_card(
    config: dict[str, Any], meta: dict[str, Any], best: dict[str, Any] | None, run_dir: Path, health: str = ""
) -> str:
    """card.md: what the model is, what it was trained on, how well it did, and how to use it."""
    isnet = meta.get("isnet", {})
    data = meta.get("data", {})
    contract = meta.get("contract", {})
    variant = isnet.get("variant")
    kind = (
        "a standard classifier (no heatmap loss; baseline)"
        if variant == "none" and isnet.get("method") != "rrr"
        else "a Right-for-the-Right-Reasons classifier (input-gradient penalty on the background)"
        if isnet.get("method") == "rrr"
        else f"an ISNet ({variant}): trained so its LRP relevance stays inside the mask"
    )
    lines = [
        f"# Model card: {run_dir.name}",
        "",
        f"**What it is**: {kind}, architecture `{meta.get('arch')}`, classes {meta.get('classes')}.",
        "",
        "## Intended use",
        "Research on chest X-ray classification and background-bias mitigation. Not a medical device: do not use",
        "it for diagnosis. Masks were needed only for training; at run time it is the plain classifier.",
        "",
        "## Input",
        f"- {contract.get('channels', 1)} channel(s), {contract.get('size')} x {contract.get('size')} px, "
        f"resize `{contract.get('resize')}`, DICOM window `{contract.get('window')}`, values in "
        f"[{contract.get('low', 0.0)}, {contract.get('high', 1.0)}] (air dark).",
        "- `isnet predict/explain/evaluate` apply this preprocessing from the checkpoint automatically.",
        "",
        "## Training data",
        f"- manifest: `{data.get('manifest')}` (sha256 {str(data.get('sha256', ''))[:16]}...)",
        f"- training samples per class: {data.get('train_counts')}",
        f"- validation samples per class: {data.get('val_counts')} ({data.get('val_source')})",
    ]
    if data.get("ood_manifest"):
        lines.append(f"- out-of-distribution set: `{data.get('ood_manifest')}` ({data.get('ood_count')} images)")
    lines += [
        "",
        "## Training",
        f"- variant `{variant}`, method `{isnet.get('method')}`, P={isnet.get('P')}, d={isnet.get('d')}, "
        f"E={isnet.get('E')}, A={isnet.get('A')}, B={isnet.get('B')}, LRP eps={isnet.get('eps')}, "
        f"C1={_num(isnet.get('C1'))}, C2={_num(isnet.get('C2'))} ({isnet.get('cut_source')}), "
        f"background swap {isnet.get('background_swap', 0)}" + _lds_text(isnet),
        f"- optimizer {config.get('optimizer')} lr {config.get('lr')}, {config.get('epochs')} epochs, batch "
        f"{config.get('batch_size')}, scheduler {config.get('scheduler')}, seed {config.get('seed')}, "
        f"deterministic {config.get('deterministic')}",
        f"- full configuration: `config.json`; re-run with `isnet train --config {run_dir / 'config.yaml'}`",
        "",
        "## Results (validation, selected checkpoint `best.safetensors`)",
    ]
    if best:
        for key in (
            "epoch",
            "val_loss",
            "val_accuracy",
            "val_macro_f1",
            "val_auroc",
            "val_share_inside",
            "ood_accuracy",
        ):
            if best.get(key) not in (None, ""):
                lines.append(f"- {key}: {_num(best[key])}")
        lines.append(f"- selected by: {config.get('select_by')}")
    else:
        lines.append("- no completed epoch")
    if health:
        lines += ["", "## Training health", f"- {health}"]
    lines += [
        "",
        "`val_share_inside` is the mean fraction of the absolute LRP relevance that falls inside the mask",
        "(1.0 = the model looks only at the lungs). See `metrics.csv` and `curves.png` for every epoch.",
        "",
        "## Limitations",
        "- Validation figures are i.i.d.: performance on other hospitals, devices or populations is unknown",
        "  until measured (`isnet evaluate`, `isnet audit`).",
        "- Relevance inside the lungs does not prove the model uses clinically meaningful features.",
        "",
    ]
    return "\n".join(lines)


def _num(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _lds_text(isnet: dict[str, Any]) -> str:
    """The model card's note on LRP deep supervision: each hidden layer with its C1/C2."""
    cuts = isnet.get("lds_cuts")
    if not cuts:
        return ""
    layers = ", ".join(f"`{name}` C1={_num(c[0])} C2={_num(c[1])}" for name, c in cuts.items())
    return f"; LRP deep supervision (GWRP decay {isnet.get('lds_decay')} over layers): {layers}"
