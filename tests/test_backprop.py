"""Backprop against two slow references that are obviously correct.

- `naive_sample`: one sample at a time, one weight at a time, the chain rule written out as
  dC_i/dw_jk = dC_i/da_j * g'(z_j) * a_k in plain Python loops (no gradpipe.backprop).
- `fd_reference`: central finite differences of C_i in float64, one parameter at a time.

Then: per-sample gradients, the microbatch check (row i == backprop on x[i:i+1] alone), the
block sums, per-sample squared norms (rank-1 identity), the sink (plain and full, in bounded
pieces), chunking, float32 against float64, and one 2-2-1 network worked out by hand.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gradpipe.backprop as backprop
from gradpipe.activations import HIDDEN_ACTIVATIONS
from gradpipe.backprop import block_partial, deltas, per_sample_grads, per_sample_sq_norms
from gradpipe.losses import LOSSES
from gradpipe.model import Architecture, Params, forward, init_params

OUTPUTS = [("sigmoid", "squared"), ("identity", "squared"), ("softmax", "cross_entropy")]


class Problem(NamedTuple):
    arch: Architecture
    params: Params
    x: np.ndarray
    y: np.ndarray


def make_problem(sizes, hidden, output, loss, n, seed, dtype="float64") -> Problem:
    """Seeded weights, random nonzero biases (init gives zeros, which would hide bias bugs),
    normal inputs, and targets in the loss's domain (one-hot for cross_entropy)."""
    arch = Architecture(tuple(sizes), hidden, output, loss, dtype)
    rng = np.random.default_rng(seed)
    params = init_params(arch, seed)
    params = Params(params.w, [b + rng.normal(scale=0.5, size=b.shape).astype(b.dtype)
                               for b in params.b])
    x = rng.normal(size=(n, sizes[0]))
    n_L = sizes[-1]
    if loss == "cross_entropy":
        y = np.eye(n_L)[rng.integers(0, n_L, size=n)]
    elif output == "sigmoid":
        y = rng.uniform(size=(n, n_L))
    else:
        y = rng.normal(size=(n, n_L))
    return Problem(arch, params, x.astype(dtype), y.astype(dtype))


