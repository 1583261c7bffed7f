"""`isnet audit`: does this model look at the lungs? Relevance and counterfactual tests on masked images.

For every image with a lung mask M (model input x, values per the model's input contract):
- inside share = sum(|R| M) / sum(|R|), R the LRP relevance of the predicted class summed over channels
  (needs a checkpoint or an export made with --with-heatmap; otherwise left out);
- the predictions on the counterfactuals of `isnet_cli.report.counterfactuals` (background mean-filled,
  blurred or swapped with another class's, lungs hidden).
A flip is a change of the predicted class. The verdict uses the constants below. "Lungs" is
the mask's region: the model's contract names it (`roi_name`), and the verdict and the report use that
name ("region of interest (face)") for data sets that are not chest X-rays. The contact sheet of the
worst offenders is `isnet_cli.report.audit_sheet`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.infer.predict import iter_prepared, softmax
from isnet_cli.report.counterfactuals import (
    BLUR_SIGMA_FRACTION,
    PERTURBATIONS,
    channel_fills,
    fill_record,
    perturb,
    swap_partners,
)
from isnet_cli.report.metrics import mask_shares

# Verdict thresholds (documented in the report and the README).
LUNGS_MIN_SHARE = 0.7  # "looks at the lungs": mean |R| share inside the lungs at least this ...
LUNGS_MAX_SWAP_FLIP = 0.1  # ... and at most this fraction of predictions flip when the background is swapped
SHORTCUT_MAX_SHARE = 0.5  # "uses the background": mean share below this ...
SHORTCUT_MIN_SWAP_FLIP = 0.25  # ... or more than this fraction flips on a background swap


@dataclass
class AuditSet:
    """Preprocessed masked images of the audited set, in dataset order."""

    files: list[str]
    x: np.ndarray  # (N, C, S, S)
    masks: np.ndarray  # (N, 1, S, S) in {0, 1}
    labels: np.ndarray  # (N,) class index, -1 when unknown


def _batched_probs(backend: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    out = [softmax(np.asarray(backend.logits(x[i : i + batch_size]), np.float64)) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(backend.classes)))


def verdict(share: float | None, swap_flip: float | None, roi: str = "lungs") -> str:
    """One line: what the numbers say, with the thresholds used; `roi` names the masked region."""
    rule = (
        f"looks at the {roi} if inside share >= {LUNGS_MIN_SHARE} and swap flip rate <= {LUNGS_MAX_SWAP_FLIP}; "
        f"uses the background if share < {SHORTCUT_MAX_SHARE} or swap flip rate > {SHORTCUT_MIN_SWAP_FLIP}"
    )
    if swap_flip is None and share is None:
        return f"not enough information (no relevance, no background swap possible) [{rule}]"
    share_ok = share is None or share >= LUNGS_MIN_SHARE
    swap_ok = swap_flip is None or swap_flip <= LUNGS_MAX_SWAP_FLIP
    shortcut = (share is not None and share < SHORTCUT_MAX_SHARE) or (
        swap_flip is not None and swap_flip > SHORTCUT_MIN_SWAP_FLIP
    )
    if share_ok and swap_ok:
        result = f"looks at the {roi}"
    elif shortcut:
        result = "uses the background (shortcut)"
    else:
        result = "mixed: partly uses the background"
    return f"{result} [{rule}]"


def run_audit(
    backend: Any,
    audit_set: AuditSet,
    batch_size: int = 16,
    on_step: Any = None,
    perturbations: Sequence[str] = PERTURBATIONS,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Summary and per-image rows of the audit. `on_step(name)` is called after each stage.

    `perturbations`: the counterfactuals to run (default all; the background swap is always among them,
    the verdict needs it), for callers that need only some of the flip rates.
    """
    unknown = set(perturbations) - set(PERTURBATIONS)
    if unknown or "background_swap" not in perturbations:
        raise ValueError(f"perturbations {sorted(perturbations)}: a subset of {PERTURBATIONS} with background_swap")
    step = on_step or (lambda _: None)
    x, m, labels = audit_set.x, audit_set.masks, audit_set.labels
    sigma = max(1.0, x.shape[-1] * BLUR_SIGMA_FRACTION)
    fills = channel_fills(x, m)
    probs0 = _batched_probs(backend, x, batch_size)
    pred0 = probs0.argmax(axis=1)
    step("original")
    share = _inside_shares(backend, x, m, batch_size, step)
    known = labels >= 0
    partners = swap_partners(np.where(known, labels, pred0) if known.all() else pred0)
    results: dict[str, dict[str, Any]] = {}
    for kind in perturbations:
        results[kind] = _counterfactual(backend, kind, audit_set, partners, fills, sigma, batch_size, probs0)
        step(kind)
    contract = getattr(backend, "contract", None)
    roi = contract.roi_label if contract is not None else "lungs"
    summary = _summary(backend.classes, audit_set, share, results, probs0, fills, sigma, roi)
    return summary, _per_image(backend.classes, audit_set, share, results, probs0, partners)


