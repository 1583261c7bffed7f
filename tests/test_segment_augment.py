"""Synthetic consolidations for segmenter training (`isnet_cli.segment.augment`)."""

from __future__ import annotations

import torch

from isnet_cli.segment.augment import implant_opacities


def _chest(batch: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark lungs (0.2) in tissue (0.8): two rectangles, 1 = lung in the mask."""
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, 6:26, 4:14] = 1
    mask[:, :, 6:26, 18:28] = 1
    return 0.8 - 0.6 * mask, mask


def test_p_zero_returns_an_equal_copy() -> None:
    x, mask = _chest(4)
    out = implant_opacities(x, mask, 0.0)
    assert torch.equal(out, x)
    assert out is not x


def test_opacities_brighten_the_lungs_only_up_to_tissue_and_leave_the_rest_alone() -> None:
    x, mask = _chest(16)
    before = x.clone()
    out = implant_opacities(x, mask, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(x, before)  # the input is not changed in place
    gain = out - x
    lung = mask.bool()
    assert torch.all(gain >= 0)
    assert torch.all(out <= 0.8 + 1e-6)  # never brighter than the image's soft tissue (its 90th percentile)
    assert torch.all(gain[~lung] == 0)  # tissue is already at the tissue level: nothing to pull
    per_image = (gain * mask).amax(dim=(1, 2, 3))
    # every image gets an opacity; its peak is a * (0.8 - 0.2) with a in [0.4, 0.9]
    assert torch.all(per_image >= 0.4 * 0.6 - 1e-6) and torch.all(per_image <= 0.9 * 0.6 + 1e-6)


def test_about_a_share_p_of_the_images_get_opacities_and_a_seed_repeats_them() -> None:
    x, mask = _chest(400, size=16)
    mask[:, :, 3:13, 2:7] = 1
    x = 0.8 - 0.6 * mask
    out = implant_opacities(x, mask, 0.5, torch.Generator().manual_seed(1))
    changed = ((out - x).abs().amax(dim=(1, 2, 3)) > 0).float().mean()
    assert 0.4 < float(changed) < 0.6
    again = implant_opacities(x, mask, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_an_image_without_lungs_is_left_alone() -> None:
    x = torch.full((2, 1, 16, 16), 0.5)
    out = implant_opacities(x, torch.zeros(2, 1, 16, 16), 1.0)
    assert torch.equal(out, x)
