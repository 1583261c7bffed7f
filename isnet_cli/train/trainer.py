"""One process's training machinery: loaders, optimizer, one training epoch (as short named steps) and
the C1/C2 warm-up. Validation on it (precise batch norm, scores, the per-epoch heatmap figure) is
`isnet_cli.train.validation`; the loop that drives both, epoch by epoch, is `isnet_cli.train.fit`.

One training step (variant `selective`, the default):

    R = lrp(x, "selective")          # the training forward *and* the relevance pass, one graph
    CE = cross_entropy(lrp.logits, y)
    L = (1 - P)·CE + P·heatmap_loss(R, mask)   # fp32, see isnet_cli.objective.loss
    backward, all-reduce gradients (DDP), clip to norm 1, optimizer step

Non-finite losses or gradients skip the step (counted; `max_bad_steps` in a row stop the run with
`TrainingDiverged`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from isnet_cli.console import console, progress_enabled
from isnet_cli.device import fused_optimizer, resolve_device
from isnet_cli.distributed import Dist
from isnet_cli.objective.loss import heatmap_loss
from isnet_cli.objective.objective import Objective, hidden_map, lds_layers, make_lrp
from isnet_cli.objective.settings import TARGETS, HeatmapLossParams
from isnet_cli.objective.swap import swap_backgrounds
from isnet_cli.objective.tuning import Welford, cut_from_stats
from isnet_cli.train import ddp
from isnet_cli.train.config import TrainConfig
from isnet_cli.train.data import DataBundle, check_files, make_sets
from isnet_cli.train.health import GRAD_TERMS_EVERY, gradient_split, step_diagnostics
from isnet_cli.train.state import RunState
from isnet_cli.train.stop import StopFlag, TrainingDiverged, TrainingInterrupted, ignore_sigint

# on_step(epoch, steps done in this epoch) -> True to stop as Ctrl-C does (for embedding and tests).
StepCallback = Callable[[int, int], bool | None]


@dataclasses.dataclass
class StepResult:
    """One training step: the objective's output, whether the step is skipped (non-finite loss or
    gradient), whether a rank asked to stop, and the gradient norm (before clipping) and its CE/heatmap split."""

    out: Any
    bad: bool
    stop: bool
    grad_norm: torch.Tensor | None = None
    grad_split: tuple[float, float] | None = None


def loss_sums(out: Any, n: int) -> torch.Tensor:
    """(loss, ce, background, foreground) of a batch of `n`, times n, and n: summed into epoch means."""
    parts = [out.loss.item() * n, out.ce.item() * n, out.background.item() * n, out.foreground.item() * n, n]
    return torch.tensor(parts, dtype=torch.float64)


def loss_means(sums: torch.Tensor) -> dict[str, float]:
    """Means of summed `loss_sums`."""
    n = float(sums[4]) or float("nan")
    return {
        "loss": sums[0].item() / n,
        "ce": sums[1].item() / n,
        "background": sums[2].item() / n,
        "foreground": sums[3].item() / n,
    }


class Trainer:
    """One process's view of a training run (rank 0 writes the run folder)."""

    def __init__(
        self, cfg: TrainConfig, dist_info: Dist, stop: StopFlag, data: DataBundle, on_step: StepCallback | None = None
    ):
        self.cfg, self.dist, self.stop, self.on_step = cfg, dist_info, stop, on_step
        self.device = resolve_device(cfg.device, dist_info.local_rank, dist_info.world)
        self.contract = cfg.contract()
        self.settings = cfg.objective_settings()
        self.progress_on = progress_enabled(cfg.no_progress) and dist_info.main
        self.data = data
        self.classes = data.classes
        self.sets = make_sets(cfg, data, self.contract, dist_info.rank, dist_info.world)
        self.steps_per_epoch = self.sets.steps_per_epoch
        self.skipped_total = 0
        self.lds_layers: tuple[str, ...] = ()  # hidden layers of LRP deep supervision, set by `build_model`
        self.step_rows: list[dict[str, Any]] = []  # steps.csv (rank 0)
        self._explainer: Any = None
        self._explainer_model: nn.Module | None = None

    # -- setup ----------------------------------------------------------------------------------
    def check_files(self) -> None:
        """Decode every image and mask once (this fills the cache) and report all bad files together."""
        check_files(self.sets, self.cfg.workers, self.progress_on, self.dist.main, lambda p: self.gather(p)[0])

    def build_model(self) -> nn.Module:
        """The configured architecture on this rank's device, identical on every rank; its LDS layers checked."""
        from isnet_cli.backbones import build_model

        cfg = self.cfg
        model = build_model(
            cfg.arch, len(self.classes), in_channels=self.contract.channels, pretrained=cfg.pretrained
        ).to(self.device)
        self.lds_layers = lds_layers(model, cfg.arch, cfg.lds_layer_names) if cfg.lds else ()
        ddp.broadcast_weights(self.dist, model)
        return model

    def resume(self, state: RunState, step_rows: list[dict[str, Any]]) -> None:
        """Continue the counts of a resumed run: skipped steps and the steps.csv rows written so far."""
        self.skipped_total = state.skipped
        self.step_rows = step_rows

    def loader(self, ds: Any, sampler: Sampler[int], epoch: int, drop_last: bool = False) -> DataLoader:
        """Batches of `ds` in `sampler`'s order; worker randomness seeded by (seed, epoch)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=self.cfg.workers,
            drop_last=drop_last,
            generator=g,
            worker_init_fn=ignore_sigint if self.cfg.workers else None,
            pin_memory=self.device.type == "cuda",
        )

    def make_optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """The configured optimizer over the trainable parameters, and the cosine schedule (or None)."""
        cfg = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        fused = fused_optimizer(self.device)
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused
            )
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs) if cfg.scheduler == "cosine" else None
        return opt, sched

    def gather(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order (see `ddp.gather`)."""
        return ddp.gather(self.dist, obj)

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's batch-norm buffers on every rank (see `ddp.broadcast_buffers`)."""
        ddp.broadcast_buffers(self.dist, model)

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
        self.sets.sampler.set_epoch(epoch, skip * cfg.batch_size)
        loader = self.loader(self.sets.train, self.sets.sampler, epoch, drop_last=self.sets.drop_last)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, ce, bg, fg, samples
        task = progress.add_task(
            f"{label} {epoch + 1}/{cfg.epochs}", total=self.steps_per_epoch, completed=skip, stats=""
        )
        step, bad_in_row, t0, seen = skip, 0, time.perf_counter(), 0
        p_now = cfg.P * min(1.0, epoch / cfg.ramp_epochs) if cfg.ramp_epochs else cfg.P
        for x, mask, y in loader:
            x, mask, y = (t.to(self.device, non_blocking=True) for t in (x, mask, y))
            x = self._swap(x, mask, epoch, step)
            result = self._step(model, objective, opt, (x, mask, y), step, p_now, heat, collect_mass)
            if self.dist.main:
                self.step_rows.append(
                    step_diagnostics(label, epoch, step, result.out, result.grad_norm, result.grad_split)
                )
            bad_in_row = self._count_bad(bad_in_row, result.bad, opt, epoch, step)
            if not result.bad:
                opt.step()
                sums += loss_sums(result.out, len(y))
            step += 1
            seen += len(y)
            self._show(progress, task, result.out, seen, t0)
            if heat and self.on_step is not None and self.on_step(epoch, step):
                self.stop.event.set()
            if result.stop or (self.dist.world == 1 and self.stop.event.is_set()):
                return loss_means(sums), step, True
            if step >= self.steps_per_epoch:
                break
        return loss_means(ddp.sum_over_ranks(self.dist, sums, self.device)), step, False

    def _swap(self, x: torch.Tensor, mask: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """Background swap, seeded by (seed, epoch, step, rank) so that a resumed run swaps alike."""
        cfg = self.cfg
        if cfg.background_swap <= 0:
            return x
        g = torch.Generator().manual_seed(
            (cfg.seed * 1_000_003 + epoch) * 100_003 + step * self.dist.world + self.dist.rank
        )
        return swap_backgrounds(x, mask, cfg.background_swap, g)

    def _step(
        self,
        model: nn.Module,
        objective: Objective,
        opt: torch.optim.Optimizer,
        batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        step: int,
        p_now: float,
        heat: bool,
        collect_mass: list[Welford] | None,
    ) -> StepResult:
        """Loss, backward, gradient sync and clipping of one batch; the optimizer step is the caller's."""
        x, mask, y = batch
        opt.zero_grad(set_to_none=True)
        out = objective(x, mask, y, heat=heat, P=p_now)
        if collect_mass is not None:
            for stats, masses in zip(collect_mass, self._mass(objective, x, mask), strict=True):
                stats.update(masses.tolist())
        bad = not bool(torch.isfinite(out.loss))
        ce_grads = self._ce_gradients(model, out, heat and p_now > 0 and step % GRAD_TERMS_EVERY == 0)
        if not bad:
            out.loss.backward()
        bad, stop = ddp.sync_gradients(self.dist, model, bad, self.stop.event.is_set(), self.device)
        result = StepResult(out, bad, stop)
        if not bad:
            result.grad_split = gradient_split(model, ce_grads, 1.0 - p_now) if ce_grads is not None else None
            result.grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.clip)
            result.bad = not bool(torch.isfinite(result.grad_norm))
        return result

    def _count_bad(self, bad_in_row: int, bad: bool, opt: torch.optim.Optimizer, epoch: int, step: int) -> int:
        """The number of bad steps in a row after this one; too many raise `TrainingDiverged`."""
        if not bad:
            return 0
        bad_in_row += 1
        self.skipped_total += 1
        opt.zero_grad(set_to_none=True)
        if self.dist.main:
            console.print(
                f"[yellow]warning: non-finite loss or gradient at epoch {epoch + 1} step {step + 1}: "
                f"step skipped ({bad_in_row} in a row)[/yellow]"
            )
        if bad_in_row >= self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {bad_in_row} non-finite losses/gradients in a row at epoch "
                f"{epoch + 1} step {step + 1}; lower --lr, raise --d or --E, or check the inputs"
            )
        return bad_in_row

    def _show(self, progress: Any, task: Any, out: Any, seen: int, t0: float) -> None:
        """Advance the progress bar with the step's loss terms and the throughput."""
        rate = seen * self.dist.world / max(time.perf_counter() - t0, 1e-9)
        progress.update(
            task,
            advance=1,
            stats=f"loss {out.loss.item():.3f} ce {out.ce.item():.3f} bg {out.background.item():.3f} "
            f"fg {out.foreground.item():.3f} | {rate:.1f} img/s",
        )

    def _ce_gradients(self, model: nn.Module, out: Any, wanted: bool) -> list[torch.Tensor | None] | None:
        """∂CE/∂θ alone (before the full backward), for the per-term gradient norms of steps.csv. Only for a
        loss with a heatmap term: without one the whole gradient is the CE's, and splitting it by P would
        report a heatmap part that does not exist (and cost an extra backward every tenth step)."""
        if not wanted or self.dist.world > 1 or not self.settings.uses_lrp_loss or not out.ce.requires_grad:
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        return list(torch.autograd.grad(out.ce, params, retain_graph=True, allow_unused=True))

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
            self._explainer = make_lrp(model, self.settings, self.lds_layers)
            self._explainer_model = model
        return self._explainer

    # -- C1/C2 ----------------------------------------------------------------------------------
    def tune_cut(self, model: nn.Module, progress: Any, keep_weights: bool = False) -> list[tuple[float, float]]:
        """Warm up a copy with CE only for `cut_epochs`, collect Σ|R| in the last epoch (Welford);
        (C1, C2) of the input map, then of each LDS layer. `keep_weights`: `model` continues from the
        warmed-up weights (otherwise the copy is thrown away, as the reference does)."""
        cfg = self.cfg
        warm = copy.deepcopy(model)
        plain = dataclasses.replace(self.settings, variant="none", method="isnet")
        objective = Objective(plain, warm, self.device, None)
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
