"""Training data: read and check the manifests, split train/validation, build the datasets and the
per-rank epoch sampler, and decode every file once before training (all bad files reported together)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from isnet_cli.console import make_progress
from isnet_cli.errors import InputError, IsnetError
from isnet_cli.io.cache import file_digest
from isnet_cli.io.contract import InputContract
from isnet_cli.io.dataset import XrayDataset, read_dataset, split_samples
from isnet_cli.io.images import detect_channels
from isnet_cli.train.config import TrainConfig
from isnet_cli.train.stop import ignore_sigint


@dataclass
class DataBundle:
    """The class list, the train / validation / out-of-distribution samples and their summary (checkpoint)."""

    classes: list[str]
    train: list[Any]
    val: list[Any]
    ood: list[Any]
    summary: dict[str, Any]


def _content_hash(path: Path) -> str:
    """sha256 of a manifest file, or of the sorted (relative path, size) listing of a folder tree."""
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        digest.update(f"{p.relative_to(path)}\t{p.stat().st_size}\n".encode())
    return digest.hexdigest()


def _first(problems: Sequence[str], shown: int, sep: str) -> str:
    """The first `shown` problems joined by `sep`, and how many more there are."""
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return sep.join(problems[:shown]) + more


def _check_labels(samples: Sequence[Any], classes: Sequence[str], source: str, need_masks: bool) -> None:
    """Every sample labelled with a known class (and masked where needed); one error lists the problems."""
    problems = []
    for s in samples:
        if s.label is None:
            problems.append(f"{s.image}: no label")
        elif s.label not in classes:
            problems.append(f"{s.image}: label '{s.label}' is not in the class list {list(classes)}")
        elif need_masks and s.mask is None:
            problems.append(f"{s.image}: no mask (ISNet training needs a lung mask for every training image)")
    if problems:
        raise InputError(
            source,
            f"{len(problems)} bad sample(s): " + _first(problems, 3, "; "),
            "fix the manifest, pass --classes listing every class, or use --variant none for unmasked data",
        )


def _split(cfg: TrainConfig, samples: list[Any], classes: list[str]) -> tuple[list[Any], list[Any], str]:
    """(train, validation, where the validation set came from): --val, or a seeded split of DATA."""
    if cfg.val:
        val = list(read_dataset(cfg.val).samples)
        _check_labels(val, classes, cfg.val, cfg.needs_masks)
        return samples, val, f"--val {cfg.val}"
    train, val = split_samples(samples, val_fraction=cfg.val_fraction, seed=cfg.seed)
    return train, val, f"split of the training data (val fraction {cfg.val_fraction}, seed {cfg.seed})"


def prepare_data(cfg: TrainConfig) -> DataBundle:
    """Read the manifests, split train/validation, check labels and masks, summarise (for the checkpoint)."""
    spec = read_dataset(cfg.data)
    classes = list(cfg.classes) if cfg.classes else list(spec.classes)
    if len(classes) < 2:
        raise InputError(cfg.data, f"training needs at least two classes, found {classes}", "check the label column")
    _check_labels(spec.samples, classes, cfg.data, cfg.needs_masks)
    train, val, val_source = _split(cfg, list(spec.samples), classes)
    if cfg.channels is None:  # auto: colour data sets train colour models; recorded in config and contract
        cfg.channels = detect_channels([s.image for s in train])
    if not val:
        raise InputError(cfg.data, "the validation split is empty", "pass --val DATA or use more images")
    if len(train) < cfg.batch_size:
        raise InputError(
            cfg.data, f"only {len(train)} training images for batch size {cfg.batch_size}", "lower --batch-size"
        )
    ood = []
    if cfg.ood:
        ood = list(read_dataset(cfg.ood).samples)
        _check_labels(ood, classes, cfg.ood, need_masks=False)

    def counts(samples: Sequence[Any]) -> dict[str, int]:
        return {c: sum(s.label == c for s in samples) for c in classes}

    summary = {
        "manifest": str(Path(cfg.data).resolve()),
        "sha256": _content_hash(Path(cfg.data)),
        "train_counts": counts(train),
        "val_counts": counts(val),
        "val_source": val_source,
    }
    if cfg.ood:
        summary.update(ood_manifest=str(Path(cfg.ood).resolve()), ood_count=len(ood))
    return DataBundle(classes, train, val, ood, summary)


class EpochSampler(Sampler[int]):
    """This rank's indices for one epoch: a permutation seeded by (seed, epoch), sharded over ranks.

    The order depends only on (seed, epoch), so a resumed run sees the same batches; `start` skips the
    first batches of an epoch interrupted mid-way. The permutation is padded (repeating its head) to a
    multiple of the world size, as DistributedSampler does.
    """

    def __init__(
        self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True, pad: bool = True
    ) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle, self.pad = n, seed, rank, world, shuffle, pad
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad:
            total = math.ceil(self.n / self.world) * self.world
            order += order[: total - self.n]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip)


@dataclass
class TrainSets:
    """The datasets of a run, this rank's training sampler and the epoch length in steps."""

    train: XrayDataset
    val: XrayDataset
    ood: XrayDataset | None
    sampler: EpochSampler
    drop_last: bool
    steps_per_epoch: int

    @property
    def all(self) -> list[XrayDataset]:
        """Every dataset of the run: training, validation and, with --ood, out-of-distribution."""
        return [self.train, self.val] + ([self.ood] if self.ood is not None else [])


