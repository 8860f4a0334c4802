"""Activation functions g(z) and their derivatives g'(z), as one table.

Each entry pairs `fn` (g) with `prime` (g', taken in z as the formula is), the cheap
`prime_of_a` that backprop uses, and `minus` (g(z) - y, for the output layer's loss).
softmax couples the units of a layer, so it has no elementwise g'; backprop only uses it
fused with cross_entropy (see `backprop.output_delta`). Functions keep the dtype of z.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from numpy.typing import NDArray

from .errors import lookup

Array = NDArray[np.floating]
Mask = NDArray[np.bool_]
Index = NDArray[np.intp]

# sigmoid and tanh saturate: where a = g(z) is within TAIL of a limit (1 for sigmoid, +-1
# for tanh), 1 - |a| has lost log2(1/TAIL) bits or more to the rounding of a, so g'(z) and
# g(z) - y take 1 - |a| from z there, through exp. Elsewhere the a-formulas lose fewer
# bits than that: relative error about eps / TAIL, 2^-42 in float64 and 2^-15 in float32.
# Saturated units are usually rare: the check is one max (or min) per layer, and the
# fix-up touches only them. Measured on workload L's proxy, see backprop.py.
TAIL: dict[np.dtype, float] = {np.dtype(np.float64): 2.0**-10, np.dtype(np.float32): 2.0**-8}
# From this fraction of saturated units in a chunk on, g'(z) is taken from z for all of
# them (`prime`, exact everywhere): finding and patching units one by one costs more.
# Which way a chunk goes depends on that chunk only, and both are exact to the bound above.
DENSE = 1 / 256


def _tail(a: Array) -> float:
    return TAIL.get(a.dtype, TAIL[np.dtype(np.float64)])


def _patch(out: Array, where: Mask, fix: Callable[[Index], Array]) -> None:
    """out[where] = fix(i) in place, with i the flat (C-order) indexes of where."""
    i = np.flatnonzero(where)
    np.put(out, i, fix(i))


def _one_minus(x: Array, times: Array, out: Array | None = None) -> Array:
    """(1 - x) * times in one array (new, or `out`), in place after the first step."""
    out = np.subtract(1, x, out=out)
    out *= times
    return out


def _at(x: Array, i: Index) -> Array:
    return np.take(x, i)  # flat (C-order) indexes, whatever the layout of x


class Activation(NamedTuple):
    # Each function takes an optional `out` (an array shaped like z, or None: a new one)
    # and returns its result: backprop reuses one set of arrays for every chunk of a block,
    # since allocating and page-faulting new ones cost as much as the arithmetic.
    fn: Callable[..., Array]
    prime: Callable[[Array], Array] | None  # g'(z); None: not elementwise (softmax)
    # g'(z) from a = g(z), with z used only where a has rounded near a limit: the same
    # numbers as `prime` without a second exp or tanh per unit, which profiling showed to
    # cost more than the matrix products (backprop uses this).
    prime_of_a: Callable[..., Array] | None
    # (a, z, y) -> g(z) - y, without the cancellation of a - y where a = g(z) rounded near
    # a limit of g and y is near that limit (a 0/1 or -1/1 target). None: softmax.
    minus: Callable[[Array, Array, Array], Array] | None


def sigmoid(z: Array, out: Array | None = None) -> Array:
    """g(z) = 1 / (1 + exp(-z))."""
    # exp(-z) overflows to inf for z below about -88 (float32) and 1 / (1 + inf) = 0 is then
    # the right answer, so the overflow is not an error. In place: one array, not five.
    a = np.negative(z, out=out)
    with np.errstate(over="ignore"):
        np.exp(a, out=a)
    a += 1
    np.divide(1, a, out=a)  # the bits of np.reciprocal, at twice its speed
    return a


def sigmoid_prime(z: Array, out: Array | None = None) -> Array:
    """g'(z) = g(z) g(-z) = 1 / (4 cosh^2(z / 2))."""
    # Not g(z) (1 - g(z)): where g(z) rounds to 1 that is 0, while g'(40) = 4.2e-18. sech
    # before squaring: cosh overflows to inf past |z| = 1420 (178 in float32), where the
    # exact g' underflows too, and 1 / inf = 0 is right; cosh^2 would overflow sooner.
    c = np.multiply(z, 0.5, out=out)
    with np.errstate(over="ignore"):
        np.cosh(c, out=c)
    np.divide(1, c, out=c)
    c *= c
    c *= 0.25
    return c


def _sigmoid_tail(a: Array, z: Array, i: Index) -> Array:
    """1 - g(z) = g(-z) = exp(-z) g(z) at the flat indexes i, where z > 0."""
    t = np.exp(-_at(z, i))
    t *= _at(a, i)
    return t


def sigmoid_prime_of_a(a: Array, z: Array, out: Array | None = None) -> Array:
    """g'(z) = a (1 - a) with a = g(z); a exp(-z) a where a > 1 - TAIL.

    1 - a = g(-z) = exp(-z) g(z): near a = 1 it is taken from z, not from the rounded a.
    """
    hi = 1 - _tail(a)
    if not (a.size and a.max() > hi):  # a near 0 keeps its digits: only 1 - a cancels
        return _one_minus(a, a, out)
    where = a > hi
    if np.count_nonzero(where) >= DENSE * a.size:
        return sigmoid_prime(z, out)
    p = _one_minus(a, a, out)
    _patch(p, where, lambda i: _sigmoid_tail(a, z, i) * _at(a, i))
    return p


