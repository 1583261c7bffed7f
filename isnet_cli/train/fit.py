"""ISNet training: data preparation, the loop, the run folder, resume, and multi-process (DDP) training
(process-group plumbing in `isnet_cli.distributed`, the per-batch loss in `isnet_cli.objective.objective`).

One training step (variant `selective`, the default):

    R = lrp(x, "selective")          # the training forward *and* the relevance pass, one graph
    CE = cross_entropy(lrp.logits, y)
    L = (1 - P)·CE + P·heatmap_loss(R, mask)   # fp32, see isnet_cli.objective.loss
    backward, all-reduce gradients (DDP), clip to norm 1, optimizer step

`variant="none"` is the standard classifier through the same code (P = 0, no relevance pass);
`method="rrr"` replaces the heatmap loss with the Right-for-the-Right-Reasons input-gradient penalty.

Reliability: non-finite losses or gradients skip the step (counted; `max_bad_steps` in a row stop the
run with an error); Ctrl-C finishes the current step, saves `last` and raises `TrainingInterrupted`
(exit 130); `resume` restores weights, optimizer, scheduler, RNG states, epoch and step, so under
`deterministic` a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from isnet_cli.console import console, make_progress, progress_enabled
from isnet_cli.device import resolve_device
from isnet_cli.distributed import Dist, process_group, spawn
from isnet_cli.errors import InputError, IsnetError
from isnet_cli.infer.checkpoint import save_checkpoint
from isnet_cli.io.cache import file_digest
from isnet_cli.io.contract import InputContract
from isnet_cli.objective.loss import HeatmapLossParams, heatmap_loss
from isnet_cli.objective.objective import TARGETS, Cuts, Objective, hidden_map, lds_layers, make_lrp, relevance_stats
from isnet_cli.objective.swap import swap_backgrounds
from isnet_cli.objective.tuning import Welford, cut_from_stats, parse_cut
from isnet_cli.report.metrics import classification_scores
from isnet_cli.train import run_folder
from isnet_cli.train.config import TrainConfig
from isnet_cli.train.health import Health, assess, epoch_status

STATE_FILE = "last.state.pt"
STEPS_FILE = "steps.csv"


class TrainingInterrupted(IsnetError):
    """Ctrl-C: `last` was saved; exit code 130 as for any interrupted command."""

    exit_code = 130


class TrainingDiverged(IsnetError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class TrainResult:
    """What `train` returns on the calling process."""

    run_dir: Path
    best: dict[str, Any] | None
    last: dict[str, Any] | None
    cut: tuple[float, float] | None
    model: nn.Module | None = None
    skipped_steps: int = 0
    health: Health | None = None  # did the run learn (see isnet_cli.train.health)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class DataBundle:
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


def prepare_data(cfg: TrainConfig) -> DataBundle:
    """Read the manifests, split train/validation, check labels and masks, summarise (for the checkpoint)."""
    from isnet_cli.io.dataset import read_dataset, split_samples

    spec = read_dataset(cfg.data)
    classes = list(cfg.classes) if cfg.classes else list(spec.classes)
    if len(classes) < 2:
        raise InputError(cfg.data, f"training needs at least two classes, found {classes}", "check the label column")
    _check_labels(spec.samples, classes, cfg.data, cfg.needs_masks)
    if cfg.val:
        vspec = read_dataset(cfg.val)
        train, val = list(spec.samples), list(vspec.samples)
        _check_labels(val, classes, cfg.val, cfg.needs_masks)
        val_source = f"--val {cfg.val}"
    else:
        train, val = split_samples(spec.samples, val_fraction=cfg.val_fraction, seed=cfg.seed)
        val_source = f"split of the training data (val fraction {cfg.val_fraction}, seed {cfg.seed})"
    if not val:
        raise InputError(cfg.data, "the validation split is empty", "pass --val DATA or use more images")
    if len(train) < cfg.batch_size:
        raise InputError(
            cfg.data, f"only {len(train)} training images for batch size {cfg.batch_size}", "lower --batch-size"
        )
    ood = []
    if cfg.ood:
        ospec = read_dataset(cfg.ood)
        ood = list(ospec.samples)
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


def _worker_init(_: int) -> None:
    # Ctrl-C is handled by the main process (finish the step, save); workers must not die on it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------- runtime


def set_determinism(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this before its first use to be reproducible.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors / plain values (loadable with torch.load(weights_only=True))."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------- trainer


class _Stop:
    """Set by SIGINT (first Ctrl-C); a second Ctrl-C raises KeyboardInterrupt immediately."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        console.print("[yellow]Ctrl-C: finishing this step and saving 'last' (press again to abort)[/yellow]")


# steps.csv: the per-term gradient norms cost one extra plain backward, so only every this many steps.
GRAD_TERMS_EVERY = 10


