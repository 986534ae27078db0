"""MMD / JMMD against a naive double-loop reference, and their basic properties."""

from __future__ import annotations

import pytest
import torch

from osmd_ray.blocks.jmmd import jmmd, mmd, multi_kernel_matrix


def naive_jmmd(xs, ys, num_kernels: int, kernel_mul: float) -> torch.Tensor:
    """JMMD written out with python loops over samples, kernels and layers (fp64)."""
    n, m = xs[0].shape[0], ys[0].shape[0]
    total = n + m
    kernels = []  # per layer, a total x total nested list of scalar tensors
    for x, y in zip(xs, ys, strict=True):
        rows = [r.reshape(-1).double() for r in x] + [r.reshape(-1).double() for r in y]
        dist = [[((rows[i] - rows[j]) ** 2).sum() for j in range(total)] for i in range(total)]
        dist_sum = sum(dist[i][j] for i in range(total) for j in range(total))
        base = (dist_sum / (total * total - total)).detach()
        widths = [
            base / kernel_mul ** (num_kernels // 2) * kernel_mul**b for b in range(num_kernels)
        ]
        kernels.append(
            [
                [sum(torch.exp(-dist[i][j] / w) for w in widths) for j in range(total)]
                for i in range(total)
            ]
        )

    def k(i: int, j: int) -> torch.Tensor:
        value = torch.ones((), dtype=torch.float64)
        for layer in kernels:
            value = value * layer[i][j]
        return value

    xx = sum(k(i, j) for i in range(n) for j in range(n)) / (n * n)
    yy = sum(k(n + i, n + j) for i in range(m) for j in range(m)) / (m * m)
    xy = sum(k(i, n + j) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


CASES = [
    # (n, m, per-layer per-sample shapes)
    (4, 4, [(3,)]),
    (5, 3, [(2, 4)]),
    (3, 6, [(5,), (3,)]),
    (6, 6, [(2, 2, 2), (4,)]),
]


@pytest.mark.parametrize("n,m,shapes", CASES)
@pytest.mark.parametrize("num_kernels", [1, 3, 5])
@pytest.mark.parametrize("kernel_mul", [2.0, 1.5])
def test_matches_naive_reference_values_and_gradients(n, m, shapes, num_kernels, kernel_mul):
    gen = torch.Generator().manual_seed(n * 100 + m * 10 + num_kernels)
    xs = [torch.randn(n, *s, generator=gen, dtype=torch.float64) for s in shapes]
    ys = [torch.randn(m, *s, generator=gen, dtype=torch.float64) + 0.5 for s in shapes]
    xs_a = [x.float().requires_grad_() for x in xs]
    xs_b = [x.clone().requires_grad_() for x in xs]

    got = jmmd(xs_a, [y.float() for y in ys], num_kernels, kernel_mul)
    want = naive_jmmd(xs_b, ys, num_kernels, kernel_mul)
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)

    # Gradients agree too, which also checks that the bandwidth is detached.
    got.backward()
    want.backward()
    for a, b in zip(xs_a, xs_b, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-5)


def test_kernel_matrix_is_symmetric_with_num_kernels_on_the_diagonal():
    x, y = torch.randn(4, 3), torch.randn(2, 3)
    k = multi_kernel_matrix(x, y, num_kernels=3)
    assert k.shape == (6, 6)
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(torch.diagonal(k), torch.full((6,), 3.0))


def test_single_layer_jmmd_is_mmd():
    x, y = torch.randn(5, 4), torch.randn(7, 4)
    torch.testing.assert_close(jmmd([x], [y]), mmd(x, y))


def test_zero_for_identical_samples():
    x, p = torch.randn(8, 6), torch.softmax(torch.randn(8, 3), dim=1)
    assert abs(mmd(x, x.clone()).item()) < 1e-5
    assert abs(jmmd([x, p], [x.clone(), p.clone()]).item()) < 1e-5
    # All rows equal: every distance is 0, the bandwidth floor avoids 0/0.
    same = torch.ones(4, 3)
    value = jmmd([same, same], [same, same])
    assert torch.isfinite(value) and abs(value.item()) < 1e-6


def test_symmetric_in_x_and_y():
    x, y = torch.randn(6, 5), torch.randn(4, 5) * 2
    px, py = torch.softmax(torch.randn(6, 3), 1), torch.softmax(torch.randn(4, 3), 1)
    torch.testing.assert_close(mmd(x, y), mmd(y, x))
    torch.testing.assert_close(jmmd([x, px], [y, py]), jmmd([y, py], [x, px]))


def test_non_negative_on_random_inputs_and_grows_with_shift():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, m = torch.randint(2, 10, (2,), generator=gen).tolist()
        x, y = torch.randn(n, 4, generator=gen), torch.randn(m, 4, generator=gen)
        px = torch.softmax(torch.randn(n, 3, generator=gen), 1)
        py = torch.softmax(torch.randn(m, 3, generator=gen), 1)
        assert mmd(x, y).item() >= -1e-6
        assert jmmd([x, px], [y, py]).item() >= -1e-6
    x = torch.randn(32, 4, generator=gen)
    near, far = x + 0.1, x + 3.0
    assert mmd(x, far).item() > mmd(x, near).item() > 0


def test_gradients_flow_to_both_sides_and_are_finite():
    x = torch.randn(6, 4, requires_grad=True)
    y = (torch.randn(5, 4) + 1).requires_grad_()
    px = torch.softmax(torch.randn(6, 3, requires_grad=True), 1)
    value = jmmd([x, px], [y, torch.softmax(y[:, :3], 1)])
    value.backward()
    for t in (x, y):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    # Gradient descent on y lowers the discrepancy.
    with torch.no_grad():
        y2 = y - 0.5 * y.grad
    assert jmmd([x, px], [y2, torch.softmax(y2[:, :3], 1)]).item() < value.item()


def test_rejects_mismatched_layers_and_rows():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="number of layers"):
        jmmd([x, x], [y])
    with pytest.raises(ValueError, match="rows"):
        jmmd([x, x[:3]], [y, y])
    with pytest.raises(ValueError, match="feature size"):
        mmd(x, torch.randn(4, 2))


