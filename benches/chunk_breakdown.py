"""Where a chunk's time goes: workload L's model (128-256-64-10, sigmoid hidden, softmax
and cross-entropy), one BLAS thread, every part of `block_partial`'s chunk loop timed apart.

    python benches/chunk_breakdown.py [--rows 65536] [--reps 5] [--json FILE]

The loop below is `backprop.Workspace.forward` and `.backward` and block_partial's sums,
written out with a timer between the parts; its summed gradient is checked bitwise against
`block_partial`'s, so the parts are the engine's own work. Also measured: numpy's ufuncs
alone on one chunk's widest array (ns per element), the machine's view of where the
elementwise time can go. Timer overhead is about 0.1 us a part, 20 parts a chunk.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict

import numpy as np
from threadpoolctl import threadpool_limits

from gradpipe.activations import ACTIVATIONS
from gradpipe.backprop import (
    Workspace,
    block_partial,
    chunk_rows_for,
    output_delta,
    output_losses,
    per_sample_sq_norms,
)
from gradpipe.model import Architecture, init_params


def breakdown(dtype: str, rows: int, reps: int) -> dict:
    arch = Architecture((128, 256, 64, 10), "sigmoid", "softmax", "cross_entropy", dtype)
    params = init_params(arch, 0).astype(dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 128)).astype(dtype)
    y = np.eye(10, dtype=dtype)[rng.integers(0, 10, rows)]
    c = chunk_rows_for(arch)
    L = arch.L
    ws = Workspace(arch, params, c)
    T: dict[str, float] = defaultdict(float)
    sum_w = [np.zeros((0, 0))] + [np.zeros(w.shape) for w in params.w[1:]]

    def tick(part: str, t0: float) -> float:
        t = time.perf_counter()
        T[part] += t - t0
        return t

    for rep in range(reps + 1):  # rep 0 warms up and checks the bits
        if rep == 1:
            T.clear()
        for s in range(0, rows, c):
            xc, yc = x[s : s + c], y[s : s + c]
            m = xc.shape[0]
            t = time.perf_counter()
            a, z = [xc], [np.empty((0, 0), xc.dtype)]
            for l in range(1, L + 1):
                a_l = ws.a[l][:m]
                if ws.exp_layer[l]:
                    e = np.matmul(a[l - 1], ws.w_t[l], out=ws.prime[l][:m])
                    t = tick(f"product: forward layer {l}", t)
                    e -= ws.b_rows[l][:m]
                    t = tick("bias", t)
                    np.exp(e, out=e)
                    t = tick("sigmoid: exp", t)
                    np.add(e, 1, out=a_l)
                    np.divide(1, a_l, out=a_l)
                    t = tick("sigmoid: 1 / (1 + e)", t)
                    z.append(e)
                else:
                    z_l = np.matmul(a[l - 1], ws.w_t[l], out=ws.z[l][:m])
                    t = tick(f"product: forward layer {l}", t)
                    z_l += ws.b_rows[l][:m]
                    t = tick("bias", t)
                    z.append(z_l)
                    a_l = ACTIVATIONS[arch.g(l)].fn(z_l, out=a_l)
                    t = tick("softmax", t)
                a.append(a_l)
            delta = [np.empty((0, 0), xc.dtype)] * (L + 1)
            delta[L] = output_delta(arch, a[L], z[L], yc)
            t = tick("output delta (BP1)", t)
            for l in range(L - 1, 0, -1):
                d = np.matmul(delta[l + 1], params.w[l + 1], out=ws.delta[l][:m])
                t = tick(f"product: BP2 layer {l}", t)
                e = z[l]
                d *= a[l]
                e *= a[l]
                d *= e
                t = tick("sigmoid': d a (e a)", t)
                delta[l] = d
            losses = output_losses(arch, a[L], z[L], yc)
            t = tick("losses (cross-entropy from the logits, float64)", t)
            sq = per_sample_sq_norms(delta, a)
            t = tick("per-sample squared norms", t)
            for l in range(1, L + 1):
                product = np.matmul(delta[l].T, a[l - 1], out=ws.product[l])
                t = tick(f"product: summed BP4 layer {l}", t)
                sum_w[l] += product
                t = tick("float64 sums (weights, biases, losses, norms)", t)
                ws.ones[:m] @ delta[l]
                t = tick("float64 sums (weights, biases, losses, norms)", t)
            float(losses.sum())
            sq.sum(axis=0)
            t = tick("float64 sums (weights, biases, losses, norms)", t)
            a[L].argmax(axis=1)
            tick("accuracy (arg-max)", t)
        if rep == 0:
            ref = block_partial(arch, params, x, y, classify=True)
            assert all(np.array_equal(sum_w[l], ref.sum_w[l]) for l in range(1, L + 1)), (
                "the timed loop is not block_partial's computation")
            sum_w = [np.zeros((0, 0))] + [np.zeros(w.shape) for w in params.w[1:]]
    total = sum(T.values())
    products = sum(v for k, v in T.items() if k.startswith("product"))
    flops = 6 * rows * arch.n_params * reps
    return {
        "dtype": dtype, "rows": rows, "chunk_rows": c, "reps": reps,
        "ms_per_rep": {k: 1e3 * v / reps for k, v in sorted(T.items(), key=lambda kv: -kv[1])},
        "share": {k: v / total for k, v in sorted(T.items(), key=lambda kv: -kv[1])},
        "products_share": products / total,
        "nominal_gflops": flops / total / 1e9,
        "products_own_gflops": flops / products / 1e9,
    }


def ufuncs(dtype: str, shape: tuple[int, int], reps: int = 200) -> dict:
    """ns per element of numpy's ufuncs the chunk uses, on one chunk's widest array."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    out = np.empty_like(x)
    calls = {"exp": lambda: np.exp(x, out=out), "multiply": lambda: np.multiply(x, x, out=out),
             "divide": lambda: np.divide(1, x, out=out), "add": lambda: np.add(x, 1, out=out)}
    ns = {}
    for name, fn in calls.items():
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        ns[name] = (time.perf_counter() - t) / reps / x.size * 1e9
    return ns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    flags = open("/proc/cpuinfo").read().split("flags", 1)[-1].split("\n", 1)[0].split()
    report: dict = {"machine": {"cpu": platform.processor() or platform.machine(),
                                "avx512f": "avx512f" in flags, "avx2": "avx2" in flags,
                                "numpy": np.__version__},
                    "runs": []}
    with threadpool_limits(1):
        a = np.random.default_rng(0).standard_normal((2048, 2048))
        for dtype in ("float32", "float64"):
            sq = a.astype(dtype)
            sq @ sq
            t = time.perf_counter()
            sq @ sq
            square = 2 * 2048**3 / (time.perf_counter() - t) / 1e9
            run = breakdown(dtype, args.rows, args.reps)
            arch_rows = run["chunk_rows"]
            run["square_product_gflops_1_thread"] = square
            run["ufunc_ns_per_element"] = ufuncs(dtype, (arch_rows, 256))
            report["runs"].append(run)
            print(f"\n{dtype}: chunks of {arch_rows} rows, {run['nominal_gflops']:.1f} GFLOP/s "
                  f"nominal (6NP), {run['nominal_gflops'] / square:.3f} of a 2048^3 product "
                  f"on 1 thread ({square:.1f}); products {run['products_share']:.1%} of the "
                  f"time, at {run['products_own_gflops']:.1f} GFLOP/s nominal")
            for part, ms in run["ms_per_rep"].items():
                print(f"  {part:50s} {ms:8.1f} ms  {run['share'][part]:6.1%}")
            print("  ufuncs, ns per element: " + ", ".join(
                f"{k} {v:.2f}" for k, v in run["ufunc_ns_per_element"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
