"""Exact losses and derivatives at any range: gradpipe in float64 against references that
share nothing with it.

- `exact_sample`: the chain rule for every weight in 60-digit arithmetic (mpmath), each
  formula written the plain way (log of softmax, a - y, g(z) g(-z) and sech^2 for g'): at
  that precision nothing cancels, and exp(-2000) is a number, not 0.
- tests/reference.py (the naive per-weight loops, float64) and torch autograd (float64)
  where values are moderate, for the general case.

Extremes covered: logits of +-1,000, confident right and wrong answers, ties, one and two
classes, targets whose rows do not sum to one, sigmoid units at z = +-40 and tanh at
+-20 (hidden and output, with targets at the limits), one sample.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import naive_full_batch

from gradpipe.activations import ACTIVATIONS, TAIL, sigmoid, softmax
from gradpipe.backprop import block_partial, deltas, output_losses
from gradpipe.losses import LOSSES
from gradpipe.model import Architecture, Params, forward

mpmath = pytest.importorskip("mpmath")
mp = mpmath.mp
mp.dps = 60

RTOL = 1e-9
TINY = 1e-300  # below this a float64 result may have underflowed where the exact one did not


# ---------------------------------------------------------------------------- exact reference

def _g(name: str, z):
    if name == "sigmoid":
        return 1 / (1 + mpmath.exp(-z))
    if name == "tanh":
        return mpmath.tanh(z)
    if name == "relu":
        return z if z > 0 else mpmath.mpf(0)
    return z


def _g_prime(name: str, z):
    # g(z) g(-z) and sech^2: the textbook s (1 - s) and 1 - tanh^2 cancel even at 60 digits
    # once z is past about 140 (sigmoid) or 70 (tanh).
    if name == "sigmoid":
        return _g("sigmoid", z) * _g("sigmoid", -z)
    if name == "tanh":
        return mpmath.sech(z) ** 2
    if name == "relu":
        return mpmath.mpf(1) if z > 0 else mpmath.mpf(0)
    return mpmath.mpf(1)


def exact_sample(arch: Architecture, params: Params, x_i, y_i):
    """C_i, dC_i/dtheta (flat order) and its magnitude for one sample, exactly (to 60
    digits), as floats. The magnitude is the same chain rule with |.| on every term of the
    backward sums: a float64 result can be off by a few eps of it where a sum cancels."""
    L = arch.L
    W = [None] + [[[mpmath.mpf(float(v)) for v in row] for row in params.w[l]]
                  for l in range(1, L + 1)]
    B = [None] + [[mpmath.mpf(float(v)) for v in params.b[l]] for l in range(1, L + 1)]
    y = [mpmath.mpf(float(v)) for v in y_i]
    a = [[mpmath.mpf(float(v)) for v in x_i]]
    z: list = [None]
    for l in range(1, L + 1):
        z_l = [mpmath.fsum(W[l][j][k] * a[l - 1][k] for k in range(len(a[l - 1]))) + B[l][j]
               for j in range(len(W[l]))]
        if arch.g(l) == "softmax":
            e = [mpmath.exp(v) for v in z_l]
            s = mpmath.fsum(e)
            a_l = [v / s for v in e]
        else:
            a_l = [_g(arch.g(l), v) for v in z_l]
        z.append(z_l)
        a.append(a_l)
    n_L = len(a[L])
    delta: list = [None] * (L + 1)
    mag: list = [None] * (L + 1)
    if arch.loss == "squared":
        C = mpmath.fsum((a[L][j] - y[j]) ** 2 for j in range(n_L))
        delta[L] = [2 * (a[L][j] - y[j]) * _g_prime(arch.g(L), z[L][j]) for j in range(n_L)]
    else:
        C = -mpmath.fsum(y[j] * mpmath.log(a[L][j]) for j in range(n_L) if y[j] != 0)
        # dC/dz_j = sum_m (-y_m / a_m) a_m (1[m = j] - a_j) = a_j sum_m y_m - y_j
        S = mpmath.fsum(y)
        delta[L] = [a[L][j] * S - y[j] for j in range(n_L)]
    mag[L] = [abs(v) for v in delta[L]]
    for l in range(L - 1, 0, -1):
        delta[l] = [mpmath.fsum(W[l + 1][m][j] * delta[l + 1][m] for m in range(len(a[l + 1])))
                    * _g_prime(arch.g(l), z[l][j]) for j in range(len(a[l]))]
        mag[l] = [mpmath.fsum(abs(W[l + 1][m][j]) * mag[l + 1][m] for m in range(len(a[l + 1])))
                  * abs(_g_prime(arch.g(l), z[l][j])) for j in range(len(a[l]))]
    grad, size = [], []
    for l in range(1, L + 1):
        for j in range(len(a[l])):
            for k in range(len(a[l - 1])):
                grad.append(delta[l][j] * a[l - 1][k])
                size.append(mag[l][j] * abs(a[l - 1][k]))
        grad += delta[l]
        size += mag[l]
    return float(C), np.array([float(v) for v in grad]), np.array([float(v) for v in size])


def exact_reference(arch, params, x, y):
    """Per-sample losses (n,), gradients (n, P) and their magnitudes (n, P), exactly."""
    rows = [exact_sample(arch, params, x[i], y[i]) for i in range(len(x))]
    return tuple(np.array([r[q] for r in rows]) for q in range(3))


def gradpipe_per_sample(arch, params, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample losses (through block_partial's sink) and gradients, float64."""
    got: list = []
    block_partial(arch, params, x, y, sink=lambda s, c, sq, g: got.append((c, g)), full=True)
    return (np.concatenate([c for c, _ in got]), np.concatenate([g for _, g in got]))


