"""Synthetic consolidations for segmenter training: opaque lung is still lung.

A lung segmenter trained on mostly aerated lungs learns "lung = dark inside the thorax" and cuts dense
opacities (pneumonia, effusion, a mass) out of its mask, most of all at the lung border. A classifier
trained on such masks (`isnet train --masks auto`, `--variant masked`) is then told that the lesion is
background. This augmentation shows the segmenter opaque lungs whose target mask stays the whole lung.

Per training image, with probability p, k ~ U{1, 2} opacities, each a Gaussian g_k(u) = exp(-|u - c_k|² /
(2σ_k²)) centred on a random pixel c_k of the image's lung mask, σ_k ~ U(0.03, 0.10)·S (S the image side),
of strength a_k ~ U(0.4, 0.9); they pull the pixels towards the soft-tissue level t of the image:

    x' = x + w · max(t - x, 0),   w = max_k a_k g_k,   t = the 90th percentile of x

so an opacity brightens aerated lung up to (never beyond) the brightness of the heart and chest wall,
fading smoothly into its surroundings with no edge at the mask border (an edge there would tell the
segmenter where the border is). The mask is not changed.
"""

from __future__ import annotations

import torch

TISSUE_QUANTILE = 0.9
SIGMA_RANGE = (0.03, 0.10)  # fraction of the image side
STRENGTH_RANGE = (0.4, 0.9)
MAX_OPACITIES = 2


def _uniform(bounds: tuple[float, float], generator: torch.Generator | None) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand((), generator=generator))


def implant_opacities(
    x: torch.Tensor, mask: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A batch (B, C, H, W) with synthetic opacities inside the lungs of about a fraction `p` of its images
    (see the module docstring); `mask` (B, 1, H, W), 1 = lung. Returns a new tensor; `x` is not changed."""
    out = x.clone()
    if p <= 0:
        return out
    h, w = x.shape[-2:]
    yy = torch.arange(h, dtype=x.dtype, device=x.device).view(h, 1)
    xx = torch.arange(w, dtype=x.dtype, device=x.device).view(1, w)
    for i in range(x.shape[0]):
        lung = mask[i, 0].nonzero()
        if float(torch.rand((), generator=generator)) >= p or len(lung) == 0:
            continue
        tissue = torch.quantile(x[i].flatten().float(), TISSUE_QUANTILE).to(x.dtype)
        weight = torch.zeros((h, w), dtype=x.dtype, device=x.device)
        for _ in range(int(torch.randint(1, MAX_OPACITIES + 1, (), generator=generator))):
            cy, cx = lung[int(torch.randint(len(lung), (), generator=generator))].tolist()
            sigma = _uniform(SIGMA_RANGE, generator) * max(h, w)
            g = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
            weight = torch.maximum(weight, _uniform(STRENGTH_RANGE, generator) * g)
        out[i] = x[i] + weight * (tissue - x[i]).clamp(min=0)
    return out