def _inside_shares(backend: Any, x: np.ndarray, m: np.ndarray, batch_size: int, step: Any) -> np.ndarray:
    """Per image, the share of |R| (predicted class) inside the lungs; NaN without relevance."""
    share = np.full(len(x), np.nan)
    if backend.has_relevance:
        for i in range(0, len(x), batch_size):
            _, r = backend.relevance(x[i : i + batch_size])
            share[i : i + batch_size] = mask_shares(r.sum(axis=1), m[i : i + batch_size, 0])[1]
        step("relevance")
    return share


def _counterfactual(
    backend: Any,
    kind: str,
    audit_set: AuditSet,
    partners: np.ndarray,
    fills: dict[str, np.ndarray],
    sigma: float,
    batch_size: int,
    probs0: np.ndarray,
) -> dict[str, np.ndarray]:
    """Probabilities on the `kind` counterfactual, whether each prediction flipped, and |Δp| of the original
    prediction (NaN rows: images without a swap partner)."""
    x, m = audit_set.x, audit_set.masks
    n, pred0 = len(x), probs0.argmax(axis=1)
    rows = np.arange(n) if kind != "background_swap" else np.flatnonzero(partners >= 0)
    probs = np.full_like(probs0, np.nan)
    for i in range(0, len(rows), batch_size):
        idx = rows[i : i + batch_size]
        other = x[partners[idx]] if kind == "background_swap" else None
        other_m = m[partners[idx]] if kind == "background_swap" else None
        xb = perturb(kind, x[idx], m[idx], fills, sigma, other, other_m)
        probs[idx] = _batched_probs(backend, xb, batch_size)
    flips = np.where(np.isnan(probs[:, 0]), np.nan, (probs.argmax(axis=1) != pred0).astype(float))
    dp = np.abs(probs[np.arange(n), pred0] - probs0[np.arange(n), pred0])
    return {"probs": probs, "flips": flips, "dp": dp}


def _rate(values: np.ndarray) -> float | None:
    """Mean of the finite values (None if there are none)."""
    v = values[np.isfinite(values)]
    return float(v.mean()) if len(v) else None