def assert_exact(got, want, mag=None, rtol=RTOL):
    """|got - want| <= rtol |want| (+ 1e-13 of the magnitude where sums may cancel)."""
    atol = TINY if mag is None else 1e-13 * mag + TINY
    err = np.abs(np.asarray(got, float) - want)
    bad = ~(err <= rtol * np.abs(want) + atol)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} differ; worst at {np.argwhere(bad)[:3].tolist()}: "
        f"got {np.asarray(got)[bad][:3]}, want {want[bad][:3]}")


def net(sizes, hidden, output, loss, w, b) -> tuple[Architecture, Params]:
    arch = Architecture(tuple(sizes), hidden, output, loss, "float64")
    return arch, Params([np.empty((0, 0))] + [np.asarray(v, float) for v in w],
                        [np.empty(0)] + [np.asarray(v, float) for v in b])


# ---------------------------------------------------------------------------- cross_entropy

LOGIT_ROWS = [
    # (logits, target): confident wrong and right at +-1,000, ties, moderate, huge spread
    ([1000.0, -1000.0, 0.0], [0.0, 1.0, 0.0]),  # C = 2000
    ([1000.0, -1000.0, 0.0], [1.0, 0.0, 0.0]),  # C = exp(-1000), underflows: 0
    ([-1000.0, 1000.0, 999.0], [0.0, 1.0, 0.0]),  # C = log1p(e^-1) = 0.3132...
    ([40.0, 0.0, 0.0], [1.0, 0.0, 0.0]),  # C = log1p(2 e^-40) = 8.5e-18, not 0
    ([40.0, 0.0, 0.0], [0.0, 0.0, 1.0]),  # C = 40 + log1p(...)
    ([5.0, 5.0, 5.0], [0.0, 1.0, 0.0]),  # a three-way tie: log 3
    ([0.3, -1.2, 2.5], [0.2, 0.5, 0.3]),  # soft target
    ([0.3, -1.2, 2.5], [0.3, 0.9, 0.0]),  # a row that sums to 1.2
    ([700.0, -700.0, 0.0], [2.0, 0.0, 0.0]),  # a row that sums to 2
    ([-3.0, 7.0, 1.0], [0.0, 0.0, 0.0]),  # a row of zeros: C = 0, delta = 0
]


