"""One batch's training objective: CE, the ISNet heatmap loss through the LRP engine (optionally with
LRP deep supervision), or the RRR penalty.

`Objective(settings, model, device, cut, lds_cuts)(x, mask, y)` runs the training forward, the relevance
pass and the loss in one graph and returns a `StepOutput`. `ObjectiveSettings` holds every parameter
the loss depends on (the training configuration builds it: `TrainConfig.objective_settings`); `Cuts`
carries the foreground bounds C1/C2.
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

from isnet_cli.device import autocast
from isnet_cli.errors import InputError, ModelError
from isnet_cli.objective.loss import gwrp, heatmap_loss, rrr_penalty, total_loss
from isnet_cli.objective.settings import TARGETS, HeatmapLossParams, ObjectiveSettings


@dataclass
class StepOutput:
    """One batch's loss, its parts (detached) and logits; the in-mask share and Σ|R| when LRP ran."""

    loss: torch.Tensor
    ce: torch.Tensor
    background: torch.Tensor
    foreground: torch.Tensor
    logits: torch.Tensor
    share: torch.Tensor | None = None  # (B,) share of |R| inside the mask
    mass: torch.Tensor | None = None  # (B,) whole-map Σ|R| (the C1/C2 statistic)


class Objective:
    """Computes the training / validation loss of one batch for the configured variant and method.

    With LRP deep supervision (`lds_cuts`: C1/C2 per hidden layer), the heatmap loss of each hidden
    layer's relevance joins the input map's, combined by a GWRP over layers with decay `--lds-decay`.
    """

    def __init__(
        self,
        settings: ObjectiveSettings,
        model: nn.Module,
        device: torch.device,
        cut: tuple[float, float] | None,
        lds_cuts: dict[str, tuple[float, float]] | None = None,
    ):
        self.settings, self.model, self.device = settings, model, device
        base = settings.loss
        self.params = dataclasses.replace(base, C1=cut[0], C2=cut[1]) if cut else base
        self.lds_params = {name: dataclasses.replace(base, C1=c[0], C2=c[1]) for name, c in (lds_cuts or {}).items()}
        self.lrp = make_lrp(model, settings, tuple(self.lds_params)) if settings.uses_lrp_loss else None
        self.amp = settings.amp and device.type == "cuda"

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device, self.amp)

    def __call__(
        self, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, heat: bool = True, P: float | None = None
    ) -> StepOutput:
        """`heat=False` or `P=0`: CE only (the C1/C2 warm-up, the `none` variant, the start of a ramp).

        `P` overrides the configured weight (the ramp); validation always uses the configured P.
        """
        P = self.settings.P if P is None else P
        zero = torch.zeros((), device=x.device)
        if self.settings.method == "rrr" and heat:
            x = x.detach().requires_grad_(True)
            with self._autocast():
                logits = self.model(x)
            ce = F.cross_entropy(logits.float(), y)
            penalty = rrr_penalty(x, logits, mask)
            return StepOutput(ce + self.settings.rrr_lambda * penalty, ce, penalty.detach(), zero, logits.detach())
        if self.lrp is None or not heat or P == 0:
            with self._autocast():
                logits = self.model(x)
            ce = F.cross_entropy(logits.float(), y)
            return StepOutput(ce, ce, zero, zero, logits.detach())
        with self._autocast():  # the engine runs its relevance pass in fp32 whatever the forward did
            relevance = self.lrp(x, TARGETS[self.settings.variant])
        logits = self.lrp.logits
        ce = F.cross_entropy(logits.float(), y)
        parts = heatmap_loss(relevance, mask, self.params)
        heat = parts.total
        if self.lds_params:
            layer_losses = [
                heatmap_loss(hidden_map(self.lrp, name), mask, p).total for name, p in self.lds_params.items()
            ]
            heat = gwrp(torch.stack([heat, *layer_losses]), self.settings.lds_decay)
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


def make_lrp(model: nn.Module, settings: ObjectiveSettings, hidden: Sequence[str] = ()) -> Any:
    """The training LRP engine: the settings' epsilon and zB bounds, recording relevance at `hidden` layers."""
    from isnet_cli.lrp import LRP

    return LRP(model, epsilon=settings.epsilon, low=settings.low, high=settings.high, hidden=hidden)


def hidden_map(lrp: Any, name: str) -> torch.Tensor:
    """The relevance an LRP call recorded at hidden layer `name`; it must be an image-like map."""
    relevance = lrp.hidden[name]
    if relevance.dim() not in (4, 5):
        raise ModelError(
            f"--lds-layers: layer {name!r} outputs shape {tuple(relevance.shape[-3:])}, not a (C, H, W) map; "
            "name convolutional layers"
        )
    return relevance


def lds_layers(model: nn.Module, arch: str, names: Sequence[str] | None) -> tuple[str, ...]:
    """The hidden layers of LRP deep supervision: `names` (--lds-layers), or the architecture's default."""
    from isnet_cli.backbones import default_lds_layers

    names = names or default_lds_layers(arch, model)
    if not names:
        children = ", ".join(name for name, _ in model.named_children())
        raise InputError(
            None,
            f"--lds: no default hidden layers for --arch {arch}",
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
