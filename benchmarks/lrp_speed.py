"""LRP heatmap latency: isnet's engine against Zennit, and DenseNet-121 heatmap / forward time.

Measured side by side in one process, on the same inputs, as medians over interleaved repetitions
(so load from other processes hits both sides alike). Each API is called the way a user calls it:
ours as ``LRP(model)(x, class)`` under ``torch.no_grad()``; Zennit as ``attributor(x, output_relevance)``
inside an open ``Gradient(model, composite)`` context (hook registration and canonizer merging are
done once, outside the timing, which favours Zennit; Zennit works on a copy of the model so
that the two can be timed interleaved). Both use the same rules: ε = 0.01 on
conv/linear/pools, zB [0, 1] at the first layer, batch norm merged.

    python benchmarks/lrp_speed.py [--reps 5] [--size 224] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from torch import nn

from isnet_cli.lrp import LRP


def _time(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def zennit_composite(canonizer):
    from zennit.composites import SpecialFirstLayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Pass, ZBox
    from zennit.types import Activation, Convolution

    layer_map = [
        (Activation, Pass()),
        (Sum, Epsilon(0.01)),
        ((nn.MaxPool2d, nn.AdaptiveAvgPool2d), Epsilon(0.01)),
        ((Convolution, nn.Linear), Epsilon(0.01)),
    ]
    first = [(Convolution, ZBox(0.0, 1.0, stabilizer=0.01))]
    return SpecialFirstLayerMapComposite(layer_map, first_map=first, canonizers=[canonizer])


def compare_with_zennit(arch: str, size: int, reps: int, device: torch.device, sync) -> tuple[float, float]:
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=3).eval().to(device)
    # two copies of the same weights: Zennit's hooks and merged BNs stay on its copy, so the two
    # APIs can be timed interleaved
    theirs_model = copy.deepcopy(model)
    x = torch.rand(1, 3, size, size, device=device)
    lrp = LRP(model)
    canonizer = ResNetCanonizer() if arch.startswith("resnet") else SequentialMergeBatchNorm()

    def ours() -> None:
        with torch.no_grad():
            lrp(x, 0)

    ours_times, zennit_times = [], []
    with Gradient(theirs_model, zennit_composite(canonizer)) as attributor:
        xz = x.clone().requires_grad_(True)

        def theirs() -> None:
            attributor(xz, lambda z: z * torch.eye(z.shape[1], device=z.device)[[0]])

        ours()  # warm-up both
        theirs()
        for _ in range(reps):
            ours_times.append(_time(ours, sync))
            zennit_times.append(_time(theirs, sync))
    return statistics.median(ours_times), statistics.median(zennit_times)


def densenet_ratio(size: int, reps: int, device: torch.device, sync) -> tuple[float, float]:
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=3).eval().to(device)
    x = torch.rand(1, 3, size, size, device=device)
    lrp = LRP(model)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def heatmap() -> None:
        with torch.no_grad():
            lrp(x, "predicted")

    forward()
    heatmap()
    f_times, h_times = [], []
    for _ in range(reps):  # interleaved
        f_times.append(_time(forward, sync))
        h_times.append(_time(heatmap, sync))
    return statistics.median(h_times), statistics.median(f_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch 1, {args.size} px, median of {args.reps}"
    )
    print(f"{'model':<14}{'isnet (ms)':>12}{'zennit (ms)':>13}{'ratio':>8}   goal")
    for arch in ("resnet18", "vgg16_bn"):
        ours, theirs = compare_with_zennit(arch, args.size, args.reps, device, sync)
        print(f"{arch:<14}{ours * 1e3:>12.1f}{theirs * 1e3:>13.1f}{ours / theirs:>8.2f}   <= 0.6")
    heat, fwd = densenet_ratio(args.size, args.reps, device, sync)
    print(f"{'model':<14}{'heatmap (ms)':>12}{'forward (ms)':>13}{'ratio':>8}   goal")
    print(f"{'densenet121':<14}{heat * 1e3:>12.1f}{fwd * 1e3:>13.1f}{heat / fwd:>8.2f}   <= 3.0")


if __name__ == "__main__":
    main()
