"""LRP rules as explicit, differentiable tensor operations: the ε division, batch-norm fusion, zB and αβ.

Conventions: relevance tensors carry a leading *map* dimension K (several explained quantities per
sample, e.g. one per class): shape (K, B, ...), while stored activations have shape (B, ...) and
broadcast against them. The linear maps the rules send messages back through are transposed
explicitly (`transpose`), so the heatmap is an ordinary differentiable function of the weights and
activations: training needs one extra backward, never a double backward. Every op here also exports
to ONNX (opset 17), so the `--with-heatmap` graph is this engine as it is.

Two kinds of message flow backwards between steps:
- a *relevance* R (the usual LRP quantity, same shape as the activation), and
- a *gradient message* G = s ⊙ R_out / stab(z_out) sent by a batch norm to its producer(s), so that
  a conv (or pool) followed by one or more BN slices gets the ε-rule of the *fused* conv∘BN with the
  BN output as denominator (the reference's per-consumer fusion after DenseNet concatenations).
  The relevance it stands for at the BN input a is a ⊙ G.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isnet_cli.lrp.transpose import sum_to


def stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps·sign(z), with sign(0) = +1 (the reference's and Zennit's stabiliser); d/dz = 1.

    The sign comes from copysign against z + 0.0 (which turns −0.0 into +0.0): on CPU this is five
    times faster than torch.where, and these element-wise passes cost as much as the convolutions.
    ONNX has no CopySign, so an export traces the equivalent where().
    """
    if torch.onnx.is_in_onnx_export():
        return torch.where(z >= 0, eps, -eps) + z
    return torch.full_like(z, eps).copysign_(z.detach() + 0.0).add_(z)  # the sign term is a constant


def epsilon_divide(
    r: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    scale_in: torch.Tensor | None = None,
    shift_in: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """LRP-ε division s = scale_out ⊙ R / stab(z), z = scale_in ⊙ y + shift_in, stab(z) = z + ε·sign(z),
    for the relevance R = factor ⊙ r (factor: an activation, when R is the product an LRP rule sends).

    The per-channel vectors (shape (C,), each optional) express a fused batch norm and detached biases
    without materialising z. When gradients are recorded, the backward recomputes z and stab(z) from
    y instead of keeping them, and keeps the output (which the transposed linear map that follows
    keeps anyway) or r, never the product R: autograd would keep z, stab(z), its sign mask, the
    quotient and R, up to four extra activation-sized tensors per layer.
    """
    extra = (scale_in, shift_in, scale_out, factor)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (r, y, *extra)):
        return _EpsilonDivide.apply(r, y, eps, *extra)
    return _epsilon_divide(r, y, eps, *extra)


def _epsilon_divide(r, y, eps, scale_in, shift_in, scale_out, factor) -> torch.Tensor:
    big_r = r if factor is None else factor * r
    s = big_r / stabilise(affine(y, scale_in, shift_in), eps)
    return s if scale_out is None else s * channel_view(scale_out, s.dim() - 1)


