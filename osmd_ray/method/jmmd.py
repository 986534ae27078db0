"""Multi-kernel MMD and joint MMD (JMMD), the distribution alignment terms of DESIGN §2.

The one copy of this maths in the package: the losses, the benchmarks and any baseline call
these functions.

Definitions (Long et al., "Deep Transfer Learning with Joint Adaptation Networks", ICML 2017):
for samples ``x`` (n rows) and ``y`` (m rows), stack them into ``z = [x; y]`` and build a
multi-kernel Gaussian matrix ``K[i, j] = sum_b exp(-||z_i - z_j||^2 / bw_b)``. The biased
estimator is then ``mean K_xx + mean K_yy - 2 mean K_xy`` (diagonals included). JMMD uses
several layers (e.g. pooled features, then predictions) and multiplies their kernel matrices
element-wise before the same combination, so it compares *joint* distributions.

Both estimators are squared RKHS distances between the two empirical mean embeddings, so they
are >= 0 up to rounding (products of positive semi-definite kernels stay positive
semi-definite).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Floor for the data-driven bandwidth: identical samples give an all-zero distance matrix,
# and exp(-0 / 0) would be NaN.
_MIN_BANDWIDTH = 1e-8


def _flatten(t: Tensor) -> Tensor:
    """(N, ...) -> (N, D) in fp32: kernels of bf16 distances lose most of their precision."""
    return t.reshape(t.shape[0], -1).float()


def _squared_distances(z: Tensor) -> Tensor:
    """All pairwise squared Euclidean distances of the rows of ``z`` (N, D) -> (N, N).

    Uses ``|a|^2 + |b|^2 - 2 a.b`` (memory O(N^2), not O(N^2 D)); rounding can make that
    slightly negative, hence the clamp. No square root, so the gradient is finite at 0.
    """
    sq = (z * z).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)


def multi_kernel_matrix(
    x: Tensor, y: Tensor, num_kernels: int = 5, kernel_mul: float = 2.0
) -> Tensor:
    """Sum of Gaussian kernels over the rows of ``concat([x, y])``: an (n+m) x (n+m) matrix.

    The base bandwidth is the mean off-diagonal squared distance ``sum(L2) / (N^2 - N)`` over
    the N = n+m stacked rows, detached (it is a scale, not something to optimise) and floored.
    The ``num_kernels`` bandwidths are ``base / kernel_mul**(num_kernels // 2) * kernel_mul**i``,
    centred on the base bandwidth.
    """
    if num_kernels < 1:
        raise ValueError(f"num_kernels must be >= 1, got {num_kernels}")
    if x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError(f"need at least one row on each side, got {x.shape[0]} and {y.shape[0]}")
    xf, yf = _flatten(x), _flatten(y)
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"x and y differ in feature size: {tuple(x.shape)} vs {tuple(y.shape)}")
    l2 = _squared_distances(torch.cat([xf, yf], dim=0))
    rows = l2.shape[0]
    # max(.., 1): a 1 x 1 matrix has no off-diagonal pair; its distance sum is 0 anyway.
    base = (l2.detach().sum() / max(rows * rows - rows, 1)).clamp_min(_MIN_BANDWIDTH)
    base = base / kernel_mul ** (num_kernels // 2)
    return sum(torch.exp(-l2 / (base * kernel_mul**i)) for i in range(num_kernels))


def _combine(kernel: Tensor, n: int) -> Tensor:
    """Biased MMD^2 from a stacked kernel matrix whose first ``n`` rows are the x side."""
    k_xx = kernel[:n, :n].mean()
    k_yy = kernel[n:, n:].mean()
    k_xy = kernel[:n, n:].mean()
    return k_xx + k_yy - 2.0 * k_xy


def mmd(x: Tensor, y: Tensor, num_kernels: int = 5, kernel_mul: float = 2.0) -> Tensor:
    """Biased multi-kernel MMD^2 between samples ``x`` (n, ...) and ``y`` (m, ...): a scalar."""
    return _combine(multi_kernel_matrix(x, y, num_kernels, kernel_mul), x.shape[0])


def jmmd(
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    num_kernels: int = 5,
    kernel_mul: float = 2.0,
) -> Tensor:
    """Biased joint MMD^2 over layers: ``xs[l]`` is (n, ...) and ``ys[l]`` is (m, ...).

    The per-layer multi-kernel matrices (each with its own bandwidths) are multiplied
    element-wise, then combined as in :func:`mmd`. With one layer this equals :func:`mmd`.
    """
    if len(xs) != len(ys) or len(xs) == 0:
        raise ValueError(f"need the same, non-zero number of layers, got {len(xs)} and {len(ys)}")
    n, m = xs[0].shape[0], ys[0].shape[0]
    for layer, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x.shape[0] != n or y.shape[0] != m:
            raise ValueError(
                f"layer {layer} has {x.shape[0]} and {y.shape[0]} rows, layer 0 has {n} and {m}"
            )
    kernel = multi_kernel_matrix(xs[0], ys[0], num_kernels, kernel_mul)
    for x, y in zip(xs[1:], ys[1:], strict=True):
        kernel = kernel * multi_kernel_matrix(x, y, num_kernels, kernel_mul)
    return _combine(kernel, n)