# --- the linear-time estimator (Gretton et al. 2012) ---------------------------------------------


def stacked_kernel(xs, ys, num_kernels: int = 5, kernel_mul: float = 2.0) -> torch.Tensor:
    """The quadratic estimator's joint kernel matrix over the stacked rows [x; y]."""
    kernel = multi_kernel_matrix(xs[0], ys[0], num_kernels, kernel_mul)
    for x, y in zip(xs[1:], ys[1:], strict=True):
        kernel = kernel * multi_kernel_matrix(x, y, num_kernels, kernel_mul)
    return kernel


def unbiased_quadratic(xs, ys) -> float:
    """The unbiased O(n^2) statistic (diagonals left out) with the same kernels."""
    kernel = stacked_kernel(xs, ys).double()
    n, m = xs[0].shape[0], ys[0].shape[0]
    k_xx, k_yy = kernel[:n, :n], kernel[n:, n:]
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kernel[:n, n:].mean())


@pytest.mark.parametrize("n,m", [(8, 8), (7, 7), (6, 9)])
def test_linear_uses_the_quadratic_kernels_on_consecutive_pairs(n, m):
    """Same bandwidths and kernels as the quadratic matrix, read at Gretton's pairs only:
    h_i = k(x_2i, x_2i+1) + k(y_2i, y_2i+1) - k(x_2i, y_2i+1) - k(x_2i+1, y_2i)."""
    gen = torch.Generator().manual_seed(n * 10 + m)
    xs = [torch.randn(n, 5, generator=gen), torch.softmax(torch.randn(n, 3, generator=gen), 1)]
    ys = [torch.randn(m, 5, generator=gen) + 1, torch.softmax(torch.randn(m, 3, generator=gen), 1)]
    xs_a = [x.clone().requires_grad_() for x in xs]
    xs_b = [x.clone().requires_grad_() for x in xs]
    got = jmmd(xs_a, ys, estimator="linear")
    kernel = stacked_kernel(xs_b, ys)
    pairs = min(n, m) // 2  # an odd last row, or the larger side's surplus, is left out
    i = torch.arange(pairs) * 2
    want = (
        kernel[i, i + 1] + kernel[n + i, n + i + 1] - kernel[i, n + i + 1] - kernel[i + 1, n + i]
    ).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    for a, b in zip(xs_a, xs_b, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    # One layer: mmd and jmmd agree for the linear estimator too.
    torch.testing.assert_close(
        mmd(xs[0], ys[0], estimator="linear"), jmmd(xs[:1], ys[:1], estimator="linear")
    )


def test_linear_odd_batch_drops_the_last_row():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, generator=gen).requires_grad_()
    y = (torch.randn(7, 4, generator=gen) + 0.5).requires_grad_()
    value = mmd(x, y, estimator="linear")
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    # Three pairs per side: the 7th row only enters the (detached) bandwidth.
    for t in (x, y):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[6] == 0).all() and (t.grad[:6].abs().sum(dim=1) > 0).all()


