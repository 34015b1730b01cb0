"""SC, AG and MAG on surfaces whose values are known by hand or in closed form."""
import numpy as np
import pytest

from cfsam.core.flatness import flatness_metrics


def grid(n=9, span=1.0):
    x = np.linspace(-span, span, n)
    X, Y = np.meshgrid(x, x, indexing="ij")  # Z[i, j] = f(x_i, y_j)
    return X, Y, x[1] - x[0]


@pytest.mark.parametrize("a,b", [(1.5, -0.5), (-2.0, -1.0), (0.3, 0.7)])
def test_quadratic_bowl(a, b):
    X, Y, h = grid()
    m = flatness_metrics(a * X**2 + b * Y**2, h)
    # central second differences are exact on quadratics: f_xx + f_yy = 2a + 2b everywhere
    assert m["SC"] == pytest.approx(abs(2 * a + 2 * b), rel=1e-9)
    # central first differences are exact too: grad = (2a x, 2b y) at the interior points
    inner = (slice(1, -1), slice(1, -1))
    assert m["AG"] == pytest.approx(np.mean(np.hypot(2 * a * X[inner], 2 * b * Y[inner])), rel=1e-12)


@pytest.mark.parametrize("n,span", [(5, 1.0), (11, 1.0), (11, 0.1)])
def test_plane(n, span):
    p, q = 3.0, -4.0
    X, Y, h = grid(n, span)
    m = flatness_metrics(p * X + q * Y + 7.0, h)
    assert m["SC"] == pytest.approx(0.0, abs=1e-9)
    assert m["AG"] == pytest.approx(5.0, rel=1e-9)  # |gradient| = hypot(3, 4), whatever the step
    # every step along axis 0 changes Z by |p| h, along axis 1 by |q| h, equally many pairs each
    assert m["MAG"] == pytest.approx((abs(p) + abs(q)) * h / 2, rel=1e-9)


def test_small_grid_by_hand():
    Z = np.array([[0.0, 1.0, 3.0],
                  [2.0, 2.0, 2.0],
                  [5.0, 0.0, 1.0]])
    m = flatness_metrics(Z, 0.5)
    # one interior point (1, 1): f_xx = (0 - 4 + 1) / 0.25 = -12, f_yy = (2 - 4 + 2) / 0.25 = 0
    assert m["SC"] == pytest.approx(12.0)
    # f_x = (0 - 1) / 1 = -1, f_y = (2 - 2) / 1 = 0
    assert m["AG"] == pytest.approx(1.0)
    # |steps| along rows: 1, 2, 0, 0, 5, 1; along columns: 2, 1, 1, 3, 2, 1 -> 19 over 12 pairs
    assert m["MAG"] == pytest.approx(19 / 12)


def test_rectangular_grid_and_axes():
    # a surface that changes only along axis 0 (i): the metrics do not depend on which axis is which
    Z = np.outer(np.arange(4.0) ** 2, np.ones(6))
    m, mt = flatness_metrics(Z, 1.0), flatness_metrics(Z.T, 1.0)
    assert m == pytest.approx(mt)
    assert m["SC"] == pytest.approx(2.0)


@pytest.mark.parametrize("Z,spacing,match", [
    (np.zeros(9), 1.0, "2-D"),
    (np.zeros((2, 5)), 1.0, "3 x 3"),
    (np.array([[0, 1, 2], [0, np.nan, 1], [0, 0, 0]]), 1.0, "non-finite"),
    (np.zeros((3, 3)), 0.0, "spacing"),
    (np.zeros((3, 3)), -1.0, "spacing"),
])
def test_bad_input(Z, spacing, match):
    with pytest.raises(ValueError, match=match):
        flatness_metrics(Z, spacing)
