"""What reaches the driver per step, and what it costs there (issue 13.1 and 13.4).

Measures, on this machine, the constants of the README's "Scaling" model:

- counts: partials (tree nodes) that reach the driver per step, and their bytes, for B
  blocks on W workers (assign_blocks' runs, tree.nodes_within), against B before the tree;
  pure arithmetic, so it also covers 1B rows (15,259 blocks of 65,536 rows) on 1,000 workers.
- driver: reduce.reduce's time for those partials, for P = 50,122 and 1,000,000
  parameters, and for every block's partial (what the driver did before the tree).
- transfer: the seconds for the driver to ray.get k partials of P float64 from actors.
- runs: real steps on Ray (Run, as `gradpipe train` does) for B = 16 / 128 / 1,024 blocks and
  W = 0, 1, 2, 3 workers: step seconds, partials and bytes from the metrics, the driver's
  reduce time, the read rate (Pool.load) and the compute rate (W = 0).

    python benches/tree_bench.py [--quick] [--json benches/tree-bench-YYYYmmdd.json]

Prints every table and writes the raw figures as JSON (benches/out/tree-bench-STAMP.json by
default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gradpipe.backprop import Partial
from gradpipe.data import Block
from gradpipe.reduce import reduce
from gradpipe.tree import nodes_within
from gradpipe.worker import assign_blocks

HERE = Path(__file__).resolve().parent
BENCH_SIZES = (128, 256, 64, 10)  # the benchmark model of RESULTS.md: P = 50,122


def n_params(sizes: tuple[int, ...]) -> int:
    return sum(sizes[l] * (sizes[l - 1] + 1) for l in range(1, len(sizes)))


def fake_blocks(blocks: int, rows: int = 65536) -> tuple[Block, ...]:
    return tuple(Block(i, "f", i, 0, rows, 0, i * rows) for i in range(blocks))


def sent_nodes(blocks: int, workers: int) -> list[tuple[int, int]]:
    """The tree nodes that reach the driver when assign_blocks splits `blocks` equal blocks
    over `workers` workers (in-process: workers == 0, one node)."""
    groups = assign_blocks(fake_blocks(blocks), max(1, workers))
    return [node for g in groups if g for node in nodes_within(g[0].index, g[-1].index + 1,
                                                               blocks)]


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------- counts

def counts() -> list[dict]:
    rows = []
    for blocks in (64, 1024, 4096, 15259, 152588):
        for workers in (1, 2, 3, 4, 7, 8, 16, 32, 64, 256, 1000):
            if workers > blocks:
                continue
            k = len(sent_nodes(blocks, workers))
            rows.append({"blocks": blocks, "workers": workers, "partials": k,
                         "bound": workers * (math.log2(blocks) + 1),
                         "tight_bound": (workers - 1) * math.ceil(math.log2(blocks)) + 1,
                         "before": blocks, "per_worker": k / workers})
    return rows


# ---------------------------------------------------------------------------- driver

def partial_of(span: tuple[int, int], sizes: tuple[int, ...], rng) -> Partial:
    w = [np.zeros((0, 0))] + [rng.normal(size=(sizes[l], sizes[l - 1]))
                              for l in range(1, len(sizes))]
    b = [np.zeros(0)] + [rng.normal(size=sizes[l]) for l in range(1, len(sizes))]
    return Partial(span[0], 1000, 1.0, w, b, np.ones(len(sizes)), 10, span=span[1] - span[0])


def driver(quick: bool) -> list[dict]:
    """reduce() on the nodes W workers send, and on every block's partial (before)."""
    rng = np.random.default_rng(0)
    rows = []
    models = [BENCH_SIZES] + ([] if quick else [(1000, 999)])  # P = 50,122 and 1,000,000
    for sizes in models:
        p = n_params(sizes)
        budget = 2.1e9  # bytes of partials held at once
        cases = [(blocks, w) for blocks in (256, 4096) for w in (1, 2, 4, 7, 16, 64, 0)]
        for blocks, workers in cases:
            nodes = ([(b, b + 1) for b in range(blocks)] if workers == 0 else
                     sent_nodes(blocks, workers))  # workers 0 here: every block (before)
            if len(nodes) * 8 * p > budget:
                continue
            parts = [partial_of(n, sizes, rng) for n in nodes]
            reduce(parts)  # warm
            times = timed(lambda parts=parts: reduce(parts), 3 if quick else 5)
            t = statistics.median(times)
            rows.append({"parameters": p, "blocks": blocks,
                         "workers": "every block (before)" if workers == 0 else workers,
                         "partials": len(parts), "partial_bytes": 8 * p * len(parts),
                         "seconds": t, "ns_per_add": 1e9 * t / max(1, (len(parts) - 1) * p)
                         if len(parts) > 1 else None, "all": times})
            del parts
    return rows


