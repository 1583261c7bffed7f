"""The segmenter-then-classifier pipeline (`isnet train --variant masked`), the baseline an ISNet replaces.

One module, one graph: x (B, C, S, S) preprocessed by the classifier's contract ->
  1. the segmenter sees x's first channel resized (bilinear) to its own input size s; its lung
     probability is resized back to S and thresholded at 0.5 (mask M);
  2. the classifier sees x ⊙ M + air ⊙ (1 − M): the background replaced by air (the contract's low value).
Both contracts must letterbox (or stretch) alike, so that the same pixel of the radiograph is at the same
relative place at both sizes. The segmenter's clean-up of `isnet segment` (two largest components, holes
filled) is not in the graph: it is not a tensor operation ONNX runs, and the classifier was trained on
masks of the same kind.

The U-Net is built here (not in `isnet_cli.segment`) because inference and training, below the segment
commands, rebuild a pipeline from a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LUNG_THRESHOLD = 0.5


def build_unet(unet: dict[str, Any], in_channels: int = 1, out_channels: int = 2) -> nn.Module:
    """MONAI 2-D UNet with the recorded `channels`, `strides`, `num_res_units`."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(unet["channels"]),
        strides=tuple(unet["strides"]),
        num_res_units=int(unet["num_res_units"]),
    )


class MaskedPipeline(nn.Module):
    """`x -> classifier(x ⊙ M + air ⊙ (1 − M))`, M the segmenter's thresholded lung mask at x's size."""

    def __init__(self, classifier: nn.Module, segmenter: nn.Module, segmenter_size: int, air: float) -> None:
        super().__init__()
        self.classifier = classifier
        self.segmenter = segmenter
        self.segmenter_size = int(segmenter_size)
        self.air = float(air)

    def lung_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) float mask, 1 = lung."""
        size = self.segmenter_size
        small = nn.functional.interpolate(x[:, :1], size=(size, size), mode="bilinear", align_corners=False)
        lung = torch.softmax(self.segmenter(small).float(), dim=1)[:, 1:2]
        lung = nn.functional.interpolate(lung, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return (lung > LUNG_THRESHOLD).to(x.dtype)

    def apply_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The background (mask 0) replaced by air."""
        return x * mask + self.air * (1.0 - mask)

    def masked_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier sees."""
        return self.apply_mask(x, self.lung_mask(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.masked_input(x))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
