"""The shortcut experiment behind the `shortcut_runs` fixture (and the mission test).

Training phantoms (the synth's default contrast) carry a background marker perfectly correlated with the
label (bias 1.0: the marker is in every `opacity` image and in no `normal` one). A standard classifier
(`--variant none`) and the ISNet are trained on them with the `isnet train` defaults; only the
architecture (ResNet-18, what a user would pick), the image size, the seed and the number of epochs are
given: 12 for the ISNet (the default is 30, which the 5-seed study in `benchmarks/convergence.py` runs;
12 keeps CI short: both seeds scored as at 15, flipped 0.985 / 0.98 and 76% / 73% of |R| in the lungs,
where at 10 seed 0 kept only 63%, too near the tests' 60%), 3 for the standard classifier (it learns the
marker in its first). The ISNet is trained with two seeds; a fixture runs two trainings at once, each
with its share of the cores. Three test sets: `test_biased` (same correlation), `test_clean` (no marker)
and `test_flipped` (marker only in `normal` images). A model that reads the marker collapses on the
flipped set; a model that looks at the lungs scores the same on all three.

The colour analogue (`kind="faces"`: colour faces whose mouth is the label, face masks, a red marker in
the background) runs the same recipe with one ISNet seed (`COLOUR_ISNET_SEEDS`), 8 ISNet epochs (it
scores 1.0 on every test set by then, with 97% of |R| on the face) and `--roi-name face`; the channels
are detected from the data (3).

`train_shortcut_runs(tmp_dir)` returns a `ShortcutRuns` with the run folders and the manifests.
`score(run_dir, manifest)` gives the accuracy and the mean share of |LRP relevance| (predicted class)
inside the lung masks.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

SIZE = 64
N_TRAIN = 400
N_TEST = 200
ARCH = "resnet18"
ISNET_SEEDS = (0, 1)
COLOUR_ISNET_SEEDS = (0,)
ISNET_EPOCHS = 12
COLOUR_ISNET_EPOCHS = 8
BASELINE_EPOCHS = 3
PARALLEL_TRAININGS = 2  # training processes at once per fixture
COMMON = dict(arch=ARCH, img_size=SIZE, deterministic=True, no_progress=True, heatmaps=2)


@dataclass(frozen=True)
class ShortcutRuns:
    """Run folders (`baseline`: variant none; `isnets`: the default ISNet, one per seed) and manifests."""

    baseline: Path
    isnets: tuple[Path, ...]
    train: Path
    test_biased: Path
    test_clean: Path
    test_flipped: Path

    @property
    def isnet(self) -> Path:
        """The first seed's ISNet (for the tests that need one trained ISNet)."""
        return self.isnets[0]


@dataclass(frozen=True)
class Score:
    accuracy: float
    share_inside: float  # mean over images of Σ|R|·mask / Σ|R| for the predicted class


def make_phantom_sets(root: Path, kind: str = "chest") -> dict[str, Path]:
    """Biased training set and the three test sets (different seeds: no image is shared)."""
    from isnet_cli.synth import synthesize

    specs = {
        "train": (1.0, 0, N_TRAIN),
        "test_biased": (1.0, 101, N_TEST),
        "test_clean": (None, 102, N_TEST),
        "test_flipped": ("flip", 103, N_TEST),
    }
    return {
        name: synthesize(root / name, n=n, size=SIZE, bias=bias, seed=seed, kind=kind)
        for name, (bias, seed, n) in specs.items()
    }


def _cores() -> int:
    """The cores this process may use: its share under pytest-xdist (`OMP_NUM_THREADS`, set in conftest),
    else all of them. Each training gets an equal part and never more: a torch process with two OpenMP
    threads on cores it shares spin-waits at every barrier: beside three one-thread trainings on 2 cores, a
    ResNet-18 step at 64 px took 1.59 s with two threads and 0.73 s with one."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def _train(job: tuple[dict[str, Any], int]) -> Path:
    """One training run in a worker process with its own number of torch threads."""
    import torch

    from isnet_cli.train import TrainConfig, train

    options, threads = job
    torch.set_num_threads(threads)
    return train(TrainConfig(**options)).run_dir


def train_shortcut_runs(tmp_dir: Path, kind: str = "chest") -> ShortcutRuns:
    """Generate the phantoms, train the baseline and the ISNets (about 6.5 minutes on 2 CPU cores for the chest)."""
    tmp_dir = Path(tmp_dir)
    sets = make_phantom_sets(tmp_dir / "data", kind)
    where: dict[str, Any] = dict(data=str(sets["train"]), out=str(tmp_dir / "runs"), cache=str(tmp_dir / "cache"))
    seeds, epochs = ISNET_SEEDS, ISNET_EPOCHS
    if kind == "faces":
        where["roi_name"] = "face"
        seeds, epochs = COLOUR_ISNET_SEEDS, COLOUR_ISNET_EPOCHS
    isnet = dict(COMMON, **where, variant="selective", epochs=epochs)
    threads = max(1, _cores() // PARALLEL_TRAININGS)
    jobs = [(dict(isnet, seed=seed, name=f"isnet-seed{seed}"), threads) for seed in seeds]
    jobs.append((dict(COMMON, **where, variant="none", seed=0, epochs=BASELINE_EPOCHS, name="baseline"), threads))
    with ProcessPoolExecutor(max_workers=PARALLEL_TRAININGS, mp_context=get_context("spawn")) as pool:
        *isnets, baseline = pool.map(_train, jobs)
    return ShortcutRuns(
        baseline, tuple(isnets), sets["train"], sets["test_biased"], sets["test_clean"], sets["test_flipped"]
    )


def score(run_dir: Path, manifest: Path, checkpoint: str = "best") -> Score:
    """Accuracy and in-mask relevance share of a run's checkpoint on a phantom manifest."""
    import torch

    from isnet_cli.infer.checkpoint import load_checkpoint
    from isnet_cli.io.contract import InputContract
    from isnet_cli.io.dataset import XrayDataset, read_dataset
    from isnet_cli.lrp import LRP
    from isnet_cli.objective.loss import heatmap_loss
    from isnet_cli.objective.settings import HeatmapLossParams

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
