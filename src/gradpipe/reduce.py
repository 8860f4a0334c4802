"""The reducer: block partials -> the full-batch gradient dC/dw = (1/N) sum_i dC_i/dw.

Partials are added along a binary tree fixed by the block indices alone (tree.py), in
float64, and divided by N once at the end: the workers send the nodes they hold whole,
and `reduce` completes the tree from whatever nodes arrive. Every addition is fixed by the
blocks, so the result has the same bits for any number of workers and after any retry.
Also here: the gradient noise scale, over all parameters and per layer, estimated from the
same sums, and the second moment (1/N) sum_i g_i^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .backprop import Partial
from .tree import complete, partial_bytes

F64 = NDArray[np.float64]

# Gradient.noise_scale: its denominator must exceed this many eps of the terms it subtracts.
NOISE_ULPS = 128


@dataclass
class Gradient:
    """The full-batch loss and gradient over N samples, with the per-sample norm sums."""

    n: int  # N, samples summed
    loss: float  # C = (1/N) sum_i C_i
    w: list[F64]  # dC/dw[l], (n_l, n_{l-1}); index 0 unused
    b: list[F64]  # dC/db[l], (n_l,)
    sq_norm_sum: F64  # (L+1,): sum_i |dC_i/dtheta[l]|^2 per layer; index 0 unused
    correct: int  # samples classified right (classification)
    # Machine epsilon of the compute dtype (the coarsest of the partials'), for noise_scale.
    eps: float = float(np.finfo(np.float64).eps)
    # With second moments: (1/N) sum_i (dC_i/dw[l])^2 and (1/N) sum_i (dC_i/db[l])^2.
    sq_w: list[F64] | None = None
    sq_b: list[F64] | None = None
    # With output sums: sum_i (a[L]_i - y_i)^2 per output unit (n_L,), a sum, not a mean.
    out_sse: F64 | None = None
    # What reached the reducer: tree nodes (partials) and the bytes of their arrays.
    partials: int = 0
    partial_bytes: int = 0

    @property
    def L(self) -> int:
        return len(self.w) - 1

    def flat(self) -> F64:
        """The gradient as one vector in the gradients row order (layer, w then b, j, k)."""
        return _flat(self.w, self.b)

    def flat_sq(self) -> F64 | None:
        """The second moment (1/N) sum_i g_i^2 in the same order; None without second moments.

        The diagonal of the empirical Fisher (BackPACK's SumGradSquared divided by N); the
        per-parameter variance of the per-sample gradients is flat_sq() - flat()^2.
        """
        if self.sq_w is None or self.sq_b is None:
            return None
        return _flat(self.sq_w, self.sq_b)

    def layer_norms(self) -> F64:
        """|dC/dtheta[l]| per layer, (L+1,); index 0 unused."""
        return np.sqrt(self.layer_sq_norms())

    def norm(self) -> float:
        return float(np.sqrt(np.sum(self.layer_norms() ** 2)))

    def layer_sq_norms(self) -> F64:
        """|dC/dtheta[l]|^2 per layer, (L+1,); index 0 unused."""
        out = np.zeros(self.L + 1)
        for l in range(1, self.L + 1):
            out[l] = np.sum(self.w[l] ** 2) + np.sum(self.b[l] ** 2)
        return out

    def noise_scale(self) -> float:
        """B_simple = tr(Sigma) / |G|^2 (McCandlish et al., 2018), unbiased; NaN if undefined.

        With g_i the per-sample gradients and G their mean over n samples:
        tr(Sigma) ~ S = (sum_i |g_i|^2 - n |G|^2) / (n - 1), and, since E|G|^2 =
        |G_true|^2 + tr(Sigma)/n, |G_true|^2 ~ D = |G|^2 - S / n.

        NaN where n < 2 or D is not significantly positive: D <= NOISE_ULPS * eps *
        (|G|^2 + |S| / n), eps that of the compute dtype. The two terms D subtracts are sums
        of squares rounded to about eps of their size each (the per-sample squared norms and
        the gradient are computed apart, in the compute dtype), so a D below that bound is
        rounding, not signal, and B would be any number (2.5e17 where D is 0 in exact
        arithmetic). In float32 the bound is 1.5e-5 (|G|^2 + S/n): B above about
        6.5e4 n, far past any useful batch size, reads as null.
        """
        return b_simple(self.n, float(np.sum(self.flat() ** 2)), float(self.sq_norm_sum.sum()),
                        self.eps)

    def layer_noise_scales(self) -> F64:
        """B_simple of each layer's parameters alone, (L+1,) (index 0 unused; NaN where
        undefined): noise_scale's estimator with |G|^2 and sum_i |g_i|^2 restricted to
        layer l, i.e. |dC/dtheta[l]|^2 and sq_norm_sum[l]."""
        out = np.full(self.L + 1, np.nan)
        for l, g2 in enumerate(self.layer_sq_norms()[1:], start=1):
            out[l] = b_simple(self.n, float(g2), float(self.sq_norm_sum[l]), self.eps)
        return out


def _flat(w: list[F64], b: list[F64]) -> F64:
    parts = []
    for l in range(1, len(w)):
        parts += [w[l].ravel(), b[l].ravel()]
    return np.concatenate(parts)


def b_simple(n: int, g2: float, sq_sum: float, eps: float) -> float:
    """B_simple = S / (|G|^2 - S / n), S = (sum_i |g_i|^2 - n |G|^2) / (n - 1); NaN where
    n < 2 or the denominator is within NOISE_ULPS * eps of the terms it subtracts
    (Gradient.noise_scale says why). g2 = |G|^2, sq_sum = sum_i |g_i|^2."""
    if n < 2:
        return float("nan")
    trace = (sq_sum - n * g2) / (n - 1)
    denom = g2 - trace / n
    if not denom > NOISE_ULPS * eps * (g2 + abs(trace) / n):
        return float("nan")
    return trace / denom


def reduce(partials: list[Partial]) -> Gradient:
    """Complete the tree from its nodes (block partials, or workers' subtrees), in float64,
    and divide by N once."""
    root = complete(partials)
    n = root.n
    if n == 0:
        raise ValueError("the partials hold zero samples")
    second = root.sq_w is not None and root.sq_b is not None
    # New arrays (the root may be a caller's partial): x / n has the bits of x /= n.
    return Gradient(
        n, root.loss_sum / n, [w / n for w in root.sum_w], [b / n for b in root.sum_b],
        np.array(root.sq_norm_sum, dtype=np.float64), root.correct, root.eps,
        [w / n for w in root.sq_w] if second and root.sq_w is not None else None,
        [b / n for b in root.sq_b] if second and root.sq_b is not None else None,
        out_sse=None if root.out_sse is None else np.array(root.out_sse, dtype=np.float64),
        partials=len(partials), partial_bytes=sum(partial_bytes(p) for p in partials))