def affine(y: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """scale ⊙ y + shift with per-channel vectors (either may be None)."""
    if scale is not None:
        y = channel_view(scale, y.dim()) * y
    if shift is not None:
        y = y + channel_view(shift, y.dim())
    return y


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a (K, B, C, ...) or (K, B, C) tensor over everything but the channels C."""
    return t.sum([i for i in range(t.dim()) if i != 2]) if t.dim() > 3 else t.sum((0, 1))


class _EpsilonDivide(torch.autograd.Function):
    """`epsilon_divide` with a hand-written backward that recomputes the denominator.

    With q = 1/stab(z), R = factor ⊙ r and g the incoming gradient (d stab/dz = 1 away from z = 0):
    ∂/∂R = g·s_out·q, ∂/∂r = factor·∂/∂R, ∂/∂factor = Σ_K r·∂/∂R, ∂/∂z = −∂/∂R·R·q,
    ∂/∂y = s_in·∂/∂z, ∂/∂s_in = Σ y·∂/∂z, ∂/∂shift = Σ ∂/∂z, ∂/∂s_out = Σ g·R·q (Σ over all but
    the channel axis, and over the map axis K). Without s_out and factor, R·q is the output itself.
    """

    @staticmethod
    def forward(ctx, r, y, eps, scale_in, shift_in, scale_out, factor):
        out = _epsilon_divide(r, y, eps, scale_in, shift_in, scale_out, factor)
        ctx.eps, ctx.r_shape = eps, r.shape
        ctx.keeps_output = scale_out is None and factor is None
        ctx.save_for_backward(out if ctx.keeps_output else r, y, scale_in, shift_in, scale_out, factor)
        return out

    @staticmethod
    def backward(ctx, grad):
        kept, y, scale_in, shift_in, scale_out, factor = ctx.saved_tensors
        need_r, need_y, _, need_si, need_sh, need_so, need_f = ctx.needs_input_grad
        q = stabilise(affine(y, scale_in, shift_in), ctx.eps).reciprocal_()
        g_big = grad * q  # ∂/∂R, before s_out
        grad_so = grad_f = None
        if ctx.keeps_output:
            grad_r, r_q = g_big, kept
        else:
            r = kept
            big_r = r if factor is None else factor * r
            if need_so:
                grad_so = _channel_sum(g_big * big_r)
            if scale_out is not None:
                g_big = g_big * channel_view(scale_out, g_big.dim() - 1)
            grad_r = g_big if factor is None else g_big * factor
            if need_f:
                grad_f = sum_to(g_big * r, factor.shape)
            r_q = big_r * q
        grad_r = sum_to(grad_r, ctx.r_shape) if need_r else None
        grad_y = grad_si = grad_sh = None
        if need_y or need_si or need_sh:
            gz = -(g_big * r_q)
            if need_y:
                grad_y = sum_to(gz if scale_in is None else gz * channel_view(scale_in, gz.dim() - 1), y.shape)
            if need_si:
                grad_si = _channel_sum(gz * y)
            if need_sh:
                grad_sh = _channel_sum(gz)
        return grad_r, grad_y, None, grad_si, grad_sh, grad_so, grad_f


def bn_affine(
    bn: nn.modules.batchnorm._BatchNorm,
    x: torch.Tensor,
    batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a batch norm as an affine map y = scale·x + shift.

    Train mode (or no running stats): the current batch statistics of the BN input, *detached*
    (biased variance, i.e. exactly what BN normalised with), so the heatmap of a sample is not
    coupled to the rest of the batch: `batch_stats` = (mean, 1/sqrt(var + eps)) as the forward kept
    them, else recomputed from x. Eval mode: running statistics.
    """
    if bn.training or bn.running_mean is None:
        if batch_stats is not None:
            mean, inv = batch_stats
        else:
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
                inv = torch.rsqrt(var + bn.eps)
    else:
        mean, inv = bn.running_mean, torch.rsqrt(bn.running_var + bn.eps)
    inv = inv.detach()
    scale = inv if bn.weight is None else bn.weight * inv
    shift = -mean.detach() * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against an (N, C, ...) tensor of `ndim` dims."""
    return v.view(-1, *([1] * (ndim - 2))) if ndim > 2 else v


def zb_input(
    r: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    apply,
    transpose,
    low: float,
    high: float,
    eps: float,
) -> torch.Tensor:
    """LRP-zB at the first layer, for inputs bounded in [low, high].

    z' = z − (l·W⁺ + l·b⁺) − (h·W⁻ + h·b⁻) (bounded-input images through the positive/negative
    weights, as the reference), s = R / (z' + eps·sign(z')),
    R_x = x ⊙ Wᵀs − l·(W⁺)ᵀs − h·(W⁻)ᵀs. `apply(x, W)` is the layer's linear map (no bias) and
    `transpose(s, W)` its transpose; the bound terms do not depend on the sample, so they are
    computed for one and broadcast.
    """
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    one = torch.ones_like(x[:1])
    zp = z
    if low != 0.0:
        zp = zp - apply(one * low, w_pos)
    if high != 0.0:
        zp = zp - apply(one * high, w_neg)
    if bias is not None:
        b = bias.detach()
        zp = zp - channel_view(low * b.clamp(min=0) + high * b.clamp(max=0), z.dim())
    s = r / stabilise(zp, eps)
    # one transposed op for the three weight sets: stacked along the input-channel axis
    stacked = torch.cat([weight, w_pos, w_neg], dim=1)
    c = transpose(s, stacked)
    c, c_pos, c_neg = c.chunk(3, dim=2 if weight.dim() > 2 else -1)  # conv: channels; linear: features
    return x * c - low * c_pos - high * c_neg


def alpha_beta(
    r: torch.Tensor,
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    apply,
    transpose,
    alpha: float,
    beta: float,
    eps: float = 1e-9,
) -> torch.Tensor:
    """LRP-αβ (α − β = 1): positive and negative contributions a_j·w_jk split and normalised apart.

    z⁺ = W⁺a⁺ + W⁻a⁻ + b⁺, z⁻ = W⁻a⁺ + W⁺a⁻ + b⁻;
    R_a = α·(a⁺ ⊙ W⁺ᵀ(R/z⁺) + a⁻ ⊙ W⁻ᵀ(R/z⁺)) − β·(a⁺ ⊙ W⁻ᵀ(R/z⁻) + a⁻ ⊙ W⁺ᵀ(R/z⁻)).
    z+ is α = 1, β = 0.
    """
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    a_pos, a_neg = a.clamp(min=0), a.clamp(max=0)
    bshape = (lambda v: channel_view(v, a.dim() if weight.dim() > 2 else 2)) if bias is not None else None
    z_pos = apply(a_pos, w_pos) + apply(a_neg, w_neg)
    if bias is not None:
        z_pos = z_pos + bshape(bias.clamp(min=0))
    s_pos = r / stabilise(z_pos, eps)
    out = alpha * (a_pos * transpose(s_pos, w_pos) + a_neg * transpose(s_pos, w_neg))
    if beta:
        z_neg = apply(a_pos, w_neg) + apply(a_neg, w_pos)
        if bias is not None:
            z_neg = z_neg + bshape(bias.clamp(max=0))
        s_neg = r / torch.where(z_neg < 0, z_neg - eps, z_neg + eps)
        out = out - beta * (a_pos * transpose(s_neg, w_neg) + a_neg * transpose(s_neg, w_pos))
    return out


def conv_apply(conv: nn.Module):
    """x ↦ conv(x, W) without bias, for rules that re-run the layer with modified weights."""
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[conv.weight.dim() - 2]

    def apply(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return fn(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    return apply
