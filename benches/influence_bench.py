"""TracIn-CP influence by ghost dot products against the explicit method (issue 11).

Workload P's model (MLP 64-128-10, sigmoid hidden, softmax + cross_entropy, float64) trained
for 40 full-batch steps on 100,000 synthetic rows with a checkpoint every 10 steps: 5
checkpoints (steps 0, 10, 20, 30, 40). 1,000 test rows from the same teacher network.

    /work/venv/bin/python benches/influence_bench.py                 # 100,000 x 1,000
    /work/venv/bin/python benches/influence_bench.py --train-rows 20000

Measured, one process on this machine's cores:
  ghost     the full influence matrix (train x test) by ghost dot products: per checkpoint
            and tile of 2,048 training rows, delta and [a, 1] of both sides, two products
            per layer (influence.ghost_factors, ghost_add); the tiles shared by 2 threads
            with one BLAS thread each, as a gradpipe worker computes its blocks
  explicit  materialise every per-sample gradient (backprop.per_sample_grads, the BP4
            outer products, 9,610 numbers a sample) of the same tiles and test rows, then
            one matrix product per tile, G_train @ G_test^T; numpy with 1 BLAS thread
            (--explicit-threads)
  command   `gradpipe influence RUN --test TEST --top 10 --dtype float64 --workers 0`,
            called in-process (planning, reading, the tiles, top 10 per test sample, writing)
Reported: wall time and CPU time (all threads of the process) per round, the order of the
three rotating; on a shared machine the CPU time is the stable one. It also checks that
the ghost matrix equals the explicit one to 1e-9 (relative to the largest
influence), and that the command's proponents and opponents are the explicit matrix's.
Writes benches/influence-YYYYMMDD.json. Data and runs go to benches/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from gradpipe.backprop import deltas, per_sample_grads
from gradpipe.influence import (
    TRAIN_ROWS,
    InfluenceConfig,
    ghost_add,
    ghost_factors,
    influence,
)
from gradpipe.model import forward
from gradpipe.outputs import read_model, read_weights
from gradpipe.recorder import read_metrics
from gradpipe.synth import _teacher, synth, synth_group

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benches" / "out" / "influence"


def make_data(train_rows: int, test_rows: int) -> tuple[Path, Path]:
    train = OUT / f"train-{train_rows}"
    if not train.exists():
        synth(train, rows=train_rows, features=64, classes=10, files=2, seed=0)
    test = OUT / f"test-{test_rows}"
    if not test.exists():
        # The same teacher as the training rows (seed 0), from a row group they do not use.
        table = synth_group(0, 10_000, test_rows, 64, 10, 1, _teacher(0, 64, 10))
        test.mkdir(parents=True)
        pq.write_table(table, test / "part-00000.parquet")
    return train, test


def train_run(train: Path, steps: int, every: int) -> Path:
    run = OUT / f"run-{train.name}-{steps}"
    if not (run / "weights.parquet").exists():
        subprocess.run([sys.executable, "-m", "gradpipe", "train", str(train), "--hidden", "128",
                        "--dtype", "float64", "--steps", str(steps), "--checkpoint-every",
                        str(every), "--workers", "0", "--out", str(run), "--overwrite",
                        "--quiet"], check=True)
    return run


def read_xy(path: Path, model) -> tuple[np.ndarray, np.ndarray]:
    """Standardized features and one-hot labels, as the workers make them (float64)."""
    table = pa.concat_tables([pq.read_table(f) for f in sorted(path.glob("*.parquet"))])
    x = np.column_stack([table.column(f).to_numpy() for f in model.features]).astype(np.float64)
    x -= model.standardize[0]
    x /= model.standardize[1]
    y = np.eye(10)[table.column("label").to_numpy()]
    return x, y


def checkpoints(run: Path) -> list[tuple[int, float, object]]:
    lr = dict(zip(*read_metrics(run).select(["step", "lr"]).to_pydict().values(), strict=True))
    out = []
    for folder in sorted((run / "checkpoints").iterdir()):
        step = int(folder.name.split("-")[1])
        _, params, _, _ = read_weights(folder / "weights.parquet")
        out.append((step, float(lr.get(step, lr.get(step - 1))), params))
    return out


def ghost_matrix(arch, cks, x, y, xt, yt, threads: int) -> np.ndarray:
    """The full matrix, tiles of TRAIN_ROWS rows split over `threads` threads of one BLAS
    thread each (as a worker computes its blocks)."""
    m = np.zeros((len(x), len(xt)))
    test = [ghost_factors(arch, p, xt, yt, eta) for _, eta, p in cks]
    starts = list(range(0, len(x), TRAIN_ROWS))

    def tile(start: int) -> None:
        rows = slice(start, start + TRAIN_ROWS)
        for (_, _, p), te in zip(cks, test, strict=True):
            ghost_add(ghost_factors(arch, p, x[rows], y[rows]), te, m[rows])

    with threadpool_limits(1, "blas"), ThreadPoolExecutor(threads) as pool:
        list(pool.map(tile, starts))
    return m


def explicit_matrix(arch, cks, x, y, xt, yt, threads: int) -> tuple[np.ndarray, dict]:
    """Materialise the per-sample gradients, then one matrix product per tile."""
    m = np.zeros((len(x), len(xt)))
    seconds = {"materialise": 0.0, "matmul": 0.0}
    with threadpool_limits(threads, "blas"):
        for _, eta, p in cks:
            a, z = forward(arch, p, xt)
            g_test = per_sample_grads(deltas(arch, p, a, z, yt), a)  # (n_test, P)
            for start in range(0, len(x), TRAIN_ROWS):
                rows = slice(start, start + TRAIN_ROWS)
                t0 = time.perf_counter()
                a, z = forward(arch, p, x[rows])
                g = per_sample_grads(deltas(arch, p, a, z, y[rows]), a)  # (m, P)
                t1 = time.perf_counter()
                m[rows] += eta * (g @ g_test.T)
                t2 = time.perf_counter()
                seconds["materialise"] += t1 - t0
                seconds["matmul"] += t2 - t1
    return m, seconds


def expected_top(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per test sample (column): the k largest positive and k most negative, ties by row."""
    rows = np.arange(m.shape[0])
    pro, opp = [], []
    for j in range(m.shape[1]):
        col = m[:, j]
        order = np.lexsort((rows, -col))
        pro.append([i for i in order[:k] if col[i] > 0])
        order = np.lexsort((rows, col))
        opp.append([i for i in order[:k] if col[i] < 0])
    return pro, opp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-rows", type=int, default=100_000)
    ap.add_argument("--test-rows", type=int, default=1_000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--explicit-threads", type=int, default=1,
                    help="BLAS threads of the explicit method (1: its CPU time is its work; "
                         "OpenBLAS threads spin between calls, ~10%% here)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (order rotates)")
    ap.add_argument("--out", type=Path, default=None, help="JSON report path")
    args = ap.parse_args()

    train, test = make_data(args.train_rows, args.test_rows)
    run = train_run(train, args.steps, args.checkpoint_every)
    model = read_model(run)
    arch = model.arch
    cks = checkpoints(run)
    x, y = read_xy(train, model)
    xt, yt = read_xy(test, model)
    print(f"{len(x)} training x {len(xt)} test rows, model {arch.sizes}, {arch.n_params} "
          f"parameters, {len(cks)} checkpoints {[s for s, _, _ in cks]}", flush=True)

    # Rounds, the order rotating, as benches/bench.py does: the machine is shared, so the
    # ratio of each round (both sides under the same load) is what is reported, by median.
    result = OUT / "influence.parquet"
    times: dict[str, list[float]] = {"ghost": [], "command": [], "explicit": []}
    # CPU seconds of this process (all its threads): on a machine shared with other jobs,
    # wall time swings 2-4x from one run to the next, CPU time by a few percent.
    cpu: dict[str, list[float]] = {"ghost": [], "command": [], "explicit": []}
    parts: dict[str, list[float]] = {"materialise": [], "matmul": []}

    def run_ghost() -> None:
        nonlocal ghost
        t0, c0 = time.perf_counter(), time.process_time()
        ghost = ghost_matrix(arch, cks, x, y, xt, yt, args.threads)
        times["ghost"].append(time.perf_counter() - t0)
        cpu["ghost"].append(time.process_time() - c0)

    def run_command() -> None:
        nonlocal summary
        result.unlink(missing_ok=True)
        t0, c0 = time.perf_counter(), time.process_time()
        summary = influence(InfluenceConfig(run=str(run), test=str(test), out=str(result),
                                            top=args.top, dtype="float64", workers=0))
        times["command"].append(time.perf_counter() - t0)
        cpu["command"].append(time.process_time() - c0)

    def run_explicit() -> None:
        nonlocal explicit
        t0, c0 = time.perf_counter(), time.process_time()
        explicit, split = explicit_matrix(arch, cks, x, y, xt, yt, args.explicit_threads)
        times["explicit"].append(time.perf_counter() - t0)
        cpu["explicit"].append(time.process_time() - c0)
        for k, v in split.items():
            parts[k].append(v)

    ghost = explicit = np.empty(0)
    summary: dict = {}
    order = [run_ghost, run_command, run_explicit]
    for r in range(args.rounds):
        for f in order[r % 3:] + order[: r % 3]:
            f()
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s ({cpu[k][-1]:.2f} s CPU)"
                                         for k, v in times.items()), flush=True)
    ratio = {k: [e / g for e, g in zip(times["explicit"], times[k], strict=True)]
             for k in ("ghost", "command")}
    t_ghost, t_command, t_explicit = (float(np.median(times[k]))
                                      for k in ("ghost", "command", "explicit"))

    scale = float(np.abs(explicit).max())
    err = float(np.abs(ghost - explicit).max())
    big = np.abs(explicit) > 1e-6 * scale
    rel = float((np.abs(ghost - explicit)[big] / np.abs(explicit)[big]).max())
    # The command's rows against the explicit matrix: the same samples, the same values.
    table = pq.read_table(result)
    pro, opp = expected_top(explicit, args.top)
    got: dict[tuple[int, str], list[int]] = {}
    for t, kind, i in zip(table.column("test_sample").to_pylist(), table.column("kind")
                          .to_pylist(), table.column("train_sample").to_pylist(), strict=True):
        got.setdefault((t, kind), []).append(i)
    same = all(got.get((j, "proponent"), []) == pro[j] and got.get((j, "opponent"), []) == opp[j]
               for j in range(len(xt)))
    vals = table.column("influence").to_numpy()
    want = explicit[table.column("train_sample").to_numpy(), table.column("test_sample")
                    .to_numpy()]
    cmd_err = float(np.abs(vals - want).max() / scale)
    report = {
        "bench": "influence", "date": date.today().isoformat(),
        "train_rows": len(x), "test_rows": len(xt), "model": list(arch.sizes),
        "parameters": arch.n_params, "dtype": "float64",
        "checkpoints": [s for s, _, _ in cks], "lr": [e for _, e, _ in cks],
        "threads": args.threads, "explicit_blas_threads": args.explicit_threads,
        "train_tile_rows": TRAIN_ROWS,
        "rounds": args.rounds,
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "explicit_seconds_split": {k: [round(t, 3) for t in v] for k, v in parts.items()},
        "median_seconds": {"ghost": round(t_ghost, 3), "command": round(t_command, 3),
                           "explicit": round(t_explicit, 3)},
        "speedup_median_of_rounds": {k: round(float(np.median(v)), 2)
                                     for k, v in ratio.items()},
        "speedup_fastest_runs": {k: round(min(times["explicit"]) / min(times[k]), 2)
                                 for k in ("ghost", "command")},
        "cpu_seconds": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
        "speedup_cpu_median": {k: round(float(np.median(cpu["explicit"]))
                                        / float(np.median(cpu[k])), 2)
                               for k in ("ghost", "command")},
        "max_abs_error_over_max_influence": err / scale,
        "max_relative_error_where_above_1e-6_of_max": rel,
        "max_influence": scale,
        "command_rows": table.num_rows, "command_top_matches_explicit": same,
        "command_max_error_over_max_influence": cmd_err,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "numpy": np.__version__},
        "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
        "command_summary": {k: summary[k] for k in ("rows", "test_samples", "training_samples",
                                                    "checkpoints", "lr")},
    }
    print(json.dumps({k: report[k] for k in ("median_seconds", "speedup_median_of_rounds",
                                             "speedup_fastest_runs", "speedup_cpu_median",
                                             "max_abs_error_over_max_influence",
                                             "max_relative_error_where_above_1e-6_of_max",
                                             "command_top_matches_explicit",
                                             "command_max_error_over_max_influence")}, indent=2))
    out = args.out or REPO / "benches" / f"influence-{date.today():%Y%m%d}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
