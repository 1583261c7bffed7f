"""DenseNet-121 (which Zennit cannot canonize) against an independent autograd formulation.

The oracle is the reference's LRP-Flex: gradient × activation with every ReLU module's backward
multiplied by a/(a + ε), taken at the first ReLU output, then LRP-zB [0, 1] through the fused
conv0∘norm0, written here with autograd of `F.conv2d`. Flex applies ε once per affine segment
between ReLUs and LRP-0 at the logit layer, our engine applies ε at every linear op (the LRP-Block
placement), so the two are compared exactly with ε → 0 (1e-12, float64) on both sides: this checks
every explicit transpose of the DenseNet graph (concatenation splits, per-producer BN fusion,
transitions, max-pool winner-take-all, global pooling, zB) against autograd. At ε = 0.01 the maps
differ only by the placement; their correlation is asserted to stay high.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torchvision = pytest.importorskip("torchvision")

from isnet_cli.lrp import LRP  # noqa: E402


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)


def flex_relevance(model: nn.Module, x: torch.Tensor, cls: int, eps: float) -> torch.Tensor:
    """LRP-Flex with zB at the first layer (reference §2.3), eval mode."""
    model = copy.deepcopy(model)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    outputs: dict[nn.Module, torch.Tensor] = {}
    for m in relus:
        m.inplace = False
        m.register_forward_hook(lambda mod, inp, out: outputs.__setitem__(mod, out))
        m.register_full_backward_hook(lambda mod, gin, gout: (gin[0] * outputs[mod] / (outputs[mod] + eps),))
    logits = model(x)
    first = outputs[model.features.relu0]
    (grad,) = torch.autograd.grad(logits[:, cls].sum(), first)
    r1 = grad * first
    # zB through conv0 fused with norm0, bounds [0, 1]
    conv, bn = model.features.conv0, model.features.norm0
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.view(-1, 1, 1, 1)
    b = bn.bias - bn.running_mean * scale

    def lin(inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(inp, weight, None, conv.stride, conv.padding)

    w_neg = w.clamp(max=0)
    ones = torch.ones_like(x)
    z = lin(x, w) + b.view(-1, 1, 1) - lin(ones, w_neg) - b.clamp(max=0).view(-1, 1, 1)
    s = (r1 / _stab(z, eps)).detach()
    xg = x.detach().clone().requires_grad_(True)
    og = ones.clone().requires_grad_(True)
    (c,) = torch.autograd.grad((lin(xg, w) * s).sum(), xg)
    (c_neg,) = torch.autograd.grad((lin(og, w_neg) * s).sum(), og)
    return (x * c - c_neg).detach()


@pytest.fixture(scope="module")
def densenet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=3).eval().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model


def test_densenet_matches_flex_at_small_epsilon(densenet: nn.Module) -> None:
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = LRP(densenet, epsilon=1e-12)(x, 1)
    theirs = flex_relevance(densenet, x, 1, 1e-12)
    scale = theirs.abs().amax(dim=(1, 2, 3), keepdim=True)
    assert theirs.abs().sum() > 0
    assert (ours - theirs).abs().div(scale).max() < 1e-6


def test_densenet_flex_correlation_at_default_epsilon(densenet: nn.Module) -> None:
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = LRP(densenet, epsilon=0.01)(x, 0).flatten()
    theirs = flex_relevance(densenet, x, 0, 0.01).flatten()
    r = torch.corrcoef(torch.stack([ours, theirs]))[0, 1]
    assert r > 0.9
