"""Background swap: a training augmentation that gives an image the background of another.

For a batch x (B, C, H, W) with lung masks M and a partner π(i) drawn uniformly from the whole batch
(itself included), a chosen sample becomes

    x'_i = x_i ⊙ M_i + (1 − M_i) ⊙ (x_π(i) ⊙ (1 − M_π(i)) + f ⊙ M_π(i)),

its own lungs in the partner's background; where the partner's lungs fall in our background they are
filled with f, the mean background intensity of the batch, per channel (the formula of `isnet audit`'s
background swap; a colour background is filled with its mean colour). Each sample is swapped with
probability `p`; its label is kept. The partner is drawn with replacement and may be the sample itself
(which leaves it unchanged): the class of the background's owner then follows the batch's class
frequencies whatever the sample's own class, so the background carries no information about the label.
Excluding itself would make a background from the same class rarer than from another, a small
anti-correlation (1/(B-1)) a model can learn (measured: on the flipped phantoms, accuracy up to 7 points
above that on clean ones).

Why an ISNet needs it: LRP (like every attribution of the active path) gives no relevance to a unit
that a background feature switches *off*. A network trained on data whose background marker goes with
the label can therefore satisfy the heatmap loss, keeping almost all its relevance in the lungs, and
still decide by the marker through such a veto (measured: 90 % of |R| in the lungs and 0 % accuracy
once the marker is flipped; `benchmarks/convergence.py`). Swapping backgrounds within the batch breaks
the correlation between background and label that the veto needs, using the masks the ISNet already
requires; the heatmap loss keeps the evidence the model does show inside the lungs.
"""

from __future__ import annotations

import torch


def swap_backgrounds(x: torch.Tensor, mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """x with the background of each sample replaced, with probability `p`, by a random partner's."""
    b = x.shape[0]
    if p <= 0 or b < 2:
        return x
    device = x.device
    chosen = (torch.rand(b, generator=generator) < p).to(device)
    partner = torch.randint(0, b, (b,), generator=generator).to(device)
    m = mask.to(x.dtype)
    background = 1.0 - m
    dims = (0, 2, 3)  # per channel: the mean background colour of the batch
    fill = (x * background).sum(dims, keepdim=True) / background.expand_as(x).sum(dims, keepdim=True).clamp(min=1.0)
    other, other_m = x[partner], m[partner]
    swapped = x * m + background * (other * (1.0 - other_m) + fill * other_m)
    return torch.where(chosen.view(b, 1, 1, 1), swapped, x)