def _draws(shift: float, draws: int = 200, n: int = 32):
    gen = torch.Generator().manual_seed(int(shift * 100) + 1)
    linear, quadratic = [], []
    for _ in range(draws):
        x = torch.randn(n, 4, generator=gen)
        y = torch.randn(n, 4, generator=gen) + shift
        px = torch.softmax(x[:, :3] * 2, 1)
        py = torch.softmax(y[:, :3] * 2, 1)
        linear.append(jmmd([x, px], [y, py], estimator="linear").item())
        quadratic.append(unbiased_quadratic([x, px], [y, py]))
    lin = torch.tensor(linear, dtype=torch.float64)
    return lin.mean().item(), (lin.std() / draws**0.5).item(), sum(quadratic) / draws


def test_linear_is_unbiased_near_zero_for_the_same_distribution():
    mean, stderr, quad = _draws(shift=0.0)
    assert abs(mean) < 4 * stderr
    assert abs(mean - quad) < 4 * stderr
    # Unbiased: single draws go negative, unlike the biased quadratic statistic.
    gen = torch.Generator().manual_seed(0)
    values = [
        mmd(
            torch.randn(16, 3, generator=gen), torch.randn(16, 3, generator=gen), estimator="linear"
        )
        for _ in range(40)
    ]
    assert min(v.item() for v in values) < 0 < max(v.item() for v in values)


def test_linear_mean_matches_the_unbiased_quadratic_value_for_shifted_distributions():
    mean, stderr, quad = _draws(shift=1.0)
    assert mean > 10 * stderr > 0  # clearly positive
    assert abs(mean - quad) < 4 * stderr


def test_linear_gradients_are_finite_and_descent_lowers_it():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 4, generator=gen)
    y = (torch.randn(64, 4, generator=gen) + 1.5).requires_grad_()
    value = mmd(x, y, estimator="linear")
    value.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    with torch.no_grad():
        y2 = y - 5.0 * y.grad
    assert mmd(x, y2, estimator="linear").item() < value.item()
    # Identical rows: zero distances, the bandwidth floor keeps the gradient finite.
    same = torch.ones(4, 3, requires_grad=True)
    zero = jmmd([same, same], [same.detach(), same.detach()], estimator="linear")
    zero.backward()
    assert zero.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(same.grad).all()


def test_estimator_argument_is_checked():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="estimator='cubic'"):
        mmd(x, y, estimator="cubic")
    with pytest.raises(ValueError, match="estimator='cubic'"):
        jmmd([x], [y], estimator="cubic")
    with pytest.raises(ValueError, match="at least two rows"):
        mmd(x[:1], y, estimator="linear")


