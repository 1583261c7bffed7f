"""Real labels: the standard classifier and the ISNet on COVID-19 vs other pneumonia, then on other patients.

`ieee8023_gb100` (98 radiographs with radiologist lung masks from the public COVID-19 collection of Cohen
et al.; 64 COVID-19, 34 other pneumonia) is split into `--folds` stratified folds by image. For every fold
both models are trained with the `isnet train` defaults (only architecture, size, epochs and seed given)
on the other folds and score the held-out fold, so every image gets one out-of-fold probability from each
model: AUROC with its DeLong 95% CI over the pooled out-of-fold predictions, the paired DeLong test of the
difference, and the mean share of |LRP relevance| (predicted class) inside the lungs.

Then the paper's out-of-distribution question in miniature: the fold models score the
`v7_ieee8023_lungs345` radiographs (other patients of the same collection, many from other hospitals and
AP/supine views; their `finding` column is the label: 337 of 345 are COVID-19, so only the sensitivity,
with a Wilson 95% CI, is measured there, by the mean probability of the five fold models) and the share
of their relevance inside those images' lung masks (another annotator's masks, which include the heart).

This is a small data set, whose source hospital is confounded with the label: read the CIs, claim
nothing beyond them.

    python benchmarks/real_cxr.py                  # ResNet-18, 128 px, 10 epochs, 5 folds (CPU)
    python benchmarks/real_cxr.py --folds 3 --epochs 5
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAIN_SET = "ieee8023_gb100"
OOD_SET = "v7_ieee8023_lungs345"
POSITIVE = "covid19"
MODELS = {"standard": "none", "isnet": "selective"}
Z95 = 1.959964


def labelled_rows(data: Path) -> list[dict[str, str]]:
    labels = data / TRAIN_SET / "labels.csv"
    if not labels.is_file():
        raise SystemExit(f"{labels}: not found; pass --data (the folder with {TRAIN_SET} and {OOD_SET})")
    with labels.open(newline="") as f:
        return [
            {
                "image": str(data / TRAIN_SET / r["image"]),
                "mask": str(data / TRAIN_SET / r["mask"]),
                "label": r["label_name"],
            }
            for r in csv.DictReader(f)
        ]


def ood_rows(data: Path) -> list[dict[str, str]]:
    """The other collection's images whose finding names COVID-19 or another condition (label by finding)."""
    with (data / OOD_SET / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        {
            "image": str(data / OOD_SET / r["image"]),
            "mask": str(data / OOD_SET / r["mask"]),
            "label": POSITIVE if "COVID-19" in r["finding"] else "non_covid",
        }
        for r in rows
        if r["finding"] not in ("", "Unknown")
    ]


def stratified_folds(rows: list[dict[str, str]], folds: int, seed: int) -> list[int]:
    """Fold index of every row; each class spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    fold = [0] * len(rows)
    for label in sorted({r["label"] for r in rows}):
        members = [i for i, r in enumerate(rows) if r["label"] == label]
        for rank, i in enumerate(rng.permutation(members)):
            fold[int(i)] = rank % folds
    return fold


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def scored(run_dir: Path, manifest: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(labels, P(covid19), in-lung share of |R|) of a trained model on a manifest."""
    from isnet_cli.infer.loading import TorchModel
    from isnet_cli.io.dataset import read_dataset
    from isnet_cli.report.evaluate import label_indices, score_samples

    backend = TorchModel(run_dir / "best.safetensors", device="cpu")
    samples = read_dataset(manifest).samples
    result = score_samples(backend, samples, label_indices(samples, backend.classes, manifest), 16)
    positive = backend.classes.index(POSITIVE)
    return result.y == positive, result.probs[:, positive], result.share_abs, result.files