@st.composite
def problems(draw, max_n: int = 6) -> Problem:
    hidden_sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    sizes = [draw(st.integers(1, 6)), *hidden_sizes, draw(st.integers(1, 4))]
    hidden = draw(st.sampled_from(HIDDEN_ACTIVATIONS))
    output, loss = draw(st.sampled_from(OUTPUTS))
    n = draw(st.integers(1, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_problem(sizes, hidden, output, loss, n, seed)


def away_from_relu_kinks(p: Problem, margin: float = 1e-4) -> bool:
    """False when some relu unit has |z| < margin, where g' jumps and differences mislead."""
    if p.arch.activation != "relu":
        return True
    _, z = forward(p.arch, p.params, p.x)
    return all(np.all(np.abs(z[l]) > margin) for l in range(1, p.arch.L))


# ---------------------------------------------------------------------------- naive reference

def g_naive(name: str, v: float) -> float:
    if name == "sigmoid":
        return 1.0 / (1.0 + math.exp(-v))
    if name == "tanh":
        return math.tanh(v)
    if name == "relu":
        return v if v > 0 else 0.0
    assert name == "identity"
    return v


def g_prime_naive(name: str, v: float) -> float:
    if name == "sigmoid":
        s = 1.0 / (1.0 + math.exp(-v))
        return s * (1.0 - s)
    if name == "tanh":
        return 1.0 - math.tanh(v) ** 2
    if name == "relu":
        return 1.0 if v > 0 else 0.0
    assert name == "identity"
    return 1.0


def naive_sample(arch: Architecture, params: Params, x_i, y_i) -> tuple[float, list[float]]:
    """C_i and dC_i/dtheta for one sample, in Params.flat order, by explicit loops."""
    L = arch.L
    W = [None] + [params.w[l].astype(float).tolist() for l in range(1, L + 1)]  # W[l][j][k]
    B = [None] + [params.b[l].astype(float).tolist() for l in range(1, L + 1)]
    y = [float(v) for v in y_i]

    # Forward, one unit at a time.
    a: list[list[float]] = [[float(v) for v in x_i]]
    z: list[list[float] | None] = [None]
    for l in range(1, L + 1):
        z_l = []
        for j in range(len(W[l])):
            s = B[l][j]
            for k in range(len(a[l - 1])):
                s += W[l][j][k] * a[l - 1][k]
            z_l.append(s)
        if arch.g(l) == "softmax":
            m = max(z_l)
            e = [math.exp(v - m) for v in z_l]
            a_l = [v / sum(e) for v in e]
        else:
            a_l = [g_naive(arch.g(l), v) for v in z_l]
        z.append(z_l)
        a.append(a_l)

    # Loss C_i and dC_i/da[L].
    n_L = len(a[L])
    if arch.loss == "squared":
        C = sum((a[L][j] - y[j]) ** 2 for j in range(n_L))
        dC_da = [2.0 * (a[L][j] - y[j]) for j in range(n_L)]
    else:
        C = -sum(y[j] * math.log(a[L][j]) for j in range(n_L))
        dC_da = [-y[j] / a[L][j] for j in range(n_L)]

    # delta_j = dC/dz_j = dC/da_j * g'(z_j); for softmax, g couples the units, so
    # dC/dz_j = sum_m dC/da_m * da_m/dz_j with da_m/dz_j = a_m (1[m == j] - a_j).
    delta: list[list[float] | None] = [None] * (L + 1)
    if arch.g(L) == "softmax":
        delta[L] = [
            sum(dC_da[m] * a[L][m] * ((1.0 if m == j else 0.0) - a[L][j]) for m in range(n_L))
            for j in range(n_L)
        ]
    else:
        delta[L] = [dC_da[j] * g_prime_naive(arch.g(L), z[L][j]) for j in range(n_L)]
    for l in range(L - 1, 0, -1):
        delta_l = []
        for j in range(len(a[l])):
            dC_da_j = 0.0  # unit j of layer l feeds every unit m of layer l+1
            for m in range(len(a[l + 1])):
                dC_da_j += W[l + 1][m][j] * delta[l + 1][m]
            delta_l.append(dC_da_j * g_prime_naive(arch.g(l), z[l][j]))
        delta[l] = delta_l

    # dC/dw_jk = delta_j * a_k, dC/db_j = delta_j; layer by layer, w (j, k) then b.
    grad: list[float] = []
    for l in range(1, L + 1):
        for j in range(len(a[l])):
            for k in range(len(a[l - 1])):
                grad.append(delta[l][j] * a[l - 1][k])
        for j in range(len(a[l])):
            grad.append(delta[l][j])
    return C, grad


def naive_reference(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample losses (n,) and gradients (n, P) by `naive_sample`."""
    rows = [naive_sample(p.arch, p.params, p.x[i], p.y[i]) for i in range(p.x.shape[0])]
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows]).reshape(len(rows), -1)


# ---------------------------------------------------------------------------- finite differences

NP_G = {
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "identity": lambda z: z,
}


def unflatten(arch: Architecture, theta: np.ndarray) -> Params:
    w, b, at = [np.empty((0, 0))], [np.empty(0)], 0
    for l in range(1, arch.L + 1):
        n_out, n_in = arch.sizes[l], arch.sizes[l - 1]
        w.append(theta[at : at + n_out * n_in].reshape(n_out, n_in))
        at += n_out * n_in
        b.append(theta[at : at + n_out])
        at += n_out
    return Params(w, b)


def losses_np(arch: Architecture, params: Params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """C_i for every sample, float64, with a forward pass written here (no gradpipe code)."""
    a = x
    for l in range(1, arch.L + 1):
        z = a @ params.w[l].T + params.b[l]
        if arch.g(l) == "softmax":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            a = e / e.sum(axis=1, keepdims=True)
        else:
            a = NP_G[arch.g(l)](z)
    if arch.loss == "squared":
        return ((a - y) ** 2).sum(axis=1)
    return -(y * np.log(a)).sum(axis=1)


def fd_reference(p: Problem, h: float = 1e-6) -> np.ndarray:
    """dC_i/dtheta_p = (C_i(theta + h e_p) - C_i(theta - h e_p)) / 2h, (n, P)."""
    theta = p.params.flat()
    out = np.empty((p.x.shape[0], theta.size))
    for q in range(theta.size):
        up, down = theta.copy(), theta.copy()
        up[q] += h
        down[q] -= h
        c_up = losses_np(p.arch, unflatten(p.arch, up), p.x, p.y)
        c_down = losses_np(p.arch, unflatten(p.arch, down), p.x, p.y)
        out[:, q] = (c_up - c_down) / (2 * h)
    return out


# ---------------------------------------------------------------------------- helpers

def backprop_grads(p: Problem) -> np.ndarray:
    """per_sample_grads(deltas(...), a): the code under test, (n, P)."""
    a, z = forward(p.arch, p.params, p.x)
    return per_sample_grads(deltas(p.arch, p.params, a, z, p.y), a)


def layer_slices(arch: Architecture) -> list[slice]:
    """Columns of layer l (w then b) in the flat order; index 0 unused (empty)."""
    out, at = [slice(0, 0)], 0
    for l in range(1, arch.L + 1):
        size = arch.sizes[l] * (arch.sizes[l - 1] + 1)
        out.append(slice(at, at + size))
        at += size
    return out


def flat_sums(part: backprop.Partial) -> np.ndarray:
    return np.concatenate(
        [np.concatenate([part.sum_w[l].ravel(), part.sum_b[l]]) for l in range(1, len(part.sum_w))]
    )


def materialized_sq_norms(arch: Architecture, grads: np.ndarray) -> np.ndarray:
    """|dC_i/dtheta[l]|^2 per sample and layer from the full gradient rows, (n, L+1)."""
    out = np.zeros((grads.shape[0], arch.L + 1))
    for l, cols in enumerate(layer_slices(arch)):
        out[:, l] = (grads[:, cols] ** 2).sum(axis=1)
    return out


class Recorder:
    """A sink that keeps copies of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]] = []

    def __call__(self, start, losses, sq_norms, grads) -> None:
        self.calls.append(
            (start, np.array(losses), np.array(sq_norms),
             None if grads is None else np.array(grads))
        )


# ---------------------------------------------------------------------------- per-sample gradients

@settings(max_examples=50, deadline=None)
@given(p=problems())
def test_per_sample_grads_match_naive_chain_rule(p):
    assume(away_from_relu_kinks(p, margin=1e-9))
    naive_losses, naive_grads = naive_reference(p)
    grads = backprop_grads(p)
    assert grads.shape == (p.x.shape[0], p.arch.n_params)
    assert grads.dtype == np.float64
    np.testing.assert_allclose(grads, naive_grads, rtol=1e-10, atol=1e-13)
    # ... and the loss table gives the same C_i as the loops
    a, _ = forward(p.arch, p.params, p.x)
    np.testing.assert_allclose(LOSSES[p.arch.loss].fn(a[-1], p.y), naive_losses,
                               rtol=1e-12, atol=1e-14)


@settings(max_examples=50, deadline=None)
@given(p=problems())
def test_per_sample_grads_match_finite_differences(p):
    assume(away_from_relu_kinks(p))
    np.testing.assert_allclose(backprop_grads(p), fd_reference(p), rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(p=problems(max_n=8))
def test_row_i_equals_backprop_on_that_sample_alone(p):
    grads = backprop_grads(p)
    for i in range(p.x.shape[0]):
        alone = backprop_grads(p._replace(x=p.x[i : i + 1], y=p.y[i : i + 1]))
        assert alone.shape == (1, p.arch.n_params)
        np.testing.assert_allclose(grads[i], alone[0], rtol=1e-12, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(p=problems(max_n=8))
def test_per_sample_sq_norms_is_the_rank_one_identity(p):
    a, z = forward(p.arch, p.params, p.x)
    delta = deltas(p.arch, p.params, a, z, p.y)
    sq = per_sample_sq_norms(delta, a)
    assert sq.shape == (p.x.shape[0], p.arch.L + 1)
    np.testing.assert_array_equal(sq[:, 0], 0)
    np.testing.assert_allclose(sq, materialized_sq_norms(p.arch, per_sample_grads(delta, a)),
                               rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------- block_partial

@settings(max_examples=40, deadline=None)
@given(p=problems(max_n=12), chunk_rows=st.integers(1, 12), block=st.integers(0, 99))
def test_block_partial_sums_losses_norms_and_sink(p, chunk_rows, block):
    n = p.x.shape[0]
    sink = Recorder()
    part = block_partial(p.arch, p.params, p.x, p.y, block=block, sink=sink, chunk_rows=chunk_rows)
    naive_losses, _ = naive_reference(p)
    grads = backprop_grads(p)  # checked against the references above
    sq = materialized_sq_norms(p.arch, grads)

    assert part.block == block and part.n == n
    assert all(s.dtype == np.float64 for s in part.sum_w[1:] + part.sum_b[1:])
    assert [s.shape for s in part.sum_w[1:]] == [w.shape for w in p.params.w[1:]]
    np.testing.assert_allclose(flat_sums(part), grads.sum(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(part.loss_sum, naive_losses.sum(), rtol=1e-12, atol=1e-14)
    assert part.sq_norm_sum.shape == (p.arch.L + 1,) and part.sq_norm_sum[0] == 0
    np.testing.assert_allclose(part.sq_norm_sum, sq.sum(axis=0), rtol=1e-10, atol=1e-14)

    # The sink sees each chunk once, in order, with per-sample losses and squared norms.
    assert [c[0] for c in sink.calls] == list(range(0, n, chunk_rows))
    assert all(c[3] is None for c in sink.calls)
    assert all(len(c[1]) == len(c[2]) <= chunk_rows for c in sink.calls)
    np.testing.assert_allclose(np.concatenate([c[1] for c in sink.calls]), naive_losses,
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.concatenate([c[2] for c in sink.calls]), sq, rtol=1e-10,
                               atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(p=problems(max_n=10), chunk_rows=st.integers(1, 10), piece_rows=st.integers(1, 4))
def test_full_sink_gets_per_sample_grads_in_bounded_pieces(p, chunk_rows, piece_rows):
    n, P = p.x.shape[0], p.arch.n_params
    sink = Recorder()
    budget = 8 * P * piece_rows + 7  # room for piece_rows float64 rows, not one more
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backprop, "FULL_CHUNK_BYTES", budget)
        block_partial(p.arch, p.params, p.x, p.y, sink=sink, full=True, chunk_rows=chunk_rows)

    # Pieces never straddle a chunk and hold at most piece_rows rows (<= budget bytes).
    expected = []
    for c in range(0, n, chunk_rows):
        m = min(chunk_rows, n - c)
        expected += [(c + s, min(piece_rows, m - s)) for s in range(0, m, piece_rows)]
    assert [(c[0], c[3].shape[0]) for c in sink.calls] == expected
    for _start, losses, sq, grads in sink.calls:
        assert grads.shape[0] <= piece_rows and grads.nbytes <= budget
        assert grads.shape[1] == P and grads.dtype == np.float64
        assert len(losses) == len(sq) == grads.shape[0]

    grads = backprop_grads(p)
    got = np.concatenate([c[3] for c in sink.calls])
    np.testing.assert_allclose(got, grads, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.concatenate([c[2] for c in sink.calls]),
                               materialized_sq_norms(p.arch, grads), rtol=1e-10, atol=1e-14)


def test_full_sink_with_budget_below_one_row_sends_one_row_at_a_time(monkeypatch):
    p = make_problem((3, 4, 2), "tanh", "softmax", "cross_entropy", n=5, seed=0)
    monkeypatch.setattr(backprop, "FULL_CHUNK_BYTES", 1)
    sink = Recorder()
    block_partial(p.arch, p.params, p.x, p.y, sink=sink, full=True)
    assert [(c[0], c[3].shape) for c in sink.calls] == [(i, (1, p.arch.n_params)) for i in range(5)]
    np.testing.assert_allclose(np.concatenate([c[3] for c in sink.calls]), backprop_grads(p),
                               rtol=1e-12, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(p=problems(max_n=12))
def test_chunk_rows_do_not_change_the_sums(p):
    n = p.x.shape[0]
    parts = [block_partial(p.arch, p.params, p.x, p.y, chunk_rows=c) for c in (1, 3, n)]
    ref = parts[-1]
    scale = np.abs(flat_sums(ref)).max()
    for part in parts[:-1]:
        assert part.n == n
        np.testing.assert_allclose(flat_sums(part), flat_sums(ref), rtol=1e-12, atol=1e-12 * scale)
        np.testing.assert_allclose(part.loss_sum, ref.loss_sum, rtol=1e-12, atol=0)
        np.testing.assert_allclose(part.sq_norm_sum, ref.sq_norm_sum, rtol=1e-12, atol=1e-300)


def test_empty_block_gives_zero_sums():
    p = make_problem((3, 4, 2), "relu", "identity", "squared", n=0, seed=1)
    sink = Recorder()
    part = block_partial(p.arch, p.params, p.x, p.y, block=3, sink=sink, full=True)
    assert part.n == 0 and part.loss_sum == 0 and part.correct == 0 and part.block == 3
    assert not np.any(flat_sums(part)) and not np.any(part.sq_norm_sum)
    assert flat_sums(part).size == p.arch.n_params
    assert sink.calls == []


def test_classify_counts_argmax_matches():
    p = make_problem((4, 5, 3), "tanh", "softmax", "cross_entropy", n=37, seed=5)
    a, _ = forward(p.arch, p.params, p.x)
    expected = int((a[-1].argmax(axis=1) == p.y.argmax(axis=1)).sum())
    assert 0 < expected < 37
    part = block_partial(p.arch, p.params, p.x, p.y, classify=True, chunk_rows=4)
    assert part.correct == expected
    assert block_partial(p.arch, p.params, p.x, p.y).correct == 0
    # Given the class indices (as block_step passes them), the count is the same, chunk by
    # chunk, and nothing else changes; wrong indices would change it (they are used).
    labels = p.y.argmax(axis=1).astype(np.int64)
    given = block_partial(p.arch, p.params, p.x, p.y, classify=True, chunk_rows=4,
                          labels=labels)
    assert given.correct == expected and given.loss_sum == part.loss_sum
    assert all(np.array_equal(u, v) for u, v in zip(given.sum_w, part.sum_w, strict=True))
    shifted = block_partial(p.arch, p.params, p.x, p.y, classify=True, chunk_rows=4,
                            labels=(labels + 1) % 3)
    assert shifted.correct == int((a[-1].argmax(axis=1) == (labels + 1) % 3).sum())


# ---------------------------------------------------------------------------- the engine's passes

def saturated_problem(hidden: str, dtype: str, n: int = 41) -> Problem:
    """Inputs scaled so that hidden units reach |z| of 10 to 3,000: sigmoid rounds to 1,
    underflows to 0, and exp(-z) overflows (z below about -88 in float32, -709 in float64)."""
    p = make_problem((5, 7, 6, 3), hidden, "softmax", "cross_entropy", n=n, seed=11, dtype=dtype)
    scale = np.geomspace(1, 3000, n).astype(dtype)[:, None]  # rows from moderate to extreme
    return Problem(p.arch, p.params, p.x * scale, p.y)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hidden", HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_engine_forward_gives_the_bits_of_model_forward(hidden, dtype, rows):
    """Workspace.forward (negated weights and exp(-z) for sigmoid layers, biases repeated on
    rows) and model.forward (what evaluate and predict use) give the same a[l], bit for bit,
    on the same rows (BLAS may round a 1-row product unlike a 41-row one), saturated units
    included."""
    p = saturated_problem(hidden, dtype)
    if hidden == "sigmoid":
        _, z_all = forward(p.arch, p.params, p.x)
        assert np.any(z_all[1] < -800) and np.any(z_all[1] > 40)  # both tails reached
    ws = backprop.Workspace(p.arch, p.params, rows)
    for start in range(0, len(p.x), rows):
        x = p.x[start : start + rows]
        want, want_z = forward(p.arch, p.params, x)
        a, z = ws.forward(p.arch, x)
        for l in range(1, p.arch.L + 1):
            np.testing.assert_array_equal(a[l], want[l])
        np.testing.assert_array_equal(z[-1], want_z[-1])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hidden", HIDDEN_ACTIVATIONS)
def test_engine_deltas_agree_with_textbook_deltas_at_saturation(hidden, dtype):
    """Workspace.backward (g'(z) = a (e a) with e = exp(-z) for sigmoid layers, e capped
    where it overflowed) and `deltas` (a (1 - a), taken from z in the tails) against float64
    deltas of the same inputs: finite, and each sample's delta[l] as close as the textbook's,
    also where a has rounded to 0 or 1. (Where exp(-z) overflows, g'(z) < 1e-38 is below
    float32's normal range: the engine gives 0, the textbook a denormal.)"""
    p = saturated_problem(hidden, dtype)
    with np.errstate(over="ignore"):
        a_ref, z_ref = forward(p.arch, p.params, p.x)
        textbook = deltas(p.arch, p.params, a_ref, z_ref, p.y)
        arch64 = Architecture(p.arch.sizes, hidden, "softmax", "cross_entropy", "float64")
        params64 = p.params.astype("float64")
        a64, z64 = forward(arch64, params64, p.x.astype(np.float64))
        exact = deltas(arch64, params64, a64, z64, p.y.astype(np.float64))
    ws = backprop.Workspace(p.arch, p.params, len(p.x))
    a, z = ws.forward(p.arch, p.x)
    got = ws.backward(p.arch, p.params, a, z, p.y)
    rtol = 1e-6 if dtype == "float32" else 1e-13
    for l in range(1, p.arch.L + 1):
        assert np.all(np.isfinite(got[l]))
        scale = np.linalg.norm(exact[l], axis=1) + np.finfo(dtype).tiny  # per sample
        err = np.linalg.norm(got[l] - exact[l], axis=1)
        err_textbook = np.linalg.norm(textbook[l] - exact[l], axis=1)
        # float32 rounds z of thousands to 1e-4: both are off by that; none is worse
        assert np.all(err <= 2 * err_textbook + rtol * scale), (l, (err / scale).max())


def test_engine_gradient_where_sigmoid_underflows_is_zero_not_nan():
    """A unit with z = -1,000 has a = 0 and g'(z) = 4e-435: its delta is 0, and the
    summed gradient stays finite (e = exp(1,000) = inf would make e a = inf * 0 = nan)."""
    arch = Architecture((1, 2, 1), "sigmoid", "identity", "squared", "float32")
    params = Params([np.empty((0, 0)), np.array([[1.0], [-1.0]]), np.array([[1.0, 1.0]])],
                    [np.empty(0), np.zeros(2), np.zeros(1)]).astype("float32")
    x = np.array([[1000.0], [1.0]], np.float32)
    y = np.zeros((2, 1), np.float32)
    part = block_partial(arch, params, x, y)
    assert all(np.all(np.isfinite(s)) for s in part.sum_w[1:] + part.sum_b[1:])
    ws = backprop.Workspace(arch, params, 2)
    a, z = ws.forward(arch, x)
    assert a[1][0, 1] == 0 and a[1][0, 0] == 1
    delta = ws.backward(arch, params, a, z, y)
    assert delta[1][0, 1] == 0 and delta[1][0, 0] == 0  # both saturated: g' rounds to 0


# ---------------------------------------------------------------------------- float32

@pytest.mark.parametrize(
    "hidden, output, loss",
    [("tanh", "softmax", "cross_entropy"), ("relu", "sigmoid", "squared"),
     ("sigmoid", "identity", "squared")],
)
def test_float32_compute_agrees_with_float64(hidden, output, loss):
    n = 20_000
    p64 = make_problem((20, 16, 10), hidden, output, loss, n=n, seed=42)
    a32 = Architecture((20, 16, 10), hidden, output, loss, "float32")
    part64 = block_partial(p64.arch, p64.params, p64.x, p64.y)
    part32 = block_partial(a32, p64.params.astype("float32"), p64.x.astype(np.float32),
                           p64.y.astype(np.float32))
    assert part32.n == n
    for l in (1, 2):
        for got, want in ((part32.sum_w[l], part64.sum_w[l]), (part32.sum_b[l], part64.sum_b[l])):
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    np.testing.assert_allclose(part32.loss_sum, part64.loss_sum, rtol=1e-5, atol=0)
    np.testing.assert_allclose(part32.sq_norm_sum, part64.sq_norm_sum, rtol=1e-5, atol=1e-300)


# ---------------------------------------------------------------------------- by hand

def test_two_two_one_sigmoid_network_by_hand():
    arch = Architecture((2, 2, 1), "sigmoid", "sigmoid", "squared", "float64")
    params = Params(
        [np.empty((0, 0)), np.array([[0.1, 0.2], [0.3, -0.4]]), np.array([[0.5, -0.6]])],
        [np.empty(0), np.array([0.1, 0.2]), np.array([0.3])],
    )
    x = np.array([[1.0, 2.0]])
    y = np.array([[1.0]])
    # Forward.
    # z1_1 = 0.1*1 + 0.2*2 + 0.1 = 0.6            a1_1 = sigmoid(0.6)  = 0.6456563062257954
    # z1_2 = 0.3*1 - 0.4*2 + 0.2 = -0.3           a1_2 = sigmoid(-0.3) = 0.425557483188341
    # z2 = 0.5*0.6456563062257954 - 0.6*0.425557483188341 + 0.3
    #    = 0.3228281531128977 - 0.2553344899130046 + 0.3 = 0.3674936631998931
    # a2 = sigmoid(0.3674936631998931) = 0.5908532205613473
    # C = (a2 - y)^2 = (-0.4091467794386527)^2 = 0.16740108712502155
    a, z = forward(arch, params, x)
    np.testing.assert_allclose(z[1], [[0.6, -0.3]], rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(a[1], [[0.6456563062257954, 0.425557483188341]], rtol=1e-14, atol=0)
    np.testing.assert_allclose(a[2], [[0.5908532205613473]], rtol=1e-14, atol=0)
    # BP1: delta2 = 2 (a2 - y) * a2 (1 - a2) = -0.8182935588773055 * 0.2417456923136312
    #             = -0.19781894290657934
    # BP2: delta1_j = w2[0, j] * delta2 * a1_j (1 - a1_j)
    #   g'(z1) = 0.6456563062257954 * 0.3543436937742046 = 0.22878424045665732
    #            0.425557483188341 * 0.574442516811659   = 0.24445831169074586
    #   delta1_1 =  0.5 * -0.19781894290657934 * 0.22878424045665732 = -0.022628928300410307
    #   delta1_2 = -0.6 * -0.19781894290657934 * 0.24445831169074586 =  0.029015090882034255
    delta = deltas(arch, params, a, z, y)
    np.testing.assert_allclose(delta[2], [[-0.19781894290657934]], rtol=1e-13, atol=0)
    np.testing.assert_allclose(delta[1], [[-0.022628928300410307, 0.029015090882034255]],
                               rtol=1e-13, atol=0)
    # BP4/BP3, in flat order (w1 row-major, b1, w2, b2):
    #   dC/dw1 = delta1_j * x_k = [[-0.02262892830041, -0.04525785660082],
    #                              [ 0.02901509088203,  0.05803018176407]]
    #   dC/db1 = delta1 = [-0.02262892830041, 0.02901509088203]
    #   dC/dw2 = delta2 * a1 = [[-0.19781894290658 * 0.64565630622580 = -0.12772304797855,
    #                            -0.19781894290658 * 0.42555748318834 = -0.08418333147030]]
    #   dC/db2 = delta2 = -0.19781894290658
    expected = [
        -0.022628928300410307, -0.045257856600820615, 0.029015090882034255, 0.05803018176406851,
        -0.022628928300410307, 0.029015090882034255,
        -0.12772304797855352, -0.08418333147030203,
        -0.19781894290657934,
    ]
    np.testing.assert_allclose(per_sample_grads(delta, a), [expected], rtol=1e-13, atol=0)
    # Squared norms per layer, by the rank-1 identity |delta|^2 (|a|^2 + 1):
    #   layer 1: (0.0226289...^2 + 0.0290150...^2) * (1 + 4 + 1) = 0.008123663369506907
    #   layer 2: 0.1978189...^2 * (0.6456563^2 + 0.4255574^2 + 1) = 0.06253234445504713
    part = block_partial(arch, params, x, y)
    np.testing.assert_allclose(part.loss_sum, 0.16740108712502155, rtol=1e-14, atol=0)
    np.testing.assert_allclose(part.sq_norm_sum, [0.0, 0.008123663369506907, 0.06253234445504713],
                               rtol=1e-13, atol=0)
    np.testing.assert_allclose(flat_sums(part), expected, rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------- second moments


def flat_sq_sums(part: backprop.Partial) -> np.ndarray:
    assert part.sq_w is not None and part.sq_b is not None
    return np.concatenate(
        [np.concatenate([part.sq_w[l].ravel(), part.sq_b[l]]) for l in range(1, len(part.sq_w))]
    )


@settings(max_examples=40, deadline=None)
@given(p=problems(max_n=12), chunk_rows=st.integers(1, 12))
def test_second_moment_is_the_sum_of_squared_per_sample_gradients(p, chunk_rows):
    part = block_partial(p.arch, p.params, p.x, p.y, chunk_rows=chunk_rows, second_moment=True)
    grads = backprop_grads(p)  # (n, P), checked against the references above
    assert all(s.dtype == np.float64 for s in part.sq_w[1:] + part.sq_b[1:])
    assert [s.shape for s in part.sq_w[1:]] == [w.shape for w in p.params.w[1:]]
    np.testing.assert_allclose(flat_sq_sums(part), (grads ** 2).sum(axis=0), rtol=1e-10,
                               atol=1e-300)
    # The first moment and everything else are those of the plain call, bit for bit.
    plain = block_partial(p.arch, p.params, p.x, p.y, chunk_rows=chunk_rows)
    assert plain.sq_w is None and plain.sq_b is None
    assert np.array_equal(flat_sums(part), flat_sums(plain))
    assert np.array_equal(part.sq_norm_sum, plain.sq_norm_sum)
    assert part.loss_sum == plain.loss_sum


def test_second_moment_against_the_naive_chain_rule():
    p = make_problem((4, 5, 3, 3), "tanh", "softmax", "cross_entropy", n=9, seed=7)
    _, naive = naive_reference(p)
    part = block_partial(p.arch, p.params, p.x, p.y, chunk_rows=4, second_moment=True)
    np.testing.assert_allclose(flat_sq_sums(part), (naive ** 2).sum(axis=0), rtol=1e-12,
                               atol=1e-300)


def test_second_moment_of_an_empty_block_is_zero():
    p = make_problem((3, 4, 2), "relu", "identity", "squared", n=0, seed=1)
    part = block_partial(p.arch, p.params, p.x, p.y, second_moment=True)
    assert not np.any(flat_sq_sums(part)) and flat_sq_sums(part).size == p.arch.n_params


def test_second_moment_in_float32_agrees_with_float64():
    p64 = make_problem((20, 16, 10), "sigmoid", "softmax", "cross_entropy", n=20_000, seed=4)
    a32 = Architecture((20, 16, 10), "sigmoid", "softmax", "cross_entropy", "float32")
    part64 = block_partial(p64.arch, p64.params, p64.x, p64.y, second_moment=True)
    part32 = block_partial(a32, p64.params.astype("float32"), p64.x.astype(np.float32),
                           p64.y.astype(np.float32), second_moment=True)
    got, want = flat_sq_sums(part32), flat_sq_sums(part64)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


# ---------------------------------------------------------------------------- outputs sink


@settings(max_examples=30, deadline=None)
@given(p=problems(max_n=12), chunk_rows=st.integers(1, 12), full=st.booleans())
def test_outputs_sink_gets_each_chunks_output_layer_before_its_rows(p, chunk_rows, full):
    n = p.x.shape[0]
    events: list = []
    block_partial(p.arch, p.params, p.x, p.y, chunk_rows=chunk_rows, full=full,
                  sink=lambda start, c, sq, g: events.append(("rows", start, len(c))),
                  outputs=lambda start, a_L, y, _: events.append(("out", start, a_L.copy(),
                                                               y.copy())))
    outs = [e for e in events if e[0] == "out"]
    assert [e[1] for e in outs] == list(range(0, n, chunk_rows))
    for _, start, a_L, y in outs:  # the chunk's own forward pass (BLAS bits depend on rows)
        np.testing.assert_array_equal(
            a_L, forward(p.arch, p.params, p.x[start : start + chunk_rows])[0][-1])
        np.testing.assert_array_equal(y, p.y[start : start + chunk_rows])
    # Each chunk's outputs come before the rows of that chunk, and its rows stay inside it.
    current = None
    for e in events:
        if e[0] == "out":
            current = (e[1], e[1] + len(e[2]))
        else:
            assert current is not None and current[0] <= e[1] and e[1] + e[2] <= current[1]


def test_outputs_sink_gets_the_predicted_classes_with_classify():
    p = make_problem((4, 5, 3), "sigmoid", "softmax", "cross_entropy", n=23, seed=2)
    got: list = []
    for classify in (True, False):
        block_partial(p.arch, p.params, p.x, p.y, chunk_rows=5, classify=classify,
                      outputs=lambda start, a_L, y, pred, c=classify:
                      got.append((c, a_L.copy(), pred)))
    for classify, a_L, pred in got:
        if classify:
            np.testing.assert_array_equal(pred, a_L.argmax(axis=1))
        else:
            assert pred is None


# ---------------------------------------------------------------------------- chunks and buffers

def test_chunk_rows_for_fits_the_widest_layer_in_chunk_bytes():
    # Workload L: 256 units, 1,024 float32 rows (1 MiB) and 512 float64 rows.
    assert backprop.chunk_rows_for(Architecture((128, 256, 64, 10))) == 1024
    assert backprop.chunk_rows_for(Architecture((128, 256, 64, 10), dtype="float64")) == 512
    for sizes in [(2, 3, 1), (784, 4096, 10), (64, 128, 10), (5, 100_000, 3)]:
        for dtype in ("float32", "float64"):
            rows = backprop.chunk_rows_for(Architecture(sizes, dtype=dtype))
            assert rows & (rows - 1) == 0  # a power of two
            assert backprop.MIN_CHUNK_ROWS <= rows <= backprop.CHUNK_ROWS
            width = max(sizes[1:]) * np.dtype(dtype).itemsize
            assert rows == backprop.MIN_CHUNK_ROWS or rows * width <= backprop.CHUNK_BYTES


@settings(max_examples=30, deadline=None)
@given(p=problems(max_n=12), chunk_rows=st.integers(1, 12), piece_rows=st.integers(1, 4))
def test_reused_grads_array_gives_the_same_pieces(p, chunk_rows, piece_rows):
    """reuse_grads writes every piece into one array: a sink that copies sees the same
    values as with a new array per piece, and the sums do not change."""
    budget = piece_rows * p.arch.n_params * np.dtype(p.arch.dtype).itemsize
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backprop, "FULL_CHUNK_BYTES", budget)
        fresh, reused = Recorder(), Recorder()
        a = block_partial(p.arch, p.params, p.x, p.y, sink=fresh, full=True,
                          chunk_rows=chunk_rows)
        b = block_partial(p.arch, p.params, p.x, p.y, sink=reused, full=True,
                          chunk_rows=chunk_rows, reuse_grads=True)
    assert len(fresh.calls) == len(reused.calls)
    for f, r in zip(fresh.calls, reused.calls, strict=True):
        assert f[0] == r[0]
        np.testing.assert_array_equal(f[3], r[3])
    np.testing.assert_array_equal(flat_sums(a), flat_sums(b))


def test_outputs_sink_gets_each_chunks_output_layer_in_the_workspace():
    """The sink gets each chunk's a[L] in the engine's own array, which the next chunk
    reuses (no copy per chunk): what it keeps past the call it copies."""
    p = make_problem((3, 5, 4), "sigmoid", "softmax", "cross_entropy", n=10, seed=2)
    kept, arrays = [], []
    block_partial(p.arch, p.params, p.x, p.y, chunk_rows=3,
                  outputs=lambda start, a_L, y, _: (kept.append((start, a_L.copy())),
                                                    arrays.append(a_L)))
    assert [start for start, _ in kept] == [0, 3, 6, 9]
    for start, a_L in kept:
        np.testing.assert_array_equal(a_L, forward(p.arch, p.params, p.x[start:start + 3])[0][-1])
    assert np.shares_memory(arrays[0], arrays[1])
