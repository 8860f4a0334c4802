"""Private training (issue 12): gradpipe's DP-SGD against Opacus, its overhead, its accuracy.

    python benches/privacy_bench.py [--only opacus,overhead,accuracy] [--reps 3] [--quick]

opacus    workload P (100,000 x 64, MLP 64-128-10, sigmoid hidden, softmax + cross-entropy,
          float32): private training throughput (samples a second) at clip 1, sigma 1,
          Poisson rate q, gradpipe in-process (2 threads) against Opacus on the CPU (2 torch
          threads; hooks and ghost clipping; its DPDataLoader and plain tensor batches).
overhead  workload L (MLP 128-256-64-10, float32), --l-rows rows in-process: a private
          step against a non-private one, over every row (q = 1) and at q = 0.1.
accuracy  a 100,000-row `gradpipe data synth` dataset (64 features, 10 classes; 20,000 more
          rows from the same teacher held out): held-out accuracy at epsilon 1, 3 and 8
          (delta 1e-5) beside the same run without privacy.

Every comparison runs in rounds, the order rotating; round 0 is a warm-up and is dropped;
ratios are medians of the per-round ratios (the machine is shared). Writes
benches/privacy-{opacus,overhead,accuracy}-DATE.json (raw figures) and prints a summary.
Needs the bench extra (torch, opacus) for `opacus`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "out" / "data"
STAMP = datetime.now(timezone.utc).strftime("%Y%m%d")


def synth_data(name: str, rows: int, features: int, files: int, row_group: int = 65536
               ) -> Path:
    """benches/out/data/NAME, made once with gradpipe's synth (10 classes, seed 0)."""
    from gradpipe.synth import synth

    path = DATA / name
    marker = path / ".bench.json"
    want = {"rows": rows, "features": features, "files": files, "row_group": row_group}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return path
    synth(path, rows=rows, features=features, classes=10, files=files,
          row_group_size=row_group, overwrite=path.exists())
    marker.write_text(json.dumps(want))
    return path