def logit_net(rows):
    """A 1-input softmax layer whose logits are the rows' biases (w = 0, x = 1)."""
    n_L = len(rows[0][0])
    arch, params = net((1, n_L), "identity", "softmax", "cross_entropy",
                       [np.zeros((n_L, 1))], [np.zeros(n_L)])
    return arch, params


@pytest.mark.parametrize("row", range(len(LOGIT_ROWS)))
def test_cross_entropy_and_delta_exact_from_logits(row):
    logits, target = (np.array([v]) for v in LOGIT_ROWS[row])
    arch, params = logit_net(LOGIT_ROWS)
    params.b[1] = logits[0].copy()  # z = b
    x, y = np.ones((1, 1)), target
    want_c, want_g, mag = exact_reference(arch, params, x, y)
    got_c, got_g = gradpipe_per_sample(arch, params, x, y)
    assert_exact(got_c, want_c, rtol=1e-13)
    assert_exact(got_g, want_g, mag)
    # The loss table's own call path, with the logits, gives the same loss.
    a, z = forward(arch, params, x)
    assert_exact(LOSSES["cross_entropy"].fn(a[1], y, z[1]), want_c, rtol=1e-13)


def test_cross_entropy_worked_extremes():
    z = np.array([r[0] for r in LOGIT_ROWS[:4]])
    y = np.array([r[1] for r in LOGIT_ROWS[:4]])
    arch = Architecture((1, 3), "identity", "softmax", "cross_entropy", "float64")
    c = output_losses(arch, softmax(z), z, y)
    # 2000 exactly; exp(-1000) (underflows to 0); log1p(exp(-1)) = 0.31326168751822286;
    # log1p(2 exp(-40)) = 2 exp(-40) = 8.496708510583178e-18
    np.testing.assert_allclose(c, [2000.0, 0.0, 0.31326168751822286, 8.496708510583178e-18],
                               rtol=1e-15, atol=0)
    assert c.dtype == np.float64


def test_softmax_delta_is_a_sum_y_minus_y_for_any_target_row():
    """delta[L] = a S - y with S = sum_j y_j, also for rows that do not sum to one."""
    rng = np.random.default_rng(3)
    z = rng.normal(scale=3.0, size=(50, 4))
    y = rng.uniform(0.0, 1.0, size=(50, 4)) * (rng.uniform(size=(50, 4)) < 0.6)
    arch, params = net((4, 4), "identity", "softmax", "cross_entropy",
                       [np.eye(4)], [np.zeros(4)])
    a, zz = forward(arch, params, z)  # z[1] = z
    delta = deltas(arch, params, a, zz, y)[1]
    _, want, mag = exact_reference(arch, params, z, y)
    assert_exact(delta, want[:, -4:], mag[:, -4:])  # the bias gradient is delta
    # For rows that sum to one it is the textbook a - y.
    y1 = y / np.where(y.sum(axis=1, keepdims=True) > 0, y.sum(axis=1, keepdims=True), 1)
    y1[y.sum(axis=1) == 0, 0] = 1.0
    np.testing.assert_allclose(deltas(arch, params, a, zz, y1)[1], a[1] - y1, rtol=1e-12,
                               atol=1e-15)


@pytest.mark.parametrize("n_L", [1, 2])
def test_one_and_two_classes(n_L):
    # One class: softmax is 1, C = 0 and delta = 0 exactly. Two: the logistic loss.
    z = np.array([[1000.0, -1000.0], [-30.0, 30.0], [0.5, 0.25]])[:, :n_L]
    y = np.eye(n_L)[[0, 0, n_L - 1]]
    arch, params = net((n_L, n_L), "identity", "softmax", "cross_entropy",
                       [np.eye(n_L)], [np.zeros(n_L)])
    got_c, got_g = gradpipe_per_sample(arch, params, z, y)
    want_c, want_g, mag = exact_reference(arch, params, z, y)
    assert_exact(got_c, want_c, rtol=1e-13)
    assert_exact(got_g, want_g, mag)
    if n_L == 1:
        assert not np.any(got_c) and not np.any(got_g)


