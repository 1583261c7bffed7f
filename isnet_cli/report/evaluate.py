"""`isnet evaluate`: classification metrics with confidence intervals, ROC/confusion plots, relevance in the mask.

Metrics are computed with numpy only (scikit-learn is a test dependency, used there as the oracle):
- accuracy = trace(C) / n; balanced accuracy = mean over classes with support of recall_c;
  precision_c = C_cc / sum_k C_kc, recall_c = C_cc / sum_k C_ck, F1_c = 2 P R / (P + R) (0 when undefined);
  macro-F1 = mean of F1_c over all model classes. C[true, predicted] is the confusion matrix.
- AUROC (one-vs-rest) = Mann-Whitney U / (n_pos n_neg) with mid-ranks for ties; macro = mean over classes.
- 95% CIs: AUROC by DeLong's variance (fast algorithm of Sun & Xu 2014), normal approximation,
  clipped to [0, 1]; accuracy, balanced accuracy, macro-F1 (and macro AUROC for more than two
  classes) by percentile bootstrap, 1000 resamples, seed 0.
- `--compare`: paired DeLong test of the AUROC difference (binary; per class for more classes) and a
  paired bootstrap CI of the macro AUROC difference.
- Relevance in the mask, per image (R summed over channels, M the lung mask):
  positive share = sum(max(R, 0) M) / sum(max(R, 0)); absolute share = sum(|R| M) / sum(|R|).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.infer.onnx_runtime import softmax

Z95 = 1.959963984540054  # standard normal quantile 0.975
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


# ---------------------------------------------------------------- metrics (numpy only)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """C[i, j] = number of samples of true class i predicted as j."""
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class from a confusion matrix (rows true, columns predicted)."""
    tp = np.diag(cm).astype(np.float64)
    precision = _ratio(tp, cm.sum(axis=0).astype(np.float64))
    recall = _ratio(tp, cm.sum(axis=1).astype(np.float64))
    f1 = _ratio(2 * precision * recall, precision + recall)
    return precision, recall, f1


