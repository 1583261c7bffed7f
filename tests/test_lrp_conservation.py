"""Conservation: with ε → 0 and every bias zeroed (conv/linear biases, BN β and running means), the
input relevance of each map sums to the explained logit (LRP-zB with bounds [0, 1] is conservative
too when biases are zero)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")

from isnet_cli.lrp import LRP  # noqa: E402


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, overlapping max pool, residual add, average pool, global pool, two linears."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.avg = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.bn1(self.conv1(x))))
        h = self.relu(self.bn2(self.conv2(h)) + h)
        h = self.gap(self.avg(h)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def zero_biases(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
            m.bias.data.zero_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
        elif getattr(m, "bias", None) is not None:
            m.bias.data.zero_()
    return model.eval()


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=3),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=3),
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=3),
    "small_cnn": SmallCNN,
}


@pytest.mark.parametrize("arch", list(MODELS))
def test_relevance_sums_to_logit(arch: str) -> None:
    torch.manual_seed(0)
    model = zero_biases(MODELS[arch]())
    channels = 1 if arch == "small_cnn" else 3
    size = 32 if arch == "densenet121" else 64  # DenseNet: 32 px still leaves 1x1 maps at the end
    x = torch.rand(2, channels, size, size)
    lrp = LRP(model, epsilon=1e-9)
    with torch.no_grad():
        every = lrp(x, "all")
        logits = lrp.logits
        assert every.shape == (2, 3, channels, size, size)
        sums = every.sum(dim=(2, 3, 4))
        assert torch.allclose(sums, logits, rtol=1e-3, atol=1e-3 * logits.abs().max().item())
        for cls in range(3):
            single = lrp(x, cls)
            assert single.shape == (2, channels, size, size)
            assert torch.allclose(single.sum(dim=(1, 2, 3)), logits[:, cls], rtol=1e-3, atol=1e-6)
        assert logits.abs().min() > 1e-4  # the check is not vacuous


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenet_v3_small"])
def test_gated_models_conserve(arch: str) -> None:
    """Squeeze-excitation gates (held constant), SiLU/Hardswish (pass) and stochastic depth."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
        if getattr(m, "bias", None) is not None:
            m.bias.data.zero_()
    with torch.no_grad():  # running variances that keep the random network's signal alive
        model.train()(torch.rand(8, 3, 64, 64))
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
    x = torch.rand(2, 3, 64, 64)
    lrp = LRP(model, epsilon=1e-9)
    with torch.no_grad():
        r = lrp(x, "predicted")
    top = lrp.logits.max(dim=1).values
    assert (r.sum(dim=(1, 2, 3)) - top).abs().max() <= 1e-3 * top.abs().max()
    model.train()
    r = LRP(model)(x, "selective")
    assert torch.isfinite(r).all()