def gradient_split(model: nn.Module, ce_grads: list[torch.Tensor | None], ce_weight: float) -> tuple[float, float]:
    """Norms of the CE part (1-P)·∂CE/∂θ of the current (unclipped) gradient and of the rest, the heatmap part."""
    ce_sq = heat_sq = 0.0
    for p, g in zip((p for p in model.parameters() if p.requires_grad), ce_grads, strict=True):
        if p.grad is None:
            continue
        ce_part = ce_weight * g if g is not None else torch.zeros_like(p.grad)
        ce_sq += float(ce_part.double().pow(2).sum())
        heat_sq += float((p.grad - ce_part).double().pow(2).sum())
    return math.sqrt(ce_sq), math.sqrt(heat_sq)


def step_diagnostics(
    phase: str, epoch: int, step: int, out: Any, norm: torch.Tensor | None, split: tuple[float, float] | None
) -> dict[str, Any]:
    """One steps.csv row: the loss terms, the explained quantity's relevance mass (Σ|R|), the logit range,
    the gradient norm before clipping and, every `GRAD_TERMS_EVERY` steps, its CE and heatmap parts."""
    logits = out.logits.float()
    return {
        "phase": phase,
        "epoch": epoch + 1,
        "step": step + 1,
        "loss": out.loss.item(),
        "ce": out.ce.item(),
        "background": out.background.item(),
        "foreground": out.foreground.item(),
        "relevance_mass": out.mass.mean().item() if out.mass is not None else None,
        "logit_range": (logits.amax(1) - logits.amin(1)).mean().item(),
        "grad_norm": norm.item() if norm is not None else None,
        "grad_ce": split[0] if split else None,
        "grad_heat": split[1] if split else None,
    }


# on_step(epoch, steps done in this epoch) -> True to stop as Ctrl-C does (for embedding and tests).
StepCallback = Callable[[int, int], bool | None]


