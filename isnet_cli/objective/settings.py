"""The training objective's parameters and names, torch-free: the `--variant` and `--method`
registries (the CLI offers them as choices), what LRP explains for each variant, the heatmap loss's
hyper-parameters, the foreground bounds C1/C2 (`Cuts`) and everything else the per-batch loss depends
on (`ObjectiveSettings`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# "none": the standard classifier; "masked": the standard classifier on lung-masked images behind a segmenter
# (the segmenter-then-classifier pipeline, `isnet_cli.pipeline`); neither has a heatmap loss.
VARIANTS = ("selective", "stochastic", "original", "none", "masked")
PLAIN_VARIANTS = ("none", "masked")
METHODS = ("isnet", "rrr")
# variant -> the LRP target explained during training ("original": one map per class)
TARGETS = {"selective": "selective", "stochastic": "stochastic", "original": "all"}


def uses_heatmap_loss(method: str, variant: str) -> bool:
    """The ISNet heatmap loss (through LRP) is on for the ISNet method with any variant but the plain ones."""
    return method == "isnet" and variant not in PLAIN_VARIANTS


@dataclass(frozen=True)
class HeatmapLossParams:
    """Hyper-parameters of the heatmap loss (module docstring of `loss`). d, E, A, B: these defaults are
    also `isnet train`'s; C1/C2 are tuned from a warm-up (`tuning`) or given with --cut."""

    d: float = 0.9
    E: float = 1.0
    A: float = 1.0
    B: float = 1.0
    C1: float = 1.0
    C2: float = 25.0


@dataclass(frozen=True)
class ObjectiveSettings:
    """Every parameter of the per-batch loss: the variant and method, the weight P of
    (1-P)·CE + P·heatmap loss, the heatmap loss's d/E/A/B (`loss`; C1/C2 come from `Cuts`), the LRP
    epsilon and zB input bounds [low, high] (the input contract's value range), the GWRP decay over LRP
    deep-supervision layers, the RRR weight, and GPU autocast for plain forwards."""

    variant: str
    method: str
    P: float
    loss: HeatmapLossParams
    epsilon: float
    low: float
    high: float
    lds_decay: float
    rrr_lambda: float
    amp: bool

    @property
    def uses_lrp_loss(self) -> bool:
        return uses_heatmap_loss(self.method, self.variant)


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
