"""The messages that flow backwards through the LRP graph, and the relevance they stand for.

A step receives a relevance R (same shape as its activation y) and/or a gradient message G from a
downstream batch norm (see `rules`); both carry the leading map dimension K. The relevance they
stand for at y is R + y ⊙ G.
"""

from __future__ import annotations

from typing import Any

import torch

Message = list  # [relevance or None, gradient message or None], both (K, *activation shape)


def upcast(t: Any) -> Any:
    """Half-precision activations (autocast) are upcast: relevance is always fp32 (fp64 kept)."""
    if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def total(r: torch.Tensor | None, g: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Relevance at an activation y from a relevance R and a gradient message G: R + y ⊙ G."""
    if g is None:
        return r
    return y * g if r is None else r + y * g