class Trainer:
    """One process's view of a training run (rank 0 writes the run folder)."""

    def __init__(self, cfg: TrainConfig, dist_info: Dist, stop: _Stop, on_step: StepCallback | None = None):
        self.cfg, self.dist, self.stop, self.on_step = cfg, dist_info, stop, on_step
        self.device = resolve_device(cfg.device, dist_info.local_rank, dist_info.world)
        self.contract = InputContract(size=cfg.img_size, channels=1, resize=cfg.resize, window=cfg.window)
        self.progress_on = progress_enabled(cfg.no_progress) and dist_info.main
        self.skipped_total = 0
        self.classes: list[str] = []
        self.lds_layers: tuple[str, ...] = ()  # hidden layers of LRP deep supervision
        self._explainer: Any = None
        self._explainer_model: nn.Module | None = None
        self.step_rows: list[dict[str, Any]] = []  # steps.csv (rank 0)

    # -- setup ----------------------------------------------------------------------------------
    def datasets(self, data: DataBundle) -> None:
        from isnet_cli.io.dataset import XrayDataset

        cfg = self.cfg
        kw = {"cache_dir": Path(cfg.cache) if cfg.cache else Path(cfg.out) / ".cache"}
        self.train_ds = XrayDataset(
            data.train, data.classes, self.contract, augment=cfg.augment, require_masks=cfg.needs_masks, **kw
        )
        self.val_ds = XrayDataset(data.val, data.classes, self.contract, require_masks=cfg.needs_masks, **kw)
        self.ood_ds = (
            XrayDataset(data.ood, data.classes, self.contract, require_masks=False, **kw) if data.ood else None
        )
        self.sampler = EpochSampler(len(self.train_ds), cfg.seed, self.dist.rank, self.dist.world)
        per_rank = math.ceil(len(self.train_ds) / self.dist.world)
        self.drop_last = per_rank > cfg.batch_size
        self.steps_per_epoch = per_rank // cfg.batch_size if self.drop_last else 1

    def check_files(self) -> None:
        """Decode every image and mask once (this fills the cache) and report all bad files together."""
        problems: list[str] = []
        sets = [self.train_ds, self.val_ds] + ([self.ood_ds] if self.ood_ds is not None else [])
        total = sum(len(ds) for ds in sets)
        if self.dist.main:
            with make_progress(self.progress_on) as progress:
                task = progress.add_task("checking images and masks", total=total)
                for ds in sets:
                    loader = DataLoader(
                        _Checked(ds),
                        batch_size=None,
                        num_workers=self.cfg.workers,
                        worker_init_fn=_worker_init if self.cfg.workers else None,
                    )
                    for problem in loader:
                        if problem:
                            problems.append(problem)
                        progress.advance(task)
        problems = self.gather(problems)[0]
        if problems:
            raise InputError(
                None,
                f"{len(problems)} unusable training file(s): " + _first(problems, 5, " | "),
                "fix or remove them from the manifest (`isnet data check` lists them all)",
            )

    def loader(self, ds: Any, sampler: Sampler[int], epoch: int, drop_last: bool = False) -> DataLoader:
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=self.cfg.workers,
            drop_last=drop_last,
            generator=g,
            worker_init_fn=_worker_init if self.cfg.workers else None,
            pin_memory=self.device.type == "cuda",
        )

    def make_optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs) if cfg.scheduler == "cosine" else None
        return opt, sched

    # -- distributed helpers -------------------------------------------------------------------
    def sync_gradients(self, model: nn.Module, bad: bool) -> tuple[bool, bool]:
        """All-reduce (average) the gradients and OR the 'bad step' / 'stop' flags over ranks."""
        stop = self.stop.event.is_set()
        if self.dist.world == 1:
            return bad, stop
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None and not bad else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(bad), float(stop)], device=self.device)])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = (flat[offset : offset + n] / self.dist.world).view_as(p).to(p.dtype)
            offset += n
        return bool(flat[-2] > 0), bool(flat[-1] > 0)

    def recalibrate_bn(self, model: nn.Module) -> None:
        """Re-estimate batch-norm running statistics on the training data with the epoch's final weights.

        The running averages collected during the epoch mix statistics of weights that kept changing;
        the ISNet loss changes activations a lot, and eval-mode predictions (validation, checkpoint
        selection, every later use of the model) then drift from what training optimised. One
        no-grad forward pass per epoch (cumulative averages, momentum=None) fixes that ("precise BN").
        """
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not bns:
            return
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        sampler = EpochSampler(len(self.train_ds), self.cfg.seed, self.dist.rank, self.dist.world, shuffle=False)
        with torch.no_grad():
            for x, _, _ in self.loader(self.train_ds, sampler, 0, drop_last=self.drop_last):
                model(x.to(self.device))
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            if self.dist.world > 1:  # average the ranks' estimates
                for buf in (m.running_mean, m.running_var):
                    dist.all_reduce(buf)
                    buf /= self.dist.world

    def broadcast_buffers(self, model: nn.Module) -> None:
        """BN running statistics from rank 0 (as DDP does), so every rank validates and saves the same model."""
        if self.dist.world > 1:
            for b in model.buffers():
                dist.broadcast(b, src=0)

    def gather(self, obj: Any) -> list[Any]:
        if self.dist.world == 1:
            return [obj]
        out: list[Any] = [None] * self.dist.world
        dist.all_gather_object(out, obj)
        return out

    # -- one epoch ----------------------------------------------------------------------------------
    def run_epoch(
        self,
        model: nn.Module,
        objective: Objective,
        opt: torch.optim.Optimizer,
        epoch: int,
        skip: int,
        progress: Any,
        heat: bool = True,
        collect_mass: list[Welford] | None = None,
        label: str = "train",
    ) -> tuple[dict[str, float], int, bool]:
        """Train one epoch from batch `skip`; returns (mean losses, next step, stopped early)."""
        cfg = self.cfg
        model.train()
        self.sampler.set_epoch(epoch, skip * cfg.batch_size)
        loader = self.loader(self.train_ds, self.sampler, epoch, drop_last=self.drop_last)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, ce, bg, fg, samples
        task = progress.add_task(
            f"{label} {epoch + 1}/{cfg.epochs}", total=self.steps_per_epoch, completed=skip, stats=""
        )
        step, consecutive_bad, t0, seen = skip, 0, time.perf_counter(), 0
        p_now = cfg.P * min(1.0, epoch / cfg.ramp) if cfg.ramp else cfg.P
        for x, mask, y in loader:
            x, mask, y = (t.to(self.device, non_blocking=True) for t in (x, mask, y))
            if cfg.background_swap > 0:
                g = torch.Generator().manual_seed(
                    (cfg.seed * 1_000_003 + epoch) * 100_003 + step * self.dist.world + self.dist.rank
                )
                x = swap_backgrounds(x, mask, cfg.background_swap, g)
            opt.zero_grad(set_to_none=True)
            out = objective(x, mask, y, heat=heat, P=p_now)
            if collect_mass is not None:
                for stats, masses in zip(collect_mass, self._mass(objective, x, mask), strict=True):
                    stats.update(masses.tolist())
            bad = not bool(torch.isfinite(out.loss))
            ce_grads = self._ce_gradients(model, out, heat and p_now > 0 and step % GRAD_TERMS_EVERY == 0)
            if not bad:
                out.loss.backward()
            bad, stop = self.sync_gradients(model, bad)
            norm, split = None, None
            if not bad:
                split = gradient_split(model, ce_grads, 1.0 - p_now) if ce_grads is not None else None
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                bad = not bool(torch.isfinite(norm))
            if self.dist.main:
                self.step_rows.append(step_diagnostics(label, epoch, step, out, norm, split))
            if bad:
                consecutive_bad += 1
                self.skipped_total += 1
                opt.zero_grad(set_to_none=True)
                if self.dist.main:
                    console.print(
                        f"[yellow]warning: non-finite loss or gradient at epoch {epoch + 1} step {step + 1}: "
                        f"step skipped ({consecutive_bad} in a row)[/yellow]"
                    )
                if consecutive_bad >= cfg.max_bad_steps:
                    raise TrainingDiverged(
                        f"training diverged: {consecutive_bad} non-finite losses/gradients in a row at epoch "
                        f"{epoch + 1} step {step + 1}; lower --lr, raise --d or --E, or check the inputs"
                    )
            else:
                consecutive_bad = 0
                opt.step()
                n = len(y)
                sums += torch.tensor(
                    [out.loss.item() * n, out.ce.item() * n, out.background.item() * n, out.foreground.item() * n, n],
                    dtype=torch.float64,
                )
            step += 1
            seen += len(y)
            rate = seen * self.dist.world / max(time.perf_counter() - t0, 1e-9)
            progress.update(
                task,
                advance=1,
                stats=f"loss {out.loss.item():.3f} ce {out.ce.item():.3f} bg {out.background.item():.3f} "
                f"fg {out.foreground.item():.3f} | {rate:.1f} img/s",
            )
            if heat and self.on_step is not None and self.on_step(epoch, step):
                self.stop.event.set()
            if stop or (self.dist.world == 1 and self.stop.event.is_set()):
                return self._means(sums), step, True
            if step >= self.steps_per_epoch:
                break
        if self.dist.world > 1:
            sums = sums.to(self.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        return self._means(sums), step, False

    def _ce_gradients(self, model: nn.Module, out: Any, wanted: bool) -> list[torch.Tensor | None] | None:
        """∂CE/∂θ alone (before the full backward), for the per-term gradient norms of steps.csv."""
        if not wanted or self.dist.world > 1 or self.cfg.method != "isnet" or not out.ce.requires_grad:
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        return list(torch.autograd.grad(out.ce, params, retain_graph=True, allow_unused=True))

    @staticmethod
    def _means(sums: torch.Tensor) -> dict[str, float]:
        n = float(sums[4]) or float("nan")
        return {
            "loss": sums[0].item() / n,
            "ce": sums[1].item() / n,
            "background": sums[2].item() / n,
            "foreground": sums[3].item() / n,
        }

    def _mass(self, objective: Objective, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Whole-map Σ|R| per sample for the variant's target (C1/C2 statistic), without gradients:
        (1 + number of LDS layers, B), the input map first."""
        lrp = objective.lrp or self.explainer(objective.model)
        with torch.no_grad():
            relevance = lrp(x, TARGETS.get(self.cfg.variant, "selective"))
            maps = [relevance, *(hidden_map(lrp, name) for name in self.lds_layers)]
            return torch.stack([heatmap_loss(r, mask, HeatmapLossParams()).mass for r in maps])

    def explainer(self, model: nn.Module) -> Any:
        """An LRP engine for relevance statistics of models trained without the heatmap loss."""
        if self._explainer is None or self._explainer_model is not model:
            self._explainer = make_lrp(model, self.cfg, self.lds_layers)
            self._explainer_model = model
        return self._explainer

    # -- C1/C2 ----------------------------------------------------------------------------------
    def tune_cut(self, model: nn.Module, progress: Any, keep_weights: bool = False) -> list[tuple[float, float]]:
        """Warm up a copy with CE only for `cut_epochs`, collect Σ|R| in the last epoch (Welford);
        (C1, C2) of the input map, then of each LDS layer. `keep_weights`: `model` continues from the
        warmed-up weights (otherwise the copy is thrown away, as the reference does)."""
        cfg = self.cfg
        warm = copy.deepcopy(model)
        objective = Objective(dataclasses.replace(cfg, variant="none", method="isnet"), warm, self.device, None)
        opt, _ = self.make_optimizer(warm)
        stats = [Welford() for _ in range(1 + len(self.lds_layers))]
        for epoch in range(cfg.cut_epochs):
            last = epoch == cfg.cut_epochs - 1
            _, _, stopped = self.run_epoch(
                warm,
                objective,
                opt,
                epoch,
                0,
                progress,
                heat=False,
                collect_mass=stats if last else None,
                label="C1/C2 warm-up",
            )
            if stopped:
                raise TrainingInterrupted("interrupted during the C1/C2 warm-up (nothing to resume yet); run again")
        cuts = []
        for per_rank in zip(*self.gather(stats), strict=True):  # one map's statistics from every rank
            merged = Welford()
            for part in per_rank:
                merged = merged.merge(part)
            cuts.append(cut_from_stats(merged.mean, merged.std))
        if keep_weights:
            model.load_state_dict(warm.state_dict())
        return cuts

    # -- validation -------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, objective: Objective, ds: Any, with_heat: bool) -> dict[str, float]:
        """Loss parts, accuracy, macro-F1, AUROC and share of |R| inside the mask on `ds` (all ranks pooled)."""
        model.eval()
        # no padding: every sample is scored exactly once over all ranks
        sampler = EpochSampler(len(ds), 0, self.dist.rank, self.dist.world, shuffle=False, pad=False)
        probs, labels, shares, sums = [], [], [], torch.zeros(5, dtype=torch.float64)
        explainer = objective.lrp if (with_heat and objective.lrp is not None) else None
        for x, mask, y in self.loader(ds, sampler, 0):
            x, mask, y = (t.to(self.device) for t in (x, mask, y))
            if with_heat:
                ctx = torch.enable_grad() if self.cfg.method == "rrr" else torch.no_grad()
                with ctx:
                    out = objective(x, mask, y)
                share = out.share
                if share is None:
                    share, _ = relevance_stats(explainer or self.explainer(model), x, mask, "predicted")
                shares.append(share.cpu())
            else:
                with torch.no_grad():
                    out = objective(x, mask, y, heat=False)
            n = len(y)
            sums += torch.tensor(
                [out.loss.item() * n, out.ce.item() * n, out.background.item() * n, out.foreground.item() * n, n],
                dtype=torch.float64,
            )
            probs.append(torch.softmax(out.logits.float(), 1).cpu())
            labels.append(y.cpu())
        local = (
            torch.cat(probs).numpy() if probs else np.zeros((0, len(self.classes))),
            torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64),
            torch.cat(shares).numpy() if shares else np.zeros(0),
            sums,
        )
        parts = self.gather(local)
        p = np.concatenate([q[0] for q in parts])
        lab = np.concatenate([q[1] for q in parts])
        sh = np.concatenate([q[2] for q in parts])
        total = sum(q[3] for q in parts)
        means = self._means(total)
        result = {
            "loss": means["loss"],
            "ce": means["ce"],
            "background": means["background"],
            "foreground": means["foreground"],
            **classification_scores(lab, p),
        }
        if len(sh):
            result["share_inside"] = float(np.mean(sh))
        return result

    def heatmap_figure(self, model: nn.Module, lrp: Any, path: Path) -> None:
        """A few validation heatmaps (predicted class) of this epoch's model: heatmaps/epoch_N.png."""
        n = min(self.cfg.heatmaps, len(self.val_ds))
        if n <= 0:
            return
        model.eval()
        xs, ms, ys = zip(*(self.val_ds[i] for i in range(n)), strict=True)
        x, m = torch.stack(xs).to(self.device), torch.stack(ms)
        lrp = lrp or self.explainer(model)
        with torch.no_grad():
            relevance = lrp(x, "predicted").sum(1).cpu().numpy()
            pred = lrp.logits.argmax(1).cpu().tolist()
        titles = [f"true {self.classes[int(y)]} / pred {self.classes[p]}" for y, p in zip(ys, pred, strict=True)]
        run_folder.heatmap_grid(path, x[:, 0].cpu().numpy(), relevance, m[:, 0].numpy() > 0.5, titles)


# ---------------------------------------------------------------------------------------------- run folder


def resolve_run_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    name = cfg.name or run_folder.next_run_name(out)
    run_dir = out / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise InputError(run_dir, "run folder already exists", "pick another --name, or continue it with --resume")
    return run_dir


def find_resume(path: str | Path) -> Path:
    """`--resume` accepts the run folder or a checkpoint inside it; returns the run folder."""
    p = Path(path)
    run_dir = p if p.is_dir() else p.parent
    if not (run_dir / STATE_FILE).is_file() or not (run_dir / "config.json").is_file():
        raise InputError(
            p, "not a resumable run (no last.state.pt / config.json)", "pass a run folder written by `isnet train`"
        )
    return run_dir


def load_resume_config(run_dir: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The run's own config, with the runtime options (`TrainConfig.RUNTIME`) the user gave again."""
    import json

    saved = json.loads((run_dir / "config.json").read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known})
    changed = {k: v for k, v in overrides.items() if k in TrainConfig.RUNTIME}
    ignored = sorted(k for k, v in overrides.items() if k not in TrainConfig.RUNTIME and getattr(cfg, k, v) != v)
    if ignored:
        console.print(f"[yellow]--resume: ignoring {', '.join(ignored)} (the run keeps its own settings)[/yellow]")
    return dataclasses.replace(cfg, out=str(run_dir.parent), name=run_dir.name, **changed)


def _meta(
    cfg: TrainConfig,
    classes: list[str],
    contract: InputContract,
    cuts: Cuts,
    data: DataBundle,
    row: dict[str, Any],
) -> dict[str, Any]:
    isnet = {
        "variant": cfg.variant,
        "method": cfg.method,
        "P": cfg.P if cfg.uses_lrp_loss else 0.0,
        "d": cfg.d,
        "E": cfg.E,
        "A": cfg.A,
        "B": cfg.B,
        "eps": cfg.eps,
        **cuts.record(),
        "lds_decay": cfg.lds_decay if cuts.hidden else None,
        "rrr_lambda": cfg.rrr_lambda if cfg.method == "rrr" else None,
        "background_swap": cfg.background_swap,
    }
    return {
        "arch": cfg.arch,
        "num_classes": len(classes),
        "in_channels": contract.channels,
        "pretrained": cfg.pretrained,
        "classes": classes,
        "contract": contract.to_dict(),
        "isnet": isnet,
        "metrics": row,
        "data": data.summary,
        "epoch": row.get("epoch"),
    }


# ---------------------------------------------------------------------------------------------- entry points


def train(
    cfg: TrainConfig,
    resume: str | Path | None = None,
    resume_overrides: dict[str, Any] | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train as configured (or continue the run `resume`); spawns `cfg.devices` processes if > 1."""
    if resume is not None:
        run_dir = find_resume(resume)
        cfg = load_resume_config(run_dir, resume_overrides or {})
    cfg.validate()
    if cfg.devices > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _spawn(cfg, resume is not None)
    return train_process(cfg, resume is not None, on_step)


def train_process(cfg: TrainConfig, resuming: bool, on_step: StepCallback | None = None) -> TrainResult:
    info = Dist.from_env()
    stop = _Stop()
    stop.install()
    try:
        with process_group(info, cfg.device):
            return _run(cfg, resuming, info, stop, on_step)
    finally:
        stop.uninstall()


def _run(cfg: TrainConfig, resuming: bool, info: Dist, stop: _Stop, on_step: StepCallback | None) -> TrainResult:
    set_determinism(cfg.seed, cfg.deterministic)
    trainer = Trainer(cfg, info, stop, on_step)
    data = prepare_data(cfg)
    trainer.classes = data.classes
    trainer.datasets(data)
    trainer.check_files()

    if resuming:
        run_dir = Path(cfg.out) / str(cfg.name)
        state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=True)
    else:
        run_dir = resolve_run_dir(cfg) if info.main else Path()
        run_dir = Path(trainer.gather(str(run_dir))[0])
        state = None

    from isnet_cli.backbones import build_model

    model = build_model(cfg.arch, len(data.classes), in_channels=1, pretrained=cfg.pretrained).to(trainer.device)
    trainer.lds_layers = lds_layers(cfg, model)
    if info.world > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    if state is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run_dir / "last.safetensors"), device=str(trainer.device)))

    with make_progress(trainer.progress_on, _stats_column()) as progress:
        cuts = _resolve_cut(cfg, trainer, model, progress, state)
        objective = Objective(cfg, model, trainer.device, cuts.input, cuts.hidden)
        if cfg.amp and cfg.uses_lrp_loss and info.main:
            console.print(
                "[yellow]--amp: the relevance pass and the heatmap loss run in fp32; "
                "only plain forwards use autocast[/yellow]"
            )
        opt, sched = trainer.make_optimizer(model)
        rows: list[dict[str, Any]] = []
        start_epoch, skip, best_score, best_row = 0, 0, None, None
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            if sched is not None and state.get("scheduler") is not None:
                sched.load_state_dict(state["scheduler"])
                sched.T_max = cfg.epochs  # --epochs may extend a resumed run
            start_epoch, skip = int(state["epoch"]), int(state["step"])
            best_score = state.get("best_score")
            trainer.skipped_total = int(state.get("skipped", 0))
            rows = [r for r in run_folder.read_metrics(run_dir / "metrics.csv") if int(r["epoch"]) <= start_epoch]
            trainer.step_rows = run_folder.read_metrics(run_dir / STEPS_FILE)
            best_row = next((r for r in rows if str(r["epoch"]) == str(state.get("best_epoch"))), None)
            set_rng_state(state["rng"][info.rank])
            if info.main:
                console.print(f"resuming {run_dir} at epoch {start_epoch + 1}, step {skip + 1}")

        if info.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            config = {
                **dataclasses.asdict(cfg),
                "name": run_dir.name,
                **cuts.record(),
                "background_swap": cfg.background_swap,
                "classes": data.classes,
                "world_size": info.world,
                "contract": trainer.contract.to_dict(),
            }
            run_folder.write_json(run_dir / "config.json", config)
            run_folder.write_yaml(
                run_dir / "config.yaml",
                cfg.recipe(),
                header=f"# isnet train --config {run_dir / 'config.yaml'}   (recipe of run {run_dir.name})\n",
            )
        meta = lambda row: _meta(cfg, data.classes, trainer.contract, cuts, data, row)  # noqa: E731
        val_counts = data.summary["val_counts"].values()
        majority = max(val_counts) / max(1, sum(val_counts))

        last_row = rows[-1] if rows else None
        health = assess(rows, best_row, majority, len(data.classes), cfg.uses_lrp_loss)
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            means, step, stopped = trainer.run_epoch(model, objective, opt, epoch, skip, progress)
            skip = 0
            if stopped and step < trainer.steps_per_epoch:
                trainer.broadcast_buffers(model)
                rng = trainer.gather(rng_state())
                if info.main:
                    save_checkpoint(run_dir / "last.safetensors", model, meta({"epoch": epoch, "partial_steps": step}))
                    state = _state(opt, sched, epoch, step, best_score, best_row, rng, trainer.skipped_total, cuts)
                    _write_state(run_dir, state)
                    run_folder.write_metrics(run_dir / STEPS_FILE, trainer.step_rows, run_folder.STEP_COLUMNS)
                raise TrainingInterrupted(
                    f"interrupted at epoch {epoch + 1}, step {step}: saved {run_dir / 'last.safetensors'}; "
                    f"continue with: isnet train --resume {run_dir}"
                )
            if cfg.precise_bn:
                trainer.recalibrate_bn(model)
            trainer.broadcast_buffers(model)
            val = trainer.evaluate(model, objective, trainer.val_ds, with_heat=True)
            ood = (
                trainer.evaluate(model, objective, trainer.ood_ds, with_heat=False)
                if trainer.ood_ds is not None
                else None
            )
            row = {
                "epoch": epoch + 1,
                **{f"train_{k}": v for k, v in means.items()},
                **{f"val_{k}": v for k, v in val.items()},
                "ood_ce": ood["ce"] if ood else None,
                "ood_accuracy": ood["accuracy"] if ood else None,
                "lr": opt.param_groups[0]["lr"],
                "skipped_steps": trainer.skipped_total,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            row["health"] = epoch_status(row, majority, len(data.classes), cfg.uses_lrp_loss)
            if sched is not None:
                sched.step()
            score = _score(row, cfg.select_by)
            improved = best_score is None or (
                math.isfinite(score) and (score < best_score if cfg.select_by == "loss" else score > best_score)
            )
            if improved:
                best_score, best_row = score, row
            rows.append(row)
            last_row = row
            health = assess(rows, best_row, majority, len(data.classes), cfg.uses_lrp_loss)
            rng = trainer.gather(rng_state())
            if info.main:
                save_checkpoint(run_dir / "last.safetensors", model, meta(row))
                if improved:
                    save_checkpoint(run_dir / "best.safetensors", model, meta(row))
                state = _state(opt, sched, epoch + 1, 0, best_score, best_row, rng, trainer.skipped_total, cuts)
                _write_state(run_dir, state)
                run_folder.write_metrics(run_dir / "metrics.csv", rows)
                run_folder.write_metrics(run_dir / STEPS_FILE, trainer.step_rows, run_folder.STEP_COLUMNS)
                run_folder.plot_curves(run_dir / "curves.png", rows)
                run_folder.plot_steps(run_dir / "diagnostics.png", trainer.step_rows)
                trainer.heatmap_figure(model, objective.lrp, run_dir / "heatmaps" / f"epoch_{epoch + 1}.png")
                run_folder.write_text(
                    run_dir / "card.md",
                    run_folder.model_card(
                        dataclasses.asdict(cfg), meta(best_row or row), best_row, run_dir, health.message
                    ),
                )
                _report_epoch(row, cfg, improved)
            if stopped and epoch + 1 < cfg.epochs:
                raise TrainingInterrupted(
                    f"interrupted after epoch {epoch + 1}: saved {run_dir / 'last.safetensors'}; "
                    f"continue with: isnet train --resume {run_dir}"
                )
        _check_agreement(model, trainer)
    if info.main and not health.ok:
        console.print(f"[yellow]warning: {health.message}[/yellow]", soft_wrap=True)
    return TrainResult(run_dir, best_row, last_row, cuts.input, model, trainer.skipped_total, health)


def _stats_column() -> Any:
    from rich.progress import TextColumn

    return TextColumn("{task.fields[stats]}")


def _resolve_cut(
    cfg: TrainConfig, trainer: Trainer, model: nn.Module, progress: Any, state: dict[str, Any] | None
) -> Cuts:
    if not cfg.uses_lrp_loss:
        return Cuts(None, "not used")
    if state is not None and state.get("cut") is not None:
        c = state["cut"]
        hidden = {name: (float(v[0]), float(v[1])) for name, v in (state.get("lds_cuts") or {}).items()}
        return Cuts((float(c[0]), float(c[1])), str(state.get("cut_source", "resumed")), hidden)
    given = parse_cut(cfg.cut)
    if given is not None:
        return Cuts(given, "--cut")
    first, *hidden = trainer.tune_cut(model, progress, keep_weights=cfg.warm_start)
    if trainer.dist.main:
        console.print(f"C1/C2 tuned after a {cfg.cut_epochs}-epoch plain warm-up: C1={first[0]:.4g}, C2={first[1]:.4g}")
        for name, (c1, c2) in zip(trainer.lds_layers, hidden, strict=True):
            console.print(f"  LDS layer {name}: C1={c1:.4g}, C2={c2:.4g}")
    return Cuts(first, f"auto ({cfg.cut_epochs}-epoch warm-up)", dict(zip(trainer.lds_layers, hidden, strict=True)))


def _score(row: dict[str, Any], select_by: str) -> float:
    key = {"loss": "val_loss", "accuracy": "val_accuracy", "auroc": "val_auroc", "macro_f1": "val_macro_f1"}[select_by]
    value = row.get(key)
    return float(value) if value is not None else float("nan")


def _state(
    opt: Any,
    sched: Any,
    epoch: int,
    step: int,
    best_score: float | None,
    best_row: dict[str, Any] | None,
    rng: list[dict[str, Any]],
    skipped: int,
    cuts: Cuts,
) -> dict[str, Any]:
    """Resume state: tensors and plain values only, so it loads with torch.load(weights_only=True)."""
    return {
        "epoch": epoch,  # next epoch to run (0-based)
        "step": step,  # batches of that epoch already done
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "rng": rng,  # one entry per rank
        "best_score": best_score,
        "best_epoch": best_row.get("epoch") if best_row else None,
        "skipped": skipped,
        "cut": list(cuts.input) if cuts.input else None,
        "cut_source": cuts.source,
        "lds_cuts": cuts.record()["lds_cuts"],
    }


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    import io as _io

    from isnet_cli.io.atomic import atomic_write_bytes

    buf = _io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(run_dir / STATE_FILE, buf.getvalue())


def _report_epoch(row: dict[str, Any], cfg: TrainConfig, improved: bool) -> None:
    parts = [
        f"epoch {row['epoch']}/{cfg.epochs}",
        f"train loss {row['train_loss']:.4f}",
        f"val loss {row['val_loss']:.4f}",
        f"acc {row['val_accuracy']:.3f}",
        f"auroc {row['val_auroc']:.3f}",
    ]
    if row.get("val_share_inside") is not None:
        parts.append(f"in-mask {row['val_share_inside']:.3f}")
    if row.get("ood_accuracy") is not None:
        parts.append(f"ood acc {row['ood_accuracy']:.3f}")
    console.print("  ".join(parts) + ("  [green]best[/green]" if improved else ""), soft_wrap=True)


def _check_agreement(model: nn.Module, trainer: Trainer) -> None:
    """Under DDP every rank must end with identical weights (a cheap checksum comparison)."""
    if trainer.dist.world == 1:
        return
    checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    sums = trainer.gather(checksum)
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise IsnetError(f"DDP ranks disagree on the final weights (checksums {sums}); please report this")


# ---------------------------------------------------------------------------------------------- spawning


def _spawn(cfg: TrainConfig, resuming: bool) -> TrainResult:
    """`--devices N`: N processes on this machine (one GPU each, or gloo on CPU), like torchrun."""
    import torch.multiprocessing as mp

    if not resuming:
        cfg = dataclasses.replace(cfg, name=resolve_run_dir(cfg).name)
    try:
        spawn(train_process, (cfg, resuming), cfg.devices)
    except mp.ProcessRaisedException as exc:
        # the child's traceback ends with "module.ExceptionType: message": keep the type's exit code
        kind, _, message = str(exc).strip().splitlines()[-1].partition(": ")
        if kind.endswith("TrainingInterrupted"):
            raise TrainingInterrupted(message) from None
        if kind.endswith("InputError"):
            raise InputError(None, message) from None
        raise IsnetError(f"a training process failed: {kind}: {message}") from None
    run_dir = Path(cfg.out) / str(cfg.name)
    rows = run_folder.read_metrics(run_dir / "metrics.csv")
    return TrainResult(run_dir, None, rows[-1] if rows else None, None, None)
