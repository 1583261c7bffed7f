"""LRP rules as explicit, differentiable tensor operations.

Conventions: relevance tensors carry a leading *map* dimension K (several explained quantities per
sample, e.g. one per class): shape (K, B, ...), while stored activations have shape (B, ...) and
broadcast against them. Linear maps are transposed explicitly (a transposed convolution, a matmul,
an expand or band matrices for average pools, a scatter-add for max pools) on a K·B batch, so the
heatmap is an ordinary differentiable function of the weights and activations: training needs one
extra backward, never a double backward. Every op here also exports to ONNX (opset 17), so the
`--with-heatmap` graph is this engine as it is.

Two kinds of message flow backwards between steps:
- a *relevance* R (the usual LRP quantity, same shape as the activation), and
- a *gradient message* G = s ⊙ R_out / stab(z_out) sent by a batch norm to its producer(s), so that
  a conv (or pool) followed by one or more BN slices gets the ε-rule of the *fused* conv∘BN with the
  BN output as denominator (the reference's per-consumer fusion after DenseNet concatenations).
  The relevance it stands for at the BN input a is a ⊙ G.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps·sign(z), with sign(0) = +1 (the reference's and Zennit's stabiliser); d/dz = 1.

    The sign comes from copysign against z + 0.0 (which turns −0.0 into +0.0): on CPU this is five
    times faster than torch.where, and these element-wise passes cost as much as the convolutions.
    ONNX has no CopySign, so an export traces the equivalent where().
    """
    if torch.onnx.is_in_onnx_export():
        return torch.where(z >= 0, eps, -eps) + z
    return torch.full_like(z, eps).copysign_(z.detach() + 0.0).add_(z)  # the sign term is a constant


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


# (adaptive?, number of spatial dims) of each average pool, module classes and functions
_POOL_FAMILIES: tuple[tuple[tuple[Any, ...], bool], ...] = (
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), False),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), True),
    ((F.avg_pool1d, F.avg_pool2d, F.avg_pool3d), False),
    ((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d), True),
)
_POOLS: dict[Any, tuple[bool, int]] = {
    pool: (adaptive, dims) for family, adaptive in _POOL_FAMILIES for dims, pool in enumerate(family, start=1)
}
# F.avg_pool{1,2,3}d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
_AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_AVG_POOL_DEFAULTS = {
    "stride": None,
    "padding": 0,
    "ceil_mode": False,
    "count_include_pad": True,
    "divisor_override": None,
}


def _tuple(v, nd: int) -> tuple[int, ...]:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * nd


def _avg_windows(n: int, m: int, kernel: int, stride: int, pad: int, include_pad: bool) -> list[tuple[int, int, int]]:
    """(start, end, divisor) of each of the m windows of an average pool along one axis of size n,
    with PyTorch's rules: a window may hang over the padding (ceil_mode) but not past it; the divisor
    counts padded positions when `include_pad`."""
    windows = []
    for i in range(m):
        start, end = i * stride - pad, min(i * stride - pad + kernel, n + pad)
        size = end - start
        start, end = max(start, 0), min(end, n)
        windows.append((start, end, size if include_pad else end - start))
    return windows


