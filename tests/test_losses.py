"""Losses: every grad against a central difference of fn in a, worked values, lookup errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradpipe.activations import softmax
from gradpipe.errors import ConfigError
from gradpipe.losses import LOSSES, cross_entropy, get_loss, squared

H = 1e-6


def loss_inputs(name: str, n: int, n_L: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, y) in the domain of the loss: any reals for squared; probabilities and one-hot y
    for cross_entropy (a kept away from 0 so that the finite difference stays accurate)."""
    rng = np.random.default_rng(seed)
    if name == "cross_entropy":
        a = rng.uniform(0.05, 1.0, size=(n, n_L))
        y = np.eye(n_L)[rng.integers(0, n_L, size=n)]
    else:
        a = rng.normal(scale=3.0, size=(n, n_L))
        y = rng.normal(scale=3.0, size=(n, n_L))
    return a, y


def central_difference_in_a(fn, a: np.ndarray, y: np.ndarray, h: float = H) -> np.ndarray:
    """dC_i/da_ij by central differences: C_i depends on row i only, so a whole column is
    perturbed at once and the difference of the (n,) losses is column j of the derivative."""
    out = np.empty_like(a)
    for j in range(a.shape[1]):
        step = np.zeros_like(a)
        step[:, j] = h
        out[:, j] = (fn(a + step, y) - fn(a - step, y)) / (2 * h)
    return out


@pytest.mark.parametrize("name", sorted(LOSSES))
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), n_L=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_grad_matches_central_difference(name, n, n_L, seed):
    loss = LOSSES[name]
    a, y = loss_inputs(name, n, n_L, seed)
    grad = loss.grad(a, y)
    assert grad.shape == (n, n_L)
    np.testing.assert_allclose(grad, central_difference_in_a(loss.fn, a, y), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_fn_is_float64_per_sample_and_grad_keeps_dtype(name):
    a, y = loss_inputs(name, 4, 3, seed=0)
    a32, y32 = a.astype(np.float32), y.astype(np.float32)
    loss = LOSSES[name]
    c = loss.fn(a32, y32)
    assert c.shape == (4,) and c.dtype == np.float64
    assert loss.grad(a32, y32).dtype == np.float32
    np.testing.assert_allclose(c, loss.fn(a, y), rtol=1e-6, atol=1e-7)


def test_squared_has_no_factor_one_half():
    a = np.array([[1.0, 2.0], [0.0, 0.0]])
    y = np.array([[0.5, 4.0], [0.0, 3.0]])
    # row 0: (1 - 0.5)^2 + (2 - 4)^2 = 0.25 + 4 = 4.25 (with a factor 1/2 it would be 2.125)
    # row 1: 0 + (0 - 3)^2 = 9
    np.testing.assert_allclose(squared(a, y), [4.25, 9.0], rtol=0, atol=0)
    # dC/da_j = 2 (a_j - y_j)
    np.testing.assert_allclose(LOSSES["squared"].grad(a, y), [[1.0, -4.0], [0.0, -6.0]],
                               rtol=0, atol=0)


def test_cross_entropy_on_one_hot_targets():
    a = np.array([[0.2, 0.5, 0.3], [0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    y = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # -log(0.5) = 0.6931471805599453; -log(0.7) = 0.35667494393873245;
    # a = 0 for the true class: -log(0) = inf. (Changed on purpose: a used to be clipped to
    # 1e-12, capping every loss at 27.63; the exact value needs the logits, below.)
    with np.errstate(divide="raise", invalid="raise"):
        c = cross_entropy(a, y)
    np.testing.assert_allclose(c, [0.6931471805599453, 0.35667494393873245, np.inf],
                               rtol=1e-14, atol=0)
    # dC/da_j = -y_j / a_j: only the true class has a nonzero entry
    np.testing.assert_allclose(
        LOSSES["cross_entropy"].grad(a, y),
        [[0.0, -2.0, 0.0], [-1 / 0.7, 0.0, 0.0], [-np.inf, 0.0, 0.0]], rtol=1e-14, atol=0,
    )


def test_cross_entropy_from_logits_worked_values():
    z = np.array([[0.0, 1000.0], [1000.0, -1000.0], [0.0, np.log(3.0)], [5.0, 5.0]])
    y = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.25, 0.75]])
    a = softmax(z)
    # row 0: lse(z) - z_0 = 1000 + log1p(exp(-1000)) = 1000 (a_0 = exp(-1000) underflows)
    # row 1: lse(z) - z_0 = log1p(exp(-2000)) = exp(-2000), which underflows to 0
    # row 2: a = (1/4, 3/4): -log(3/4) = 0.2876820724517809
    # row 3: a tie, a = (1/2, 1/2): -(0.25 + 0.75) log(1/2) = log 2 = 0.6931471805599453
    np.testing.assert_allclose(
        cross_entropy(a, y, z), [1000.0, 0.0, 0.2876820724517809, 0.6931471805599453],
        rtol=1e-15, atol=0,
    )
    # A confident right answer is small but not 0: log1p(exp(-40)) = 4.248354255291589e-18
    # (log of the rounded a = 1 would give 0).
    np.testing.assert_allclose(
        cross_entropy(softmax(np.array([[40.0, 0.0]])), np.array([[1.0, 0.0]]),
                      np.array([[40.0, 0.0]])),
        [4.248354255291589e-18], rtol=1e-15, atol=0,
    )


def test_cross_entropy_is_zero_for_a_confident_right_answer():
    y = np.array([[0.0, 1.0]])
    np.testing.assert_allclose(cross_entropy(np.array([[0.0, 1.0]]), y), [0.0], rtol=0, atol=0)


def test_get_loss_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        get_loss("mse")
    message = str(info.value)
    assert "'mse'" in message
    for name in LOSSES:
        assert name in message


def test_get_loss_returns_table_entry():
    for name, loss in LOSSES.items():
        assert get_loss(name) is loss