def test_cross_entropy_deep_network_with_huge_logits():
    rng = np.random.default_rng(7)
    sizes = (3, 4, 5)
    arch, params = net(sizes, "tanh", "softmax", "cross_entropy",
                       [rng.normal(size=(4, 3)), 300 * rng.normal(size=(5, 4))],
                       [rng.normal(size=4), rng.normal(size=5)])
    x = rng.normal(size=(6, 3))
    y = np.eye(5)[rng.integers(0, 5, size=6)]
    _, z = forward(arch, params, x)
    assert np.abs(z[2]).max() > 500  # logits in the hundreds
    got_c, got_g = gradpipe_per_sample(arch, params, x, y)
    want_c, want_g, mag = exact_reference(arch, params, x, y)
    assert want_c.max() > 100
    assert_exact(got_c, want_c, rtol=1e-12)
    assert_exact(got_g, want_g, mag)


# ---------------------------------------------------------------------------- saturation

def saturated_net(hidden, output, z_hidden, z_out):
    """3 inputs -> 4 hidden -> 1 output, biases set so that the hidden units sit at
    z_hidden (+- small) and the output at z_out; every delta is then a product."""
    rng = np.random.default_rng(11)
    w1 = 0.01 * rng.normal(size=(4, 3))
    w2 = rng.uniform(0.5, 1.5, size=(1, 4)) * np.array([1, -1, 1, -1])
    b1 = np.array(z_hidden, float)
    arch, params = net((3, 4, 1), hidden, output, "squared", [w1, w2], [b1, np.zeros(1)])
    x = rng.normal(size=(1, 3))
    a, _ = forward(arch, params, x)
    params.b[2] = np.array([z_out]) - a[1] @ w2.T[:, 0]  # z[2] = z_out
    return arch, params, x


@pytest.mark.parametrize("hidden, zh", [
    ("sigmoid", [40.0, -40.0, 25.0, 0.3]),
    ("sigmoid", [700.0, -700.0, 36.0, -36.0]),
    ("tanh", [20.0, -20.0, 12.0, -0.4]),
    ("tanh", [300.0, -300.0, 18.0, 9.0]),
])
@pytest.mark.parametrize("output, zo, target", [
    ("sigmoid", 40.0, 1.0), ("sigmoid", 40.0, 0.0), ("sigmoid", -40.0, 0.0),
    ("sigmoid", 20.0, 1.0), ("sigmoid", 2.0, 1.0),
    ("tanh", 20.0, 1.0), ("tanh", -20.0, -1.0), ("tanh", -12.0, 1.0), ("tanh", 0.7, 0.25),
    ("identity", 3.0, 2.5), ("relu", 3.0, 0.0),
])
def test_saturated_units_are_exact(hidden, zh, output, zo, target):
    arch, params, x = saturated_net(hidden, output, zh, zo)
    y = np.array([[target]])
    got_c, got_g = gradpipe_per_sample(arch, params, x, y)
    want_c, want_g, mag = exact_reference(arch, params, x, y)
    assert_exact(got_c, want_c, rtol=1e-12)
    assert_exact(got_g, want_g, mag)


