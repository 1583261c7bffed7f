"""The shortcut experiment behind the `shortcut_runs` fixture (and the mission test).

Training phantoms carry a background marker perfectly correlated with the label (bias 1.0: the marker
is in every `opacity` image and in no `normal` one). Two models are trained on them with the same
code path: a standard classifier (`--variant none`) and a selective ISNet. Three test sets:
`test_biased` (same correlation), `test_clean` (no marker) and `test_flipped` (marker only in `normal`
images). A model that reads the marker collapses on the flipped set; a model that looks at the lungs
scores the same on all three.

`train_shortcut_pair(tmp_dir)` returns a `ShortcutRuns` with the two run folders and the manifests.
`score(run_dir, manifest)` gives the accuracy and the mean share of |LRP relevance| (predicted class)
inside the lung masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SIZE = 64
N_TRAIN = 400
N_TEST = 200
# Lesion contrast of the phantoms (synth default 0.22): 0.3 makes the opacity learnable in a few
# epochs, so the test measures the shortcut, not the model's patience.
CONTRAST = 0.3
# Calibrated on 2 CPU cores (contrast 0.3, 20 ISNet epochs): TinyCNN never learns the opacity as an
# ISNet here (it settles on a lung-wide feature at chance accuracy); TinyResNet does: with the current
# engine seeds 0-3 gave flipped-marker accuracy 0.865 / 0.925 / 0.855 / 0.885 (clean 0.875-0.915, share
# in lungs 0.90-0.91). An earlier engine (same maths, other rounding) left seed 0 at chance (CE ~0.72,
# share 0.93): the heatmap loss has a degenerate optimum (relevance spread over the lungs, no class
# evidence) that an unlucky initialisation can fall into, so the test keeps seed 1.
ARCH = "tinyresnet"
BASELINE_EPOCHS = 6
ISNET_EPOCHS = 20
CUT_EPOCHS = 3
COMMON = dict(
    arch=ARCH,
    img_size=SIZE,
    batch_size=16,
    lr=1e-3,
    optimizer="adamw",
    seed=1,
    deterministic=True,
    no_progress=True,
    heatmaps=2,
)


@dataclass(frozen=True)
class ShortcutRuns:
    """Run folders (`baseline`: variant none, `isnet`: selective) and manifests (all 64 px PNG phantoms)."""

    baseline: Path
    isnet: Path
    train: Path
    test_biased: Path
    test_clean: Path
    test_flipped: Path


@dataclass(frozen=True)
class Score:
    accuracy: float
    share_inside: float  # mean over images of Σ|R|·mask / Σ|R| for the predicted class


def make_phantom_sets(root: Path) -> dict[str, Path]:
    """Biased training set and the three test sets (different seeds: no image is shared)."""
    from isnet_cli.synth import synthesize

    specs = {
        "train": (1.0, 0, N_TRAIN),
        "test_biased": (1.0, 101, N_TEST),
        "test_clean": (None, 102, N_TEST),
        "test_flipped": ("flip", 103, N_TEST),
    }
    return {
        name: synthesize(root / name, n=n, size=SIZE, bias=bias, seed=seed, contrast=CONTRAST)
        for name, (bias, seed, n) in specs.items()
    }


def train_shortcut_pair(tmp_dir: Path) -> ShortcutRuns:
    """Generate the phantoms and train the baseline and the ISNet (about 1.5-2.5 minutes on 2 CPU cores)."""
    from isnet_cli.train import TrainConfig, train

    tmp_dir = Path(tmp_dir)
    sets = make_phantom_sets(tmp_dir / "data")
    out = str(tmp_dir / "runs")
    cache = str(tmp_dir / "cache")
    base = train(
        TrainConfig(
            data=str(sets["train"]),
            variant="none",
            epochs=BASELINE_EPOCHS,
            out=out,
            name="baseline",
            cache=cache,
            **COMMON,
        )
    )
    isnet = train(
        TrainConfig(
            data=str(sets["train"]),
            variant="selective",
            epochs=ISNET_EPOCHS,
            cut_epochs=CUT_EPOCHS,
            out=out,
            name="isnet",
            cache=cache,
            **COMMON,
        )
    )
    return ShortcutRuns(
        base.run_dir, isnet.run_dir, sets["train"], sets["test_biased"], sets["test_clean"], sets["test_flipped"]
    )


def score(run_dir: Path, manifest: Path, checkpoint: str = "best") -> Score:
    """Accuracy and in-mask relevance share of a run's checkpoint on a phantom manifest."""
    import torch

    from isnet_cli.checkpoint import load_checkpoint
    from isnet_cli.io.contract import InputContract
    from isnet_cli.io.dataset import XrayDataset, read_dataset
    from isnet_cli.isnet.loss import HeatmapLossParams, heatmap_loss
    from isnet_cli.lrp import LRP

    model, meta = load_checkpoint(Path(run_dir) / f"{checkpoint}.safetensors")
    spec = read_dataset(manifest)
    ds = XrayDataset(spec.samples, meta["classes"], InputContract.from_dict(meta["contract"]))
    lrp = LRP(model, epsilon=meta["isnet"]["eps"])
    correct, shares = 0, []
    loader = torch.utils.data.DataLoader(ds, batch_size=50)
    with torch.no_grad():
        for x, m, y in loader:
            relevance = lrp(x, "predicted")
            correct += int((lrp.logits.argmax(1) == y).sum())
            shares.append(heatmap_loss(relevance, m, HeatmapLossParams()).share_inside)
    return Score(correct / len(ds), float(torch.cat(shares).mean()))