def _summary(
    classes: list[str],
    audit_set: AuditSet,
    share: np.ndarray,
    results: dict[str, dict[str, Any]],
    probs0: np.ndarray,
    fills: dict[str, np.ndarray],
    sigma: float,
    roi: str = "lungs",
) -> dict[str, Any]:
    """The audit.json summary: shares, flip rates, accuracies, the settings used and the verdict."""
    labels = audit_set.labels
    known = labels >= 0

    def accuracy(probs: np.ndarray) -> float | None:
        ok = known & np.isfinite(probs[:, 0])
        return float((probs[ok].argmax(axis=1) == labels[ok]).mean()) if ok.any() else None

    share_mean = _rate(share)
    swap_flip = _rate(results["background_swap"]["flips"])
    return {
        "n": len(audit_set.x),
        "classes": classes,
        "roi": roi,
        "inside_mask_share": {
            "mean": share_mean,
            "median": float(np.nanmedian(share)) if np.isfinite(share).any() else None,
            "definition": "sum(|R| M) / sum(|R|), R = LRP of the predicted class",
        }
        if share_mean is not None
        else None,
        "flip_rate": {k: _rate(v["flips"]) for k, v in results.items()},
        "mean_abs_prob_change": {k: _rate(v["dp"]) for k, v in results.items()},
        "accuracy": {
            "original": accuracy(probs0),
            **{"background_removed" if k == "background_mean" else k: accuracy(v["probs"]) for k, v in results.items()},
        }
        if known.any()
        else None,
        "fill_values": fill_record(fills),
        "blur_sigma_px": sigma,
        "swap_partner": "random image of another class (true label if every image has one, else predicted), seed 0",
        "thresholds": {
            "looks_at_lungs": {"min_inside_share": LUNGS_MIN_SHARE, "max_swap_flip_rate": LUNGS_MAX_SWAP_FLIP},
            "uses_background": {"max_inside_share": SHORTCUT_MAX_SHARE, "min_swap_flip_rate": SHORTCUT_MIN_SWAP_FLIP},
        },
        "verdict": verdict(share_mean, swap_flip, roi),
    }


def _per_image(
    classes: list[str],
    audit_set: AuditSet,
    share: np.ndarray,
    results: dict[str, dict[str, Any]],
    probs0: np.ndarray,
    partners: np.ndarray,
) -> list[dict[str, Any]]:
    """One audit.json row per image: prediction, share, and what each counterfactual did to it."""
    labels, pred0 = audit_set.labels, probs0.argmax(axis=1)
    per_image = []
    for i in range(len(audit_set.x)):
        row: dict[str, Any] = {
            "file": audit_set.files[i],
            "label": classes[labels[i]] if labels[i] >= 0 else None,
            "predicted": classes[pred0[i]],
            "p_predicted": float(probs0[i, pred0[i]]),
            "inside_mask_share": None if np.isnan(share[i]) else float(share[i]),
        }
        for kind, res in results.items():
            flip = res["flips"][i]
            row[kind] = (
                None
                if np.isnan(flip)
                else {
                    "predicted": classes[int(res["probs"][i].argmax())],
                    "flipped": bool(flip),
                    "abs_prob_change": float(res["dp"][i]),
                }
            )
        row["swap_partner"] = audit_set.files[partners[i]] if partners[i] >= 0 else None
        per_image.append(row)
    return per_image


def load_audit_set(
    samples: list[Any], classes: list[str], contract: Any, batch_size: int, fail_fast: bool, on_batch: Any = None
) -> tuple[AuditSet, list[dict[str, str]], int]:
    """Preprocess the samples that have a mask; returns the set, the failures and how many had no mask."""
    masked = [s for s in samples if s.mask is not None]
    index = {c: i for i, c in enumerate(classes)}
    files, xs, ms, labels, failed = [], [], [], [], []
    for batch in iter_prepared(masked, contract, batch_size, with_mask=True):
        for sample, prepared in batch:
            problem = prepared if isinstance(prepared, Exception) else None
            if problem is None and (prepared.mask is None or not prepared.mask.any()):
                problem = InputError(
                    sample.mask, "mask is empty", f"audit needs a {contract.roi_name} mask for every image"
                )
            if problem is not None:
                if fail_fast:
                    raise problem
                failed.append({"file": str(sample.image), "error": str(problem)})
                continue
            files.append(str(sample.image))
            xs.append(prepared.x)
            ms.append(prepared.mask)
            labels.append(index.get(str(sample.label), -1) if sample.label is not None else -1)
        if on_batch is not None:
            on_batch(len(batch))
    if not files:
        raise InputError(
            None, f"no image with a usable {contract.roi_name} mask", "audit needs a manifest with a mask column"
        )
    audit_set = AuditSet(files, np.stack(xs), np.stack(ms).astype(np.float32), np.array(labels, dtype=np.int64))
    return audit_set, failed, len(samples) - len(masked)


def write_audit(path: Path, summary: dict[str, Any], per_image: list[dict[str, Any]]) -> None:
    from isnet_cli.io.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps({**summary, "images": per_image}, indent=2) + "\n").encode())
