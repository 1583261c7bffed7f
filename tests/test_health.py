"""Training health: the end-of-run verdict, the per-epoch `health` column and the per-step diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from isnet_cli.backbones import build_model
from isnet_cli.objective.objective import Objective
from isnet_cli.train.config import TrainConfig
from isnet_cli.train.health import CHANCE_AUROC, assess, epoch_status, gradient_split


def _row(auroc: float | None, accuracy: float, ce: float) -> dict[str, object]:
    return {"val_auroc": auroc, "val_accuracy": accuracy, "train_ce": ce}


@pytest.mark.parametrize(
    ("row", "heat", "expected"),
    [
        (_row(0.95, 0.9, 0.2), True, "ok"),
        (_row(0.52, 0.5, 0.69), True, "chance"),
        (_row(CHANCE_AUROC - 0.01, 0.58, 0.4), False, "chance"),
        (_row(None, 0.52, 0.3), True, "chance"),  # no AUROC (one class in validation): majority 0.5 + margin
        (_row(None, 0.8, 0.3), True, "ok"),
        (_row(0.7, 0.65, 0.67), True, "ce-stalled"),  # separates a little, CE still near ln 2 = 0.693
        (_row(0.7, 0.65, 0.67), False, "ok"),  # a plain run is not judged by its CE
    ],
)
def test_epoch_status(row: dict[str, object], heat: bool, expected: str) -> None:
    assert epoch_status(row, 0.5, 2, heat) == expected


def test_assess_reads_the_selected_checkpoint_and_says_what_to_try() -> None:
    rows = [_row(0.9, 0.85, 0.3), _row(0.5, 0.5, 0.69)]
    assert assess(rows, rows[0], 0.5, 2, True).ok
    verdict = assess(rows, None, 0.5, 2, True)  # no selection: the last epoch
    assert verdict.status == "chance"
    assert "degenerate optimum" in verdict.message and "--ramp" in verdict.message
    stalled = assess([_row(0.7, 0.6, 0.68)], None, 0.5, 2, True)
    assert stalled.status == "ce-stalled" and f"{math.log(2):.3f}" in stalled.message
    assert assess([], None, 0.5, 2, True).ok


def test_gradient_split_matches_separately_computed_terms() -> None:
    """The CE part and the heatmap part of steps.csv equal the norms of each term's own gradient."""
    torch.manual_seed(0)
    model = build_model("tinyresnet", 2, in_channels=1)
    cfg = TrainConfig(data="x", variant="selective", P=0.7)
    objective = Objective(cfg.objective_settings(), model, torch.device("cpu"), (1.0, 25.0))
    x = torch.rand(4, 1, 32, 32)
    mask = torch.zeros(4, 1, 32, 32)
    mask[..., 8:24, 6:26] = 1
    y = torch.tensor([0, 1, 0, 1])
    params = [p for p in model.parameters() if p.requires_grad]

    out = objective(x, mask, y)
    heat = (out.loss - (1 - cfg.P) * out.ce) / cfg.P
    ce_only = torch.autograd.grad(out.ce, params, retain_graph=True, allow_unused=True)
    heat_only = torch.autograd.grad(cfg.P * heat, params, retain_graph=True, allow_unused=True)
    out.loss.backward()
    ce_norm, heat_norm = gradient_split(model, list(ce_only), 1 - cfg.P)

    def norm(grads: tuple[torch.Tensor | None, ...], scale: float = 1.0) -> float:
        return math.sqrt(sum(float((scale * g).double().pow(2).sum()) for g in grads if g is not None))

    assert ce_norm == pytest.approx(norm(ce_only, 1 - cfg.P), rel=1e-6)
    assert heat_norm == pytest.approx(norm(heat_only), rel=1e-4)
    assert heat_norm > 0 and ce_norm > 0
