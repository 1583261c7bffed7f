"""Every classification metric and the share of relevance inside a mask, in one place (numpy only).

Shared by training (per-epoch validation scores), `isnet evaluate`, `isnet audit` and `isnet explain`;
scikit-learn is a test dependency, used there as the oracle.

- accuracy = trace(C) / n; balanced accuracy = mean over classes with support of recall_c;
  precision_c = C_cc / sum_k C_kc, recall_c = C_cc / sum_k C_ck, F1_c = 2 P R / (P + R) (0 when undefined);
  macro-F1 = mean of F1_c over all model classes. C[true, predicted] is the confusion matrix.
- AUROC (one-vs-rest) = Mann-Whitney U / (n_pos n_neg) with mid-ranks for ties; macro = mean over classes.
- 95% CIs: AUROC by DeLong's variance (fast algorithm of Sun & Xu 2014), normal approximation,
  clipped to [0, 1]; the others by percentile bootstrap, 1000 resamples, seed 0.
- Relevance in the mask, per image (R summed over channels, M the lung mask):
  positive share = sum(max(R, 0) M) / sum(max(R, 0)); absolute share = sum(|R| M) / sum(|R|).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # standard normal quantile 0.975
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


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


def share_summary(values: np.ndarray) -> dict[str, float | None]:
    v = values[np.isfinite(values)]
    if not len(v):
        return {"mean": None, "median": None}
    return {"mean": float(v.mean()), "median": float(np.median(v))}


def mask_shares(relevance: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-map (positive, absolute) share of relevance inside the mask; NaN where there is no relevance.

    `relevance`: (B, H, W), input channels already summed; `masks`: (B, H, W), bool or {0, 1}.
    """
    r = np.asarray(relevance, dtype=np.float64)
    m = np.asarray(masks, dtype=np.float64)
    pos, absolute = np.clip(r, 0, None), np.abs(r)
    with np.errstate(invalid="ignore", divide="ignore"):
        share_pos = (pos * m).sum(axis=(1, 2)) / pos.sum(axis=(1, 2))
        share_abs = (absolute * m).sum(axis=(1, 2)) / absolute.sum(axis=(1, 2))
    return share_pos, share_abs


def classification_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and AUROC of argmax predictions: the `isnet evaluate` metrics, per training epoch."""
    if not len(labels):
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "auroc": float("nan")}
    accuracy, _, macro_f1 = summary_scores(confusion_matrix(labels, probs.argmax(1), probs.shape[1]))
    auroc = macro_auroc(labels, probs)
    return {"accuracy": accuracy, "macro_f1": macro_f1, "auroc": float("nan") if auroc is None else auroc}