# ---------------------------------------------------------------------------- transfer

def transfer(quick: bool) -> list[dict]:
    """ray.get of k partials of P float64 from 1 or 2 actors: the driver's receive rate."""
    import ray

    @ray.remote(num_cpus=0.5)
    class Holder:
        def __init__(self, k: int, sizes: tuple[int, ...]) -> None:
            rng = np.random.default_rng(1)
            self.parts = [partial_of((i, i + 1), sizes, rng) for i in range(k)]

        def step(self, _ref) -> list:
            return self.parts

    rows = []
    for sizes in [BENCH_SIZES, (1000, 999)]:
        p = n_params(sizes)
        for actors, k in ((1, 1), (1, 8), (2, 8), (2, 32), (2, 64)):
            if 8 * p * k * actors > (2e8 if quick else 1.1e9):
                continue
            holders = [Holder.remote(k, sizes) for _ in range(actors)]
            ref = ray.put(np.zeros(10))
            ray.get([h.step.remote(ref) for h in holders])  # warm
            times = timed(lambda hs=holders, r=ref: ray.get([h.step.remote(r) for h in hs]),
                          3 if quick else 5)
            t = statistics.median(times)
            total = 8 * p * k * actors
            rows.append({"parameters": p, "actors": actors, "partials": k * actors,
                         "bytes": total, "seconds": t, "gb_per_s": total / t / 1e9,
                         "all": times})
            for h in holders:
                ray.kill(h)
    return rows


# ---------------------------------------------------------------------------- runs

