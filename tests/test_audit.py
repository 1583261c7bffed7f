"""`isnet audit`: the counterfactuals do what they say, and the audit tells a shortcut model from an ISNet."""

from __future__ import annotations

import json

import numpy as np
import pytest

from isnet_cli.report import audit, counterfactuals
from tests.tiny_models import isnet


def test_perturbations_keep_what_they_promise():
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 16, 16)).astype(np.float32)
    m = np.zeros((2, 1, 16, 16), np.float32)
    m[:, :, 4:12, 3:8] = 1.0
    m[1, :, 4:12, 9:14] = 1.0
    fills = {"background": 0.25, "lungs": 0.6}
    lungs, bg = m == 1, m == 0
    for kind in ("background_mean", "background_blur"):
        out = counterfactuals.perturb(kind, x, m, fills, 2.0)
        assert np.array_equal(out[lungs], x[lungs]) and not np.allclose(out[bg], x[bg])
    assert np.all(counterfactuals.perturb("background_mean", x, m, fills, 2.0)[bg] == 0.25)
    hidden = counterfactuals.perturb("lungs_hidden", x, m, fills, 2.0)
    assert np.all(hidden[lungs] == 0.6) and np.array_equal(hidden[bg], x[bg])
    swap = counterfactuals.perturb("background_swap", x[:1], m[:1], fills, 2.0, x[1:], m[1:])
    keep = bg[:1] & (m[1:] == 0)  # our background that is background in the partner too
    assert np.array_equal(swap[lungs[:1]], x[:1][lungs[:1]]) and np.array_equal(swap[keep], x[1:][keep])
    assert np.all(swap[bg[:1] & (m[1:] == 1)] == 0.25)  # partner's lungs never leak into our background
    blurred = counterfactuals.blur(np.ones((1, 1, 8, 8), np.float32), 2.0)
    assert np.allclose(blurred, 1.0)  # a normalised kernel keeps a constant image


def test_swap_partners_and_verdict():
    groups = np.array([0, 0, 1, 1, 1])
    partners = counterfactuals.swap_partners(groups)
    assert all(groups[p] != g for p, g in zip(partners, groups, strict=True))
    assert (counterfactuals.swap_partners(np.zeros(3, int)) == -1).all()
    assert audit.verdict(0.9, 0.05).startswith("looks at the lungs")
    assert audit.verdict(0.2, 0.05).startswith("uses the background")
    assert audit.verdict(0.9, 0.6).startswith("uses the background")
    assert audit.verdict(0.6, 0.15).startswith("mixed")
    assert "0.7" in audit.verdict(0.9, 0.05)  # the thresholds are in the line


@pytest.mark.slow
def test_audit_tells_shortcut_from_isnet(shortcut_runs, tmp_path):
    results = {}
    for name in ("baseline", "isnet"):
        out = tmp_path / name
        code, stdout, err = isnet(
            "audit", shortcut_runs.test_biased, "--model", getattr(shortcut_runs, name), "--out", out, "--json"
        )
        assert code == 0, err
        summary = json.loads(stdout)
        assert (out / "audit.json").is_file() and (out / "audit_worst.png").stat().st_size > 0
        assert len(json.loads((out / "audit.json").read_text())["images"]) == summary["n"] == 200
        results[name] = summary
    base, isn = results["baseline"], results["isnet"]
    swap = {k: v["flip_rate"]["background_swap"] for k, v in results.items()}
    share = {k: v["inside_mask_share"]["mean"] for k, v in results.items()}
    # the shortcut model follows the marker to another image's background; the ISNet does not
    assert swap["baseline"] >= 0.5 and swap["baseline"] - swap["isnet"] >= 0.3, swap
    assert share["isnet"] - share["baseline"] >= 0.3 and share["baseline"] < 0.5, share
    assert base["verdict"].startswith("uses the background")
    assert not isn["verdict"].startswith("uses the background"), isn["verdict"]
    # hiding the lungs costs the ISNet its accuracy, not the shortcut model (which never needed them).
    # (Mean-filling or blurring the whole background is out of distribution for both: on these
    # phantoms both fall to chance there, so those flip rates do not separate the two models.)
    drop = {k: v["accuracy"]["original"] - v["accuracy"]["lungs_hidden"] for k, v in results.items()}
    assert drop["isnet"] >= drop["baseline"] + 0.3, drop


def test_a_subset_of_counterfactuals_gives_the_same_rates_as_the_full_audit(tmp_path_factory) -> None:
    from isnet_cli.infer.loading import load_backend
    from isnet_cli.io.manifest import read_dataset
    from tests.tiny_models import shared_tiny_run

    run = shared_tiny_run(tmp_path_factory)
    backend = load_backend(run.checkpoint, device="cpu")
    samples = read_dataset(run.manifest).samples
    audit_set, _, _ = audit.load_audit_set(samples, backend.classes, backend.contract, 8, fail_fast=True)
    full, _ = audit.run_audit(backend, audit_set, 8)
    only_swap, rows = audit.run_audit(backend, audit_set, 8, perturbations=("background_swap",))
    assert set(only_swap["flip_rate"]) == {"background_swap"} and "background_mean" not in rows[0]
    assert only_swap["flip_rate"]["background_swap"] == full["flip_rate"]["background_swap"]
    assert only_swap["inside_mask_share"] == full["inside_mask_share"]
    assert only_swap["verdict"] == full["verdict"]
    assert list(full["accuracy"]) == [
        "original",
        "background_removed",
        "background_blur",
        "background_swap",
        "lungs_hidden",
    ]
    with pytest.raises(ValueError, match="background_swap"):
        audit.run_audit(backend, audit_set, 8, perturbations=("background_blur",))
