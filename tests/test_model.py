"""Model: Architecture validation, seeded Glorot/He init, forward pass, parameter order."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradpipe.errors import ConfigError
from gradpipe.model import (
    Architecture,
    Params,
    check_shapes,
    forward,
    init_params,
)

# ---------------------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "kwargs, words",
    [
        # softmax output needs cross_entropy, and cross_entropy needs a softmax output
        (dict(output_activation="softmax", loss="squared"), ["cross_entropy", "softmax"]),
        (dict(output_activation="sigmoid", loss="cross_entropy"), ["cross_entropy", "softmax"]),
        (dict(output_activation="identity", loss="cross_entropy"), ["cross_entropy", "softmax"]),
        # softmax is not elementwise: output layer only
        (dict(activation="softmax", output_activation="softmax", loss="cross_entropy"),
         ["softmax", "hidden", "relu", "sigmoid", "tanh", "identity"]),
        (dict(activation="softmax"), ["softmax", "hidden"]),
        # unknown names
        (dict(activation="Relu"), ["'Relu'", "relu"]),
        (dict(output_activation="linear"), ["'linear'", "identity"]),
        (dict(loss="mse"), ["'mse'", "squared"]),
        # dtypes
        (dict(dtype="float16"), ["'float16'", "float32", "float64"]),
        (dict(dtype="int32"), ["'int32'"]),
        (dict(dtype="Float64"), ["'Float64'"]),
        # sizes
        (dict(sizes=()), ["sizes"]),
        (dict(sizes=(3,)), ["sizes", "[3]"]),
        (dict(sizes=(3, 0)), ["sizes", "[3, 0]"]),
        (dict(sizes=(0, 2)), ["sizes"]),
        (dict(sizes=(3, 4, -1)), ["sizes", "-1"]),
    ],
)
def test_architecture_rejects_bad_config(kwargs, words):
    args = dict(sizes=(3, 4, 2), dtype="float64") | kwargs
    with pytest.raises(ConfigError) as info:
        Architecture(**args)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("hidden", ["identity", "relu", "sigmoid", "tanh"])
@pytest.mark.parametrize(
    "output, loss",
    [("sigmoid", "squared"), ("identity", "squared"), ("tanh", "squared"), ("relu", "squared"),
     ("softmax", "cross_entropy")],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_architecture_accepts_valid_config(hidden, output, loss, dtype):
    arch = Architecture((3, 4, 5, 2), hidden, output, loss, dtype)
    assert arch.L == 3
    assert [arch.g(l) for l in (1, 2, 3)] == [hidden, hidden, output]
    assert arch.n_params == 4 * (3 + 1) + 5 * (4 + 1) + 2 * (5 + 1)
    assert Architecture.from_dict(arch.to_dict()) == arch


def test_architecture_defaults_to_float32_and_one_layer_is_allowed():
    arch = Architecture((2, 1))
    assert arch.dtype == "float32" and arch.L == 1 and arch.g(1) == "sigmoid"


# ---------------------------------------------------------------------------- init_params

def glorot(n_in: int, n_out: int) -> float:
    return math.sqrt(6.0 / (n_in + n_out))


def he(n_in: int) -> float:
    return math.sqrt(6.0 / n_in)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 8), min_size=2, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    hidden=st.sampled_from(["identity", "relu", "sigmoid", "tanh"]),
)
def test_init_params_is_deterministic_per_seed_with_zero_biases(sizes, seed, hidden):
    arch = Architecture(tuple(sizes), hidden, "identity", "squared", "float64")
    p1, p2 = init_params(arch, seed), init_params(arch, seed)
    assert p1.L == arch.L
    check_shapes(arch, p1)
    for l in range(1, arch.L + 1):
        np.testing.assert_array_equal(p1.w[l], p2.w[l])
        np.testing.assert_array_equal(p1.b[l], np.zeros(sizes[l]))
        assert p1.w[l].dtype == np.float64 and p1.b[l].dtype == np.float64
        r = he(sizes[l - 1]) if arch.g(l) == "relu" else glorot(sizes[l - 1], sizes[l])
        assert np.all(np.abs(p1.w[l]) <= r)
    assert not np.array_equal(init_params(arch, seed + 1).flat(), p1.flat())


@pytest.mark.parametrize(
    "hidden, output, loss, radii",
    [
        # relu hidden layers: He, r = sqrt(6 / n_in); non-relu output: Glorot
        ("relu", "sigmoid", "squared", [he(30), he(40), glorot(20, 10)]),
        ("tanh", "softmax", "cross_entropy", [glorot(30, 40), glorot(40, 20), glorot(20, 10)]),
        # relu output layer: He too
        ("sigmoid", "relu", "squared", [glorot(30, 40), glorot(40, 20), he(20)]),
    ],
)
def test_init_params_glorot_and_he_uniform_bounds(hidden, output, loss, radii):
    arch = Architecture((30, 40, 20, 10), hidden, output, loss, "float64")
    params = init_params(arch, seed=7)
    for l, r in zip((1, 2, 3), radii, strict=True):
        w = params.w[l]
        assert w.shape == (arch.sizes[l], arch.sizes[l - 1])
        assert np.abs(w).max() <= r
        # U(-r, r) fills its range: with >= 200 draws the extreme is within a few % of r
        assert np.abs(w).max() > 0.95 * r
        # ... with mean 0 and variance r^2 / 3
        np.testing.assert_allclose(w.mean(), 0.0, rtol=0, atol=0.1 * r)
        np.testing.assert_allclose(w.var(), r * r / 3, rtol=0.15, atol=0)


@pytest.mark.parametrize("hidden", ["relu", "tanh"])
def test_init_params_same_values_in_float32_and_float64(hidden):
    a64 = Architecture((5, 7, 3), hidden, "sigmoid", "squared", "float64")
    a32 = Architecture((5, 7, 3), hidden, "sigmoid", "squared", "float32")
    p64, p32 = init_params(a64, 11), init_params(a32, 11)
    for l in (1, 2):
        assert p32.w[l].dtype == np.float32 and p32.b[l].dtype == np.float32
        # drawn in float64 and cast: equal up to float32 rounding, and exactly the cast
        np.testing.assert_allclose(p32.w[l], p64.w[l], rtol=6e-8, atol=0)
        np.testing.assert_array_equal(p32.w[l], p64.w[l].astype(np.float32))
        np.testing.assert_array_equal(p32.b[l], 0)


def test_check_shapes_rejects_wrong_params():
    arch = Architecture((3, 4, 2), dtype="float64")
    params = init_params(arch, 0)
    check_shapes(arch, params)
    with pytest.raises(ConfigError, match="layers"):
        check_shapes(Architecture((3, 4, 4, 2), dtype="float64"), params)
    with pytest.raises(ConfigError, match=r"layer 2"):
        check_shapes(Architecture((3, 4, 5), dtype="float64"), params)


# ---------------------------------------------------------------------------- forward

def naive_forward(arch: Architecture, params: Params, x: np.ndarray) -> list[np.ndarray]:
    """a[L] by loops over samples and units: z_j = sum_k w_jk a_k + b_j, a_j = g(z_j)."""
    g = {
        "identity": lambda v: v,
        "relu": lambda v: max(v, 0.0),
        "sigmoid": lambda v: 1.0 / (1.0 + math.exp(-v)),
        "tanh": math.tanh,
    }
    out = []
    for i in range(x.shape[0]):
        a = list(x[i])
        for l in range(1, arch.L + 1):
            w, b = params.w[l], params.b[l]
            z = [sum(w[j, k] * a[k] for k in range(len(a))) + b[j] for j in range(w.shape[0])]
            if arch.g(l) == "softmax":
                e = [math.exp(v - max(z)) for v in z]
                a = [v / sum(e) for v in e]
            else:
                a = [g[arch.g(l)](v) for v in z]
        out.append(a)
    return np.array(out).reshape(x.shape[0], arch.sizes[-1])


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    n=st.integers(0, 7),
    hidden=st.sampled_from(["identity", "relu", "sigmoid", "tanh"]),
    out=st.sampled_from([("sigmoid", "squared"), ("identity", "squared"),
                         ("softmax", "cross_entropy")]),
    seed=st.integers(0, 2**32 - 1),
)
def test_forward_shapes_and_values(sizes, n, hidden, out, seed):
    arch = Architecture(tuple(sizes), hidden, out[0], out[1], "float64")
    rng = np.random.default_rng(seed)
    params = init_params(arch, seed)
    params.b = [b + rng.normal(size=b.shape) for b in params.b]
    x = rng.normal(size=(n, sizes[0]))
    a, z = forward(arch, params, x)
    assert len(a) == len(z) == arch.L + 1
    assert a[0] is x
    assert z[0].size == 0
    for l in range(1, arch.L + 1):
        assert a[l].shape == z[l].shape == (n, sizes[l])
        assert a[l].dtype == z[l].dtype == np.float64
    np.testing.assert_allclose(a[arch.L], naive_forward(arch, params, x), rtol=1e-12, atol=1e-14)


def test_forward_keeps_float32():
    arch = Architecture((4, 3, 2), "tanh", "softmax", "cross_entropy", "float32")
    params = init_params(arch, 1)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    a, z = forward(arch, params, x)
    assert all(v.dtype == np.float32 for v in a[1:] + z[1:])
    np.testing.assert_allclose(a[2].sum(axis=1), 1.0, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- Params

def test_params_flat_order_is_layer_then_w_row_major_then_b():
    # Give every parameter a distinct value that encodes where it is: l*1000 + j*10 + k for
    # w[l][j, k], and l*1000 + 500 + j for b[l][j].
    arch = Architecture((3, 2, 4), dtype="float64")
    params = init_params(arch, 0)
    for l in (1, 2):
        for j in range(arch.sizes[l]):
            params.b[l][j] = l * 1000 + 500 + j
            for k in range(arch.sizes[l - 1]):
                params.w[l][j, k] = l * 1000 + j * 10 + k
    expected = []
    for l in (1, 2):
        for j in range(arch.sizes[l]):
            for k in range(arch.sizes[l - 1]):
                expected.append(l * 1000 + j * 10 + k)
        for j in range(arch.sizes[l]):
            expected.append(l * 1000 + 500 + j)
    flat = params.flat()
    assert flat.dtype == np.float64
    assert len(flat) == arch.n_params == 2 * 4 + 4 * 3
    np.testing.assert_array_equal(flat, expected)
    # spelled out for the first layer: w[1] row 0, row 1, then b[1]
    np.testing.assert_array_equal(flat[:8], [1000, 1001, 1002, 1010, 1011, 1012, 1500, 1501])


def test_params_astype():
    arch = Architecture((3, 2, 1), dtype="float64")
    params = init_params(arch, 3)
    p32 = params.astype("float32")
    assert all(w.dtype == np.float32 for w in p32.w) and all(b.dtype == np.float32 for b in p32.b)
    np.testing.assert_allclose(p32.flat(), params.flat(), rtol=6e-8, atol=0)