def make_sets(cfg: TrainConfig, data: DataBundle, contract: InputContract, rank: int, world: int) -> TrainSets:
    """Datasets over the bundle's samples (decoded arrays cached in --cache, default OUT/.cache)."""
    kw = {"cache_dir": Path(cfg.cache) if cfg.cache else Path(cfg.out) / ".cache", "mask_segment": cfg.mask_segment}
    # --variant masked: the classifier sees the lungs only, the background replaced by air
    masked = {"air_background": contract.low if cfg.masked else None}
    train = XrayDataset(
        data.train, data.classes, contract, augment=cfg.augment, require_masks=cfg.needs_masks, **masked, **kw
    )
    val = XrayDataset(data.val, data.classes, contract, require_masks=cfg.needs_masks, **masked, **kw)
    ood = XrayDataset(data.ood, data.classes, contract, require_masks=False, **kw) if data.ood else None
    per_rank = math.ceil(len(train) / world)
    drop_last = per_rank > cfg.batch_size
    steps = per_rank // cfg.batch_size if drop_last else 1
    return TrainSets(train, val, ood, EpochSampler(len(train), cfg.seed, rank, world), drop_last, steps)


class _Checked:
    """Dataset view whose items are "" for a good sample and the error message for a bad one."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> str:
        try:
            self.ds.load_arrays(self.ds.samples[i])
        except IsnetError as exc:
            return str(exc)
        return ""


def find_bad_files(sets: TrainSets, workers: int, progress_on: bool) -> list[str]:
    """Decode every image and mask once (this fills the cache); the error message of every bad file."""
    problems: list[str] = []
    with make_progress(progress_on) as progress:
        task = progress.add_task("checking images and masks", total=sum(len(ds) for ds in sets.all))
        for ds in sets.all:
            loader = DataLoader(
                _Checked(ds), batch_size=None, num_workers=workers, worker_init_fn=ignore_sigint if workers else None
            )
            for problem in loader:
                if problem:
                    problems.append(problem)
                progress.advance(task)
    return problems


def check_files(sets: TrainSets, workers: int, progress_on: bool, main: bool, share: Callable[[Any], Any]) -> None:
    """Rank 0 decodes every file (`find_bad_files`), `share` hands its findings to every rank, and all raise
    one error listing the bad files."""
    problems = share(find_bad_files(sets, workers, progress_on) if main else [])
    if problems:
        raise InputError(
            None,
            f"{len(problems)} unusable training file(s): " + _first(problems, 5, " | "),
            "fix or remove them from the manifest (`isnet data check` lists them all)",
        )
