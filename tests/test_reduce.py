"""Reduce: the same full-batch gradient for any split into blocks (empty ones included) and any
order of the partials; Gradient's norms and flat vector; the noise scale against a direct
computation from materialized per-sample gradients."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradpipe.activations import HIDDEN_ACTIVATIONS
from gradpipe.backprop import Partial, block_partial, deltas, per_sample_grads
from gradpipe.losses import LOSSES
from gradpipe.model import Architecture, Params, forward, init_params
from gradpipe.reduce import Gradient, reduce

OUTPUTS = [("sigmoid", "squared"), ("identity", "squared"), ("softmax", "cross_entropy")]


def make_problem(sizes, hidden, output, loss, n, seed):
    arch = Architecture(tuple(sizes), hidden, output, loss, "float64")
    rng = np.random.default_rng(seed)
    params = init_params(arch, seed)
    params = Params(params.w, [b + rng.normal(scale=0.5, size=b.shape) for b in params.b])
    x = rng.normal(size=(n, sizes[0]))
    if loss == "cross_entropy":
        y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], size=n)]
    else:
        y = rng.uniform(size=(n, sizes[-1]))
    return arch, params, x, y


@st.composite
def problems(draw, min_n: int = 1, max_n: int = 16):
    sizes = [draw(st.integers(1, 5)),
             *draw(st.lists(st.integers(1, 5), min_size=1, max_size=2)),
             draw(st.integers(1, 4))]
    output, loss = draw(st.sampled_from(OUTPUTS))
    return make_problem(sizes, draw(st.sampled_from(HIDDEN_ACTIVATIONS)), output, loss,
                        draw(st.integers(min_n, max_n)), draw(st.integers(0, 2**32 - 1)))


def materialized(arch, params, x, y):
    """Per-sample gradients (n, P), losses (n,), squared norms per layer (n, L+1)."""
    a, z = forward(arch, params, x)
    grads = per_sample_grads(deltas(arch, params, a, z, y), a)
    sq = np.zeros((x.shape[0], arch.L + 1))
    at = 0
    for l in range(1, arch.L + 1):
        size = arch.sizes[l] * (arch.sizes[l - 1] + 1)
        sq[:, l] = (grads[:, at : at + size] ** 2).sum(axis=1)
        at += size
    return grads, LOSSES[arch.loss].fn(a[-1], y), sq


def split_partials(arch, params, x, y, cuts):
    """One partial per block; block b holds rows bounds[b]:bounds[b+1] (may be empty)."""
    bounds = [0, *sorted(cuts), x.shape[0]]
    return [
        block_partial(arch, params, x[lo:hi], y[lo:hi], block=b, classify=True, chunk_rows=3)
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def assert_gradients_equal(got: Gradient, want: Gradient, rtol: float) -> None:
    assert got.n == want.n and got.correct == want.correct and got.L == want.L
    scale = np.abs(want.flat()).max()
    np.testing.assert_allclose(got.flat(), want.flat(), rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(got.loss, want.loss, rtol=rtol, atol=0)
    np.testing.assert_allclose(got.sq_norm_sum, want.sq_norm_sum, rtol=rtol, atol=1e-300)


def assert_bitwise_equal(got: Gradient, want: Gradient) -> None:
    assert got.n == want.n and got.correct == want.correct and got.loss == want.loss
    for l in range(1, want.L + 1):
        assert np.array_equal(got.w[l], want.w[l]) and np.array_equal(got.b[l], want.b[l])
    assert np.array_equal(got.sq_norm_sum, want.sq_norm_sum)


# ---------------------------------------------------------------------------- reduce

@settings(max_examples=50, deadline=None)
@given(problem=problems(), data=st.data())
def test_any_split_and_any_order_give_the_same_gradient(problem, data):
    arch, params, x, y = problem
    n = x.shape[0]
    k = data.draw(st.integers(1, 6), label="k")
    cuts = data.draw(st.lists(st.integers(0, n), min_size=k - 1, max_size=k - 1), label="cuts")
    partials = split_partials(arch, params, x, y, cuts)
    assert len(partials) == k and sum(p.n for p in partials) == n

    single = reduce([block_partial(arch, params, x, y, classify=True)])
    blocks = reduce(partials)
    assert_gradients_equal(blocks, single, rtol=1e-12)

    # The same partials in any order: the same bits (the reducer adds in block order).
    order = data.draw(st.permutations(range(k)), label="order")
    assert_bitwise_equal(reduce([partials[i] for i in order]), blocks)
    assert_bitwise_equal(reduce(list(reversed(partials))), blocks)


@settings(max_examples=40, deadline=None)
@given(problem=problems(), cuts=st.lists(st.integers(0, 16), max_size=4))
def test_reduce_is_the_mean_of_per_sample_gradients(problem, cuts):
    arch, params, x, y = problem
    n = x.shape[0]
    grads, losses, sq = materialized(arch, params, x, y)
    g = reduce(split_partials(arch, params, x, y, [min(c, n) for c in cuts]))
    assert g.n == n
    np.testing.assert_allclose(g.flat(), grads.mean(axis=0), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g.loss, losses.mean(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(g.sq_norm_sum, sq.sum(axis=0), rtol=1e-10, atol=1e-300)
    for l in range(1, arch.L + 1):
        assert g.w[l].shape == params.w[l].shape and g.b[l].shape == params.b[l].shape
        assert g.w[l].dtype == np.float64


def test_reduce_does_not_change_its_partials():
    arch, params, x, y = make_problem((3, 4, 2), "tanh", "softmax", "cross_entropy", 9, 0)
    partials = split_partials(arch, params, x, y, [2, 2, 7])
    before = copy.deepcopy(partials)
    first = reduce(partials)
    for p, q in zip(partials, before, strict=True):
        assert p.n == q.n and p.loss_sum == q.loss_sum
        assert all(np.array_equal(a, b) for a, b in zip(p.sum_w, q.sum_w, strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(p.sum_b, q.sum_b, strict=True))
        assert np.array_equal(p.sq_norm_sum, q.sq_norm_sum)
    assert_bitwise_equal(reduce(partials), first)


def test_reduce_rejects_nothing_to_reduce():
    arch, params, x, y = make_problem((3, 2), "tanh", "sigmoid", "squared", 4, 0)
    with pytest.raises(ValueError, match="no partials"):
        reduce([])
    empty = [block_partial(arch, params, x[:0], y[:0], block=b) for b in range(3)]
    with pytest.raises(ValueError, match="zero samples"):
        reduce(empty)


# ---------------------------------------------------------------------------- Gradient

def gradient_from(per_sample: np.ndarray, sizes: tuple[int, ...]) -> Gradient:
    """A Gradient built from explicit per-sample gradient rows (n, P) through one Partial."""
    n = per_sample.shape[0]
    total = per_sample.sum(axis=0)
    sum_w, sum_b, sq, at = [np.zeros((0, 0))], [np.zeros(0)], np.zeros(len(sizes)), 0
    for l in range(1, len(sizes)):
        n_out, n_in = sizes[l], sizes[l - 1]
        sum_w.append(total[at : at + n_out * n_in].reshape(n_out, n_in))
        sum_b.append(total[at + n_out * n_in : at + n_out * (n_in + 1)])
        sq[l] = (per_sample[:, at : at + n_out * (n_in + 1)] ** 2).sum()
        at += n_out * (n_in + 1)
    return reduce([Partial(0, n, 0.0, sum_w, sum_b, sq, 0)])


def test_gradient_flat_norms_on_known_values():
    # One layer 2 -> 1 then 1 -> 2: P = 2 + 1 + 2 + 2 = 7, one sample, so G = g_1.
    g1 = np.array([[3.0, 4.0, 12.0, 1.0, 2.0, 2.0, 4.0]])
    g = gradient_from(g1, (2, 1, 2))
    np.testing.assert_array_equal(g.flat(), g1[0])
    np.testing.assert_array_equal(g.w[1], [[3.0, 4.0]])
    np.testing.assert_array_equal(g.b[2], [2.0, 4.0])
    # layer 1: sqrt(9 + 16 + 144) = 13; layer 2: sqrt(1 + 4 + 4 + 16) = 5; all: sqrt(194)
    np.testing.assert_allclose(g.layer_norms(), [0.0, 13.0, 5.0], rtol=1e-15, atol=0)
    np.testing.assert_allclose(g.norm(), math.sqrt(194.0), rtol=1e-15, atol=0)


@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_gradient_norms_match_materialized(problem):
    arch, params, x, y = problem
    grads, _, _ = materialized(arch, params, x, y)
    g = reduce([block_partial(arch, params, x, y)])
    G = grads.mean(axis=0)
    np.testing.assert_allclose(g.flat(), G, rtol=1e-10, atol=1e-13)
    at, norms = 0, [0.0]
    for l in range(1, arch.L + 1):
        size = arch.sizes[l] * (arch.sizes[l - 1] + 1)
        norms.append(np.linalg.norm(G[at : at + size]))
        at += size
    np.testing.assert_allclose(g.layer_norms(), norms, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g.norm(), np.linalg.norm(G), rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------- noise scale

def noise_scale_direct(per_sample: np.ndarray) -> tuple[float, float]:
    """(tr(S), |G|^2 - tr(S)/n) with tr(S) = sum_i |g_i - G|^2 / (n-1); B is their ratio."""
    n = per_sample.shape[0]
    G = per_sample.mean(axis=0)
    trace = float(((per_sample - G) ** 2).sum() / (n - 1))
    return trace, float(G @ G) - trace / n


def test_noise_scale_worked_value():
    # g_1 = (1, 0), g_2 = (3, 0) for (w, b) of a 1 -> 1 layer: G = (2, 0), |G|^2 = 4;
    # tr(S) = (|g_1 - G|^2 + |g_2 - G|^2) / (2 - 1) = (1 + 1) / 1 = 2;
    # B = 2 / (4 - 2 / 2) = 2 / 3.
    g = gradient_from(np.array([[1.0, 0.0], [3.0, 0.0]]), (1, 1))
    np.testing.assert_allclose(g.noise_scale(), 2.0 / 3.0, rtol=1e-15, atol=0)


@settings(max_examples=50, deadline=None)
@given(problem=problems(min_n=2, max_n=16))
def test_noise_scale_matches_direct_computation(problem):
    arch, params, x, y = problem
    grads, _, _ = materialized(arch, params, x, y)
    trace, denom = noise_scale_direct(grads)
    G2 = float(grads.mean(axis=0) @ grads.mean(axis=0))
    # Keep away from a vanishing denominator (e.g. a 1-unit softmax, whose gradients are all
    # zero), where both sides are ill-conditioned.
    assume(abs(denom) > 1e-6 * G2 and abs(denom) > 0)
    got = reduce([block_partial(arch, params, x, y)]).noise_scale()
    if denom > 0:
        np.testing.assert_allclose(got, trace / denom, rtol=1e-8, atol=1e-12)
    else:
        assert math.isnan(got)  # |G|^2 - tr(S)/n <= 0: the estimate is undefined


def test_noise_scale_is_nan_for_fewer_than_two_samples():
    arch, params, x, y = make_problem((3, 4, 2), "tanh", "sigmoid", "squared", 1, 0)
    g = reduce([block_partial(arch, params, x, y)])
    assert g.n == 1 and math.isnan(g.noise_scale())
    g = gradient_from(np.array([[2.0, 1.0]]), (1, 1))
    assert math.isnan(g.noise_scale())


def test_noise_scale_is_nan_when_the_mean_gradient_vanishes():
    # g_1 = -g_2: G = 0, tr(S) = 2 |g_1|^2 > 0, denominator -tr(S)/n < 0.
    g = gradient_from(np.array([[1.0, -2.0], [-1.0, 2.0]]), (1, 1))
    assert math.isnan(g.noise_scale())


def test_noise_scale_is_zero_when_all_samples_agree():
    arch, params, x, y = make_problem((3, 4, 2), "tanh", "sigmoid", "squared", 1, 3)
    x, y = np.repeat(x, 6, axis=0), np.repeat(y, 6, axis=0)
    g = reduce([block_partial(arch, params, x, y)])
    np.testing.assert_allclose(g.noise_scale(), 0.0, rtol=0, atol=1e-10)


def test_noise_scale_is_nan_where_the_denominator_is_rounding():
    # g_1 ⟂ g_2, so |G|^2 - tr(S)/n = g_1 . g_2 / 1 = 0 in exact arithmetic (n = 2); in
    # floating point it came out as 1.8e-15 and B as 9.0e15. A denominator within
    # NOISE_ULPS eps of the terms it subtracts is rounding: NaN (written as null).
    u = [-3.5488049709979372, -1.9986036000365417]
    v = [1.9242675553236532, -3.4168107501346303]
    g = gradient_from(np.array([u, v]), (1, 1))
    g2 = float(g.flat() @ g.flat())
    trace = float(g.sq_norm_sum.sum()) - 2 * g2
    assert g2 - trace / 2 > 0  # the old test, denom > 0, let it through
    assert math.isnan(g.noise_scale())


def test_noise_scale_threshold_follows_the_compute_dtype():
    # g_1 = (1, 0, 0, w), g_2 = (-1, 0, 0, w) for a 1 -> 2 layer (P = 4) with w^2 = 1 + r:
    # G = (0, 0, 0, w), tr(S) = 2, |G|^2 - tr(S)/2 = r, B = 2 / r, and the denominator is
    # r / 2 of |G|^2 + tr(S)/n: above float64's rounding, below float32's.
    r = 1e-8
    w = math.sqrt(1 + r)
    g = gradient_from(np.array([[1.0, 0.0, 0.0, w], [-1.0, 0.0, 0.0, w]]), (1, 2))
    assert g.eps == np.finfo(np.float64).eps
    np.testing.assert_allclose(g.noise_scale(), 2 / r, rtol=1e-6, atol=0)
    g.eps = float(np.finfo(np.float32).eps)
    assert math.isnan(g.noise_scale())


def test_reduce_keeps_the_coarsest_eps():
    arch, params, x, y = make_problem((3, 4, 2), "tanh", "sigmoid", "squared", 6, 0)
    arch32 = Architecture(arch.sizes, "tanh", "sigmoid", "squared", "float32")
    p64 = block_partial(arch, params, x[:3], y[:3], block=0)
    p32 = block_partial(arch32, params.astype("float32"), x[3:].astype(np.float32),
                        y[3:].astype(np.float32), block=1)
    assert p64.eps == np.finfo(np.float64).eps and p32.eps == np.finfo(np.float32).eps
    assert reduce([p64]).eps == p64.eps
    assert reduce([p64, p32]).eps == p32.eps


# ---------------------------------------------------------------------------- second moments
# and the noise scale per layer


def layer_columns(arch) -> list[slice]:
    out, at = [slice(0, 0)], 0
    for l in range(1, arch.L + 1):
        size = arch.sizes[l] * (arch.sizes[l - 1] + 1)
        out.append(slice(at, at + size))
        at += size
    return out


@settings(max_examples=40, deadline=None)
@given(problem=problems(), data=st.data())
def test_grad_sq_is_the_mean_squared_per_sample_gradient_for_any_split(problem, data):
    arch, params, x, y = problem
    n = x.shape[0]
    grads, _, _ = materialized(arch, params, x, y)
    cuts = data.draw(st.lists(st.integers(0, n), max_size=4), label="cuts")
    bounds = [0, *sorted(cuts), n]
    partials = [block_partial(arch, params, x[lo:hi], y[lo:hi], block=b, chunk_rows=3,
                              second_moment=True)
                for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
    g = reduce(partials)
    np.testing.assert_allclose(g.flat_sq(), (grads ** 2).mean(axis=0), rtol=1e-10,
                               atol=1e-300)
    # (1/N) sum g_i^2 - G^2 is the per-parameter (population) variance of the g_i.
    np.testing.assert_allclose(g.flat_sq() - g.flat() ** 2, grads.var(axis=0), rtol=1e-7,
                               atol=1e-12 * max(1.0, float((grads ** 2).max())))
    # Block order, not arrival order: the same bits for any order of the partials.
    order = data.draw(st.permutations(range(len(partials))), label="order")
    assert np.array_equal(reduce([partials[i] for i in order]).flat_sq(), g.flat_sq())
    # The first moment is unchanged by asking for the second.
    plain = reduce([block_partial(arch, params, x[lo:hi], y[lo:hi], block=b, chunk_rows=3)
                    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))])
    assert plain.flat_sq() is None and np.array_equal(plain.flat(), g.flat())


def test_reduce_refuses_to_mix_partials_with_and_without_second_moments():
    arch, params, x, y = make_problem((3, 4, 2), "tanh", "sigmoid", "squared", 6, 0)
    with pytest.raises(AssertionError, match="mixed"):
        reduce([block_partial(arch, params, x[:3], y[:3], block=0, second_moment=True),
                block_partial(arch, params, x[3:], y[3:], block=1)])


@settings(max_examples=50, deadline=None)
@given(problem=problems(min_n=2, max_n=16))
def test_layer_noise_scale_matches_its_definition_on_each_layer(problem):
    arch, params, x, y = problem
    grads, _, _ = materialized(arch, params, x, y)
    got = reduce([block_partial(arch, params, x, y)]).layer_noise_scales()
    assert got.shape == (arch.L + 1,) and math.isnan(got[0])
    for l, cols in enumerate(layer_columns(arch)[1:], start=1):
        trace, denom = noise_scale_direct(grads[:, cols])  # the definition on layer l alone
        G2 = float(grads[:, cols].mean(axis=0) @ grads[:, cols].mean(axis=0))
        if not (abs(denom) > 1e-6 * G2 and abs(denom) > 0):
            continue  # ill-conditioned on both sides, as in the whole-model test
        if denom > 0:
            np.testing.assert_allclose(got[l], trace / denom, rtol=1e-8, atol=1e-12)
        else:
            assert math.isnan(got[l])


def test_layer_noise_scale_of_a_one_layer_model_is_the_noise_scale():
    g = gradient_from(np.array([[1.0, 0.0], [3.0, 0.0]]), (1, 1))
    assert g.layer_noise_scales()[1] == g.noise_scale() == pytest.approx(2.0 / 3.0, rel=1e-15)
