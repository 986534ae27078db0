"""MMD / JMMD against a naive double-loop reference, and their basic properties."""

from __future__ import annotations

import pytest
import torch

from osmd_ray.method.jmmd import jmmd, mmd, multi_kernel_matrix


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
