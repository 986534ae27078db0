"""Multi-kernel MMD and joint MMD (JMMD), the distribution alignment terms of DESIGN §2.

The one copy of this maths in the package: the losses, the benchmarks and any baseline call
these functions.

Definitions (Long et al., "Deep Transfer Learning with Joint Adaptation Networks", ICML 2017):
for samples ``x`` (n rows) and ``y`` (m rows), stack them into ``z = [x; y]`` and build a
multi-kernel Gaussian matrix ``K[i, j] = sum_b exp(-||z_i - z_j||^2 / bw_b)``. The biased
estimator is then ``mean K_xx + mean K_yy - 2 mean K_xy`` (diagonals included). JMMD uses
several layers (e.g. pooled features, then predictions) and multiplies their kernel matrices
element-wise before the same combination, so it compares *joint* distributions.

Both quadratic statistics are squared RKHS distances between the two empirical mean
embeddings, so they are >= 0 up to rounding (products of positive semi-definite kernels stay
positive semi-definite).

``estimator="linear"`` switches both to the linear-time statistic of Gretton et al. ("A Kernel
Two-Sample Test", JMLR 2012, section 6): split each side into consecutive pairs
``(x_{2i-1}, x_{2i})``, ``(y_{2i-1}, y_{2i})`` and average
``h_i = k(x_{2i-1}, x_{2i}) + k(y_{2i-1}, y_{2i}) - k(x_{2i-1}, y_{2i}) - k(x_{2i}, y_{2i-1})``.
It evaluates 4 kernel values per pair instead of an (n+m)^2 matrix: O(n D) time and memory,
unbiased for a fixed kernel (so it can be negative; the batch-driven bandwidth makes that
approximate), with a higher variance than the quadratic statistic. The
bandwidth is the same data-driven one as the quadratic estimator's, computed exactly in O(N D)
from the centred rows. The cost against batch size: benchmarks/jmmd_cost.py.

``fixed_bandwidth`` (a layer's kernel given, not driven by the batch): JAN's own code gives
the prediction layer one Gaussian kernel ``exp(-||a - b||^2 / 1.68)`` instead of the
features' five batch-driven ones, so one entry of the product kernel stays small.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Floor for the data-driven bandwidth: identical samples give an all-zero distance matrix,
# and exp(-0 / 0) would be NaN.
_MIN_BANDWIDTH = 1e-8

ESTIMATORS = ("quadratic", "linear")
"""``quadratic``: the biased O(n^2) statistic of Long et al.; ``linear``: Gretton et al.'s
O(n) statistic over pairs of rows (see the module docstring)."""


def _flatten(t: Tensor) -> Tensor:
    """(N, ...) -> (N, D) in fp32: kernels of bf16 distances lose most of their precision."""
    return t.reshape(t.shape[0], -1).float()


def squared_distances(z: Tensor) -> Tensor:
    """All pairwise squared Euclidean distances of the rows of ``z`` (N, D) -> (N, N).

    Uses ``|a|^2 + |b|^2 - 2 a.b`` (memory O(N^2), not O(N^2 D)); rounding can make that
    slightly negative, hence the clamp. No square root, so the gradient is finite at 0.
    """
    sq = (z * z).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)


def multi_kernel_matrix(
    x: Tensor,
    y: Tensor,
    num_kernels: int = 5,
    kernel_mul: float = 2.0,
    fixed_bandwidth: float | None = None,
) -> Tensor:
    """Sum of Gaussian kernels over the rows of ``concat([x, y])``: an (n+m) x (n+m) matrix.

    The base bandwidth is the mean off-diagonal squared distance ``sum(L2) / (N^2 - N)`` over
    the N = n+m stacked rows, detached (it is a scale, not something to optimise) and floored.
    The ``num_kernels`` bandwidths are ``base / kernel_mul**(num_kernels // 2) * kernel_mul**i``,
    centred on the base bandwidth. ``fixed_bandwidth``: the base is that number instead.
    """
    if num_kernels < 1:
        raise ValueError(f"num_kernels must be >= 1, got {num_kernels}")
    if x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError(f"need at least one row on each side, got {x.shape[0]} and {y.shape[0]}")
    xf, yf = _flatten(x), _flatten(y)
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"x and y differ in feature size: {tuple(x.shape)} vs {tuple(y.shape)}")
    l2 = squared_distances(torch.cat([xf, yf], dim=0))
    rows = l2.shape[0]
    if fixed_bandwidth is not None:
        base = l2.new_tensor(float(fixed_bandwidth))
    else:
        # max(.., 1): a 1 x 1 matrix has no off-diagonal pair; its distance sum is 0 anyway.
        base = (l2.detach().sum() / max(rows * rows - rows, 1)).clamp_min(_MIN_BANDWIDTH)
    base = base / kernel_mul ** (num_kernels // 2)
    return sum(torch.exp(-l2 / (base * kernel_mul**i)) for i in range(num_kernels))


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: use one of {ESTIMATORS}")


def _bandwidths(
    z: Tensor, num_kernels: int, kernel_mul: float, fixed_bandwidth: float | None = None
) -> list[Tensor]:
    """The bandwidths :func:`multi_kernel_matrix` uses for the stacked rows ``z`` (N, D), in
    O(N D): ``sum_ij ||z_i - z_j||^2 = 2 N sum_i ||z_i - mean||^2`` (centring first keeps
    the difference of large sums from cancelling in fp32)."""
    rows = z.shape[0]
    if fixed_bandwidth is not None:
        base = z.new_tensor(float(fixed_bandwidth))
    else:
        centred = z.detach() - z.detach().mean(dim=0, keepdim=True)
        total = 2.0 * rows * (centred * centred).sum()
        base = (total / max(rows * rows - rows, 1)).clamp_min(_MIN_BANDWIDTH)
    base = base / kernel_mul ** (num_kernels // 2)
    return [base * kernel_mul**i for i in range(num_kernels)]


def _paired_kernels(
    x: Tensor,
    y: Tensor,
    pairs: int,
    num_kernels: int,
    kernel_mul: float,
    fixed_bandwidth: float | None = None,
) -> Tensor:
    """(4, pairs) multi-kernel values k(x1, x2), k(y1, y2), k(x1, y2), k(x2, y1) for the
    consecutive row pairs ``x1 = x[0::2]``, ``x2 = x[1::2]`` (likewise y), first ``pairs``."""
    if num_kernels < 1:
        raise ValueError(f"num_kernels must be >= 1, got {num_kernels}")
    xf, yf = _flatten(x), _flatten(y)
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"x and y differ in feature size: {tuple(x.shape)} vs {tuple(y.shape)}")
    widths = _bandwidths(torch.cat([xf, yf], dim=0), num_kernels, kernel_mul, fixed_bandwidth)
    x1, x2 = xf[0 : 2 * pairs : 2], xf[1 : 2 * pairs : 2]
    y1, y2 = yf[0 : 2 * pairs : 2], yf[1 : 2 * pairs : 2]
    # (4, pairs, D) -> (4, pairs) squared distances of the four pairings.
    diffs = torch.stack([x1 - x2, y1 - y2, x1 - y2, x2 - y1])
    l2 = (diffs * diffs).sum(dim=2)
    return sum(torch.exp(-l2 / w) for w in widths)


def _linear_pairs(n: int, m: int) -> int:
    """Row pairs the linear estimator uses: an odd last row (or the larger side's surplus)
    is left out."""
    pairs = min(n, m) // 2
    if pairs < 1:
        raise ValueError(
            f"the linear estimator needs at least two rows on each side, got {n} and {m}"
        )
    return pairs


def _combine_linear(kernels: Tensor) -> Tensor:
    """Gretton's linear-time MMD^2: the mean over pairs of h = k_xx + k_yy - k_xy - k_yx."""
    return (kernels[0] + kernels[1] - kernels[2] - kernels[3]).mean()


def _combine(kernel: Tensor, n: int) -> Tensor:
    """Biased MMD^2 from a stacked kernel matrix whose first ``n`` rows are the x side."""
    k_xx = kernel[:n, :n].mean()
    k_yy = kernel[n:, n:].mean()
    k_xy = kernel[:n, n:].mean()
    return k_xx + k_yy - 2.0 * k_xy


def mmd(
    x: Tensor,
    y: Tensor,
    num_kernels: int = 5,
    kernel_mul: float = 2.0,
    estimator: str = "quadratic",
) -> Tensor:
    """Multi-kernel MMD^2 between samples ``x`` (n, ...) and ``y`` (m, ...): a scalar.

    ``estimator``: ``quadratic`` (biased, all pairs) or ``linear`` (Gretton's pairs statistic;
    needs n, m >= 2 and uses the first ``2 * (min(n, m) // 2)`` rows of each side).
    """
    _check_estimator(estimator)
    if estimator == "linear":
        pairs = _linear_pairs(x.shape[0], y.shape[0])
        return _combine_linear(_paired_kernels(x, y, pairs, num_kernels, kernel_mul))
    return _combine(multi_kernel_matrix(x, y, num_kernels, kernel_mul), x.shape[0])


def jmmd(
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    num_kernels: int = 5,
    kernel_mul: float = 2.0,
    estimator: str = "quadratic",
    layer_kernels: Sequence[tuple[int, float | None]] | None = None,
) -> Tensor:
    """Joint MMD^2 over layers: ``xs[l]`` is (n, ...) and ``ys[l]`` is (m, ...).

    The per-layer multi-kernel matrices (each with its own bandwidths) are multiplied
    element-wise, then combined as in :func:`mmd`. With one layer this equals :func:`mmd`.
    ``estimator="linear"`` multiplies the per-layer kernel values of the same row pairs
    instead, in O(n) (see :func:`mmd`). ``layer_kernels``: each layer's (number of kernels,
    fixed bandwidth or None for the batch-driven one); by default every layer has
    ``num_kernels`` batch-driven kernels.
    """
    _check_estimator(estimator)
    if len(xs) != len(ys) or len(xs) == 0:
        raise ValueError(f"need the same, non-zero number of layers, got {len(xs)} and {len(ys)}")
    kernels_of = (
        list(layer_kernels) if layer_kernels is not None else [(num_kernels, None)] * len(xs)
    )
    if len(kernels_of) != len(xs):
        raise ValueError(f"layer_kernels has {len(kernels_of)} entries for {len(xs)} layers")
    n, m = xs[0].shape[0], ys[0].shape[0]
    for layer, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x.shape[0] != n or y.shape[0] != m:
            raise ValueError(
                f"layer {layer} has {x.shape[0]} and {y.shape[0]} rows, layer 0 has {n} and {m}"
            )
    layers = list(zip(xs, ys, kernels_of, strict=True))
    if estimator == "linear":
        pairs = _linear_pairs(n, m)
        product = None
        for x, y, (count, fixed) in layers:
            k = _paired_kernels(x, y, pairs, count, kernel_mul, fixed)
            product = k if product is None else product * k
        return _combine_linear(product)
    kernel = None
    for x, y, (count, fixed) in layers:
        k = multi_kernel_matrix(x, y, count, kernel_mul, fixed)
        kernel = k if kernel is None else kernel * k
    return _combine(kernel, n)
