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


# Taps of a stride-2, kernel-3, padding-1 transposed convolution for each output phase (row or column
# parity a) and input offset d (0: the same input row, 1: the next): index into its kernel, or None.
_SUBPIXEL_TAPS = ((1, None), (2, 0))


def subpixel_conv(up: nn.ConvTranspose2d) -> nn.Module:
    """The same function as `up` (kernel 3, stride 2, padding 1, output padding 1, the up-sampling of MONAI's
    U-Net) as a plain convolution + pixel shuffle: zero-pad right/bottom by 1, a 2x2 convolution to 4 x the
    output channels (one group per output phase), then `PixelShuffle(2)`. Output pixel (2i + a, 2j + b)
    of the transposed convolution only sums input rows i (+1) and columns j (+1) with the taps of
    `_SUBPIXEL_TAPS`; onnxruntime runs a Conv + DepthToSpace much faster than its ConvTranspose on CPU."""
    w = up.weight.detach()  # (in, out, 3, 3)
    cin, cout = w.shape[:2]
    weight = torch.zeros(cout, 2, 2, cin, 2, 2, dtype=w.dtype)  # (out, a, b, in, di, dj)
    for a, rows in enumerate(_SUBPIXEL_TAPS):
        for b, cols in enumerate(_SUBPIXEL_TAPS):
            for di, ki in enumerate(rows):
                for dj, kj in enumerate(cols):
                    if ki is not None and kj is not None:
                        weight[:, a, b, :, di, dj] = w[:, :, ki, kj].T
    conv = nn.Conv2d(cin, 4 * cout, 2, bias=up.bias is not None)
    conv.weight.data = weight.reshape(4 * cout, cin, 2, 2)
    if up.bias is not None:
        conv.bias.data = up.bias.detach().repeat_interleave(4)
    return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), conv, nn.PixelShuffle(2))


def _is_unet_upsampling(m: nn.Module) -> bool:
    """A transposed convolution `subpixel_conv` rewrites exactly."""
    return (
        isinstance(m, nn.ConvTranspose2d)
        and m.kernel_size == (3, 3)
        and m.stride == (2, 2)
        and m.padding == (1, 1)
        and m.output_padding == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
    )


def export_form(net: nn.Module) -> nn.Module:
    """A copy of a U-Net with the same function in the layers onnxruntime runs fastest on CPU (for ONNX
    export): each single-slope PReLU as the LeakyReLU of that slope (identical, and one vectorised op
    instead of a broadcast multiply), each stride-2 transposed convolution as `subpixel_conv`."""
    import copy

    out = copy.deepcopy(net).eval()
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.PReLU) and child.weight.numel() == 1:
                setattr(parent, name, nn.LeakyReLU(float(child.weight.detach())))
            elif _is_unet_upsampling(child):
                setattr(parent, name, subpixel_conv(child))
    return out


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
