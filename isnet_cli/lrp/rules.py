"""LRP rules as explicit, differentiable tensor operations.

Conventions: relevance tensors carry a leading *map* dimension K (several explained quantities per
sample, e.g. one per class): shape (K, B, ...), while stored activations have shape (B, ...) and
broadcast against them. Linear maps are transposed with the kernels autograd itself uses
(`aten.convolution_backward`, the pooling backward kernels, a matmul) applied to a K·B batch, so the
heatmap is an ordinary differentiable function of the weights and activations: training needs one
extra backward, never a double backward.

Two kinds of message flow backwards between steps:
- a *relevance* R (the usual LRP quantity, same shape as the activation), and
- a *gradient message* G = s ⊙ R_out / stab(z_out) sent by a batch norm to its producer(s), so that
  a conv (or pool) followed by one or more BN slices gets the ε-rule of the *fused* conv∘BN with the
  BN output as denominator (the reference's per-consumer fusion after DenseNet concatenations).
  The relevance it stands for at the BN input a is a ⊙ G.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps·sign(z), with sign(0) = +1 (the reference's and Zennit's stabiliser).

    Built as where(z ≥ 0, eps, −eps) + z: two passes over z instead of four (these element-wise
    passes cost as much as the convolutions on CPU at high resolution).
    """
    e = z.new_tensor(eps)
    return torch.where(z >= 0, e, -e).add_(z)


def fold(t: torch.Tensor) -> torch.Tensor:
    """(K, B, ...) -> (K·B, ...): the map dimension folded into the batch."""
    return t.flatten(0, 1)


def unfold(t: torch.Tensor, k: int) -> torch.Tensor:
    """(K·B, ...) -> (K, B, ...)."""
    return t.unflatten(0, (k, -1))


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_transpose(g: torch.Tensor, conv: nn.Module, weight: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """Wᵀg for a convolution (the input-gradient of conv(·, W) at g), g of shape (K, B, C_out, ...).

    A transposed convolution with the output padding that restores the input size (a strided conv
    drops trailing rows); differentiable in `weight` and `g`.
    """
    k = g.shape[0]
    nd = weight.dim() - 2
    padding = [0] * nd if conv.padding == "valid" else list(conv.padding)
    out_pad = []
    for i in range(nd):
        size = in_shape[2 + i]
        produced = (
            (g.shape[3 + i] - 1) * conv.stride[i] - 2 * padding[i] + conv.dilation[i] * (weight.shape[2 + i] - 1) + 1
        )
        out_pad.append(size - produced)
    grad = _CONV_T[nd](fold(g), weight, None, conv.stride, padding, out_pad, conv.groups, conv.dilation)
    return unfold(grad, k)


def linear_transpose(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Wᵀg for a linear layer y = x Wᵀ + b, for g of shape (K, B, ..., out)."""
    return g @ weight


def pool_transpose(g: torch.Tensor, module: nn.Module | None, fn, args, kwargs, in_shape) -> torch.Tensor:
    """Transpose of an average/adaptive-average pool or a mean, as a uniform linear map.

    Global pooling is an expand; fixed-size 2-D pools use their backward kernels; anything else
    goes through autograd of the (linear) op at a constant point, with a graph only when the
    caller is differentiating.
    """
    k = g.shape[0]
    shape = (k * in_shape[0], *in_shape[1:])
    if isinstance(module, nn.AdaptiveAvgPool2d) and len(in_shape) == 4:
        out_hw = g.shape[-2:]
        if tuple(out_hw) == (1, 1):
            return (g / (in_shape[-1] * in_shape[-2])).expand(k, *in_shape)
        dummy = g.new_empty(1).expand(shape)
        return unfold(torch.ops.aten._adaptive_avg_pool2d_backward(fold(g).contiguous(), dummy), k)
    if isinstance(module, nn.AvgPool2d) and len(in_shape) == 4:
        dummy = g.new_empty(1).expand(shape)
        ks, st, pad = (nn.modules.utils._pair(v) for v in (module.kernel_size, module.stride, module.padding))
        grad = torch.ops.aten.avg_pool2d_backward(
            fold(g).contiguous(),
            dummy,
            ks,
            st,
            pad,
            module.ceil_mode,
            module.count_include_pad,
            module.divisor_override,
        )
        return unfold(grad, k)
    differentiating = torch.is_grad_enabled()
    with torch.enable_grad():
        x0 = g.new_zeros(shape, requires_grad=True)
        out = fn(x0, *args, **kwargs)
        (grad,) = torch.autograd.grad(out, x0, fold(g).reshape(out.shape), create_graph=differentiating)
    return unfold(grad, k)


def maxpool_transpose(g: torch.Tensor, indices: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """Winner-take-all: scatter-add g to the stored argmax positions.

    A scatter-*add*, because overlapping windows can pick the same input twice (ResNet's 3×3/2 pool);
    `max_unpool` would overwrite and silently lose relevance.
    """
    k, b, c = g.shape[:3]
    idx = indices.flatten(2).unsqueeze(0).expand(k, -1, -1, -1)
    out = g.new_zeros(k, b, c, math.prod(in_shape[2:]))
    out = out.scatter_add(3, idx, g.flatten(3))
    return out.view(k, *in_shape)


def epsilon_message(r: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """LRP-ε division: s = R / (z + eps·sign(z)); the input relevance is then a ⊙ Wᵀs."""
    return r / stabilise(z, eps)


def bn_affine(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a batch norm as an affine map y = scale·x + shift.

    Train mode (or no running stats): the current batch statistics of the BN input, *detached*
    (biased variance, i.e. exactly what BN normalised with), so the heatmap of a sample is not
    coupled to the rest of the batch; eval mode: running statistics.
    """
    if bn.training or bn.running_mean is None:
        dims = [0, *range(2, x.dim())]
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    inv = torch.rsqrt(var.detach() + bn.eps)
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