def test_saturated_rows_in_a_block_with_many_rows():
    """The fix-up per unit (few saturated units in the chunk) and for the whole chunk
    (many): both exact. Hidden deltas sum over two outputs here: judged with magnitudes."""
    rng = np.random.default_rng(5)
    for scale, every in ((0.5, 100), (30.0, 7)):  # about 1% and 50% saturated units
        for hidden in ("sigmoid", "tanh"):
            arch, params = net((3, 6, 2), hidden, "sigmoid", "squared",
                               [scale * rng.normal(size=(6, 3)), rng.normal(size=(2, 6))],
                               [rng.normal(size=6), rng.normal(size=2)])
            x = rng.normal(size=(200, 3))
            x[::every] *= 40  # these rows push their units to the limits
            y = rng.integers(0, 2, size=(200, 2)).astype(float)
            a, _ = forward(arch, params, x)
            saturated = np.mean(np.abs(a[1]) > 1 - TAIL[np.dtype(np.float64)])
            assert (saturated < 1 / 64) == (scale < 1), saturated
            got_c, got_g = gradpipe_per_sample(arch, params, x, y)
            want_c, want_g, mag = exact_reference(arch, params, x, y)
            assert_exact(got_c, want_c, rtol=1e-12)
            assert_exact(got_g, want_g, mag)


# ---------------------------------------------------------------------------- the tables

def exact_prime(name, z):
    return np.array([float(_g_prime(name, mpmath.mpf(float(v)))) for v in z])


@pytest.mark.parametrize("name, limit", [("sigmoid", 745.0), ("tanh", 370.0)])
def test_prime_and_prime_of_a_exact_everywhere(name, limit):
    act = ACTIVATIONS[name]
    z = np.concatenate([np.linspace(-limit, limit, 1001), np.linspace(-45, 45, 1801)])
    want = exact_prime(name, z)
    assert_exact(act.prime(z), want, rtol=1e-13)
    a = act.fn(z)
    assert_exact(act.prime_of_a(a, z), want, rtol=1e-12)
    # A chunk with few saturated units takes the per-unit path: the same numbers.
    few = np.concatenate([z[np.abs(z) < 1][:2000], [40.0, -40.0, 20.0]])
    assert_exact(act.prime_of_a(act.fn(few), few), exact_prime(name, few), rtol=1e-12)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_prime_of_a_float32_within_its_bound(name):
    """float32: relative error about eps / TAIL = 2^-15 at worst, against g'(z) exactly
    (before: 1 - a lost every digit where a rounded to its limit)."""
    act = ACTIVATIONS[name]
    z = np.linspace(-80, 80, 6401).astype(np.float32)
    want = exact_prime(name, z.astype(np.float64))
    keep = want > 1e-37  # float32's normal range
    got = act.prime_of_a(act.fn(z), z).astype(np.float64)
    bound = 2 * float(np.finfo(np.float32).eps) / TAIL[np.dtype(np.float32)]
    np.testing.assert_allclose(got[keep], want[keep], rtol=bound, atol=0)
    assert bound < 1e-4


@pytest.mark.parametrize("name, limit", [("sigmoid", 1.0), ("tanh", 1.0)])
@pytest.mark.parametrize("target", ["limit", "minus_limit", "near", 0.3])
def test_minus_is_g_of_z_minus_y_exactly(name, limit, target):
    act = ACTIVATIONS[name]
    z = np.concatenate([np.linspace(-60, 60, 241), [36.7, -18.2, 0.0]])[:, None]
    lo = 0.0 if name == "sigmoid" else -1.0
    value = {"limit": limit, "minus_limit": lo, "near": 1 - 2.0**-40}.get(target, target)
    y = np.full_like(z, value)
    with mp.workdps(200):  # tanh(60) - 1 = -1.5e-52 needs more than 60 digits
        want = np.array([[float(_g(name, mpmath.mpf(float(v))) - mpmath.mpf(float(value)))]
                         for v in z[:, 0]])
    assert act.minus is not None
    assert_exact(act.minus(act.fn(z), z, y), want, rtol=1e-12)


