"""Per-sample losses C_i and their gradients dC_i/da[L], as one table.

`fn(a, y)` returns the per-sample loss (n,) in float64; `grad(a, y)` returns dC_i/da[L]
(n, n_L) in the dtype of a. The full-batch loss is C = (1/N) sum_i C_i (reduce.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from numpy.typing import NDArray

from .errors import ConfigError

Array = NDArray[np.floating]

# Probabilities are clipped to [EPS, 1] inside log so that a confident wrong answer costs
# about -log(1e-12) = 27.6 instead of inf.
EPS = 1e-12


class Loss(NamedTuple):
    fn: Callable[[Array, Array], Array]
    grad: Callable[[Array, Array], Array]


def squared(a: Array, y: Array) -> Array:
    """C_i = sum_j (a_j - y_j)^2, summed over the output units, no factor 1/2."""
    d = a - y
    return np.einsum("nj,nj->n", d, d, dtype=np.float64)


def squared_grad(a: Array, y: Array) -> Array:
    """dC_i/da_j = 2 (a_j - y_j)."""
    return 2 * (a - y)


def cross_entropy(a: Array, y: Array) -> Array:
    """C_i = -sum_j y_j log(a_j), for probabilities a (softmax output) and one-hot y."""
    return -np.einsum("nj,nj->n", y, np.log(np.clip(a, EPS, None)), dtype=np.float64)


def cross_entropy_grad(a: Array, y: Array) -> Array:
    """dC_i/da_j = -y_j / a_j (backprop uses the fused softmax form a - y instead)."""
    return -y / np.clip(a, EPS, None)


LOSSES: dict[str, Loss] = {
    "squared": Loss(squared, squared_grad),
    "cross_entropy": Loss(cross_entropy, cross_entropy_grad),
}


def get_loss(name: str) -> Loss:
    """Look a loss up by name; unknown names raise a ConfigError listing the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(
            f"unknown loss {name!r}. Choose one of: {', '.join(sorted(LOSSES))}."
        ) from None
