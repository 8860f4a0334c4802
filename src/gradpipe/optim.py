"""The optimizer, pure numpy: the learning-rate schedule, mini-batch draws and the SGD step.

Step s computes grad_s at w_s; then v_s = momentum * v_{s-1} + grad_s and
w_{s+1} = w_s - lr_s * v_s, where grad_s already holds weight_decay * w_s on the weights
(never on the biases), so that the recorded gradient is the one the step used.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]


def lr_at(schedule: str, lr: float, steps: int, step: int) -> float:
    """The learning rate of `step` in a run of `steps` steps.

    constant: lr; cosine: lr (1 + cos(pi s / steps)) / 2; linear: lr (1 - s / steps).
    A run extended by --resume --steps N follows the schedule of N steps from where it
    resumes; the steps already done keep the rates they had.
    """
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * step / steps))
    if schedule == "linear":
        return lr * (1 - step / steps)
    return lr


def draw_batch(batch: int | None, seed: int, n_rows: int, step: int) -> NDArray[np.int64] | None:
    """Sorted global row indexes of step's mini-batch, keyed by (seed, step) alone, so the
    same for any number of workers; None for the full batch."""
    if batch is None or batch >= n_rows:
        return None
    rng = np.random.default_rng([seed, step])
    return np.sort(rng.choice(n_rows, size=batch, replace=False)).astype(np.int64)


def weight_mask(sizes: tuple[int, ...]) -> F64:
    """1 for every weight, 0 for every bias, in the flat parameter order (layer, w, b)."""
    parts = []
    for l in range(1, len(sizes)):
        parts += [np.ones(sizes[l] * sizes[l - 1]), np.zeros(sizes[l])]
    return np.concatenate(parts)


def with_weight_decay(grad: F64, params: F64, weight_decay: float, mask: F64) -> F64:
    """dC/dtheta + weight_decay * w on the weights (L2), never on the biases."""
    return grad + weight_decay * params * mask if weight_decay else grad


def sgd_step(params: F64, velocity: F64, grad: F64, lr: float, momentum: float
             ) -> tuple[F64, F64]:
    """One SGD step with momentum: v = momentum v + grad; w = w - lr v. Returns (w, v)."""
    velocity = momentum * velocity + grad
    with np.errstate(over="ignore"):  # an overflow to inf is the caller's divergence check
        return params - lr * velocity, velocity
