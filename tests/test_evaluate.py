"""`isnet evaluate`: metrics equal scikit-learn's on known predictions, CIs, report.json, --compare."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from isnet_cli.infer.predict import softmax
from isnet_cli.report import evaluate as ev
from isnet_cli.report import metrics
from tests.tiny_models import isnet, shared_tiny_run


def known_scored(k: int, n: int = 150, seed: int = 1) -> ev.Scored:
    """Labels and probabilities with ties (rounded logits), a known set of predictions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.2
    probs = softmax(np.round(logits, 1))
    nan = np.full(n, np.nan)
    return ev.Scored(files=[f"f{i}" for i in range(n)], y=y, probs=probs, share_pos=nan, share_abs=nan)


@pytest.mark.parametrize("k", [2, 3])
def test_metrics_equal_scikit_learn(k):
    scored = known_scored(k)
    y, probs = scored.y, scored.probs
    classes = [f"c{i}" for i in range(k)]
    report = ev.build_report(scored, classes)
    pred = probs.argmax(axis=1)
    labels = list(range(k))
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert report["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", labels=labels), abs=1e-12)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for c, name in enumerate(classes):
        row = report["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[c], recall[c], f1[c]))
        assert row["support"] == support[c]
        assert report["auroc"]["per_class"][name]["auroc"] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]))
    expected_auc = skm.roc_auc_score(y, probs[:, 1]) if k == 2 else skm.roc_auc_score(y, probs, multi_class="ovr")
    assert report["auroc"]["macro"] == pytest.approx(expected_auc, abs=1e-12)
    assert report["confusion"]["matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    # every CI contains its point estimate and lies in [0, 1]
    cis = {name: report["ci95"][name] for name in ("accuracy", "balanced_accuracy", "macro_f1")}
    cis["auroc"] = report["auroc"]["ci95"]
    for name, (lo, hi) in cis.items():
        value = report["auroc"]["macro"] if name == "auroc" else report[name]
        assert 0.0 <= lo <= value <= hi <= 1.0, name
        assert hi - lo > 0.01, name  # a real interval on 150 samples
    assert report["ci95"] == ev.build_report(scored, classes)["ci95"]  # fixed seed: reproducible


def test_auroc_by_hand_and_delong_variance():
    # the classic 4-sample example: 3 of the 4 positive-negative pairs are ordered correctly
    y = np.array([0, 0, 1, 1])
    auc, (lo, hi) = metrics.auroc_ci(np.array([0.1, 0.4, 0.35, 0.8]), y == 1)
    assert auc == 0.75 and lo <= auc <= hi
    # DeLong's covariance against its definition with the Heaviside kernel, on tied scores
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    scores = np.round(np.stack([rng.normal(size=40) + y, rng.normal(size=40) + 0.3 * y]), 1)
    aucs, cov = metrics.delong(scores, y == 1)
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    expected = np.cov(v10) / pos.shape[1] + np.cov(v01) / neg.shape[1]
    assert np.allclose(aucs, psi.mean(axis=(1, 2))) and np.allclose(cov, expected)
    # paired test: identical scores give no difference; by hand z = d / sqrt(V_a + V_b - 2 C_ab)
    same = metrics.paired_delong(scores[0], scores[0], y == 1)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0
    test = metrics.paired_delong(scores[0], scores[1], y == 1)
    z = (aucs[0] - aucs[1]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert test["z"] == pytest.approx(z) and test["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))


def test_compare_three_classes_paired():
    a = known_scored(3, seed=2)
    b = ev.Scored(a.files[::-1], a.y[::-1], np.roll(a.probs, 1, axis=1)[::-1], a.share_pos, a.share_abs)
    out = ev.compare_models(a, b, ["x", "y", "z"])  # b lists the same files in another order
    assert out["n"] == len(a.files)
    assert out["auroc_a"] == pytest.approx(metrics.macro_auroc(a.y, a.probs))
    assert out["auroc_b"] == pytest.approx(metrics.macro_auroc(a.y, np.roll(a.probs, 1, axis=1)))
    lo, hi = out["ci95"]
    assert lo <= out["difference"] <= hi and out["difference"] > 0.1 and out["p_value"] < 0.05
    assert out["per_class"]["x"]["test"] == "paired DeLong"


def test_mask_shares_by_hand():
    r = np.zeros((2, 2, 2))
    r[0] = [[3.0, -1.0], [1.0, 0.0]]  # the second map has no relevance at all
    mask = np.array([[[True, True], [False, False]]] * 2)
    pos, absolute = metrics.mask_shares(r, mask)
    assert pos[0] == pytest.approx(3 / 4) and absolute[0] == pytest.approx(4 / 5)
    assert np.isnan(pos[1]) and np.isnan(absolute[1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def test_evaluate_cli_report_matches_predict(tiny, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = isnet(
        "evaluate", tiny.manifest, "--model", tiny.checkpoint, "--out", out, "--json", "--compare", tiny.checkpoint
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert set(report) >= {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "per_class", "confusion"}
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "confusion.png").stat().st_size > 0 and (out / "roc.png").stat().st_size > 0
    # the accuracy is that of the predictions `isnet predict` gives for the same files
    code, stdout, _ = isnet("predict", tiny.manifest, "--model", tiny.checkpoint, "--json")
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert report["accuracy"] == pytest.approx(np.mean([r["predicted"] == r["label"] for r in rows]))
    assert sum(map(sum, report["confusion"]["matrix"])) == report["n"] == 32
    share = report["inside_mask_share"]
    assert share["n"] == 32
    for kind in ("positive", "absolute"):
        assert 0.0 <= share[kind]["mean"] <= 1.0 and 0.0 <= share[kind]["median"] <= 1.0
    assert report["compare"]["difference"] == 0.0 and report["compare"]["test"] == "paired DeLong"


def test_evaluate_rejects_unknown_labels(tiny, tmp_path):
    manifest = tmp_path / "m.csv"
    root = tiny.manifest.parent
    text = tiny.manifest.read_text().replace(",opacity", ",pneumonia")
    manifest.write_text(text.replace("images/", f"{root}/images/").replace("masks/", f"{root}/masks/"))
    code, _, err = isnet("evaluate", manifest, "--model", tiny.checkpoint, "--out", tmp_path / "e")
    assert code == 2 and "pneumonia" in err
