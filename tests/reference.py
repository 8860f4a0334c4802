"""An independent reference: the chain rule for every weight, written out with Python loops.

Shares nothing with gradpipe's backprop (no matrix products, no delta arrays): for each
sample it runs the forward pass unit by unit and then applies
dC/dw_jk = dC/da_j * g'(z_j) * a_k, with dC/da_j of a hidden unit summed over the next
layer's units. Slow by design; use it on tiny networks only.
"""

from __future__ import annotations

import math

import numpy as np


def _g(name: str, z: float) -> float:
    return {"sigmoid": lambda v: 1 / (1 + math.exp(-v)), "tanh": math.tanh,
            "relu": lambda v: max(v, 0.0), "identity": lambda v: v}[name](z)


def _g_prime(name: str, z: float) -> float:
    if name == "sigmoid":
        s = 1 / (1 + math.exp(-z))
        return s * (1 - s)
    if name == "tanh":
        return 1 - math.tanh(z) ** 2
    if name == "relu":
        return 1.0 if z > 0 else 0.0
    return 1.0


def naive_sample(sizes, w, b, activation, output_activation, loss, x, y):
    """(C_0, dC_0/dw[l][j][k], dC_0/db[l][j]) for one sample, by loops over units."""
    L = len(sizes) - 1
    a = [list(map(float, x))]
    z = [[]]
    for l in range(1, L + 1):
        zl = [sum(w[l][j][k] * a[l - 1][k] for k in range(sizes[l - 1])) + b[l][j]
              for j in range(sizes[l])]
        z.append(zl)
        g = output_activation if l == L else activation
        if g == "softmax":
            m = max(zl)
            e = [math.exp(v - m) for v in zl]
            a.append([v / sum(e) for v in e])
        else:
            a.append([_g(g, v) for v in zl])
    yl = list(map(float, y))
    if loss == "squared":
        C = sum((a[L][j] - yl[j]) ** 2 for j in range(sizes[L]))
    else:
        C = -sum(yl[j] * math.log(a[L][j]) for j in range(sizes[L]))
    # dC/dz for the output units, written per unit.
    dz = [None] * (L + 1)
    if output_activation == "softmax":
        # dC/dz_j = sum_m dC/da_m * da_m/dz_j with da_m/dz_j = a_m (1[m=j] - a_j)
        dC_da = [-yl[m] / a[L][m] for m in range(sizes[L])]
        dz[L] = [sum(dC_da[m] * a[L][m] * ((m == j) - a[L][j]) for m in range(sizes[L]))
                 for j in range(sizes[L])]
    else:
        dz[L] = [2 * (a[L][j] - yl[j]) * _g_prime(output_activation, z[L][j])
                 for j in range(sizes[L])]
    for l in range(L - 1, 0, -1):
        dz[l] = [sum(w[l + 1][m][j] * dz[l + 1][m] for m in range(sizes[l + 1]))
                 * _g_prime(activation, z[l][j]) for j in range(sizes[l])]
    gw = [None] + [[[dz[l][j] * a[l - 1][k] for k in range(sizes[l - 1])]
                    for j in range(sizes[l])] for l in range(1, L + 1)]
    gb = [None] + [list(dz[l]) for l in range(1, L + 1)]
    return C, gw, gb


def flat(sizes, gw, gb) -> np.ndarray:
    """Flatten in gradients.parquet order: layer, w (j, k) then b (j)."""
    out = []
    for l in range(1, len(sizes)):
        out += [v for row in gw[l] for v in row] + list(gb[l])
    return np.array(out)


def naive_full_batch(sizes, w, b, activation, output_activation, loss, x, y):
    """(C, dC/dtheta flat, per-sample losses, per-sample flat gradients) over all rows."""
    w = [None] + [np.asarray(w[l], dtype=np.float64).tolist() for l in range(1, len(sizes))]
    b = [None] + [np.asarray(b[l], dtype=np.float64).tolist() for l in range(1, len(sizes))]
    losses, grads = [], []
    for i in range(len(x)):
        C, gw, gb = naive_sample(sizes, w, b, activation, output_activation, loss, x[i], y[i])
        losses.append(C)
        grads.append(flat(sizes, gw, gb))
    grads = np.array(grads)
    return float(np.mean(losses)), grads.mean(axis=0), np.array(losses), grads