def runs(quick: bool, folder: Path) -> dict:
    """Real steps: Run as `gradpipe train` drives it, on Ray (and in-process for 0)."""
    import gradpipe.train as train_mod
    from gradpipe.synth import synth
    from gradpipe.train import Run, TrainConfig

    rows_total = 32768 if quick else 131072
    reduce_times: list[float] = []
    real_reduce = train_mod.reduce

    def timed_reduce(partials):
        t0 = time.perf_counter()
        out = real_reduce(partials)
        reduce_times.append(time.perf_counter() - t0)
        return out

    train_mod.reduce = timed_reduce
    out_rows = []
    try:
        for blocks in (16, 128, 1024):
            data = folder / f"data-{rows_total}-{blocks}"
            if not data.exists():
                synth(data, rows=rows_total, features=128, classes=10,
                      row_group_size=rows_total // blocks)
            for workers in (0, 1, 2, 3):
                reduce_times.clear()
                config = TrainConfig(data=str(data), out=str(folder / f"run-{blocks}-{workers}"),
                                     workers=workers, hidden=BENCH_SIZES[1:-1], steps=4,
                                     record_every=100, overwrite=True)
                run = Run(config)
                t0 = time.perf_counter()
                run.prepare()  # starts the pool and reads every block (Pool.load)
                prepared = time.perf_counter() - t0
                seen: list[dict] = []
                try:
                    run.execute(lambda done, m, seen=seen: seen.append(m))
                finally:
                    run.close()
                steady = seen[1:]  # step 0 also scales the blocks
                out_rows.append({
                    "blocks": blocks, "workers": workers, "rows": rows_total,
                    "parameters": n_params(BENCH_SIZES), "prepare_seconds": prepared,
                    "data_bytes": run.data_bytes,
                    "step_seconds": statistics.median(m["seconds"] for m in steady),
                    "reduce_seconds": statistics.median(reduce_times[1:]),
                    "partials": [m["partials"] for m in seen],
                    "partial_bytes": [m["partial_bytes"] for m in seen],
                    "all_steps": [m["seconds"] for m in seen],
                })
                print(f"  runs: B {blocks:5d} W {workers}: step "
                      f"{out_rows[-1]['step_seconds']:.3f} s, reduce "
                      f"{1e3 * out_rows[-1]['reduce_seconds']:.2f} ms, partials "
                      f"{out_rows[-1]['partials'][-1]}", flush=True)
    finally:
        train_mod.reduce = real_reduce
    return {"rows": out_rows}


def read_rate(folder: Path, rows_total: int) -> dict:
    """Pool.load on one core: Parquet row groups -> checked numpy arrays, bytes/s."""
    from gradpipe.data import DataSpec, plan
    from gradpipe.worker import BlockSet

    out = {}
    for blocks in (16, 1024):
        data = folder / f"data-{rows_total}-{blocks}"
        dataset = plan(DataSpec(str(data)))
        files = sum(f.stat().st_size for f in data.glob("*.parquet"))
        times = []
        for _ in range(3):
            bs = BlockSet(dataset, list(dataset.blocks), "float32")
            t0 = time.perf_counter()
            held = bs.load()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        out[str(blocks)] = {"seconds": t, "parquet_bytes": files, "array_bytes": held,
                            "parquet_mb_per_s": files / t / 1e6,
                            "rows_per_s": dataset.n_rows / t}
    return out


def machine() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True,
                              text=True).stdout.strip()

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average": os.getloadavg(), "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": git("status", "--short", "--untracked-files=no").splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--data", default=str(HERE / "out" / "tree-data"),
                        help="folder for the synthetic datasets (kept for reruns)")
    args = parser.parse_args()
    started = datetime.now(timezone.utc)
    report: dict = {"started": started.isoformat(timespec="seconds"), "machine": machine(),
                    "quick": args.quick}

    report["counts"] = counts()
    print("partials reaching the driver per step (tree) / before (every block):")
    for r in report["counts"]:
        if r["workers"] in (1, 2, 4, 7, 32, 1000):
            print(f"  B {r['blocks']:6d} W {r['workers']:4d}: {r['partials']:6d} "
                  f"(bound W(log2 B + 1) = {r['bound']:8.0f}; before {r['before']})")

    report["driver"] = driver(args.quick)
    print("driver: reduce() time")
    for r in report["driver"]:
        print(f"  P {r['parameters']:8d} B {r['blocks']:5d} W {r['workers']!s:>21}: "
              f"{r['partials']:5d} partials, {r['partial_bytes'] / 1e6:9.1f} MB, "
              f"{1e3 * r['seconds']:9.2f} ms")

    from gradpipe.worker import ray_init

    ray_init("local", num_cpus=os.cpu_count())
    report["transfer"] = transfer(args.quick)
    print("transfer: ray.get of partials from actors")
    for r in report["transfer"]:
        print(f"  P {r['parameters']:8d} x {r['partials']:3d} from {r['actors']} actors: "
              f"{r['bytes'] / 1e6:8.1f} MB in {1e3 * r['seconds']:8.2f} ms "
              f"({r['gb_per_s']:.2f} GB/s)")

    folder = Path(args.data)
    folder.mkdir(parents=True, exist_ok=True)
    report["runs"] = runs(args.quick, folder)
    report["read"] = read_rate(folder, report["runs"]["rows"][0]["rows"])
    print("read:", {k: f"{v['parquet_mb_per_s']:.0f} MB/s" for k, v in report["read"].items()})
    report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path = Path(args.json) if args.json else (
        HERE / "out" / f"tree-bench-{started.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
