"""Per-sample losses C_i and their gradients dC_i/da[L], as one table.

`fn(a, y, z, g)` returns the per-sample loss (n,) in float64; `grad(a, y, z, g)` returns
dC_i/da[L] (n, n_L) in the dtype of a. a = g(z) is the output layer; z (z[L]) and g (its
`Activation`) are optional, and make the value exact where a alone has rounded: the
logits for cross_entropy, a - y near a saturated limit for squared. The full-batch loss
is C = (1/N) sum_i C_i (reduce.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
from numpy.typing import NDArray

from .errors import lookup

if TYPE_CHECKING:
    from .activations import Activation

Array = NDArray[np.floating]


class LossFn(Protocol):
    def __call__(
        self, a: Array, y: Array, z: Array | None = None, g: Activation | None = None
    ) -> Array: ...


class Loss(NamedTuple):
    fn: LossFn
    grad: LossFn


def _minus(a: Array, y: Array, z: Array | None, g: Activation | None) -> Array:
    """a - y, or g(z) - y from the activation where z and g are given (exact at saturation)."""
    if z is None or g is None or g.minus is None:
        return a - y
    return g.minus(a, z, y)


def squared(a: Array, y: Array, z: Array | None = None, g: Activation | None = None) -> Array:
    """C_i = sum_j (a_j - y_j)^2, summed over the output units, no factor 1/2."""
    d = _minus(a, y, z, g)
    return np.einsum("nj,nj->n", d, d, dtype=np.float64)


def squared_grad(
    a: Array, y: Array, z: Array | None = None, g: Activation | None = None
) -> Array:
    """dC_i/da_j = 2 (a_j - y_j)."""
    d = _minus(a, y, z, g)
    d *= 2
    return d


def cross_entropy(
    a: Array, y: Array, z: Array | None = None, g: Activation | None = None
) -> Array:
    """C_i = -sum_j y_j log(a_j), for a = softmax(z); exact from the logits z when given.

    From z: C_i = sum_j y_j (lse(z) - z_j), lse(z) = log sum_m exp(z_m), written as
    sum_j y_j (M - z_j) + (sum_j y_j) log1p(r) with M = max_m z_m and r = the sum of
    exp(z_m - M) over all m but one arg-max. Every term is >= 0 for y >= 0, so there is no
    cancellation, no overflow, and no clipping: logits of +-1,000 give 2,000, and a
    confident right answer gives log1p(r) ~ r, not 0. Valid for any y (rows need not sum
    to one). Without z: -sum_j y_j log(a_j), exact as far as a is (inf where a_j = 0 < y_j).
    """
    if z is None:
        with np.errstate(divide="ignore"):
            logs = np.log(a.astype(np.float64))  # y_j log(0) counts only where y_j != 0
        return -np.einsum("nj,nj->n", y, np.where(y != 0, logs, 0.0), dtype=np.float64)
    # Units along axis 0, samples along axis 1: each step below is one pass over n values
    # per unit, not n short rows (row-wise max and sums of 10 values are slow in numpy).
    n_L = z.shape[1]
    gap = np.array(z.T, dtype=np.float64, order="C")  # (n_L, n), float64 whatever z is
    M = np.maximum.reduce(gap, axis=0)  # (n,) max_m z_m
    np.subtract(M, gap, out=gap)  # M - z_j >= 0, exact for float32 z
    c = np.einsum("nj,jn->n", y, gap, dtype=np.float64)  # sum_j y_j (M - z_j)
    top = gap == 0
    np.negative(gap, out=gap)
    np.exp(gap, out=gap)  # exp(z_j - M) <= 1, and exactly 1 at the max
    gap -= top  # the max units drop out of r ...
    r = np.ones(n_L) @ gap  # (n,)
    r += top.sum(axis=0) - 1  # ... but one: ties beyond the first add exp(0) = 1 each
    c += (y @ np.ones(n_L, y.dtype)) * np.log1p(r)
    return c


def cross_entropy_grad(
    a: Array, y: Array, z: Array | None = None, g: Activation | None = None
) -> Array:
    """dC_i/da_j = -y_j / a_j (backprop uses the fused softmax form a sum(y) - y instead)."""
    out = np.zeros_like(a)
    with np.errstate(divide="ignore"):  # -y_j / 0 = -inf is the derivative's value
        np.divide(-y, a, out=out, where=y != 0)  # and 0, not 0/0, where a_j = y_j = 0
    return out


LOSSES: dict[str, Loss] = {
    "squared": Loss(squared, squared_grad),
    "cross_entropy": Loss(cross_entropy, cross_entropy_grad),
}


def get_loss(name: str) -> Loss:
    """Look a loss up by name; unknown names raise a ConfigError listing the valid ones."""
    return lookup(LOSSES, name, "loss")
