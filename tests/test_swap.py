"""Background swap augmentation: lungs kept, background from another image, deterministic per generator."""

from __future__ import annotations

import torch

from isnet_cli.objective.swap import swap_backgrounds


def _batch(b: int = 6, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 1, size, size, generator=g)
    mask = torch.zeros(b, 1, size, size)
    for i in range(b):  # lungs at slightly different places, so partners' lungs fall in our background
        mask[i, :, 4 + i % 3 : 12, 3 : 7 + i % 2] = 1
        mask[i, :, 4 : 12 - i % 2, 9:13] = 1
    return x, mask


def test_every_image_keeps_its_lungs_and_gets_the_background_of_a_batch_image() -> None:
    x, mask = _batch()
    out = swap_backgrounds(x, mask, 1.0, torch.Generator().manual_seed(3))
    bg = 1 - mask
    fill = float((x * bg).sum() / bg.sum())
    assert torch.equal(out * mask, x * mask)
    owners = []
    for i in range(len(x)):
        # whose background did sample i get? exactly one image matches everywhere its background is visible
        matches = [
            j for j in range(len(x)) if torch.allclose(out[i][(bg[i] * bg[j]).bool()], x[j][(bg[i] * bg[j]).bool()])
        ]
        assert len(matches) == 1, (i, matches)
        j = matches[0]
        owners.append(j)
        partner_lungs = (bg[i] * mask[j]).bool()
        assert torch.allclose(out[i][partner_lungs], torch.full_like(out[i][partner_lungs], fill))
    assert owners != list(range(len(x)))  # not the identity


def test_the_owner_of_the_background_does_not_depend_on_the_label() -> None:
    """Partners are drawn from the whole batch, itself included: P(owner in class 1 | own class) is the
    batch's class share for both classes (excluding itself would give 7/15 against 8/15 in a batch of 16)."""
    labels = torch.tensor([0, 1] * 8)
    x = labels.float().view(16, 1, 1, 1).expand(16, 1, 4, 4).clone()  # the background value tells its owner
    mask = torch.zeros(16, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    same, trials = torch.zeros(2), 4000
    for _ in range(trials):
        out = swap_backgrounds(x, mask, 1.0, g)
        owner = out[:, 0, 0, 0].round().long()
        for c in (0, 1):
            same[c] += float((owner[labels == c] == 1).float().mean())
    share = same / trials
    assert abs(share[0] - 0.5) < 0.01 and abs(share[1] - 0.5) < 0.01, share


def test_probability_zero_is_the_identity_and_the_generator_fixes_the_result() -> None:
    x, mask = _batch()
    assert torch.equal(swap_backgrounds(x, mask, 0.0, torch.Generator().manual_seed(0)), x)
    a = swap_backgrounds(x, mask, 0.5, torch.Generator().manual_seed(7))
    b = swap_backgrounds(x, mask, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    swapped = [not torch.equal(a[i], x[i]) for i in range(len(x))]
    assert 0 < sum(swapped) < len(x)  # p = 0.5 over six images, this seed: some but not all


def test_a_batch_of_one_is_left_alone() -> None:
    x, mask = _batch(b=1)
    assert torch.equal(swap_backgrounds(x, mask, 1.0, torch.Generator().manual_seed(0)), x)
