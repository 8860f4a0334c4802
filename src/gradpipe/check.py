"""Backprop against finite differences: `gradpipe check` and the one-weight `gradpipe explain`.

Both work in float64 on a few samples read straight from the dataset, independently of the
workers, so they test the same backprop code the pipeline runs against a calculation that
shares nothing with it but the forward pass.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .activations import ACTIVATIONS
from .backprop import deltas, per_sample_grads
from .data import plan, read_rows
from .errors import ConfigError
from .losses import LOSSES
from .model import Architecture, forward
from .outputs import param_index, params_from_flat, read_model
from .train import TrainConfig, build_model, data_spec
from .worker import Pool

# Finite differences (`_derivative`): central differences D(s) at steps h and h/2, combined by
# Richardson extrapolation, R = D(h/2) + (D(h/2) - D(h)) / 3, which cancels the O(h^2) term
# and leaves O(h^4). The step is set by the parameter's reach: w[l][j, k] moves z_j by
# a_k^(l-1) per unit, so h = STEP / max(1, |a_k^(l-1)|) moves z_j by at most STEP whatever the
# scale of the inputs (b[l][j]: h = STEP). A fixed h = 1e-6 lost ~1e-6 of the derivative to
# the rounding of a loss of 1e4 (diabetes, targets of scale 300); at STEP the truncation,
# ~STEP^4, is below the rounding, which `_evaluate` bounds for every sample.
STEP = 2.0**-10
# A comparison's error is |backprop - finite difference| less the finite difference's rounding
# bound, over the norm of the sample's gradient across all the parameters checked: a
# derivative that is ~0 next to the sample's others is judged by how well it is known, not
# relative to itself, and a sample whose gradient float64 cannot resolve (an output saturated
# at its target) raises no alarm. On scikit-learn's datasets correct gradients differ by
# 1e-13 to 4e-10 of that norm before the bound is taken off (up to 0.8 on samples whose
# outputs are saturated, all of it rounding: the bound was 2.4x or more above every
# difference); a factor (1 + 1e-6) in backprop shows as >= 1e-6 / sqrt(parameters checked),
# ~2e-7 for 3 layers of 8. TOL sits between them.
TOL = 1e-8
WEAK = 1e-6  # a check that would miss a relative error this large says so in a note
KINK_SHRINK = 8  # a step that moves a relu unit across z = 0 is divided by this ...
KINK_TRIES = 8  # ... up to this many times; after that the comparison is left out
ERROR_MEASURE = ("max(0, |backprop - finite difference| - fd_error) / norm of the sample's "
                 "gradient over the parameters checked")


def _setup(config: TrainConfig):
    dataset = plan(data_spec(config))
    config64 = dataclasses.replace(config, dtype="float64")
    arch, params, standardize = build_model(config64, dataset)
    target_scale = read_model(config.weights).target_scale if config.weights else None
    if config.standardize and not config.weights:
        # As `train` does: the features' (and regression targets') mean and std over the
        # whole dataset, so that the check sees the inputs and targets training would.
        pool = Pool(dataset, 0, "float64")
        standardize = pool.moments()
        if dataset.scales_targets:
            target_scale = pool.moments(targets=True)
    return dataset, arch, params.astype("float64"), (standardize, target_scale)


def _read(dataset, rows, scales):
    standardize, target_scale = scales
    ids, x, y = read_rows(dataset, rows, "float64")
    if standardize is not None:
        x = (x - standardize[0]) / standardize[1]
    if target_scale is not None:
        y = (y - target_scale[0]) / target_scale[1]
    return ids, x, y


def _evaluate(arch: Architecture, flat: np.ndarray, x: np.ndarray, y: np.ndarray
              ) -> tuple[float, float, list[np.ndarray]]:
    """C_0 of one sample (x, y are (1, n_0), (1, n_L)), a bound on its rounding error, and
    which relu units are on (z > 0).

    The bound is a running error bound of the forward pass (Wilkinson): each z_j carries the
    rounding of its dot product, eps * (sum_k |w_jk a_k| + |b_j|), plus the error of its inputs
    through |w|; each a_j that through |g'(z_j)| plus one ulp of its own; C_0 that through
    |dC/da| plus one ulp. It is what finite differences of C_0 cannot see below: a saturated
    output (a = 1 - 1e-10, y = 1) leaves C_0 only a few bits of a - y, large inputs leave
    z large rounding errors.
    """
    params = params_from_flat(arch.sizes, flat, "float64")
    a, z = forward(arch, params, x)
    eps = np.finfo(np.float64).eps
    err = np.zeros(arch.sizes[0])  # (n_0,) x is taken as exact
    for l in range(1, arch.L + 1):
        w_abs = np.abs(params.w[l])
        err_z = w_abs @ err + eps * (w_abs @ np.abs(a[l - 1][0]) + np.abs(params.b[l]))
        g = arch.g(l)
        if g == "softmax":
            # da_j/dz_k = a_j (1[j = k] - a_k): |da_j| <= 2 a_j max_k |dz_k|.
            err = 2 * a[l][0] * err_z.max()
        else:
            prime = ACTIVATIONS[g].prime
            assert prime is not None
            err = np.abs(prime(z[l]))[0] * err_z
        err += np.spacing(np.abs(a[l][0]))
    loss = LOSSES[arch.loss]
    # From a, not from the logits: the rounding bound below is that of the forward pass to a,
    # and a finite difference cannot resolve more than it anyway.
    c = float(loss.fn(a[arch.L], y)[0])
    # The loss compares a with y: their difference rounds at the ulp of the larger.
    err += np.spacing(np.maximum(np.abs(a[arch.L][0]), np.abs(y[0])))
    noise = float(np.spacing(abs(c)) + np.abs(loss.grad(a[arch.L], y)[0]) @ err)
    pattern = [z[l] > 0 for l in range(1, arch.L + 1) if arch.g(l) == "relu"]
    return c, noise, pattern


def _derivative(arch: Architecture, flat: np.ndarray, p: int, x: np.ndarray, y: np.ndarray,
                h: float) -> dict:
    """dC_0/dtheta_p by Richardson-extrapolated central differences at steps h and h/2.

    Returns the estimate, the step h used, a bound on its rounding error (the loss's rounding
    bound through R's weights: 3 noise / h), and whether the loss is smooth over the steps: a
    step that turns a relu unit on or off shrinks by KINK_SHRINK, up to KINK_TRIES times.
    """
    _, noise0, pattern = _evaluate(arch, flat, x, y)

    def central(step: float) -> tuple[float, float, bool]:
        plus, minus = flat.copy(), flat.copy()
        plus[p] += step
        minus[p] -= step
        c_plus, noise_plus, on_plus = _evaluate(arch, plus, x, y)
        c_minus, noise_minus, on_minus = _evaluate(arch, minus, x, y)
        same = all(np.array_equal(q, r) for q, r in zip(on_plus, pattern, strict=True)) and all(
            np.array_equal(q, r) for q, r in zip(on_minus, pattern, strict=True))
        # Divided by the steps actually taken: flat[p] +- step rounds to a float.
        return (c_plus - c_minus) / (plus[p] - minus[p]), max(noise_plus, noise_minus), same

    for _ in range(KINK_TRIES):
        d_h, noise_h, smooth_h = central(h)
        d_half, noise_half, smooth_half = central(h / 2)
        if smooth_h and smooth_half:
            break
        h /= KINK_SHRINK
    # |D(s) error| <= noise / s, and R = (4 D(h/2) - D(h)) / 3: |R error| <= 3 noise / h.
    noise = max(noise0, noise_h, noise_half)
    return {"value": float(d_half + (d_half - d_h) / 3), "step": h, "error": 3 * noise / h,
            "smooth": smooth_h and smooth_half}


def _step(a: list[np.ndarray], layer: int, k: int | None, i: int) -> float:
    """STEP in units of the parameter's reach: w[l][j, k] scales a_k^(l-1), b[l][j] scales 1."""
    if k is None:
        return STEP
    return STEP / max(1.0, abs(float(a[layer - 1][i, k])))


def _position(sizes: tuple[int, ...], layer: int, j: int, k: int | None) -> int:
    """Index of w[l][j, k] (of b[l][j] when k is None) in Params.flat() order."""
    start = sum(sizes[m] * (sizes[m - 1] + 1) for m in range(1, layer))
    n_in = sizes[layer - 1]
    return start + (j * n_in + k if k is not None else sizes[layer] * n_in + j)


def relative_error(a: float, b: float) -> float:
    """|a - b| / max(|a| + |b|, 1e-12): 0 when equal, 1 when of opposite sign."""
    return abs(a - b) / max(abs(a) + abs(b), 1e-12)


def finite_difference_check(
    config: TrainConfig, *, samples: int = 4, per_layer: int = 8, tol: float = TOL,
    perturb: float = 0.0,
) -> dict:
    """Compare per-sample backprop gradients with finite differences of C_i, in float64.

    Checks `samples` rows spread over the dataset and `per_layer` parameters of every layer
    (weights and biases), drawn with the config's seed. Each comparison's `relative_error` is
    ERROR_MEASURE; `worst` is the comparison where it is largest, and `ok` is whether that is
    within `tol`. `detectable_error` is the smallest e for which backprop * (1 + e) would fail:
    large when the sampled gradients are lost in rounding. `perturb` multiplies the
    backprop gradient by (1 + perturb) before the comparison: a test hook that shows which
    wrong gradients the check catches.
    """
    dataset, arch, params, scales = _setup(config)
    rng = np.random.default_rng(config.seed)
    rows = sorted(rng.choice(dataset.n_rows, size=min(samples, dataset.n_rows), replace=False))
    ids, x, y = _read(dataset, [int(r) for r in rows], scales)
    a, z = forward(arch, params, x)
    backprop = per_sample_grads(deltas(arch, params, a, z, y), a) * (1 + perturb)  # (n, P)
    index = param_index(arch.sizes)
    flat = params.flat()
    chosen: list[int] = []
    for l in range(1, arch.L + 1):
        in_layer = np.flatnonzero(index["layer"] == l)
        chosen += sorted(rng.choice(in_layer, size=min(per_layer, len(in_layer)), replace=False))
    checks: list[dict] = []
    for i in range(len(rows)):
        found = []
        for p in chosen:
            l, k = int(index["layer"][p]), int(index["k"][p])
            k_or_none = None if k < 0 else k
            fd = _derivative(arch, flat, p, x[i : i + 1], y[i : i + 1],
                             _step(a, l, k_or_none, i))
            bp = float(backprop[i, p])
            found.append({
                "sample": int(ids[i]), "layer": l, "param": str(index["param"][p]),
                "j": int(index["j"][p]), "k": k_or_none,
                "backprop": bp, "finite_difference": fd["value"],
                "abs_error": abs(bp - fd["value"]), "fd_error": fd["error"],
                "elementwise_relative_error": relative_error(bp, fd["value"]),
                "step": fd["step"], "smooth": fd["smooth"],
            })
        # The sample's gradient norm, the larger from either side: a backprop that is wrongly
        # zero still shows an error of 1.
        # math.hypot scales: np.linalg.norm squares 1e-181 to 0.
        scale = max(math.hypot(*(c["backprop"] for c in found)),
                    math.hypot(*(c["finite_difference"] for c in found)))
        for c in found:
            c["scale"] = scale
            c["relative_error"] = (max(0.0, c["abs_error"] - c["fd_error"]) / scale
                                   if scale > 0 else 0.0)
        checks += found
    judged = [c for c in checks if c["smooth"]] or checks
    # Ties (errors of 0 are common) go to the largest disagreement before the bound.
    worst = max(judged, key=lambda c: (c["relative_error"],
                                       c["abs_error"] / c["scale"] if c["scale"] > 0 else 0.0))
    # The smallest e for which backprop * (1 + e) fails: e |g_p| > fd_error + tol * scale.
    # None: every sampled derivative is 0, so no factor would show.
    detectable = min(((c["fd_error"] + tol * c["scale"]) / abs(c["backprop"])
                      for c in judged if c["backprop"] != 0.0), default=None)
    report = {"checks": checks, "worst": worst, "samples": len(rows),
              "parameters": len(chosen), "tol": tol, "ok": bool(worst["relative_error"] <= tol),
              "error_measure": ERROR_MEASURE, "step": STEP, "detectable_error": detectable,
              "not_smooth": sum(not c["smooth"] for c in checks)}
    if detectable is None or detectable > WEAK:
        above = "" if detectable is None else f" above {detectable:.1e}"
        report["note"] = (
            f"only a relative error of backprop{above} would show here: the sampled gradients "
            "are lost in float64 rounding (saturated units?)")
    return report


def explain(config: TrainConfig, *, layer: int, j: int, k: int | None, sample: int) -> dict:
    """The chain rule for one weight w[l][j, k] (or bias b[l][j] when k is None) and one sample.

    dC_0/dw_jk = dC_0/da_j * g'(z_j) * a_k^(l-1); for a hidden layer dC_0/da_j =
    sum_m w[l+1][m, j] * delta[l+1]_m, listed term by term.
    """
    dataset, arch, params, scales = _setup(config)
    L = arch.L
    if not 1 <= layer <= L:
        raise ConfigError(f"--layer {layer}: must be in 1..{L} (the model has {L} layers)")
    n_out, n_in = arch.sizes[layer], arch.sizes[layer - 1]
    if not 0 <= j < n_out:
        raise ConfigError(f"--j {j}: layer {layer} has units 0..{n_out - 1}")
    if k is not None and not 0 <= k < n_in:
        raise ConfigError(f"--k {k}: layer {layer - 1} has units 0..{n_in - 1}")
    ids, x, y = _read(dataset, [sample], scales)
    a, z = forward(arch, params, x)
    delta = deltas(arch, params, a, z, y)
    g = arch.g(layer)
    out: dict = {"sample": int(ids[0]), "layer": layer, "j": j, "k": k,
                 "activation": g, "loss": arch.loss}
    if layer == L and g == "softmax":
        # softmax couples the outputs: only the fused product dC/dz_j exists.
        out["dC_da"] = float(delta[L][0, j])
        out["da_dz"] = 1.0
        out["note"] = ("softmax + cross_entropy: dC_0/dz_j = a_j sum_m y_m - y_j is shown as "
                       "dC_da, with da_dz = 1")
    else:
        if layer == L:
            dC_da = float(LOSSES[arch.loss].grad(a[L], y, z[L], ACTIVATIONS[g])[0, j])
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
    # The same finite difference as `gradpipe check`, in this one parameter.
    fd = _derivative(arch, params.flat(), _position(arch.sizes, layer, j, k), x, y,
                     _step(a, layer, k, 0))
    out["finite_difference"] = fd["value"]
    out["fd_error"] = fd["error"]
    out["relative_error"] = relative_error(out["grad"], out["finite_difference"])
    return out
