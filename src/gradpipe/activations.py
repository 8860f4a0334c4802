"""Activation functions g(z) and their derivatives g'(z), as one table.

Each entry pairs `fn` (g) with `prime` (g', taken in z as the formula is). softmax couples
the units of a layer, so it has no elementwise g'; backprop only uses it fused with
cross_entropy (see `backprop.output_delta`). Functions keep the dtype of z.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from numpy.typing import NDArray

from .errors import ConfigError

Array = NDArray[np.floating]


class Activation(NamedTuple):
    fn: Callable[[Array], Array]
    prime: Callable[[Array], Array] | None  # None: not elementwise (softmax)


def sigmoid(z: Array) -> Array:
    """g(z) = 1 / (1 + exp(-z)), written so that no exp overflows."""
    # exp(-|z|) <= 1 always; pick the algebraically equal form for each sign.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def sigmoid_prime(z: Array) -> Array:
    """g'(z) = g(z) (1 - g(z))."""
    s = sigmoid(z)
    return s * (1 - s)


def tanh(z: Array) -> Array:
    """g(z) = tanh(z)."""
    return np.tanh(z)


def tanh_prime(z: Array) -> Array:
    """g'(z) = 1 - tanh(z)^2."""
    t = np.tanh(z)
    return 1 - t * t


def relu(z: Array) -> Array:
    """g(z) = max(z, 0)."""
    return np.maximum(z, 0)


def relu_prime(z: Array) -> Array:
    """g'(z) = 1 if z > 0 else 0 (the subgradient 0 is taken at z = 0)."""
    return (z > 0).astype(z.dtype)


def identity(z: Array) -> Array:
    """g(z) = z."""
    return z


def identity_prime(z: Array) -> Array:
    """g'(z) = 1."""
    return np.ones_like(z)


def softmax(z: Array) -> Array:
    """g(z)_j = exp(z_j) / sum_m exp(z_m), over the units of each row of z (n, n_L)."""
    # Subtracting the row max leaves the result unchanged and keeps exp from overflowing.
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation(sigmoid, sigmoid_prime),
    "tanh": Activation(tanh, tanh_prime),
    "relu": Activation(relu, relu_prime),
    "identity": Activation(identity, identity_prime),
    "softmax": Activation(softmax, None),
}

HIDDEN_ACTIVATIONS = ("identity", "relu", "sigmoid", "tanh")


def get_activation(name: str) -> Activation:
    """Look an activation up by name; unknown names raise a ConfigError listing the valid ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}. Choose one of: {', '.join(sorted(ACTIVATIONS))}."
        ) from None
