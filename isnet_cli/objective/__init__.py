"""The ISNet objective: heatmap loss (background GWRP + foreground band), RRR baseline, C1/C2 tuning, and
the per-batch training objective (`isnet_cli.objective.objective`, imported on its own: it needs the LRP engine)."""

from isnet_cli.objective.loss import HeatmapLoss, HeatmapLossParams, gwrp, heatmap_loss, rrr_penalty, total_loss
from isnet_cli.objective.tuning import Welford, cut_from_stats, parse_cut

__all__ = [
    "HeatmapLoss",
    "HeatmapLossParams",
    "Welford",
    "cut_from_stats",
    "gwrp",
    "heatmap_loss",
    "parse_cut",
    "rrr_penalty",
    "total_loss",
]
