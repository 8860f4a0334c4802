"""Backprop against finite differences: `gradpipe check` and the one-weight `gradpipe explain`.

Both work in float64 on a few samples read straight from the dataset, independently of the
workers, so they test the same backprop code the pipeline runs against a calculation that
shares nothing with it but the forward pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .activations import ACTIVATIONS
from .backprop import deltas, per_sample_grads
from .data import plan, read_rows
from .errors import ConfigError
from .losses import LOSSES
from .model import Architecture, Params, forward
from .outputs import param_index, params_from_flat
from .train import TrainConfig, build_model, data_spec

EPS = 1e-6  # central difference step; error O(EPS^2) against rounding O(1e-16 / EPS)


def _losses(arch: Architecture, params: Params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    a, _ = forward(arch, params, x)
    return LOSSES[arch.loss].fn(a[arch.L], y)


def _setup(config: TrainConfig):
    dataset = plan(data_spec(config))
    config64 = dataclasses.replace(config, dtype="float64")
    arch, params, standardize = build_model(config64, dataset)
    return dataset, arch, params.astype("float64"), standardize


def _read(dataset, rows, standardize):
    ids, x, y = read_rows(dataset, rows, "float64")
    if standardize is not None:
        x = (x - standardize[0]) / standardize[1]
    return ids, x, y


def relative_error(a: float, b: float) -> float:
    """|a - b| / max(|a| + |b|, 1e-12): 0 when equal, 1 when of opposite sign."""
    return abs(a - b) / max(abs(a) + abs(b), 1e-12)


def finite_difference_check(
    config: TrainConfig, *, samples: int = 4, per_layer: int = 8, eps: float = EPS
) -> dict:
    """Compare per-sample backprop gradients with central differences of C_i, in float64.

    Checks `samples` rows spread over the dataset and `per_layer` parameters of every
    layer (weights and biases), drawn with the config's seed. Returns the worst
    relative error and every comparison.
    """
    dataset, arch, params, standardize = _setup(config)
    rng = np.random.default_rng(config.seed)
    rows = sorted(rng.choice(dataset.n_rows, size=min(samples, dataset.n_rows), replace=False))
    ids, x, y = _read(dataset, [int(r) for r in rows], standardize)
    a, z = forward(arch, params, x)
    backprop = per_sample_grads(deltas(arch, params, a, z, y), a)  # (n, P)
    index = param_index(arch.sizes)
    flat = params.flat()
    checks = []
    for l in range(1, arch.L + 1):
        in_layer = np.flatnonzero(index["layer"] == l)
        chosen = rng.choice(in_layer, size=min(per_layer, len(in_layer)), replace=False)
        for p in sorted(chosen):
            plus, minus = flat.copy(), flat.copy()
            plus[p] += eps
            minus[p] -= eps

            c_plus = _losses(arch, params_from_flat(arch.sizes, plus, "float64"), x, y)
            c_minus = _losses(arch, params_from_flat(arch.sizes, minus, "float64"), x, y)
            fd = (c_plus - c_minus) / (2 * eps)  # (n,)
            for i in range(len(rows)):
                checks.append({
                    "sample": int(ids[i]), "layer": l, "param": str(index["param"][p]),
                    "j": int(index["j"][p]),
                    "k": None if index["k"][p] < 0 else int(index["k"][p]),
                    "backprop": float(backprop[i, p]), "finite_difference": float(fd[i]),
                    "relative_error": relative_error(backprop[i, p], fd[i]),
                    "abs_error": abs(float(backprop[i, p] - fd[i])),
                })
    def badness(c: dict) -> float:
        # An error relative to a tiny value says nothing: judge those by their absolute error.
        return min(c["relative_error"], c["abs_error"] / 1e-7)

    worst = max(checks, key=badness)
    return {"checks": checks, "worst": worst, "samples": len(rows),
            "parameters": len(checks) // max(len(rows), 1), "eps": eps}


def explain(config: TrainConfig, *, layer: int, j: int, k: int | None, sample: int,
            eps: float = EPS) -> dict:
    """The chain rule for one weight w[l][j, k] (or bias b[l][j] when k is None) and one sample.

    dC_0/dw_jk = dC_0/da_j * g'(z_j) * a_k^(l-1); for a hidden layer dC_0/da_j =
    sum_m w[l+1][m, j] * delta[l+1]_m, listed term by term.
    """
    dataset, arch, params, standardize = _setup(config)
    L = arch.L
    if not 1 <= layer <= L:
        raise ConfigError(f"--layer {layer}: must be in 1..{L} (the model has {L} layers)")
    n_out, n_in = arch.sizes[layer], arch.sizes[layer - 1]
    if not 0 <= j < n_out:
        raise ConfigError(f"--j {j}: layer {layer} has units 0..{n_out - 1}")
    if k is not None and not 0 <= k < n_in:
        raise ConfigError(f"--k {k}: layer {layer - 1} has units 0..{n_in - 1}")
    ids, x, y = _read(dataset, [sample], standardize)
    a, z = forward(arch, params, x)
    delta = deltas(arch, params, a, z, y)
    g = arch.g(layer)
    out: dict = {"sample": int(ids[0]), "layer": layer, "j": j, "k": k,
                 "activation": g, "loss": arch.loss}
    if layer == L and g == "softmax":
        # softmax couples the outputs: only the fused product dC/dz_j = a_j - y_j exists.
        out["dC_da"] = float(delta[L][0, j])
        out["da_dz"] = 1.0
        out["note"] = ("softmax + cross_entropy: dC_0/dz_j = a_j - y_j is shown as dC_da, "
                       "with da_dz = 1")
    else:
        if layer == L:
            dC_da = float(LOSSES[arch.loss].grad(a[L], y)[0, j])
            out["dC_da_formula"] = ("2 (a_j - y_j)" if arch.loss == "squared" else "-y_j / a_j")
        else:
            terms = params.w[layer + 1][:, j] * delta[layer + 1][0]  # (n_{l+1},)
            dC_da = float(terms.sum())
            out["dC_da_formula"] = f"sum_m w[{layer + 1}][m, {j}] * delta[{layer + 1}]_m"
            out["dC_da_terms"] = [
                {"m": m, "w": float(params.w[layer + 1][m, j]),
                 "delta": float(delta[layer + 1][0, m]), "product": float(terms[m])}
                for m in range(len(terms))
            ]
        out["dC_da"] = dC_da
        prime = ACTIVATIONS[g].prime
        assert prime is not None  # softmax is handled above
        out["da_dz"] = float(prime(z[layer])[0, j])
    out["a_j"] = float(a[layer][0, j])
    out["z_j"] = float(z[layer][0, j])
    out["dz_dw"] = 1.0 if k is None else float(a[layer - 1][0, k])
    out["grad"] = out["dC_da"] * out["da_dz"] * out["dz_dw"]
    out["backprop"] = float(delta[layer][0, j] * out["dz_dw"])
    # Central difference of C_0 in this one parameter.
    target = params.b[layer] if k is None else params.w[layer]
    where = (j,) if k is None else (j, k)
    saved = target[where]
    target[where] = saved + eps
    c_plus = _losses(arch, params, x, y)[0]
    target[where] = saved - eps
    c_minus = _losses(arch, params, x, y)[0]
    target[where] = saved
    out["finite_difference"] = float((c_plus - c_minus) / (2 * eps))
    out["relative_error"] = relative_error(out["grad"], out["finite_difference"])
    return out