def test_loss_config_selects_the_estimator():
    from osmd_ray.blocks.losses import alignment_loss
    from osmd_ray.config import LossConfig

    gen = torch.Generator().manual_seed(2)
    z_p, z_h = torch.randn(10, 6, generator=gen), torch.randn(10, 6, generator=gen) + 1
    logits_p, logits_h = torch.randn(10, 3, generator=gen), torch.randn(10, 3, generator=gen)
    probs = [torch.softmax(logits_p, 1), torch.softmax(logits_h, 1)]
    for estimator in ("quadratic", "linear"):
        for alignment in ("jmmd", "mmd"):
            cfg = LossConfig(alignment=alignment, jmmd_estimator=estimator)
            got = alignment_loss(z_p, z_h, logits_p, logits_h, cfg)
            want = (
                jmmd([z_p, probs[0]], [z_h, probs[1]], estimator=estimator)
                if alignment == "jmmd"
                else mmd(z_p, z_h, estimator=estimator)
            )
            torch.testing.assert_close(got, want)
    assert LossConfig().jmmd_estimator == "quadratic"


# --- a fixed kernel on a layer (JAN's setting for the predictions) --------------------------------


@pytest.mark.parametrize("estimator", ["quadratic", "linear"])
def test_a_fixed_bandwidth_layer_uses_one_given_gaussian_kernel(estimator):
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 5, generator=gen), torch.softmax(torch.randn(8, 3, generator=gen), 1)]
    ys = [torch.randn(8, 5, generator=gen) + 1, torch.softmax(torch.randn(8, 3, generator=gen), 1)]
    got = jmmd(xs, ys, estimator=estimator, layer_kernels=[(5, None), (1, 1.68)])
    if estimator == "quadratic":
        probs = torch.cat([xs[1], ys[1]]).double()
        given = torch.exp(-(torch.cdist(probs, probs) ** 2) / 1.68)
        kernel = multi_kernel_matrix(xs[0], ys[0]).double() * given
        want = kernel[:8, :8].mean() + kernel[8:, 8:].mean() - 2 * kernel[:8, 8:].mean()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # The given kernel does not move with the batch's spread; the batch-driven one does.
    scaled = [xs[0], xs[1] * 3], [ys[0], ys[1] * 3]
    fixed_scaled = jmmd(*scaled, estimator=estimator, layer_kernels=[(5, None), (1, 1.68)])
    driven = jmmd(xs, ys, estimator=estimator)
    driven_scaled = jmmd(*scaled, estimator=estimator)
    assert abs(float(fixed_scaled - got)) > 1e-4
    torch.testing.assert_close(driven_scaled, driven, rtol=1e-4, atol=1e-6)
    # The default is every layer's num_kernels batch-driven kernels.
    torch.testing.assert_close(
        jmmd(xs, ys, estimator=estimator, layer_kernels=[(5, None), (5, None)]), driven
    )
    with pytest.raises(ValueError, match="layer_kernels"):
        jmmd(xs, ys, layer_kernels=[(5, None)])


def test_loss_config_prediction_bandwidth_gives_the_predictions_a_fixed_kernel():
    from osmd_ray.blocks.losses import alignment_loss
    from osmd_ray.config import LossConfig

    gen = torch.Generator().manual_seed(2)
    z_p, z_h = torch.randn(10, 6, generator=gen), torch.randn(10, 6, generator=gen) + 1
    logits_p, logits_h = torch.randn(10, 3, generator=gen), torch.randn(10, 3, generator=gen)
    probs = [torch.softmax(logits_p, 1), torch.softmax(logits_h, 1)]
    got = alignment_loss(z_p, z_h, logits_p, logits_h, LossConfig(prediction_bandwidth=1.68))
    want = jmmd([z_p, probs[0]], [z_h, probs[1]], layer_kernels=[(5, None), (1, 1.68)])
    torch.testing.assert_close(got, want)
    assert abs(float(got - jmmd([z_p, probs[0]], [z_h, probs[1]]))) > 1e-5