def test_sigmoid_output_squared_loss_at_saturation_worked_value():
    # z = 40, y = 1: a rounds to 1, but a - y = -g(-40) = -4.248354255291589e-18 and
    # C = g(-40)^2 = 1.8048513878454153e-35; before, both were 0.
    z = np.array([[40.0]])
    a = sigmoid(z)
    assert a[0, 0] == 1.0
    c = LOSSES["squared"].fn(a, np.ones((1, 1)), z, ACTIVATIONS["sigmoid"])
    np.testing.assert_allclose(c, [1.8048513878454153e-35], rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------- moderate ranges

@pytest.mark.parametrize("hidden", ["sigmoid", "tanh", "relu", "identity"])
@pytest.mark.parametrize("output, loss", [("sigmoid", "squared"), ("tanh", "squared"),
                                          ("identity", "squared"), ("relu", "squared"),
                                          ("softmax", "cross_entropy")])
def test_matches_naive_reference_and_torch(hidden, output, loss):
    """General case against tests/reference.py (loops) and torch autograd, both float64."""
    rng = np.random.default_rng(sum(map(ord, hidden + output)))
    sizes = (4, 5, 3, 3)
    arch, params = net(sizes, hidden, output, loss,
                       [rng.normal(size=(sizes[l], sizes[l - 1])) for l in (1, 2, 3)],
                       [rng.normal(size=sizes[l]) for l in (1, 2, 3)])
    x = rng.normal(size=(7, 4))
    if loss == "cross_entropy":
        y = rng.uniform(size=(7, 3)) * rng.uniform(0.5, 1.5, size=(7, 1))  # rows: any sum
    else:
        y = rng.normal(size=(7, 3))
    got_c, got_g = gradpipe_per_sample(arch, params, x, y)
    _, _, ref_c, ref_g = naive_full_batch(sizes, params.w, params.b, hidden, output, loss, x, y)
    scale = np.abs(ref_g).max()
    np.testing.assert_allclose(got_c, ref_c, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got_g, ref_g, rtol=RTOL, atol=1e-14 * scale)

    torch = pytest.importorskip("torch")
    fns = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
           "identity": lambda v: v}
    for i in range(len(x)):
        ps = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for l in range(1, arch.L + 1) for v in (params.w[l], params.b[l])]
        h = torch.tensor(x[i], dtype=torch.float64)
        for l in range(arch.L):
            zt = ps[2 * l] @ h + ps[2 * l + 1]
            if l < arch.L - 1:
                h = fns[hidden](zt)
        t = torch.tensor(y[i], dtype=torch.float64)
        if loss == "cross_entropy":
            c = -(t * torch.log_softmax(zt, dim=0)).sum()
        else:
            c = ((fns[output](zt) - t) ** 2).sum()
        c.backward()
        g = torch.cat([p.grad.reshape(-1) for p in ps]).numpy()
        np.testing.assert_allclose(got_c[i], c.item(), rtol=1e-12, atol=0)
        np.testing.assert_allclose(got_g[i], g, rtol=RTOL, atol=1e-14 * scale)


def test_float32_and_float64_agree_on_saturated_block():
    rng = np.random.default_rng(9)
    arch64, params = net((5, 8, 3), "tanh", "sigmoid", "squared",
                         [8 * rng.normal(size=(8, 5)), 6 * rng.normal(size=(3, 8))],
                         [rng.normal(size=8), rng.normal(size=3)])
    x = rng.normal(size=(300, 5))
    y = rng.integers(0, 2, size=(300, 3)).astype(float)
    arch32 = Architecture(arch64.sizes, "tanh", "sigmoid", "squared", "float32")
    c64, g64 = gradpipe_per_sample(arch64, params, x, y)
    c32, g32 = gradpipe_per_sample(arch32, params.astype("float32"), x.astype(np.float32),
                                   y.astype(np.float32))
    # Per sample, against each sample's own scale (float32 rounds z itself to 6e-8).
    scale = np.abs(g64).max(axis=1, keepdims=True)
    assert np.all(np.abs(g32 - g64) <= 1e-4 * scale)
    np.testing.assert_allclose(c32, c64, rtol=1e-4, atol=1e-30)
