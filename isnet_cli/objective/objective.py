"""One batch's training objective: CE, the ISNet heatmap loss through the LRP engine (optionally with
LRP deep supervision), or the RRR penalty, as `isnet train` configures it.

`Objective(cfg, model, device, cut, lds_cuts)(x, mask, y)` runs the training forward, the relevance
pass and the loss in one graph and returns a `StepOutput`; `Cuts` carries the foreground bounds C1/C2.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from isnet_cli.errors import InputError, ModelError
from isnet_cli.objective.loss import HeatmapLossParams, gwrp, heatmap_loss, rrr_penalty, total_loss
from isnet_cli.train.config import TrainConfig

# variant -> the LRP target explained during training ("original": one map per class)
TARGETS = {"selective": "selective", "stochastic": "stochastic", "original": "all"}


@dataclass
class StepOutput:
    loss: torch.Tensor
    ce: torch.Tensor
    background: torch.Tensor
    foreground: torch.Tensor
    logits: torch.Tensor
    share: torch.Tensor | None = None  # (B,) share of |R| inside the mask
    mass: torch.Tensor | None = None  # (B,) whole-map Σ|R| (the C1/C2 statistic)


@dataclass(frozen=True)
class Cuts:
    """Foreground bounds (C1, C2) of the heatmap loss, how they were found, and with LRP deep
    supervision one pair per hidden layer (in layer order)."""

    input: tuple[float, float] | None
    source: str
    hidden: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON form kept in config.json, checkpoints and the resume state."""
        return {
            "C1": self.input[0] if self.input else None,
            "C2": self.input[1] if self.input else None,
            "cut_source": self.source,
            "lds_cuts": {name: list(c) for name, c in self.hidden.items()} or None,
        }


class Objective:
    """Computes the training / validation loss of one batch for the configured variant and method.

    With LRP deep supervision (`lds_cuts`: C1/C2 per hidden layer), the heatmap loss of each hidden
    layer's relevance joins the input map's, combined by a GWRP over layers with decay `--lds-decay`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        device: torch.device,
        cut: tuple[float, float] | None,
        lds_cuts: dict[str, tuple[float, float]] | None = None,
    ):
        self.cfg, self.model, self.device = cfg, model, device
        self.params = HeatmapLossParams(cfg.d, cfg.E, cfg.A, cfg.B, *(cut or (1.0, 25.0)))
        self.lds_params = {
            name: HeatmapLossParams(cfg.d, cfg.E, cfg.A, cfg.B, *c) for name, c in (lds_cuts or {}).items()
        }
        self.lrp = make_lrp(model, cfg, tuple(self.lds_params)) if cfg.uses_lrp_loss else None
        self.amp = cfg.amp and device.type == "cuda"

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cuda", enabled=True) if self.amp else contextlib.nullcontext()

    def __call__(
        self, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, heat: bool = True, P: float | None = None
    ) -> StepOutput:
        """`heat=False` or `P=0`: CE only (the C1/C2 warm-up, the `none` variant, the start of a ramp).

        `P` overrides the configured weight (the ramp); validation always uses the configured P.
        """
        P = self.cfg.P if P is None else P
        zero = torch.zeros((), device=x.device)
        if self.cfg.method == "rrr" and heat:
            x = x.detach().requires_grad_(True)
            with self._autocast():
                logits = self.model(x)
            ce = F.cross_entropy(logits.float(), y)
            penalty = rrr_penalty(x, logits, mask)
            return StepOutput(ce + self.cfg.rrr_lambda * penalty, ce, penalty.detach(), zero, logits.detach())
        if self.lrp is None or not heat or P == 0:
            with self._autocast():
                logits = self.model(x)
            ce = F.cross_entropy(logits.float(), y)
            return StepOutput(ce, ce, zero, zero, logits.detach())
        with self._autocast():  # the engine runs its relevance pass in fp32 whatever the forward did
            relevance = self.lrp(x, TARGETS[self.cfg.variant])
        logits = self.lrp.logits
        ce = F.cross_entropy(logits.float(), y)
        parts = heatmap_loss(relevance, mask, self.params)
        heat = parts.total
        if self.lds_params:
            layer_losses = [
                heatmap_loss(hidden_map(self.lrp, name), mask, p).total for name, p in self.lds_params.items()
            ]
            heat = gwrp(torch.stack([heat, *layer_losses]), self.cfg.lds_decay)
        loss = total_loss(ce, heat, P)
        return StepOutput(
            loss,
            ce,
            parts.background.detach(),
            parts.foreground.detach(),
            logits.detach(),
            parts.share_inside,
            parts.mass,
        )


def make_lrp(model: nn.Module, cfg: TrainConfig, hidden: Sequence[str] = ()) -> Any:
    from isnet_cli.lrp import LRP

    return LRP(model, epsilon=cfg.eps, low=0.0, high=1.0, hidden=hidden)


def hidden_map(lrp: Any, name: str) -> torch.Tensor:
    """The relevance an LRP call recorded at hidden layer `name`; it must be an image-like map."""
    relevance = lrp.hidden[name]
    if relevance.dim() not in (4, 5):
        raise ModelError(
            f"--lds-layers: layer {name!r} outputs shape {tuple(relevance.shape[-3:])}, not a (C, H, W) map; "
            "name convolutional layers"
        )
    return relevance


def lds_layers(cfg: TrainConfig, model: nn.Module) -> tuple[str, ...]:
    """The hidden layers of LRP deep supervision: --lds-layers, or the architecture's default."""
    from isnet_cli.backbones import default_lds_layers

    if not cfg.lds:
        return ()
    names = cfg.lds_layer_names or default_lds_layers(cfg.arch, model)
    if not names:
        children = ", ".join(name for name, _ in model.named_children())
        raise InputError(
            None,
            f"--lds: no default hidden layers for --arch {cfg.arch}",
            f"name them with --lds-layers (module paths; top-level modules: {children})",
        )
    from isnet_cli.lrp.graph import layer_output, trace

    gm = trace(model)  # check the names now, not after the C1/C2 warm-up
    for name in names:
        try:
            layer_output(gm, name)
        except ModelError as exc:
            raise InputError(None, f"--lds-layers: {exc}", "name modules of the model") from None
    return tuple(names)


def relevance_stats(lrp: Any, x: torch.Tensor, mask: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(share of |R| inside the mask, logits) for the explained `target`, without gradients."""
    with torch.no_grad():
        relevance = lrp(x, target)
        parts = heatmap_loss(relevance, mask, HeatmapLossParams())
    return parts.share_inside, lrp.logits.detach()