def summary_scores(cm: np.ndarray) -> tuple[float, float, float]:
    """(accuracy, balanced accuracy, macro-F1) of one confusion matrix."""
    _, recall, f1 = per_class_scores(cm)
    support = cm.sum(axis=1)
    accuracy = float(np.trace(cm) / max(cm.sum(), 1))
    balanced = float(recall[support > 0].mean()) if (support > 0).any() else 0.0
    return accuracy, balanced, float(f1.mean())


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` along the last axis, ties get the mean of their ranks."""
    x = np.atleast_2d(x)
    out = np.empty(x.shape, dtype=np.float64)
    for i, row in enumerate(x):
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        out[i] = (ends - (counts - 1) / 2.0)[inverse]
    return out


def delong(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of several score vectors on the same samples, and their DeLong covariance matrix.

    `scores`: (k, n); `positive`: bool (n,). Fast DeLong (Sun & Xu 2014): with m positives and
    n negatives, V10_i = (rank of positive i among all - its rank among positives) / n,
    V01_j = 1 - (rank of negative j among all - its rank among negatives) / m,
    AUC = mean V10, Cov = Cov(V10) / m + Cov(V01) / n.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positive = np.asarray(positive, dtype=bool)
    pos, neg = scores[:, positive], scores[:, ~positive]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("AUROC needs positives and negatives")
    ranks_all = midranks(np.concatenate([pos, neg], axis=1))
    v10 = (ranks_all[:, :m] - midranks(pos)) / n
    v01 = 1.0 - (ranks_all[:, m:] - midranks(neg)) / m
    aucs = v10.mean(axis=1)
    cov10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(scores), len(scores)))
    cov01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(scores), len(scores)))
    return aucs, cov10 / m + cov01 / n


def auroc_ci(scores: np.ndarray, positive: np.ndarray) -> tuple[float, list[float]]:
    """AUROC and its DeLong 95% CI (normal approximation, clipped to [0, 1])."""
    aucs, cov = delong(scores[None, :], positive)
    auc, se = float(aucs[0]), math.sqrt(max(float(cov[0, 0]), 0.0))
    return auc, [max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se)]


def paired_delong(scores_a: np.ndarray, scores_b: np.ndarray, positive: np.ndarray) -> dict[str, Any]:
    """Paired DeLong test of AUROC_a - AUROC_b: z = diff / sqrt(V_a + V_b - 2 Cov_ab), two-sided p."""
    aucs, cov = delong(np.stack([scores_a, scores_b]), positive)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    if se == 0.0:
        p = 1.0 if diff == 0.0 else 0.0
        z = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    else:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2.0))
    return {
        "auroc_a": float(aucs[0]),
        "auroc_b": float(aucs[1]),
        "difference": diff,
        "ci95": [diff - Z95 * se, diff + Z95 * se],
        "z": z,
        "p_value": p,
        "test": "paired DeLong",
    }


def ovr_aurocs(y: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """One-vs-rest AUROC per class (None where the class is absent or the only one present)."""
    out: list[float | None] = []
    for c in range(probs.shape[1]):
        positive = y == c
        out.append(float(delong(probs[None, :, c], positive)[0][0]) if 0 < positive.sum() < len(y) else None)
    return out


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean of the defined one-vs-rest AUROCs (scikit-learn's multi_class='ovr', average='macro').

    Two classes: the AUROC of p_1 (both one-vs-rest AUROCs are equal up to rounding of p_0 = 1 - p_1).
    """
    aucs = ovr_aurocs(y, probs)
    values = [aucs[1]] if len(aucs) == 2 else [a for a in aucs if a is not None]
    values = [a for a in values if a is not None]
    return float(np.mean(values)) if values else None


def bootstrap_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, n) indices drawn with replacement, reproducible."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_summary_ci(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, list[float]]:
    """Percentile 95% CIs of accuracy, balanced accuracy and macro-F1 (vectorised confusion matrices)."""
    idx = bootstrap_indices(len(y))
    offsets = np.arange(len(idx))[:, None] * k * k
    flat = (offsets + y[idx] * k + pred[idx]).ravel()
    cms = np.bincount(flat, minlength=len(idx) * k * k).reshape(len(idx), k, k)
    values = np.array([summary_scores(cm) for cm in cms])
    lo, hi = np.percentile(values, [2.5, 97.5], axis=0)
    names = ("accuracy", "balanced_accuracy", "macro_f1")
    return {name: [float(lo[i]), float(hi[i])] for i, name in enumerate(names)}


def bootstrap_macro_auroc(y: np.ndarray, probs: list[np.ndarray]) -> np.ndarray:
    """Macro AUROC of each model in `probs` on the same bootstrap resamples: (resamples, models)."""
    rows = []
    for ix in bootstrap_indices(len(y)):
        values = [macro_auroc(y[ix], p[ix]) for p in probs]
        if all(v is not None for v in values):
            rows.append(values)
    return np.array(rows, dtype=np.float64)


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(p)[last]
    fps = (last + 1) - tps
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def mask_shares(relevance: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (positive, absolute) share of relevance inside the mask; NaN where there is no relevance.

    `relevance`: (B, C, S, S) summed over C; `masks`: (B, 1, S, S) in {0, 1}.
    """
    r = relevance.sum(axis=1).astype(np.float64)
    m = masks[:, 0].astype(np.float64)
    pos, absolute = np.clip(r, 0, None), np.abs(r)
    with np.errstate(invalid="ignore", divide="ignore"):
        share_pos = (pos * m).sum(axis=(1, 2)) / pos.sum(axis=(1, 2))
        share_abs = (absolute * m).sum(axis=(1, 2)) / absolute.sum(axis=(1, 2))
    return share_pos, share_abs


def share_summary(values: np.ndarray) -> dict[str, float | None]:
    v = values[np.isfinite(values)]
    if not len(v):
        return {"mean": None, "median": None}
    return {"mean": float(v.mean()), "median": float(np.median(v))}


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
    from isnet_cli.infer.predict import iter_prepared

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
                sp, sa = mask_shares(relevance[masked], m)
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


def predicted_classes(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """argmax, or for two classes 1 iff p_1 >= threshold."""
    if threshold is None:
        return probs.argmax(axis=1)
    return (probs[:, 1] >= threshold).astype(np.int64)


def build_report(scored: Scored, classes: list[str], threshold: float | None = None) -> dict[str, Any]:
    """Every metric of one model on one set, as the JSON-ready dict written to report.json."""
    y, probs, k = scored.y, scored.probs, len(classes)
    if len(y) == 0:
        raise InputError(None, "no usable images to evaluate")
    pred = predicted_classes(probs, threshold)
    cm = confusion_matrix(y, pred, k)
    precision, recall, f1 = per_class_scores(cm)
    accuracy, balanced, macro_f1 = summary_scores(cm)
    per_class_auc: dict[str, Any] = {}
    for c, name in enumerate(classes):
        positive = y == c
        if 0 < positive.sum() < len(y):
            auc, ci = auroc_ci(probs[:, c], positive)
            per_class_auc[name] = {"auroc": auc, "ci95": ci}
        else:
            per_class_auc[name] = {"auroc": None, "ci95": None}
    macro = macro_auroc(y, probs)
    if k == 2 and macro is not None:
        macro_ci, method = per_class_auc[classes[1]]["ci95"], "DeLong (normal approximation)"
    elif macro is not None:
        boot = bootstrap_macro_auroc(y, [probs])
        macro_ci = [float(v) for v in np.percentile(boot[:, 0], [2.5, 97.5])] if len(boot) else None
        method = f"percentile bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}"
    else:
        macro_ci, method = None, None
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
    from isnet_cli.infer.checkpoint import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    classes = report["classes"]
    plot_confusion(np.array(report["confusion"]["matrix"]), classes, out_dir / "confusion.png")
    plot_roc(scored.y, scored.probs, classes, out_dir / "roc.png")
    atomic_write_bytes(out_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
