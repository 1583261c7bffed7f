"""Oracle agreement with Zennit's equivalent composite on ResNet-18 and VGG-11-BN (eval mode).

Both sides: LRP-ε (ε = 0.01, stabiliser z + ε·sign(z) with sign(0) = +1 in both) on conv, linear,
max pool, adaptive average pool and the residual sum; batch norm merged into the preceding conv
(Zennit canonizers); LRP-zB with bounds [0, 1] at the first layer. Zennit's own ZBox drops the bias
from the denominator, whereas the reference keeps the bias share l·b⁺ + h·b⁻ (our rule); the oracle
therefore uses a ZBox written with Zennit's BasicHook that keeps those bias terms, as the reference.
Zennit's canonizer leaves each merged BN computing x / sqrt(1 + eps_BN) instead of the identity; on
a random VGG that 5e-6 factor per layer moves the heatmap by ~3 % (ε-dominated, cancelling sums),
so the BNs get eps_BN = 0 (running variances are ≥ 0.5). Float64 on both sides.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
zennit = pytest.importorskip("zennit")

from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import SpecialFirstLayerMapComposite  # noqa: E402
from zennit.core import BasicHook, ParamMod, stabilize  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.rules import Epsilon, NoMod, Pass  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402
from zennit.types import Activation, Convolution  # noqa: E402

from isnet_cli.lrp import LRP  # noqa: E402

EPS = 0.01


class ReferenceZBox(BasicHook):
    """zB as the reference: z' = z − (l·W⁺x + l·b⁺) − (h·W⁻x + h·b⁻)."""

    def __init__(self, low: float, high: float, eps: float) -> None:
        super().__init__(
            input_modifiers=[
                lambda x: x,
                lambda x: torch.full_like(x, low),
                lambda x: torch.full_like(x, high),
            ],
            param_modifiers=[
                NoMod(),
                ParamMod(lambda p, name: p.clamp(min=0) * (low if name == "bias" else 1.0)),
                ParamMod(lambda p, name: p.clamp(max=0) * (high if name == "bias" else 1.0)),
            ],
            output_modifiers=[lambda out: out] * 3,
            gradient_mapper=lambda grad, outs: (grad / stabilize(outs[0] - outs[1] - outs[2], eps),) * 3,
            reducer=lambda xs, gs: xs[0] * gs[0] - xs[1] * gs[1] - xs[2] * gs[2],
        )


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.eps = 0.0


def _zennit_relevance(model: nn.Module, canonizers: list, x: torch.Tensor, cls: int) -> torch.Tensor:
    layer_map = [
        (Activation, Pass()),
        (Sum, Epsilon(EPS)),
        ((nn.MaxPool2d, nn.AdaptiveAvgPool2d), Epsilon(EPS)),
        ((Convolution, nn.Linear), Epsilon(EPS)),
    ]
    composite = SpecialFirstLayerMapComposite(
        layer_map, first_map=[(Convolution, ReferenceZBox(0.0, 1.0, EPS))], canonizers=canonizers
    )
    x = x.clone().requires_grad_(True)
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(x, lambda z: z * torch.eye(z.shape[1], dtype=z.dtype)[[cls]])
    return relevance.detach()


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_matches_zennit_per_pixel(arch: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=3).eval().double()
    _randomise_bn(model)
    # [0, 1] images, 64 px keeps the test fast
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    canonizers = [ResNetCanonizer()] if arch == "resnet18" else [SequentialMergeBatchNorm()]
    lrp = LRP(model, epsilon=EPS)
    for cls in (0, 2):
        with torch.no_grad():
            ours = lrp(x, cls)
        theirs = _zennit_relevance(model, canonizers, x, cls)
        scale = theirs.abs().amax(dim=(1, 2, 3), keepdim=True)
        assert (ours - theirs).abs().div(scale).max() < 1e-6
        assert theirs.abs().sum() > 0
