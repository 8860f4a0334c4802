"""The network: its architecture, its parameters w[l], b[l], initialisation and forward pass.

Layers are l = 1..L with L the output layer; a[0] = x. w[l] has shape (n_l, n_{l-1}) read
as (j, k): w[l][j, k] joins unit k of layer l-1 to unit j of layer l. Index 0 of every
per-layer list is unused, so that list index and layer number agree as in the book.
Arrays are batch-major: a[l] and z[l] are (n, n_l), row i is sample i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .activations import ACTIVATIONS, HIDDEN_ACTIVATIONS, get_activation
from .errors import ConfigError
from .losses import get_loss

Array = NDArray[np.floating]
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Architecture:
    """Layer sizes n_0..n_L, the activations, the loss and the compute dtype."""

    sizes: tuple[int, ...]  # n_0 (features) .. n_L (outputs)
    activation: str = "sigmoid"  # g for the hidden layers 1..L-1
    output_activation: str = "sigmoid"  # g for layer L
    loss: str = "squared"  # per-sample loss C_i
    dtype: str = "float32"  # compute dtype; sums across samples are float64 whatever it is

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or any(int(n) < 1 for n in self.sizes):
            raise ConfigError(f"layer sizes must be >= 1, got {list(self.sizes)}")
        get_activation(self.activation)
        get_activation(self.output_activation)
        get_loss(self.loss)
        if self.activation not in HIDDEN_ACTIVATIONS:
            raise ConfigError(
                f"--activation {self.activation!r} cannot be used in hidden layers. "
                f"Choose one of: {', '.join(HIDDEN_ACTIVATIONS)}."
            )
        # softmax has no elementwise g'; it is supported only fused with cross_entropy,
        # where delta[L] = a[L] sum_j y_j - y (a[L] - y for targets that sum to one).
        if (self.output_activation == "softmax") != (self.loss == "cross_entropy"):
            raise ConfigError(
                "--loss cross_entropy goes with --output-activation softmax and softmax with "
                f"cross_entropy (got loss {self.loss!r}, output activation "
                f"{self.output_activation!r})."
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}. Choose one of: {', '.join(DTYPES)}.")

    @property
    def L(self) -> int:
        """Index of the output layer."""
        return len(self.sizes) - 1

    def g(self, l: int) -> str:
        """Name of the activation of layer l."""
        return self.output_activation if l == self.L else self.activation

    @property
    def n_params(self) -> int:
        return sum(self.sizes[l] * (self.sizes[l - 1] + 1) for l in range(1, self.L + 1))

    def to_dict(self) -> dict:
        return {
            "sizes": list(self.sizes),
            "activation": self.activation,
            "output_activation": self.output_activation,
            "loss": self.loss,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        return cls(
            sizes=tuple(int(n) for n in d["sizes"]),
            activation=d["activation"],
            output_activation=d["output_activation"],
            loss=d["loss"],
            dtype=d.get("dtype", "float32"),
        )


@dataclass
class Params:
    """Weights w[l] (n_l, n_{l-1}) and biases b[l] (n_l,), l = 1..L; index 0 is unused."""

    w: list[Array]
    b: list[Array]

    @property
    def L(self) -> int:
        return len(self.w) - 1

    def astype(self, dtype: str | np.dtype) -> "Params":
        return Params(
            [w.astype(dtype, copy=False) for w in self.w],
            [b.astype(dtype, copy=False) for b in self.b],
        )

    def flat(self) -> NDArray[np.float64]:
        """All parameters as one float64 vector, in the gradients row order.

        The order is: by layer, then w before b, then j, then k (row-major w[l]).
        """
        parts = []
        for l in range(1, self.L + 1):
            parts.append(self.w[l].ravel())
            parts.append(self.b[l].ravel())
        return np.concatenate(parts).astype(np.float64)


def init_params(arch: Architecture, seed: int) -> Params:
    """Seeded initial weights: Glorot-uniform, He-uniform for relu layers; biases zero.

    w[l] ~ U(-r, r) with r = sqrt(6 / (n_{l-1} + n_l)) (Glorot and Bengio, 2010), or
    r = sqrt(6 / n_{l-1}) where g is relu (He et al., 2015). Drawn in float64 from
    numpy's PCG64 seeded with `seed`, layer by layer, then cast to the compute dtype, so
    the same seed gives the same weights in every command and both dtypes.
    """
    rng = np.random.default_rng(seed)
    w: list[Array] = [np.empty((0, 0), arch.dtype)]
    b: list[Array] = [np.empty(0, arch.dtype)]
    for l in range(1, arch.L + 1):
        n_in, n_out = arch.sizes[l - 1], arch.sizes[l]
        fan = n_in if arch.g(l) == "relu" else n_in + n_out
        r = np.sqrt(6.0 / fan)
        w.append(rng.uniform(-r, r, size=(n_out, n_in)).astype(arch.dtype))  # (j, k)
        b.append(np.zeros(n_out, arch.dtype))
    return Params(w, b)


def check_shapes(arch: Architecture, params: Params) -> None:
    """Raise ConfigError when params do not have the shapes the architecture names."""
    if params.L != arch.L:
        raise ConfigError(f"weights have {params.L} layers but the model has {arch.L}")
    for l in range(1, arch.L + 1):
        want = (arch.sizes[l], arch.sizes[l - 1])
        if params.w[l].shape != want or params.b[l].shape != (want[0],):
            raise ConfigError(
                f"layer {l}: weights have shape {params.w[l].shape} but the model expects {want}"
            )


def forward(arch: Architecture, params: Params, x: Array) -> tuple[list[Array], list[Array]]:
    """Forward pass: z[l] = a[l-1] @ w[l].T + b[l], a[l] = g(z[l]); returns (a, z).

    x is (n, n_0); a[l] and z[l] are (n, n_l); z[0] is unused (an empty array). The
    training engine (`backprop.Workspace.forward`) gives the same a[l], bit for bit, so
    evaluation sees what training saw.
    """
    a = [x]
    z = [np.empty((0, 0), x.dtype)]
    for l in range(1, arch.L + 1):
        # w[l].T C-ordered: BLAS's fastest layout for this product. The layout can change
        # the bits (the float64 products of the output layer), so it is always this one.
        z_l = a[l - 1] @ np.ascontiguousarray(params.w[l].T)
        z_l += params.b[l]  # (n, n_l)
        z.append(z_l)
        a.append(ACTIVATIONS[arch.g(l)].fn(z_l))
    return a, z
