"""A tiny trained checkpoint on 32 px phantoms, for the predict / export / evaluate / info tests.

A few full-batch Adam steps on `tinycnn` (a couple of seconds on CPU) on marker-biased phantoms: the
outputs are confident and differ between images, which is all these tests need; the shortcut
experiment itself lives in tests/shortcut.py.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

SIZE = 32
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TinyRun:
    checkpoint: Path  # runs/tiny/best.safetensors
    manifest: Path  # 32 phantoms with masks and labels
    images: Path  # the images folder of that set


def make_tiny_run(root: Path, steps: int = 40, n: int = 32) -> TinyRun:
    import numpy as np
    import torch

    from isnet_cli.backbones import build_model
    from isnet_cli.infer.checkpoint import save_checkpoint
    from isnet_cli.io.contract import InputContract
    from isnet_cli.io.manifest import read_dataset
    from isnet_cli.io.preprocess import preprocess_file
    from isnet_cli.synth import synthesize

    # with the background marker (bias 1.0) a few steps give confident, class-dependent outputs
    manifest = synthesize(root / "data", n=n, size=SIZE, seed=3, bias=1.0)
    spec = read_dataset(manifest)
    contract = InputContract(size=SIZE)
    x = torch.from_numpy(np.stack([preprocess_file(s.image, contract).x for s in spec.samples]))
    y = torch.tensor([spec.classes.index(s.label) for s in spec.samples])
    torch.manual_seed(0)
    model = build_model("tinycnn", len(spec.classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    meta = {
        "arch": "tinycnn",
        "num_classes": len(spec.classes),
        "classes": spec.classes,
        "contract": contract.to_dict(),
        "isnet": {"variant": "none", "eps": 0.01},
        "metrics": {"train_steps": steps},
        "data": {"train": str(manifest), "n": n},
    }
    checkpoint = save_checkpoint(root / "runs" / "tiny" / "best.safetensors", model, meta)
    return TinyRun(checkpoint=checkpoint, manifest=manifest, images=manifest.parent / "images")


_CACHE: dict[str, TinyRun] = {}


def shared_tiny_run(tmp_path_factory) -> TinyRun:
    """One tiny run per test session, whichever test module asks first."""
    if "run" not in _CACHE:
        _CACHE["run"] = make_tiny_run(tmp_path_factory.mktemp("tiny"))
    return _CACHE["run"]


def isnet(*args: object, stdin: str | None = None) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code as `isnet` would return it, stdout, stderr)."""
    from isnet_cli.cli import cli
    from isnet_cli.errors import IsnetError

    result = CliRunner().invoke(cli, [str(a) for a in args], input=stdin)
    exc = result.exception
    if isinstance(exc, IsnetError):
        return exc.exit_code, result.stdout, result.stderr + f"error: {exc}\n"
    if exc is not None and not isinstance(exc, SystemExit):
        raise AssertionError("".join(traceback.format_exception(exc)))
    return result.exit_code, result.stdout, result.stderr


def small_resnet(num_classes: int = 2, in_channels: int = 1):
    """A user-factory model (`tests.tiny_models:small_resnet`) with what ResNet/DenseNet bring to LRP export:
    overlapping max pool, residual additions (identity and 1x1-conv shortcut), an average-pool transition
    and a functional global average pool."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class SmallResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = cbr(in_channels, 8)
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.block1 = nn.Sequential(cbr(8, 8), nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
            self.relu1 = nn.ReLU()
            self.block2 = nn.Sequential(cbr(8, 16, 2), nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
            self.short2 = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
            self.relu2 = nn.ReLU()
            self.transition = nn.AvgPool2d(2)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pool(self.stem(x))
            x = self.relu1(self.block1(x) + x)
            x = self.relu2(self.block2(x) + self.short2(x))
            x = F.adaptive_avg_pool2d(self.transition(x), (1, 1))
            return self.fc(torch.flatten(x, 1))

    return SmallResNet()
