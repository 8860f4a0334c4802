"""Activations: every g' against a central difference of g, sigmoid/softmax stability, lookup."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradpipe.activations import ACTIVATIONS, HIDDEN_ACTIVATIONS, get_activation, sigmoid, softmax
from gradpipe.errors import ConfigError

H = 1e-6  # central-difference step; error O(H^2) + O(eps / H), about 1e-10 here
PRIMED = sorted(name for name, act in ACTIVATIONS.items() if act.prime is not None)

z_arrays = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6),
    elements=st.floats(-20.0, 20.0, allow_nan=False, allow_infinity=False),
)


def central_difference(fn, z: np.ndarray, h: float = H) -> np.ndarray:
    """(g(z + h) - g(z - h)) / 2h, elementwise (valid for elementwise g only)."""
    return (fn(z + h) - fn(z - h)) / (2 * h)


def test_every_activation_but_softmax_has_a_prime():
    assert ACTIVATIONS["softmax"].prime is None
    assert PRIMED == sorted(HIDDEN_ACTIVATIONS)


@pytest.mark.parametrize("name", PRIMED)
@settings(max_examples=40, deadline=None)
@given(z=z_arrays)
def test_prime_matches_central_difference(name, z):
    act = ACTIVATIONS[name]
    if name == "relu":
        # Keep away from the kink at 0, where g' is a subgradient and the difference is 1/2.
        z = np.where(np.abs(z) < 1e-3, 0.5, z)
    np.testing.assert_allclose(act.prime(z), central_difference(act.fn, z), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_functions_keep_the_dtype_of_z(name):
    z = np.array([[-2.0, -0.5, 0.0, 0.5, 3.0]], dtype=np.float32)
    act = ACTIVATIONS[name]
    assert act.fn(z).dtype == np.float32
    if act.prime is not None:
        assert act.prime(z).dtype == np.float32


def test_relu_prime_takes_subgradient_zero_at_zero():
    np.testing.assert_array_equal(ACTIVATIONS["relu"].prime(np.array([-1.0, 0.0, 1.0])), [0, 0, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_does_not_overflow_at_large_z(dtype):
    z = np.array([-1000.0, -745.0, -40.0, 0.0, 40.0, 745.0, 1000.0], dtype=dtype)
    # Underflow of exp(-1000) to 0 is the intended, exact-enough answer; overflow is not.
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        s = sigmoid(z)
        s_prime = ACTIVATIONS["sigmoid"].prime(z)
    assert s.dtype == dtype
    assert np.all(np.isfinite(s)) and np.all(np.isfinite(s_prime))
    np.testing.assert_allclose(s[[0, -1]], [0.0, 1.0], rtol=0, atol=0)
    np.testing.assert_allclose(s[3], 0.5, rtol=0, atol=0)
    np.testing.assert_allclose(s_prime[[0, -1]], [0.0, 0.0], rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(z=hnp.arrays(np.float64, 7, elements=st.floats(-30, 30, allow_nan=False)))
def test_sigmoid_matches_textbook_formula(z):
    np.testing.assert_allclose(sigmoid(z), 1.0 / (1.0 + np.exp(-z)), rtol=1e-13, atol=1e-300)


softmax_rows = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 5), st.integers(1, 6)),
    elements=st.floats(-50.0, 50.0, allow_nan=False),
)


@settings(max_examples=40, deadline=None)
@given(z=softmax_rows, shift=st.floats(-100.0, 100.0, allow_nan=False))
def test_softmax_rows_sum_to_one_and_are_shift_invariant(z, shift):
    a = softmax(z)
    assert a.shape == z.shape
    assert np.all(a >= 0)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-12, atol=0)
    # A different shift per row: softmax is invariant to adding a constant to a row.
    shifts = shift * np.arange(1, z.shape[0] + 1)[:, None]
    np.testing.assert_allclose(softmax(z + shifts), a, rtol=1e-10, atol=1e-13)


def test_softmax_worked_value_and_large_inputs():
    # exp(0), exp(1), exp(2) over their sum 1 + e + e^2 = 11.107337927389695
    np.testing.assert_allclose(
        softmax(np.array([[0.0, 1.0, 2.0]])),
        [[0.09003057317038046, 0.24472847105479764, 0.6652409557748219]],
        rtol=1e-14, atol=0,
    )
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        a = softmax(np.array([[1000.0, 1000.0], [-1000.0, 0.0]]))
    np.testing.assert_allclose(a, [[0.5, 0.5], [0.0, 1.0]], rtol=0, atol=1e-300)


def test_get_activation_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        get_activation("Relu")
    message = str(info.value)
    assert "'Relu'" in message
    for name in ACTIVATIONS:
        assert name in message


def test_get_activation_returns_table_entry():
    for name, act in ACTIVATIONS.items():
        assert get_activation(name) is act


@pytest.mark.parametrize("name", [n for n, a in ACTIVATIONS.items() if a.prime is not None])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_prime_of_a_is_prime_of_z(name, dtype):
    """backprop takes g'(z) from a = g(z) (and z where a saturates); the same number as g'(z).

    Changed on purpose: prime_of_a takes (a, z), and prime is computed from z without the
    cancellation of 1 - a, so they agree also where a rounds to its limits (z up to 60)."""
    act = ACTIVATIONS[name]
    z = np.linspace(-60, 60, 2401).astype(dtype)
    z = z[z != 0]  # relu's kink
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(act.prime_of_a(act.fn(z), z), act.prime(z), rtol=rtol,
                               atol=1e-300)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_out_gives_the_same_bits_as_a_new_array(name, dtype):
    """fn, prime and prime_of_a written into `out` (backprop reuses one array per layer)
    give the bits of their allocating form, saturated units included."""
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((50, 7)) * np.array([1, 5, 20, 40, 80, 200, 0.01])).astype(dtype)
    act = ACTIVATIONS[name]
    out = np.full_like(z, np.nan)
    a = act.fn(z)
    np.testing.assert_array_equal(act.fn(z, out=out), a)
    if act.prime is not None:
        np.testing.assert_array_equal(act.prime(z, out=np.full_like(z, np.nan)), act.prime(z))
    if act.prime_of_a is not None:
        np.testing.assert_array_equal(act.prime_of_a(a, z, out=np.full_like(z, np.nan)),
                                      act.prime_of_a(a, z))
