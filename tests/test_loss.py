"""The ISNet heatmap loss against hand-computed values (spec §4)."""

from __future__ import annotations

import math

import pytest
import torch

from isnet_cli.errors import InputError
from isnet_cli.objective.loss import foreground_band, gwrp, heatmap_loss, resize_mask, rrr_penalty
from isnet_cli.objective.settings import HeatmapLossParams
from isnet_cli.objective.tuning import Welford, cut_from_stats, parse_cut


def _mask(b: int = 2, size: int = 8) -> torch.Tensor:
    m = torch.zeros(b, 1, size, size)
    m[:, :, 2:6, 2:6] = 1
    return m


def test_gwrp_d0_is_max_d1_is_mean_and_general_d_matches_the_formula() -> None:
    torch.manual_seed(0)
    v = torch.rand(3, 50)
    assert torch.allclose(gwrp(v, 0.0), v.max(dim=1).values)
    assert torch.allclose(gwrp(v, 1.0), v.mean(dim=1))
    d = 0.9
    s = v.sort(dim=1, descending=True).values
    w = d ** torch.arange(50, dtype=torch.float64)
    expected = (s.double() * w).sum(1) / w.sum()
    assert torch.allclose(gwrp(v, d).double(), expected, rtol=1e-6)
    # a long vector uses the truncated top-k path: still the full formula to fp32 precision
    long = torch.rand(2, 5000)
    s = long.sort(dim=1, descending=True).values.double()
    w = 0.9 ** torch.arange(5000, dtype=torch.float64)
    assert torch.allclose(gwrp(long, 0.9).double(), (s * w).sum(1) / w.sum(), rtol=1e-6)


def test_relevance_entirely_inside_the_mask_gives_zero_background_loss() -> None:
    m = _mask()
    r = torch.randn(2, 1, 8, 8) * m
    out = heatmap_loss(r, m, HeatmapLossParams(d=0.9))
    assert out.background.item() == 0.0
    assert torch.allclose(out.share_inside, torch.ones(2))


def test_background_term_is_log1p_of_gwrp_of_normalised_relevance() -> None:
    m = _mask(b=1)
    r = torch.zeros(1, 1, 8, 8)
    r[..., 2:6, 2:6] = 2.0  # foreground mean |R| = 2
    r[0, 0, 0, 0] = -6.0  # one background pixel, |R| = 6 -> normalised 3
    out = heatmap_loss(r, m, HeatmapLossParams(d=0.0, E=1.0))  # d = 0: the max, g = 3
    assert out.background.item() == pytest.approx(math.log(1 + 3.0), rel=1e-6)
    out = heatmap_loss(r, m, HeatmapLossParams(d=1.0, E=2.0))  # d = 1: mean over all 64 positions
    assert out.background.item() == pytest.approx(math.log(1 + (3.0 / 64) / 2.0), rel=1e-5)


def test_background_loss_is_capped_for_an_empty_foreground() -> None:
    r = torch.ones(1, 1, 8, 8)
    out = heatmap_loss(r, torch.zeros(1, 1, 8, 8), HeatmapLossParams(d=0.0))
    cap = 1.0 - torch.tensor(1.0 - 1e-7).item()  # the reference's 1 - 1e-7 cap, as rounded in fp32
    assert out.background.item() == pytest.approx(-math.log(cap), rel=1e-4)


@pytest.mark.parametrize(
    ("mass", "expected"),
    [
        (0.5, (0.5 - 1) ** 2),  # below C1: (F/C1 - 1)^2
        (1.0, 0.0),  # at C1: zero
        (10.0, 0.0),  # inside the band
        (20.0, 0.0),  # at C2
        (20.5, ((20.5 - 20.0) / 1.0) ** 2),  # between C2 and C1 + C2: quadratic in units of C1
        (21.0, 1.0),  # the junction C1 + C2: both forms give 1
        (31.0, 31.0 - 21.0 + 1.0),  # above C1 + C2: linear in raw F units
    ],
)
def test_foreground_band_hybrid_values(mass: float, expected: float) -> None:
    low, high = foreground_band(torch.tensor([mass]), 1.0, 20.0)
    assert (low + high).item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_foreground_band_scales_with_c1() -> None:
    c1, c2 = 2.0, 10.0  # junction at C1 + C2 = 12
    low, high = foreground_band(torch.tensor([0.5, 11.0, 14.0]), c1, c2)
    assert low.tolist() == pytest.approx([(0.25 - 1) ** 2, 0.0, 0.0])
    assert high.tolist() == pytest.approx([0.0, (11 / 2 - 10 / 2) ** 2, 14 - 12 + 1])


def test_loss_combines_parts_with_weights_and_multiple_maps() -> None:
    torch.manual_seed(1)
    m = _mask(b=3)
    r = torch.randn(3, 4, 1, 8, 8)  # K' = 4 maps ("original")
    p = HeatmapLossParams(d=0.9, E=1.0, A=2.0, B=0.5, C1=1.0, C2=25.0)
    out = heatmap_loss(r, m, p)
    assert out.total.item() == pytest.approx(2.0 * out.background.item() + 0.5 * out.foreground.item(), rel=1e-6)
    assert out.mass.shape == (3,)
    assert torch.allclose(out.mass, r.abs().sum(dim=(2, 3, 4)).mean(dim=1))


