"""The segmenter-then-classifier pipeline (`isnet train --variant masked`), the baseline an ISNet replaces.

One module, one graph: x (B, C, S, S) preprocessed by the classifier's contract ->
  1. the segmenter sees x's first channel resized (bilinear) to its own input size s; its lung
     probability is resized back to S and thresholded at 0.5 (mask M);
  2. the classifier sees x ⊙ M + air ⊙ (1 − M): the background replaced by air (the contract's low value).
Both contracts must letterbox (or stretch) alike, so that the same pixel of the radiograph is at the same
relative place at both sizes. The segmenter's clean-up of `isnet segment` (two largest components, holes
filled) is not in the graph: it is not a tensor operation ONNX runs, and the classifier was trained on
masks of the same kind.

The segmenter network (a U-Net, or an ensemble of U-Nets) is built here (not in `isnet_cli.segment`)
because inference and training, below the segment commands, rebuild a pipeline from a checkpoint.
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


def build_segmenter(record: dict[str, Any], out_channels: int = 2) -> nn.Module:
    """The segmenter network a checkpoint's metadata (or a pipeline's `segmenter` record) describes: one
    U-Net (`unet`) or an ensemble of U-Nets (`ensemble`, see `SegmenterEnsemble`)."""
    if "ensemble" in record:
        members = record["ensemble"]
        nets = [build_unet(m["unet"], out_channels=out_channels) for m in members]
        return SegmenterEnsemble(nets, [int(m["input_size"]) for m in members], int(record["contract"]["size"]))
    return build_unet(record["unet"], out_channels=out_channels)


def segmenter_arch(meta: dict[str, Any]) -> dict[str, Any]:
    """The keys of a segmenter's metadata that `build_segmenter` rebuilds it from (besides the contract)."""
    return {key: meta[key] for key in ("unet", "ensemble") if key in meta}


def _channel_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 written out: the same values, but onnxruntime runs these elementwise ops several
    times faster than its Softmax on a non-last axis of an image (measured: 38 ms of a 212 ms ensemble)."""
    shifted = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    return shifted / shifted.sum(dim=1, keepdim=True)


class SegmenterEnsemble(nn.Module):
    """Several segmenters as one: the mean of their class probabilities, returned as log-probabilities
    (softmax of the output = the mean; argmax and the 0.5 threshold act on the mean).

    The input is at the largest member's size S. A member trained at a smaller size s (S a multiple of s)
    sees the input averaged over (S/s) x (S/s) blocks, which is its own letterbox at s to within resampling
    (both letterboxes keep the aspect and pad alike), and its probabilities are resized back to S
    (bilinear). Averaging independently trained networks usually scores better than its members
    (Lakshminarayanan et al. 2017, "Simple and scalable predictive uncertainty estimation using deep
    ensembles"); a coarse and a fine input size err in different places (the bundled lung segmenter:
    held-out Dice 0.951 against 0.944 and 0.949 for its 128 px and 256 px members).
    """

    def __init__(self, members: list[nn.Module], input_sizes: list[int], size: int) -> None:
        super().__init__()
        if len(members) != len(input_sizes) or not members:
            raise ValueError("one input size per member, at least one member")
        bad = [s for s in input_sizes if s <= 0 or size % s]
        if bad:
            raise ValueError(f"member input sizes {bad} do not divide the ensemble's input size {size}")
        self.members = nn.ModuleList(members)
        self.input_sizes = [int(s) for s in input_sizes]
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for member, member_size in zip(self.members, self.input_sizes, strict=True):
            factor = self.size // member_size
            inp = nn.functional.avg_pool2d(x, factor) if factor > 1 else x
            prob = _channel_softmax(member(inp).float())
            if factor > 1:
                prob = nn.functional.interpolate(prob, scale_factor=factor, mode="bilinear", align_corners=False)
            total = prob if total is None else total + prob
        mean = total / len(self.members)
        return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


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
        lung = _channel_softmax(self.segmenter(small).float())[:, 1:2]
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
