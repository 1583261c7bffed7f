"""Which quantity is explained: the relevance (or gradient message) put on the logits.

Returns a pair (kind, tensor of shape (K, B, N)) where N is the number of logits:
- ``("R", ...)``: an initial *relevance* at the logits, propagated with the ε-rule through the
  logit layer (the reference LRP Block): a class index, a LongTensor of indices, ``"predicted"``,
  ``"stochastic"`` (K = 1: relevance z_c on logit c, 0 elsewhere) and ``"all"`` (K = N: a diagonal,
  map k explains logit k; the N maps are folded into the batch and propagated in one pass).
- ``("G", ...)``: a *gradient message* ∂η/∂z at the logits, for ``"selective"``. The explained
  quantity is η_c = log(p_c + ε_s) − log(1 − p_c + ε_s) of the lowest-logit class c = argmin z,
  computed in fp32 from the softmax (ε_s = 0.01), as the reference's LRP-Flex. With the gradient
  message the logit layer gets LRP-0 (the equivalent initial relevance is z ⊙ ∂η/∂z): the input
  relevance sums to Σ_k (z_k − b_k)·∂η/∂z_k, the first-order (Taylor) contrast of η, which is the
  class-contrastive quantity of the reference's LRP-Block selective rule (z_c against the
  softmin-weighted other logits, see the algorithm spec §2.4), up to a positive factor.
"""

from __future__ import annotations

import torch

from isnet_cli.errors import InputError

SELECTIVE_EPS = 0.01
NAMED_TARGETS = ("predicted", "all", "selective", "stochastic")


def _working_precision(t: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision logits (the heatmap is always computed in fp32), fp64 kept."""
    return t if t.dtype == torch.float64 else t.float()


def selective_gradient(logits: torch.Tensor, eps_s: float = SELECTIVE_EPS) -> torch.Tensor:
    """∂η_c/∂z for η_c = log(p_c + ε_s) − log(1 − p_c + ε_s), c = argmin z, in fp32.

    ∂η/∂p_c = 1/(p_c + ε_s) + 1/(1 − p_c + ε_s) and ∂p_c/∂z_k = p_c(δ_ck − p_k). Differentiable in
    the logits (the training loss back-propagates through it).
    """
    z = _working_precision(logits)
    p = torch.softmax(z, dim=-1)
    c = z.argmin(dim=-1, keepdim=True)
    pc = p.gather(-1, c)
    deta_dp = 1.0 / (pc + eps_s) + 1.0 / (1.0 - pc + eps_s)
    onehot = torch.zeros_like(p).scatter_(-1, c, 1.0)
    return deta_dp * pc * (onehot - p)


def stochastic_classes(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per sample: the argmax logit with probability 5/11, otherwise a uniformly random other logit."""
    b, n = logits.shape
    top = logits.argmax(dim=-1)
    if n == 1:
        return top
    device = logits.device
    keep = torch.randint(0, 11, (b,), generator=generator, device=device) <= 5
    # uniform over the n - 1 other classes: draw in [0, n - 1) and skip the argmax
    other = torch.randint(0, n - 1, (b,), generator=generator, device=device)
    other = other + (other >= top).long()
    return torch.where(keep, top, other)


def initial_message(
    logits: torch.Tensor, target: int | str | torch.Tensor, generator: torch.Generator | None = None
) -> tuple[str, torch.Tensor]:
    """(kind, (K, B, N) tensor) to put on the logits for `target` (see the module docstring)."""
    if logits.dim() != 2:
        raise InputError(None, f"LRP expects logits of shape (batch, classes), got {tuple(logits.shape)}")
    b, n = logits.shape
    z = _working_precision(logits)
    if isinstance(target, str):
        if target == "all":
            eye = torch.eye(n, device=z.device, dtype=z.dtype)
            return "R", eye.unsqueeze(1) * z.unsqueeze(0)
        if target == "selective":
            return "G", selective_gradient(logits).unsqueeze(0)
        if target == "predicted":
            classes = z.detach().argmax(dim=-1)
        elif target == "stochastic":
            classes = stochastic_classes(z.detach(), generator)
        else:
            raise InputError(
                None, f"unknown LRP target {target!r}", "use a class index or one of " + ", ".join(NAMED_TARGETS)
            )
    elif isinstance(target, torch.Tensor):
        classes = target.to(device=z.device, dtype=torch.long).reshape(-1)
        if classes.numel() == 1 and b > 1:
            classes = classes.expand(b)
        if classes.numel() != b:
            raise InputError(None, f"target has {classes.numel()} entries for a batch of {b}")
    elif isinstance(target, int):
        classes = torch.full((b,), int(target), device=z.device, dtype=torch.long)
    else:
        raise InputError(None, f"unsupported LRP target type {type(target).__name__}")
    if bool(((classes < 0) | (classes >= n)).any()):
        raise InputError(None, f"target class out of range for a model with {n} classes")
    onehot = torch.zeros_like(z).scatter_(-1, classes.unsqueeze(-1), 1.0)
    return "R", (onehot * z).unsqueeze(0)
