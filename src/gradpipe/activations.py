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
    prime: Callable[[Array], Array] | None  # g'(z); None: not elementwise (softmax)
    # g'(z) written in a = g(z): the same numbers without a second exp or tanh per unit,
    # which profiling showed to cost more than the matrix products (backprop uses this).
    prime_of_a: Callable[[Array], Array] | None


def sigmoid(z: Array) -> Array:
    """g(z) = 1 / (1 + exp(-z))."""
    # exp(-z) overflows to inf for z below about -88 (float32) and 1 / (1 + inf) = 0 is then
    # the right answer, so the overflow is not an error. In place: one temporary, not five.
    a = np.negative(z)
    with np.errstate(over="ignore"):
        np.exp(a, out=a)
    a += 1
    np.reciprocal(a, out=a)
    return a


def sigmoid_prime(z: Array) -> Array:
    """g'(z) = g(z) (1 - g(z))."""
    return sigmoid_prime_of_a(sigmoid(z))


def sigmoid_prime_of_a(a: Array) -> Array:
    """g'(z) = a (1 - a) with a = g(z)."""
    return a * (1 - a)


def tanh(z: Array) -> Array:
    """g(z) = tanh(z)."""
    return np.tanh(z)


def tanh_prime(z: Array) -> Array:
    """g'(z) = 1 - tanh(z)^2."""
    return tanh_prime_of_a(np.tanh(z))


def tanh_prime_of_a(a: Array) -> Array:
    """g'(z) = 1 - a^2 with a = tanh(z)."""
    return 1 - a * a


def relu(z: Array) -> Array:
    """g(z) = max(z, 0)."""
    return np.maximum(z, 0)


def relu_prime(z: Array) -> Array:
    """g'(z) = 1 if z > 0 else 0 (the subgradient 0 is taken at z = 0)."""
    return (z > 0).astype(z.dtype)


def relu_prime_of_a(a: Array) -> Array:
    """g'(z) = 1 if a > 0 else 0 (a > 0 exactly when z > 0)."""
    return (a > 0).astype(a.dtype)


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
    "sigmoid": Activation(sigmoid, sigmoid_prime, sigmoid_prime_of_a),
    "tanh": Activation(tanh, tanh_prime, tanh_prime_of_a),
    "relu": Activation(relu, relu_prime, relu_prime_of_a),
    "identity": Activation(identity, identity_prime, identity_prime),
    "softmax": Activation(softmax, None, None),
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
