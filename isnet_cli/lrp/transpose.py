"""Transposes of the linear maps LRP sends messages back through, as explicit tensor operations.

Each is Wᵀg for a map W of the forward (a transposed convolution, a matmul, an expand or band
matrices for average pools, a scatter-add for max pools) applied to g of shape (K, B, ...), the map
dimension K folded into the batch where the op needs it, so the heatmap stays an ordinary
differentiable function of the weights and activations. Every op here exports to ONNX (opset 17).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
