"""Layer-wise relevance propagation over torch.fx graphs.

Usage::

    from isnet_cli.lrp import LRP

    lrp = LRP(model, epsilon=0.01, first_rule="zb", low=0.0, high=1.0)
    with torch.no_grad():                  # explanations: no autograd graph needed
        R = lrp(x, "predicted")            # (B, C, H, W); lrp.logits holds the forward output
    R_all = lrp(x, "all")                  # (B, K, C, H, W): every class, one reverse pass
    R = lrp(x, "selective")                # training: differentiable, one ordinary backward
    loss = F.cross_entropy(lrp.logits, y) + heatmap_loss(R, mask)

Targets: an int, a LongTensor (B,), "predicted", "all", "selective", "stochastic". Modules:
`graph` (capture and plan), `rules` (the LRP rules as tensor operations), `targets` (what is
explained), `engine` (forward over the graph and the reverse pass), `names` (rule names, torch-free).
`LRP` is imported on first use, so that `isnet_cli.lrp.names` can be read without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from isnet_cli.lrp.engine import LRP

__all__ = ["LRP"]


def __getattr__(name: str) -> Any:
    """`LRP`, imported with torch when first asked for (PEP 562)."""
    if name == "LRP":
        from isnet_cli.lrp.engine import LRP

        return LRP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