def rounds(systems: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run every system once per round, rotating the order; round 0 is dropped."""
    names = list(systems)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            value = systems[name]()
            if r > 0:
                out[name].append(value)
            print(f"  round {r} {name}: {value:,.4g}", flush=True)
    return out


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- gradpipe


def gradpipe_rate(data: Path, hidden: tuple[int, ...], steps: int, out: str | None = None,
                  threads: int | None = None, **dp: Any) -> tuple[float, float]:
    """(samples a second, seconds a step) of `steps` steps in-process, data loading and
    worker start left out (prepare), everything else of the loop in."""
    from gradpipe.train import Run, TrainConfig

    config = TrainConfig(data=str(data), hidden=hidden, workers=0, steps=steps,
                         standardize=False, lr=0.5, out=out, overwrite=out is not None, **dp)
    run = Run(config)
    run.prepare()
    if threads is not None:  # blocks computed at once in-process (default: the CPUs)
        assert run.pool.local is not None
        run.pool.local.threads = threads
    seen = [0]
    try:
        t = time.perf_counter()
        run.execute(lambda s, m: seen.__setitem__(0, seen[0] + m["samples"]))
        dt = time.perf_counter() - t
    finally:
        run.close()
    return seen[0] / dt, dt / steps


# ----------------------------------------------------------------------------- opacus


def opacus_rate(x: Any, y: Any, q: float, steps: int, mode: str, loader: bool,
                threads: int, seed: int = 0) -> float:
    """Samples a second of Opacus DP-SGD (clip 1, sigma 1, Poisson rate q) on the same MLP."""
    import torch
    from opacus import PrivacyEngine

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    n, d = x.shape
    model = torch.nn.Sequential(torch.nn.Linear(d, 128), torch.nn.Sigmoid(),
                                torch.nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                              batch_size=max(1, round(q * n)))
    criterion = torch.nn.CrossEntropyLoss()
    kw = dict(module=model, optimizer=optimizer, data_loader=data_loader,
              noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    engine = PrivacyEngine(accountant="rdp")
    if mode == "ghost":
        model, optimizer, criterion, data_loader = engine.make_private(
            criterion=criterion, grad_sample_mode="ghost", **kw)
    else:
        model, optimizer, data_loader = engine.make_private(**kw)
    g = torch.Generator().manual_seed(seed)

    def batches():
        if loader:
            while True:
                yield from data_loader
        while True:
            idx = (torch.rand(n, generator=g) < q).nonzero().squeeze(1)
            yield x[idx], y[idx]

    seen = 0
    it = batches()
    t = time.perf_counter()
    for _ in range(steps):
        xb, yb = next(it)
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        seen += len(xb)
    return seen / (time.perf_counter() - t)


def bench_opacus(args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq
    import torch

    warnings.filterwarnings("ignore")
    rows = 20_000 if args.quick else 100_000
    data = synth_data(f"privacy-P-{rows}", rows, 64, 2)
    table = pq.read_table(data)
    x = torch.tensor(np.column_stack([table.column(f"x{i}").to_numpy() for i in range(64)])
                     .astype(np.float32))
    y = torch.tensor(table.column("label").to_numpy())
    dp = dict(dp_clip=1.0, dp_noise=1.0, dp_delta=1e-5)
    report: dict = {"workload": f"P: {rows:,} x 64, MLP 64-128-10 sigmoid/softmax, float32",
                    "clip": 1.0, "noise_multiplier": 1.0,
                    "gradpipe": "in-process (--workers 0), 2 threads (2 blocks), no run "
                    "folder; also with a run folder (default recording) and with 1 thread",
                    "opacus": "make_private, poisson_sampling, flat clipping; 1 or 2 torch "
                    "threads; batches from its DPDataLoader or by indexing the tensors",
                    "rates": {}}
    runs = tempfile_dir("privacy-opacus")
    for q, steps, o_steps in ((0.01, 100, 30), (0.1, 10, 5)):
        print(f"opacus, q = {q}", flush=True)
        systems = {
            "gradpipe": lambda q=q, s=steps: gradpipe_rate(data, (128,), s, batch_rate=q,
                                                           **dp)[0],
            "gradpipe (run folder)": lambda q=q, s=steps: gradpipe_rate(
                data, (128,), s, out=str(runs / "run"), batch_rate=q, **dp)[0],
            "gradpipe, 1 thread": lambda q=q, s=steps: gradpipe_rate(
                data, (128,), s, threads=1, batch_rate=q, **dp)[0],
        }
        for mode, loader, threads in (("hooks", True, 1), ("hooks", False, 1),
                                      ("ghost", False, 1), ("hooks", False, 2),
                                      ("ghost", False, 2)):
            name = (f"opacus {mode}, {threads} thread{'s' * (threads > 1)}, "
                    f"{'DPDataLoader' if loader else 'tensor batches'}")
            systems[name] = (lambda q=q, s=o_steps, m=mode, lo=loader, t=threads:
                             opacus_rate(x, y, q, s, m, lo, t))
        measured = rounds(systems, args.reps)
        entry: dict = {"expected_batch": q * rows, "samples_per_s": measured, "ratios": {}}
        opacus = [n for n in systems if n.startswith("opacus")]
        for name in opacus:
            entry["ratios"][name] = median_ratio(measured["gradpipe"], measured[name])
        # against the fastest Opacus of each round
        best = [max(measured[n][r] for n in opacus) for r in range(args.reps)]
        entry["ratios"]["fastest opacus of each round"] = median_ratio(measured["gradpipe"],
                                                                       best)
        report["rates"][str(q)] = entry
    return report


# ----------------------------------------------------------------------------- overhead


def bench_overhead(args: argparse.Namespace) -> dict:
    rows = 50_000 if args.quick else args.l_rows
    data = synth_data(f"privacy-L-{rows}", rows, 128, 2)
    hidden = (256, 64)
    dp = dict(dp_clip=1.0, dp_noise=1.0, dp_delta=1e-5)
    report: dict = {"workload": f"L proxy: {rows:,} x 128, MLP 128-256-64-10, float32, "
                    "in-process (--workers 0, 2 threads), no run folder", "cases": {}}
    for q, steps in ((1.0, 4), (0.1, 12)):
        print(f"overhead, q = {q}", flush=True)
        plain = {"batch_rate": q} if q < 1 else {}
        systems = {
            "non-private": lambda p=plain, s=steps: gradpipe_rate(data, hidden, s, **p)[1],
            "private": lambda q=q, s=steps: gradpipe_rate(data, hidden, s, batch_rate=q,
                                                          **dp)[1],
        }
        measured = rounds(systems, args.reps)
        report["cases"][str(q)] = {
            "seconds_per_step": measured,
            "overhead": median_ratio(measured["private"], measured["non-private"]) - 1,
        }
    return report


# ----------------------------------------------------------------------------- accuracy


def bench_accuracy(args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq

    from gradpipe.synth import _teacher
    from gradpipe.train import TrainConfig, train

    rows = 20_000 if args.quick else 100_000
    every = rows // 5
    whole = synth_data(f"privacy-acc-{rows}", rows + every, 64, 6, row_group=every)
    train_dir, val_dir = DATA / f"privacy-acc-{rows}-train", DATA / f"privacy-acc-{rows}-val"
    for d in (train_dir, val_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    parts = sorted(whole.glob("part-*.parquet"))
    for p in parts[:-1]:
        os.link(p, train_dir / p.name)
    os.link(parts[-1], val_dir / parts[-1].name)
    # the teacher's own accuracy on the held-out rows: the ceiling (labels are drawn)
    val = pq.read_table(val_dir)
    xv = np.column_stack([val.column(f"x{i}").to_numpy() for i in range(64)]).astype(float)
    w1, w2 = _teacher(0, 64, 10)
    ceiling = float(((np.tanh(xv @ w1) @ w2).argmax(1) == val.column("label").to_numpy()).mean())
    q, steps, lr = 0.01, (300 if args.quick else 1000), 1.0
    report: dict = {"data": f"gradpipe data synth: {rows:,} training rows, 64 features, "
                    f"10 classes; {every:,} held-out rows of the same teacher",
                    "model": "64-128-10 sigmoid/softmax, float32, --no-standardize",
                    "batch_rate": q, "steps": steps, "lr": lr, "clip": 1.0, "delta": 1e-5,
                    "teacher_accuracy": ceiling, "runs": []}
    runs = tempfile_dir("privacy-acc")
    for seed in args.seeds:
        for eps in (None, 1.0, 3.0, 8.0):
            dp = {} if eps is None else dict(dp_clip=1.0, dp_epsilon=eps, dp_delta=1e-5)
            t = time.perf_counter()
            m = train(TrainConfig(data=str(train_dir), val=str(val_dir), hidden=(128,),
                                  workers=0, steps=steps, lr=lr, batch_rate=q, seed=seed,
                                  standardize=False, record_every=0, overwrite=True,
                                  out=str(runs / "run"), **dp))
            info = json.loads((runs / "run" / "run.json").read_text())
            row = {"seed": seed, "epsilon_target": eps, "epsilon": m.get("epsilon"),
                   "noise_multiplier": (info.get("privacy") or {}).get("noise_multiplier"),
                   "val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"],
                   "seconds": time.perf_counter() - t}
            print(f"  {row}", flush=True)
            report["runs"].append(row)
    return report


def tempfile_dir(name: str) -> Path:
    path = HERE / "out" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="opacus,overhead,accuracy")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--l-rows", type=int, default=200_000)
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")],
                        default=[0, 1])
    args = parser.parse_args()
    parts = {"opacus": bench_opacus, "overhead": bench_overhead, "accuracy": bench_accuracy}
    for name in args.only.split(","):
        t = time.perf_counter()
        report = parts[name](args)
        report["seconds"] = time.perf_counter() - t
        report["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        report["cpus"] = len(os.sched_getaffinity(0))
        report["quick"] = args.quick
        path = HERE / f"privacy-{name}-{STAMP}{'-quick' if args.quick else ''}.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