def sigmoid_minus(a: Array, z: Array, y: Array) -> Array:
    """g(z) - y = (1 - y) - exp(-z) a where a > 1 - TAIL, else a - y."""
    d = a - y
    hi = 1 - _tail(a)
    if a.size and a.max() > hi:
        _patch(d, a > hi, lambda i: (1 - _at(y, i)) - _sigmoid_tail(a, z, i))
    return d


def tanh(z: Array, out: Array | None = None) -> Array:
    """g(z) = tanh(z)."""
    return np.tanh(z, out=out)


def tanh_prime(z: Array, out: Array | None = None) -> Array:
    """g'(z) = 1 - tanh(z)^2 = 1 / cosh^2(z)."""
    # Not 1 - tanh(z)^2: where tanh(z) rounds to +-1 that is 0, while g'(20) = 1.7e-17.
    with np.errstate(over="ignore"):  # cosh = inf past |z| = 710 (89): g' = 0, as exactly
        c = np.cosh(z, out=out)
    np.divide(1, c, out=c)
    c *= c
    return c


def _tanh_tail(a: Array, z: Array, i: Index) -> Array:
    """1 - |g(z)| = exp(-2|z|) (1 + |a|) at the flat indexes i."""
    t = np.exp(-2 * np.abs(_at(z, i)))
    t *= 1 + np.abs(_at(a, i))
    return t


def tanh_prime_of_a(a: Array, z: Array, out: Array | None = None) -> Array:
    """g'(z) = 1 - a^2 with a = tanh(z); exp(-2|z|) (1 + |a|)^2 where 1 - a^2 < 2 TAIL.

    1 - |a| = exp(-2|z|) (1 + |a|): near |a| = 1 it is taken from z, not from the rounded a.
    """
    p = np.multiply(a, a, out=out)
    np.subtract(1, p, out=p)
    lo = 2 * _tail(a)  # 1 - a^2 = (1 - |a|)(1 + |a|) < 2 TAIL: |a| within about TAIL of 1
    if not (p.size and p.min() < lo):
        return p
    where = p < lo
    if np.count_nonzero(where) >= DENSE * p.size:
        return tanh_prime(z, p)  # p is `out` when given: reused
    _patch(p, where, lambda i: _tanh_tail(a, z, i) * (1 + np.abs(_at(a, i))))
    return p


def tanh_minus(a: Array, z: Array, y: Array) -> Array:
    """g(z) - y = (s - y) - s exp(-2|z|) (1 + |a|), s = sign(z), where |a| > 1 - TAIL."""
    d = a - y
    hi = 1 - _tail(a)
    if a.size and (a.max() > hi or a.min() < -hi):

        def fix(i: Index) -> Array:
            s = np.sign(_at(z, i))
            return (s - _at(y, i)) - s * _tanh_tail(a, z, i)

        _patch(d, np.abs(a) > hi, fix)
    return d


def relu(z: Array, out: Array | None = None) -> Array:
    """g(z) = max(z, 0)."""
    return np.maximum(z, 0, out=out)


def relu_prime(z: Array, out: Array | None = None) -> Array:
    """g'(z) = 1 if z > 0 else 0 (the subgradient 0 is taken at z = 0)."""
    if out is None:
        return (z > 0).astype(z.dtype)
    return np.greater(z, 0, out=out)  # True/False written as 1/0 in out's dtype


def relu_prime_of_a(a: Array, z: Array, out: Array | None = None) -> Array:
    """g'(z) = 1 if a > 0 else 0 (a > 0 exactly when z > 0)."""
    return relu_prime(a, out)


def identity(z: Array, out: Array | None = None) -> Array:
    """g(z) = z (z itself: `out` is left alone)."""
    return z


def identity_prime(z: Array, out: Array | None = None) -> Array:
    """g'(z) = 1."""
    if out is None:
        return np.ones_like(z)
    out.fill(1)
    return out


def identity_prime_of_a(a: Array, z: Array, out: Array | None = None) -> Array:
    """g'(z) = 1."""
    return identity_prime(a, out)


def exact_minus(a: Array, z: Array, y: Array) -> Array:
    """g(z) - y = a - y, for g whose a = g(z) is z or 0 (identity, relu): no rounding in a."""
    return a - y


def softmax(z: Array, out: Array | None = None) -> Array:
    """g(z)_j = exp(z_j) / sum_m exp(z_m), over the units of each row of z (n, n_L)."""
    # Units along axis 0, samples along axis 1: the max and the sum are then n_L passes
    # over n values, not n reductions of n_L values (5-7x faster for 10 units), and each
    # row's sum adds its units in order, j = 1..n_L, wherever the row is in the array.
    # Subtracting the row max leaves the result unchanged and keeps exp from overflowing.
    e = np.array(z.T, order="C")  # (n_L, n)
    e -= np.maximum.reduce(e, axis=0)
    np.exp(e, out=e)
    e /= np.add.reduce(e, axis=0)
    if out is None:
        out = np.empty(z.shape, z.dtype)  # (n, n_L), C-ordered like the other activations
    np.copyto(out, e.T)
    return out


ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation(sigmoid, sigmoid_prime, sigmoid_prime_of_a, sigmoid_minus),
    "tanh": Activation(tanh, tanh_prime, tanh_prime_of_a, tanh_minus),
    "relu": Activation(relu, relu_prime, relu_prime_of_a, exact_minus),
    "identity": Activation(identity, identity_prime, identity_prime_of_a, exact_minus),
    "softmax": Activation(softmax, None, None, None),
}

HIDDEN_ACTIVATIONS = ("identity", "relu", "sigmoid", "tanh")


def get_activation(name: str) -> Activation:
    """Look an activation up by name; unknown names raise a ConfigError listing the valid ones."""
    return lookup(ACTIVATIONS, name, "activation")
