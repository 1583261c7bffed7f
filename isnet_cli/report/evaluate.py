"""`isnet evaluate`: classification metrics with confidence intervals, ROC/confusion plots, relevance in the mask.

The metrics themselves are in `isnet_cli.report.metrics`. Here: running a model over a labelled set,
the report (macro AUROC CI by DeLong for two classes, by bootstrap for more), `--compare` (paired
DeLong test of the AUROC difference, binary or per class, and a paired bootstrap CI of the macro
AUROC difference) and the report's files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.infer.predict import iter_prepared, predicted_classes, softmax
from isnet_cli.report.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    auroc_ci,
    bootstrap_macro_auroc,
    bootstrap_summary_ci,
    confusion_matrix,
    macro_auroc,
    mask_shares,
    paired_delong,
    per_class_scores,
    roc_curve,
    share_summary,
    summary_scores,
)

# ---------------------------------------------------------------- running a model on a labelled set


@dataclass
class Scored:
    """One model's outputs on a labelled set, in dataset order (failed files left out)."""

    files: list[str]
    y: np.ndarray
    probs: np.ndarray
    share_pos: np.ndarray
    share_abs: np.ndarray
    failed: list[dict[str, str]] = field(default_factory=list)


def label_indices(samples: list[Any], classes: list[str], data: str | Path) -> list[int]:
    """Map every sample's label to the model's class index; refuse unlabelled samples or unknown labels."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for s in samples:
        if s.label is None:
            raise InputError(s.image, "has no label", "evaluate needs a manifest or folder tree with labels")
        if str(s.label) not in index:
            raise InputError(
                data,
                f"label {s.label!r} ({s.image}) is not a class of this model {classes}",
                "use the model's class names in the manifest",
            )
        out.append(index[str(s.label)])
    return out


def score_samples(
    backend: Any,
    samples: list[Any],
    labels: list[int],
    batch_size: int = 16,
    with_relevance: bool = True,
    fail_fast: bool = False,
    workers: int = 0,
    on_batch: Any = None,
) -> Scored:
    """Probabilities for every sample and, where a mask and relevance are available, the in-mask shares."""
    label_of = dict(zip((str(s.image) for s in samples), labels, strict=True))
    files: list[str] = []
    probs: list[np.ndarray] = []
    shares: list[np.ndarray] = []
    failed: list[dict[str, str]] = []
    relevance_ok = with_relevance and backend.has_relevance
    for batch in iter_prepared(samples, backend.contract, batch_size, with_mask=True, workers=workers):
        good = []
        for sample, prepared in batch:
            if isinstance(prepared, Exception):
                if fail_fast:
                    raise prepared
                failed.append({"file": str(sample.image), "error": str(prepared)})
            else:
                good.append((sample, prepared))
        if good:
            x = np.stack([p.x for _, p in good])
            masked = [i for i, (_, p) in enumerate(good) if p.mask is not None]
            share = np.full((len(good), 2), np.nan)
            if relevance_ok and masked:
                logits, relevance = backend.relevance(x)
                m = np.stack([good[i][1].mask for i in masked])
                sp, sa = mask_shares(relevance[masked].sum(axis=1), m[:, 0])
                share[masked, 0], share[masked, 1] = sp, sa
            else:
                logits = backend.logits(x)
            probs.append(softmax(np.asarray(logits, dtype=np.float64)))
            shares.append(share)
            files.extend(str(s.image) for s, _ in good)
        if on_batch is not None:
            on_batch(len(batch))
    k = len(backend.classes)
    all_shares = np.concatenate(shares) if shares else np.zeros((0, 2))
    return Scored(
        files=files,
        y=np.array([label_of[f] for f in files], dtype=np.int64),
        probs=np.concatenate(probs) if probs else np.zeros((0, k)),
        share_pos=all_shares[:, 0],
        share_abs=all_shares[:, 1],
        failed=failed,
    )


# ---------------------------------------------------------------- report


def build_report(scored: Scored, classes: list[str], threshold: float | None = None) -> dict[str, Any]:
    """Every metric of one model on one set, as the JSON-ready dict written to report.json."""
    y, probs, k = scored.y, scored.probs, len(classes)
    if len(y) == 0:
        raise InputError(None, "no usable images to evaluate")
    pred = predicted_classes(probs, threshold)
    cm = confusion_matrix(y, pred, k)
    precision, recall, f1 = per_class_scores(cm)
    accuracy, balanced, macro_f1 = summary_scores(cm)
    per_class_auc = _per_class_auroc(y, probs, classes)
    macro, macro_ci, method = _macro_auroc(y, probs, per_class_auc, classes)
    has_shares = bool(np.isfinite(scored.share_abs).any())
    return {
        "n": len(y),
        "classes": classes,
        "threshold": threshold,
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "auroc": {
            "macro": macro,
            "ci95": macro_ci,
            "ci_method": method,
            "per_class": per_class_auc,
            "per_class_ci_method": "DeLong (normal approximation)",
        },
        "ci95": {
            **bootstrap_summary_ci(y, pred, k),
            "method": f"percentile bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}",
        },
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(cm[c].sum()),
                "auroc": per_class_auc[name]["auroc"],
            }
            for c, name in enumerate(classes)
        },
        "confusion": {"labels": classes, "rows": "true", "columns": "predicted", "matrix": cm.tolist()},
        "inside_mask_share": {
            "n": int(np.isfinite(scored.share_abs).sum()),
            "positive": share_summary(scored.share_pos),
            "absolute": share_summary(scored.share_abs),
            "target": "predicted class",
        }
        if has_shares
        else None,
        "failed": scored.failed,
    }


def _per_class_auroc(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """One-vs-rest AUROC with its DeLong CI per class (None where the class is absent or alone)."""
    out: dict[str, Any] = {}
    for c, name in enumerate(classes):
        positive = y == c
        if 0 < positive.sum() < len(y):
            auc, ci = auroc_ci(probs[:, c], positive)
            out[name] = {"auroc": auc, "ci95": ci}
        else:
            out[name] = {"auroc": None, "ci95": None}
    return out


def _macro_auroc(
    y: np.ndarray, probs: np.ndarray, per_class: dict[str, Any], classes: list[str]
) -> tuple[float | None, list[float] | None, str | None]:
    """(macro AUROC, its 95% CI, how the CI was found): DeLong for two classes, bootstrap for more."""
    macro = macro_auroc(y, probs)
    if macro is None:
        return None, None, None
    if len(classes) == 2:
        return macro, per_class[classes[1]]["ci95"], "DeLong (normal approximation)"
    boot = bootstrap_macro_auroc(y, [probs])
    ci = [float(v) for v in np.percentile(boot[:, 0], [2.5, 97.5])] if len(boot) else None
    return macro, ci, f"percentile bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}"


def compare_models(a: Scored, b: Scored, classes: list[str]) -> dict[str, Any]:
    """AUROC difference (a - b) on the files both models could read, with a paired test."""
    common = sorted(set(a.files) & set(b.files))
    ia = {f: i for i, f in enumerate(a.files)}
    ib = {f: i for i, f in enumerate(b.files)}
    sel_a = np.array([ia[f] for f in common], dtype=np.int64)
    sel_b = np.array([ib[f] for f in common], dtype=np.int64)
    y, pa, pb = a.y[sel_a], a.probs[sel_a], b.probs[sel_b]
    out: dict[str, Any] = {"n": len(common)}
    if len(classes) == 2:
        out.update(paired_delong(pa[:, 1], pb[:, 1], y == 1))
        return out
    out["per_class"] = {
        name: paired_delong(pa[:, c], pb[:, c], y == c) if 0 < (y == c).sum() < len(y) else None
        for c, name in enumerate(classes)
    }
    ma, mb = macro_auroc(y, pa), macro_auroc(y, pb)
    boot = bootstrap_macro_auroc(y, [pa, pb])
    diffs = boot[:, 0] - boot[:, 1]
    p = min(1.0, 2 * min(float((diffs <= 0).mean()), float((diffs >= 0).mean()))) if len(diffs) else None
    out.update(
        auroc_a=ma,
        auroc_b=mb,
        difference=None if ma is None or mb is None else ma - mb,
        ci95=[float(v) for v in np.percentile(diffs, [2.5, 97.5])] if len(diffs) else None,
        p_value=p,
        test=f"paired bootstrap of the macro AUROC, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}",
    )
    return out


# ---------------------------------------------------------------- plots


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    shown = [1] if len(classes) == 2 else range(len(classes))
    for c in shown:
        positive = y == c
        if 0 < positive.sum() < len(y):
            fpr, tpr = roc_curve(probs[:, c], positive)
            auc, _ = auroc_ci(probs[:, c], positive)
            ax.plot(fpr, tpr, label=f"{classes[c]} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (one-vs-rest)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], scored: Scored, out_dir: Path) -> None:
    """report.json, confusion.png and roc.png in `out_dir` (report written atomically)."""
    from isnet_cli.io.atomic import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    classes = report["classes"]
    plot_confusion(np.array(report["confusion"]["matrix"]), classes, out_dir / "confusion.png")
    plot_roc(scored.y, scored.probs, classes, out_dir / "roc.png")
    atomic_write_bytes(out_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