def wilson(successes: int, n: int) -> list[float]:
    """Wilson score 95% interval of a proportion."""
    if n == 0:
        return [math.nan, math.nan]
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return [centre - half, centre + half]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/isnet-real-cxr")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()

    from isnet_cli.report.metrics import auroc_ci, paired_delong
    from isnet_cli.train import TrainConfig, train

    t_start = time.perf_counter()
    data, out = Path(args.data), Path(args.out)
    rows = labelled_rows(data)
    fold_of = stratified_folds(rows, args.folds, args.seed)
    ood_manifest = write_manifest(out / "ood.csv", ood_rows(data))
    oof: dict[str, dict[str, Any]] = {m: {} for m in MODELS}  # image -> (label, prob, share)
    ood: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {m: [] for m in MODELS}
    for k in range(args.folds):
        train_rows = [r for r, f in zip(rows, fold_of, strict=True) if f != k]
        test_manifest = write_manifest(
            out / f"fold{k}" / "test.csv", [r for r, f in zip(rows, fold_of, strict=True) if f == k]
        )
        train_manifest = write_manifest(out / f"fold{k}" / "train.csv", train_rows)
        for model, variant in MODELS.items():
            name = f"{model}_{args.arch}_s{args.size}_e{args.epochs}_fold{k}"
            run_dir = out / "runs" / name
            if not (run_dir / "best.safetensors").is_file():
                train(
                    TrainConfig(
                        data=str(train_manifest),
                        arch=args.arch,
                        img_size=args.size,
                        epochs=args.epochs,
                        seed=args.seed,
                        variant=variant,
                        out=str(out / "runs"),
                        name=name,
                        cache=str(out / "cache"),
                        no_progress=True,
                        heatmaps=2,
                    )
                )
            y, p, share, files = scored(run_dir, test_manifest)
            oof[model].update(
                {f: (bool(yi), float(pi), float(si)) for f, yi, pi, si in zip(files, y, p, share, strict=True)}
            )
            ood[model].append(scored(run_dir, ood_manifest)[:3])
        print(f"fold {k + 1}/{args.folds} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    images = sorted(oof["standard"])
    y = np.array([oof["standard"][f][0] for f in images])
    results: dict[str, Any] = {}
    for model in MODELS:
        probs = np.array([oof[model][f][1] for f in images])
        shares = np.array([oof[model][f][2] for f in images])
        auc, ci = auroc_ci(probs, y)
        ood_y = ood[model][0][0]
        ood_p = np.mean([p for _, p, _ in ood[model]], axis=0)
        ood_share = np.nanmean([np.nanmean(s) for _, _, s in ood[model]])
        hits = int(((ood_p >= 0.5) & ood_y).sum())
        results[model] = {
            "cross_validation": {
                "auroc": auc,
                "auroc_ci95": ci,
                "accuracy": float(((probs >= 0.5) == y).mean()),
                "inside_mask_share": float(np.nanmean(shares)),
            },
            "out_of_distribution": {
                "n": len(ood_y),
                "covid19": int(ood_y.sum()),
                "sensitivity": hits / max(int(ood_y.sum()), 1),
                "sensitivity_ci95": wilson(hits, int(ood_y.sum())),
                "inside_mask_share": float(ood_share),
            },
        }
    probs = {m: np.array([oof[m][f][1] for f in images]) for m in MODELS}
    results["isnet_minus_standard_auroc"] = paired_delong(probs["isnet"], probs["standard"], y)
    results["config"] = {
        "arch": args.arch,
        "size": args.size,
        "epochs": args.epochs,
        "folds": args.folds,
        "images": len(rows),
        "options": "isnet train defaults",
        "wall_seconds": round(time.perf_counter() - t_start),
        "cpus": os.cpu_count(),
    }
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "real_cxr.json").write_text(json.dumps(results, indent=1))

    print(
        f"\n{args.arch}, {args.size} px, {args.epochs} epochs, "
        f"{args.folds}-fold CV on {len(rows)} images of {TRAIN_SET}"
    )
    print("| model | CV AUROC [95% CI] | CV accuracy | in-lung share | OOD sensitivity [95% CI] | OOD in-lung share |")
    print("|---|---|---|---|---|---|")
    for model in MODELS:
        cv, o = results[model]["cross_validation"], results[model]["out_of_distribution"]
        print(
            f"| {model} | {cv['auroc']:.3f} [{cv['auroc_ci95'][0]:.3f}, {cv['auroc_ci95'][1]:.3f}] | "
            f"{cv['accuracy']:.3f} | "
            f"{cv['inside_mask_share']:.3f} | {o['sensitivity']:.3f} [{o['sensitivity_ci95'][0]:.3f}, "
            f"{o['sensitivity_ci95'][1]:.3f}] ({o['covid19']} COVID-19) | {o['inside_mask_share']:.3f} |"
        )
    d = results["isnet_minus_standard_auroc"]
    print(
        f"\nAUROC difference ISNet - standard: {d['difference']:+.3f} "
        f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], p = {d['p_value']:.3f}"
    )
    print(f"wall time {time.perf_counter() - t_start:.0f} s, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