def test_gradients_are_finite_and_nan_inf_are_replaced() -> None:
    torch.manual_seed(2)
    m = _mask()
    r = torch.randn(2, 1, 8, 8, requires_grad=True)
    bad = r.clone()
    with torch.no_grad():
        bad[0, 0, 0, 0] = float("nan")
        bad[1, 0, 0, 1] = float("inf")
        bad[1, 0, 3, 3] = float("-inf")
    for d in (0.0, 0.5, 0.9, 1.0):
        out = heatmap_loss(bad, m, HeatmapLossParams(d=d, C1=0.5, C2=3.0))
        assert torch.isfinite(out.total)
        (grad,) = torch.autograd.grad(out.total, r)
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_loss_is_fp32_under_autocast() -> None:
    m = _mask()
    r = torch.randn(2, 1, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = heatmap_loss(r, m, HeatmapLossParams())
    assert out.total.dtype == torch.float32


def test_mask_is_resized_by_any_overlap_and_must_be_binary() -> None:
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 0, 0] = 1  # one pixel in the top-left 2x2 cell
    small = resize_mask(m, (4, 4))
    assert small[0, 0, 0, 0] == 1 and small.sum() == 1
    out = heatmap_loss(torch.rand(1, 1, 4, 4), m, HeatmapLossParams())
    assert torch.isfinite(out.total)
    with pytest.raises(InputError, match="not binary"):
        heatmap_loss(torch.rand(1, 1, 8, 8), m * 0.5, HeatmapLossParams())


def test_rrr_penalty_only_sees_background_gradients() -> None:
    torch.manual_seed(3)
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    w = torch.randn(2, 64, requires_grad=True)
    logits = x.flatten(1) @ w.T
    m = _mask()
    pen = rrr_penalty(x, logits, m)
    (gx,) = torch.autograd.grad(torch.log_softmax(x.flatten(1) @ w.T, 1).sum(), x)
    assert pen.item() == pytest.approx(((gx * (1 - m)) ** 2).sum(dim=(1, 2, 3)).mean().item(), rel=1e-5)
    (gw,) = torch.autograd.grad(pen, w)
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0


def test_welford_and_cut_formula() -> None:
    values = [1.0, 2.0, 4.0, 8.0, 3.0]
    a, b = Welford(), Welford()
    a.update(values[:2])
    b.update(values[2:])
    merged = a.merge(b)
    t = torch.tensor(values, dtype=torch.float64)
    assert merged.mean == pytest.approx(t.mean().item())
    assert merged.std == pytest.approx(t.std().item())
    c1, c2 = cut_from_stats(10.0, 1.0)  # mu - 3 sigma = 7 > mu/5 = 2; C2 = min(175, 13)
    assert (c1, c2) == (pytest.approx(7.0), pytest.approx(13.0))
    c1, c2 = cut_from_stats(10.0, 5.0)  # mu/5 = 2 > -5; C2 = min(50, 25)
    assert (c1, c2) == (pytest.approx(2.0), pytest.approx(25.0))
    assert parse_cut("auto") is None
    assert parse_cut("1,25") == (1.0, 25.0)
    with pytest.raises(ValueError):
        parse_cut("5,1")


def test_original_variant_loss_is_the_mean_of_the_per_class_losses() -> None:
    """`--variant original` explains every class in one pass: its loss is (1-P)·CE + P·mean_k ℓ(R_k, M), with
    R_k the LRP heatmap of class k computed on its own, as the reference's original ISNet."""
    import torch.nn.functional as F

    from isnet_cli.backbones import build_model
    from isnet_cli.lrp import LRP
    from isnet_cli.objective.objective import Objective
    from isnet_cli.train.config import TrainConfig

    torch.manual_seed(0)
    model = build_model("tinycnn", 3).eval()
    x = torch.rand(4, 1, 32, 32)
    mask = torch.zeros(4, 1, 32, 32)
    mask[..., 6:26, 4:28] = 1
    y = torch.tensor([0, 1, 2, 1])
    cfg = TrainConfig(variant="original", P=0.7, A=2.0, B=0.5)
    out = Objective(cfg.objective_settings(), model, torch.device("cpu"), (0.5, 12.0))(x, mask, y)

    params = HeatmapLossParams(d=cfg.d, E=cfg.E, A=2.0, B=0.5, C1=0.5, C2=12.0)
    lrp = LRP(model, epsilon=cfg.eps, low=0.0, high=1.0)
    per_class = [heatmap_loss(lrp(x, k), mask, params).total for k in range(3)]
    ce = F.cross_entropy(model(x), y)
    expected = (1 - cfg.P) * ce + cfg.P * torch.stack(per_class).mean()
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.loss, expected)
