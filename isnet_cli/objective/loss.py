"""The ISNet heatmap loss (the reference's current `LRPLossCEValleysGWRP`), the RRR penalty and the total.

For a relevance tensor R of shape (B, K', C, H, W) (K' maps per sample) and a binary mask M:

- A = |R|; Â = A / (mean_fg(A) + 1e-10) per sample and map, mean_fg(A) = Σ(A·M) / (ΣM + 1e-10) over C·H·W;
- background: g = GWRP_d(Â·(1-M)) over H·W, ℓ_bg = -log(1 - min(g/(g+E), 1-1e-7)) = log(1 + g/E) (capped),
  averaged over channels and maps;
- foreground band on the un-normalised mass F = Σ_{C,H,W} A·M with bounds C1 < C2 ('hybrid' form):
  ℓ_F1 = (min(F/C1, 1) - 1)², ℓ_F2 = (max(F/C1, C2/C1) - C2/C1)² for F ≤ C1+C2, else F - (C1+C2) + 1;
  ℓ_fg = mean_K'(ℓ_F1) + mean_K'(ℓ_F2);
- per sample ℓ = A_w·ℓ_bg + B_w·ℓ_fg, averaged over the batch; total = (1-P)·CE + P·ℓ.

Everything here runs in fp32 with autocast disabled (relevance values span many orders of magnitude).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from isnet_cli.errors import InputError
from isnet_cli.objective.settings import HeatmapLossParams

# The reference caps the background activation b at 1 - 1e-7, so ℓ_bg <= -log(1e-7) ≈ 16.1.
_B_CAP = 1.0 - 1e-7
_NORM_EPS = 1e-10
# Positions whose GWRP weight d^i falls below this (relative to d^0 = 1) cannot change an fp32 sum.
_GWRP_TAIL = 1e-9


@dataclass
class HeatmapLoss:
    """Batch means of the heatmap loss and its parts, plus per-sample diagnostics (detached)."""

    total: Tensor
    background: Tensor
    foreground: Tensor
    share_inside: Tensor  # (B,) Σ|R|·M / Σ|R|: fraction of the absolute relevance inside the mask
    mass: Tensor  # (B,) mean over maps of Σ|R| over the whole map (the C1/C2 tuning statistic)


def as_maps(relevance: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 1, C, H, W); (B, K, C, H, W) unchanged."""
    if relevance.dim() == 4:
        return relevance.unsqueeze(1)
    if relevance.dim() != 5:
        raise ValueError(f"relevance must be (B, C, H, W) or (B, K, C, H, W), got {tuple(relevance.shape)}")
    return relevance


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask (B, 1|C, H, W) at `size`: adaptive average pooling, then any non-zero cell is foreground."""
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return (F.adaptive_avg_pool2d(mask, size) > 0).float()


def check_binary(mask: Tensor) -> None:
    """The loss needs an exactly binary mask (as the reference): anything else is a data error."""
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError(None, "mask is not binary (values other than 0 and 1)", "binarise the masks")


def sanitize(relevance: Tensor, mask: Tensor) -> Tensor:
    """NaN -> the mean of the finite foreground relevance; ±Inf -> the finite max / min (reference)."""
    finite = torch.isfinite(relevance)
    if bool(finite.all()):
        return relevance
    values = relevance.detach()[finite]
    if values.numel() == 0:
        return torch.zeros_like(relevance)
    fg = (relevance.detach() * mask)[finite & (mask.expand_as(relevance) > 0)]
    nan = float(fg.mean()) if fg.numel() else 0.0
    return torch.nan_to_num(relevance, nan=nan, posinf=float(values.max()), neginf=float(values.min()))


def gwrp(values: Tensor, d: float) -> Tensor:
    """Global weighted ranked pooling over the last dimension.

    g = Σ_i d^i · v_(i) / Σ_i d^i with v sorted in descending order and i over *all* N positions;
    d = 0 is the max (0^0 = 1), d = 1 the mean. Only the top positions whose weight can matter in fp32
    are sorted (top-k); the normaliser still counts all N positions, as the reference.
    """
    n = values.shape[-1]
    if d >= 1.0:
        return values.mean(dim=-1)
    if d <= 0.0:
        return values.amax(dim=-1)
    k = min(n, math.ceil(math.log(_GWRP_TAIL) / math.log(d)) + 1)
    top = values.topk(k, dim=-1, sorted=True).values
    weights = d ** torch.arange(k, device=values.device, dtype=values.dtype)
    norm = (1.0 - d**n) / (1.0 - d)
    return (top * weights).sum(dim=-1) / norm


def foreground_band(mass: Tensor, c1: float, c2: float) -> tuple[Tensor, Tensor]:
    """'Hybrid' foreground terms per map: (ℓ_F1, ℓ_F2) of the module docstring (the branch uses detached F)."""
    ratio = mass / c1
    low = (torch.clamp(ratio, max=1.0) - 1.0) ** 2
    quadratic = (torch.clamp(ratio, min=c2 / c1) - c2 / c1) ** 2
    linear = mass - (c1 + c2) + 1.0
    high = torch.where(mass.detach() <= c1 + c2, quadratic, linear)
    return low, high


def heatmap_loss(relevance: Tensor, mask: Tensor, params: HeatmapLossParams) -> HeatmapLoss:
    """The ISNet heatmap loss of the module docstring for R (B, [K,] C, H, W) and M (B, 1|C, H', W')."""
    with torch.autocast(device_type=relevance.device.type, enabled=False):
        maps = as_maps(relevance).float()
        b, k, c, h, w = maps.shape
        m = resize_mask(mask, (h, w))
        check_binary(m)
        m = m.reshape(b, 1, m.shape[1], h, w)
        maps = sanitize(maps, m)
        a = maps.abs()
        fg_mass = (a * m).sum(dim=(2, 3, 4))  # (B, K') un-normalised foreground mass F
        fg_count = m.expand(b, k, c, h, w).sum(dim=(2, 3, 4))
        fg_mean = fg_mass / (fg_count + _NORM_EPS)
        normalised = a / (fg_mean[..., None, None, None] + _NORM_EPS)
        background = (normalised * (1.0 - m)).reshape(b, k, c, h * w)
        g = gwrp(background, params.d)  # (B, K', C)
        act = torch.clamp(g / (g + params.E), max=_B_CAP)
        l_bg = (-torch.log1p(-act)).mean(dim=(1, 2))
        low, high = foreground_band(fg_mass, params.C1, params.C2)
        l_fg = low.mean(dim=1) + high.mean(dim=1)
        per_sample = params.A * l_bg + params.B * l_fg
        total_mass = a.sum(dim=(2, 3, 4))
        share = (fg_mass / (total_mass + _NORM_EPS)).mean(dim=1)
        return HeatmapLoss(
            total=per_sample.mean(),
            background=l_bg.mean(),
            foreground=l_fg.mean(),
            share_inside=share.detach(),
            mass=total_mass.mean(dim=1).detach(),
        )


def rrr_penalty(inputs: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """Right for the Right Reasons: mean_b Σ_{background} (∂ Σ_k log softmax(z)_k / ∂x)².

    `inputs` must require grad and `logits` depend on it; the gradient is taken with create_graph so
    the penalty trains the weights (a double backward).
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logp = F.log_softmax(logits.float(), dim=1).sum()
        (grad,) = torch.autograd.grad(logp, inputs, create_graph=True)
        m = resize_mask(mask, tuple(grad.shape[-2:]))
        return ((grad.float() * (1.0 - m)) ** 2).sum(dim=(1, 2, 3)).mean()


def total_loss(ce: Tensor, heat: Tensor, P: float) -> Tensor:
    """ISNet objective: (1 - P)·CE + P·heatmap loss."""
    return (1.0 - P) * ce + P * heat