def _adaptive_windows(n: int, m: int) -> list[tuple[int, int, int]]:
    """(start, end, divisor) of the m windows of an adaptive average pool from n: [⌊i·n/m⌋, ⌈(i+1)·n/m⌉)."""
    return [(i * n // m, -(-(i + 1) * n // m), -(-(i + 1) * n // m) - i * n // m) for i in range(m)]


def _pool_kind(op: Any) -> tuple[bool, int] | None:
    """(adaptive?, spatial dims) of an average pool module or function; None for a mean."""
    if isinstance(op, nn.Module):
        return next((_POOLS[cls] for cls in type(op).__mro__ if cls in _POOLS), None)
    return _POOLS.get(op)


def _pool_windows(op: Any, adaptive: bool, args, kwargs, in_sizes, out_sizes):
    """Per-axis windows of an (adaptive) average pool and its divisor override (None: per-window counts)."""
    nd = len(in_sizes)
    if adaptive:
        return [_adaptive_windows(n, m) for n, m in zip(in_sizes, out_sizes, strict=True)], None
    if isinstance(op, nn.Module):
        p = {name: getattr(op, name, _AVG_POOL_DEFAULTS.get(name)) for name in _AVG_POOL_ARGS}
    else:
        names = _AVG_POOL_ARGS if nd > 1 else _AVG_POOL_ARGS[:-1]  # avg_pool1d has no divisor_override
        p = {**_AVG_POOL_DEFAULTS, **dict(zip(names, args, strict=False)), **kwargs}
    kernel = _tuple(p["kernel_size"], nd)
    stride = kernel if p["stride"] is None else _tuple(p["stride"], nd)
    pad = _tuple(p["padding"], nd)
    windows = [
        _avg_windows(n, m, k, s, q, bool(p["count_include_pad"]))
        for n, m, k, s, q in zip(in_sizes, out_sizes, kernel, stride, pad, strict=True)
    ]
    return windows, p["divisor_override"]


def pool_transpose(g: torch.Tensor, op: Any, args: tuple, kwargs: dict, in_shape: torch.Size) -> torch.Tensor:
    """Transpose Pᵀg of an average/adaptive-average pool or a mean, a uniform linear map.

    `op` is the pool module, or the function (`F.avg_pool2d`, `torch.mean`, ...) or method name
    (`"mean"`) called with `args` / `kwargs` after the input.

    Pools are separable, P = P_1 ⊗ … ⊗ P_d with P_i[o, j] = 1/divisor_o for j in window o along axis i,
    so Pᵀg applies each P_iᵀ along its axis. Non-overlapping windows of one size k (global pools,
    stride = kernel, adaptive pools whose output divides the input) are a nearest-neighbour upsampling
    of g/∏k (an expand), anything else a small matmul per axis. Both run fast and export to ONNX.
    """
    kind = _pool_kind(op)
    if kind is None:  # torch.mean / Tensor.mean
        return _mean_transpose(g, args, kwargs, in_shape)
    adaptive, nd = kind
    # spatial sizes as Python ints: constants of an exported graph (its batch axis stays dynamic)
    in_sizes = [int(n) for n in in_shape[-nd:]]
    out_sizes = [int(m) for m in g.shape[-nd:]]
    windows, divisor = _pool_windows(op, adaptive, args, kwargs, in_sizes, out_sizes)
    lead = g.shape[:-nd]
    sizes = [w[0][1] - w[0][0] for w in windows]
    uniform = all(
        w == [(o * size, (o + 1) * size, size) for o in range(len(w))] for w, size in zip(windows, sizes, strict=True)
    )
    if uniform and divisor is None:
        x = g / math.prod(sizes)
        x = x.reshape(*lead, *(v for m in out_sizes for v in (m, 1)))
        x = x.expand(*lead, *(v for m, size in zip(out_sizes, sizes, strict=True) for v in (m, size)))
        x = x.reshape(*lead, *(m * size for m, size in zip(out_sizes, sizes, strict=True)))
        # floor-mode pools drop trailing rows: they get no relevance
        rest = [n - m * size for n, m, size in zip(in_sizes, out_sizes, sizes, strict=True)]
        return F.pad(x, [v for r in reversed(rest) for v in (0, r)]) if any(rest) else x
    x = g if divisor is None else g / divisor
    for axis, (w, n) in enumerate(zip(windows, in_sizes, strict=True)):
        # P_i as a constant (m, n) matrix: 1/divisor on each window (1 with a divisor override)
        band = torch.tensor(
            [[(1.0 if divisor is not None else 1.0 / c) if a <= j < b else 0.0 for j in range(n)] for a, b, c in w],
            dtype=g.dtype,
            device=g.device,
        )
        dim = x.dim() - nd + axis  # non-negative: the exporter writes movedim's axes into Transpose as given
        x = (x.movedim(dim, x.dim() - 1) @ band).movedim(x.dim() - 1, dim)
    return x


def _mean_transpose(g: torch.Tensor, args, kwargs, in_shape) -> torch.Tensor:
    """Transpose of x.mean(dim, keepdim): g/N broadcast back over the averaged dims."""
    dim = args[0] if args else kwargs.get("dim")
    keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    ndim = len(in_shape)
    dims = range(ndim) if dim is None or dim == [] else ([dim] if isinstance(dim, int) else dim)
    dims = sorted(d % ndim for d in dims)
    x = g / math.prod(int(in_shape[d]) for d in dims)
    if not keepdim:
        for d in dims:
            x = x.unsqueeze(d + 1)  # + 1 for the map dimension
    return x.expand(g.shape[0], *in_shape)


def sum_to(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """t summed over its broadcast dimensions down to `shape`, the transpose of a broadcast.

    `Tensor.sum_to_size` as a plain sum (which the ONNX exporter can express), and no op at all when
    the shapes already match (the usual case).
    """
    lead = t.dim() - len(shape)
    dims = [*range(lead), *(lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1)]
    return t.sum(dims, keepdim=True).reshape(shape) if dims else t


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
