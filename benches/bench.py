"""gradpipe benchmarks: step time, FLOP rate, per-sample gradients, start-up and memory.

One command runs every workload side by side in one process tree and prints medians and
ratios (the machine is shared: only ratios measured within one run mean anything):

    python benches/bench.py [--quick] [--only L,P,S,M] [--reps N]

Workloads (benches/README.md says more; data is made with `gradpipe data synth` into
benches/out/data/ and reused):

    L  1,000,000 x 128 features, 10 classes, 8 files; MLP 128-256-64-10 (50,122 params),
       one full-batch gradient per step: gradpipe on Ray (1, 2 workers), gradpipe in-process
       (workers=0), PyTorch loss.backward(), numpy's matmuls alone; py-spy profile.
    P  100,000 x 64, MLP 64-128-10: per-sample norms and full per-sample gradients,
       against torch.func vmap(grad).
    S  `gradpipe train data/digits --steps 1 --out X`, end to end, and where the time goes.
    M  workload L at 1x, 4x, 8x the rows: peak RSS of the workers, in memory vs streaming.

Writes benches/out/report-STAMP.md and results-STAMP.json. Plain Python; torch, psutil,
threadpoolctl and py-spy are optional (a missing one skips its part with a note).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
DATA = OUT / "data"

L_HIDDEN = (256, 64)
P_HIDDEN = (128,)
CHUNK = 8192  # rows per pass in gradpipe.backprop (CHUNK_ROWS); the roofline uses it too


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; --quick scales every one down."""

    l_rows: int = 1_000_000
    p_rows: int = 100_000
    p_sub_rows: int = 20_000  # rows for torch vmap norms (rows/s is what is compared)
    p_full_rows: int = 10_000  # rows for full per-sample gradients (float64 Parquet is large)
    # Adjacent none/norms pairs for the norms targets: one pair's ratio spreads by about
    # +-10% on a shared host, so the median of 15 pairs was good to about +-5% (runs gave
    # 1.05 and 1.12 for the same code); 61 pairs narrow its 95% interval to about +-2.5%.
    p_pairs: int = 61
    m_rows: int = 1_000_000  # 1x of workload M
    m_scales: tuple[int, ...] = (1, 4, 8)
    m_files: int = 8  # 8 files of 1M+ rows: 65,536-row blocks at every scale
    reps: int = 5
    s_reps: int = 3
    profile_steps: int = 4
    profile_seconds: float = 10.0  # and at least this long, for enough samples
    execute_steps: int = 4  # Run.execute cross-check (per-step `seconds` in metrics.parquet)
    roofline_reps: int = 7


FULL = Sizes()
QUICK = Sizes(l_rows=100_000, p_rows=20_000, p_sub_rows=5_000, p_full_rows=2_000, p_pairs=5,
              m_rows=100_000, m_scales=(1, 4, 8), m_files=1, reps=3, s_reps=1, profile_steps=3,
              profile_seconds=3.0, execute_steps=3, roofline_reps=5)


# ---------------------------------------------------------------------------- reporting


class Report:
    """Prints as it goes and keeps the markdown and the raw figures for the files."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.data: dict = {}
        self.targets: list[dict] = []

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list]) -> None:
        self.say("| " + " | ".join(header) + " |")
        self.say("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            self.say("| " + " | ".join(str(c) for c in r) + " |")
        self.say()

    def target(self, name: str, measured: str, value: float | None, limit: float,
               higher_is_better: bool) -> None:
        if value is None:
            met = "n/a"
        else:
            met = "met" if (value >= limit if higher_is_better else value <= limit) else "missed"
        sign = ">=" if higher_is_better else "<="
        row = {"target": name, "measured": measured, "value": value,
               "limit": f"{sign} {limit:g}", "status": met}
        self.targets.append(row)
        self.say(f"TARGET {name}: {measured} -> {fmt3(value)} (need {sign} {limit:g}): {met}")


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt3(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if abs(x) < 100 else fmt(x))


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:,.1f} ms"


def mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.0f} MiB"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------- process memory (RSS)


def _status(pid: int, key: str) -> int:
    """A VmRSS/VmHWM line of /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss(pid: int) -> int:
    return _status(pid, "VmRSS")


def hwm(pid: int) -> int:
    """Peak RSS since the process started or since reset_peak(pid)."""
    return _status(pid, "VmHWM")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/PID/clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------ round-robin timing


@dataclass
class System:
    """One thing to time: fn runs one step (or one pass); post cleans up untimed."""

    name: str
    fn: Callable[[], object]
    pids: tuple[int, ...] = ()  # other processes whose peak RSS to record (Ray actors)
    post: Callable[[], None] | None = None
    rows: int | None = None  # rows one call processes, for rows/s
    min_seconds: float = 0.0  # repeat fn within one timed call until it takes this long
    inner: int = 1  # calls of fn per timed call, set in the warm-up round
    times: list[float] = field(default_factory=list)
    driver_peak: int = 0  # largest VmHWM - VmRSS-before of the driver over the calls
    driver_hwm: int = 0
    worker_hwm: dict[int, int] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return median(self.times)


def interleave(systems: list[System], reps: int) -> None:
    """Run each system once per round, round after round, rotating the order; round 0 warms up.

    Every round runs all systems back to back, so a change in the machine's load hits all
    of them alike; ratios are then taken per round (see `ratio`).
    """
    me = os.getpid()
    for s in systems:
        s.times, s.inner = [], 1
    for r in range(reps + 1):
        LOADS.append((systems[0].name, r, os.getloadavg()[0]))
        k = r % len(systems)
        for s in systems[k:] + systems[:k]:
            for pid in (me, *s.pids):
                reset_peak(pid)
            before = rss(me)
            t = time.perf_counter()
            for _ in range(s.inner):
                s.fn()
            dt = (time.perf_counter() - t) / s.inner
            peak = hwm(me)
            workers = {pid: hwm(pid) for pid in s.pids}
            if s.post is not None:
                s.post()
            if r == 0:
                s.times.append(float("nan"))  # placeholder keeps rounds aligned
                s.inner = max(1, int(-(-s.min_seconds // dt)))
                continue
            s.times.append(dt)
            s.driver_peak = max(s.driver_peak, peak - before)
            s.driver_hwm = max(s.driver_hwm, peak)
            for pid, v in workers.items():
                s.worker_hwm[pid] = max(s.worker_hwm.get(pid, 0), v)
    for s in systems:
        s.times = s.times[1:]


LOADS: list[tuple[str, int, float]] = []  # (first system of a table, round, 1-min load average)


def paired(a: System, b: System, pairs: int) -> list[float]:
    """b's time / a's time in `pairs` back-to-back pairs, the order alternating (a b, b a,
    ...): for a small difference between two systems (per-sample norms added to a step),
    adjacent calls see the same host; a round of seven systems spreads them over seconds.
    Each call repeats fn `inner` times, as set by `interleave`'s warm-up round."""
    out = []
    for i in range(pairs):
        t: dict[str, float] = {}
        for s in ((a, b) if i % 2 == 0 else (b, a)):
            t0 = time.perf_counter()
            for _ in range(s.inner):
                s.fn()
            t[s.name] = (time.perf_counter() - t0) / s.inner
            if s.post is not None:
                s.post()
        out.append(t[b.name] / t[a.name])
    return out


def median_interval(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of the population `xs` was drawn from:
    the order statistics whose ranks bound it with probability `level` (the binomial count
    of values below the median, by its normal approximation)."""
    xs = sorted(xs)
    n = len(xs)
    half = statistics.NormalDist().inv_cdf(0.5 + level / 2) * n**0.5 / 2
    lo, hi = max(0, int(n / 2 - half)), min(n - 1, int(n / 2 + half + 0.999))
    return xs[lo], xs[hi]


def quartiles(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4)
    return f"{q[0]:.3f}-{q[2]:.3f}"


def ratio(a: System, b: System) -> float:
    """Median over rounds of a's time / b's time in the same round."""
    return median([x / y for x, y in zip(a.times, b.times, strict=True)])


def fastest(a: System, b: System) -> str:
    """The ratio of the two fastest runs: the least disturbed by other load."""
    return f"fastest runs: {fmt(min(a.times) / min(b.times))}"


def timing_table(rep: Report, systems: list[System], base: System) -> None:
    rows = []
    for s in systems:
        spread = f"{min(s.times) * 1e3:,.0f}-{max(s.times) * 1e3:,.0f}"
        rate = f"{s.rows / s.median:,.0f}" if s.rows else ""
        workers = ", ".join(mib(v) for v in s.worker_hwm.values())
        rows.append([s.name, ms(s.median), spread, fmt(ratio(s, base)), rate,
                     mib(s.driver_hwm), mib(s.driver_peak), workers])
    rep.table(["system", "median", "min-max ms", f"x {base.name}", "rows/s",
               "driver peak RSS", "driver +peak in call", "worker peak RSS"], rows)
    rep.data.setdefault("systems", {}).update({
        s.name: {"times": s.times, "median": s.median, "rows": s.rows,
                 "driver_hwm": s.driver_hwm, "driver_peak_delta": s.driver_peak,
                 "worker_hwm": list(s.worker_hwm.values())} for s in systems})


# --------------------------------------------------------------------------------- data


def gradpipe_bin() -> str:
    here = Path(sys.executable).parent / "gradpipe"
    return str(here) if here.exists() else (shutil.which("gradpipe") or "gradpipe")


def dataset(rep: Report, name: str, rows: int, features: int, files: int) -> str:
    """benches/out/data/NAME-ROWS, made once with `gradpipe data synth` (10 classes)."""
    path = DATA / f"{name}-{rows}"
    marker = path / ".bench.json"  # list_files skips dot-files, so this is not data
    want = {"rows": rows, "features": features, "files": files, "classes": 10}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return str(path)
    cmd = [gradpipe_bin(), "data", "synth", str(path), "--rows", str(rows), "--features",
           str(features), "--classes", "10", "--files", str(files), "--overwrite"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    marker.write_text(json.dumps(want))
    rep.say(f"made {path} in {time.perf_counter() - t:.1f} s: {' '.join(cmd[1:])}")
    return str(path)


def concat_blocks(blocks) -> tuple:
    import numpy as np

    return (np.concatenate([d.x for d in blocks]), np.concatenate([d.y for d in blocks]))


# ----------------------------------------------------------------------------- roofline


def matmul_mix(sizes: tuple[int, ...], m: int, dtype: str, seed: int = 0) -> list[tuple]:
    """The matrix products of one chunk's forward and backward pass, as gradpipe does them.

    (name, fn, flops): forward a[l-1] @ w[l].T, BP2 delta[l+1] @ w[l+1] for l = L-1..1,
    and the summed BP4 delta[l].T @ a[l-1].
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    L = len(sizes) - 1
    a = [rng.standard_normal((m, n)).astype(dtype) for n in sizes]
    w = [None] + [rng.standard_normal((sizes[l], sizes[l - 1])).astype(dtype)
                  for l in range(1, L + 1)]
    d = [None] + [rng.standard_normal((m, sizes[l])).astype(dtype) for l in range(1, L + 1)]
    ops = []
    for l in range(1, L + 1):
        ops.append((f"fwd{l} ({m}x{sizes[l-1]})@({sizes[l-1]}x{sizes[l]})",
                    lambda l=l: a[l - 1] @ w[l].T, 2 * m * sizes[l] * sizes[l - 1]))
    for l in range(L - 1, 0, -1):
        ops.append((f"bp2 l={l} ({m}x{sizes[l+1]})@({sizes[l+1]}x{sizes[l]})",
                    lambda l=l: d[l + 1] @ w[l + 1], 2 * m * sizes[l + 1] * sizes[l]))
    for l in range(1, L + 1):
        ops.append((f"grad{l} ({sizes[l]}x{m})@({m}x{sizes[l-1]})",
                    lambda l=l: d[l].T @ a[l - 1], 2 * m * sizes[l] * sizes[l - 1]))
    return ops


SQUARE = 4096  # numpy's matrix-product rate: one SQUARE x SQUARE x SQUARE product


def square_product(dtype: str, threads: int | None) -> tuple[Callable[[], None], float]:
    """(one SQUARE^3 product with `threads` BLAS threads, its FLOPs): the rate the issue
    states the targets against ("numpy's own 4096x4096 matrix product")."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((SQUARE, SQUARE)).astype(dtype)
    b = rng.standard_normal((SQUARE, SQUARE)).astype(dtype)
    out = np.empty((SQUARE, SQUARE), dtype)

    def fn() -> None:
        with threads_limit(threads):
            np.matmul(a, b, out=out)
    return fn, 2.0 * SQUARE**3


def time_calls(fn: Callable, min_seconds: float = 0.05) -> float:
    """Seconds per call, from a loop that runs at least min_seconds."""
    fn()
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_seconds:
            return t / n
        n *= 2


def threads_limit(n: int | None):
    """A context that sets numpy's BLAS threads (threadpoolctl), or does nothing."""
    if n is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


def roofline(rep: Report, sz: Sizes) -> None:
    """numpy's own matmul rate on this machine, per dtype and thread count."""
    rep.say("## Roofline: numpy matmul rate on this machine")
    rep.say()
    from gradpipe.model import Architecture

    sizes = (128, *L_HIDDEN, 10)
    results: dict = {}
    cells = [(dt, th) for dt in ("float32", "float64") for th in (1, 2)]
    per: dict = {c: {} for c in cells}
    chunk_by = {dt: engine_chunk(Architecture(sizes, dtype=dt)) for dt in ("float32", "float64")}
    ops_by = {dt: matmul_mix(sizes, chunk_by[dt], dt) for dt in ("float32", "float64")}
    squares = {(dt, th): square_product(dt, th) for dt, th in cells}
    square_t: dict = {c: [] for c in cells}
    for r in range(sz.roofline_reps):  # interleaved: a load change hits all cells alike
        for dt, th in cells:
            with threads_limit(th):
                for name, fn, _flops in ops_by[dt]:
                    per[(dt, th)].setdefault(name, []).append(time_calls(fn))
            if r < 3:  # a 4096^3 product takes 0.3-3 s: three rounds
                fn, _ = squares[(dt, th)]
                t = time.perf_counter()
                fn()
                square_t[(dt, th)].append(time.perf_counter() - t)
    rows = []
    for dt, th in cells:
        ops = ops_by[dt]
        t_ops = {name: median(per[(dt, th)][name]) for name, _, _ in ops}
        head_name, _, head_flops = ops[0]
        mix_t = sum(t_ops.values())
        mix_flops = sum(f for _, _, f in ops)
        sq_gflops = squares[(dt, th)][1] / min(square_t[(dt, th)]) / 1e9
        results[f"{dt}/{th}t"] = {
            "square_gflops": sq_gflops,
            "square_seconds": square_t[(dt, th)],
            "chunk_rows": chunk_by[dt],
            "headline_gflops": head_flops / t_ops[head_name] / 1e9,
            "mix_gflops": mix_flops / mix_t / 1e9,
            "mix_seconds_per_chunk": mix_t,
            "ops": {name: {"seconds": t_ops[name], "gflops": f / t_ops[name] / 1e9,
                           "share": t_ops[name] / mix_t} for name, _, f in ops},
        }
        rows.append([dt, th, fmt(sq_gflops), chunk_by[dt], fmt(head_flops / t_ops[head_name] / 1e9),
                     fmt(mix_flops / mix_t / 1e9), ms(mix_t)])
    rep.table(["dtype", "BLAS threads", f"GFLOP/s {SQUARE}x{SQUARE} product (best of 3)",
               "engine chunk rows", "GFLOP/s first product of a chunk (fwd1)",
               "GFLOP/s all 8 products of a chunk (MLP L)", "time per chunk"], rows)
    r = results["float32/2t"]
    rep.say(f"Share of matmul time by product (float32, 2 threads, one {chunk_by['float32']:,}-row "
            "chunk of L):")
    rep.say()
    rep.table(["product", "ms", "GFLOP/s", "share"],
              [[n, f"{v['seconds'] * 1e3:.2f}", fmt(v["gflops"]), f"{v['share']:.0%}"]
               for n, v in r["ops"].items()])
    mix_flops_row = sum(f for _, _, f in ops_by["float32"]) / chunk_by["float32"]
    rep.say(f"Matmul FLOPs per row of L: {mix_flops_row:,.0f} (forward 2P, BP2 and summed BP4), "
            f"against the nominal 6P = {6 * 50122:,}: 6P overstates the work by "
            f"{6 * 50122 / mix_flops_row:.2f}x.")
    rep.say()
    rep.data["roofline"] = results
    rep.data["roofline_flops_per_row"] = mix_flops_row


# --------------------------------------------------------------------------- workload L


def torch_mlp(params, x, y, threads: int, arch=None):
    """PyTorch's float32 MLP with gradpipe's weights and loss: (step function, grads getter).

    Sigmoid hidden layers; the output and loss of `arch` (softmax + cross-entropy, the
    default for classes, or sigmoid + squared)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    softmax = arch is not None and arch.output_activation == "softmax"
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    ws = [torch.tensor(w, requires_grad=True) for w in params.w[1:]]
    bs = [torch.tensor(b, requires_grad=True) for b in params.b[1:]]

    def step() -> None:
        for t in ws + bs:
            t.grad = None
        a = X
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            z = F.linear(a, w, b)
            if i == len(ws) - 1 and softmax:
                loss = -(Y * torch.log_softmax(z, dim=1)).sum(dim=1).mean()
                break
            a = torch.sigmoid(z)
        else:
            loss = ((a - Y) ** 2).sum(dim=1).mean()  # gradpipe's "squared" loss, mean over rows
        loss.backward()

    return step, lambda: [t.grad.double().numpy() for t in ws + bs]


def in_process_threads():
    """A context in which `--workers 0` computes on block threads in this process whatever
    the work (the default for long steps is one worker process per core, local.py): for the
    rows that need the blocks here, or one core, or a profile of this process."""
    from gradpipe import worker

    @contextlib.contextmanager
    def ctx():
        old = getattr(worker, "PROCESS_STEP_FLOPS", None)
        if old is None:  # an engine without worker processes
            yield
            return
        worker.PROCESS_STEP_FLOPS = float("inf")
        try:
            yield
        finally:
            worker.PROCESS_STEP_FLOPS = old
    return ctx()


def engine_layout(run) -> str:
    """How the in-process engine uses the cores (the engine may change; say what it did)."""
    processes = getattr(run.pool, "processes", 0)
    if processes:
        return (f"{processes} worker processes without Ray (local.py), each its blocks in "
                "turn with 1 BLAS thread")
    local = run.pool.local
    blocks = getattr(local, "threads", None)
    if blocks is not None:
        return f"{blocks} blocks at once, 1 BLAS thread each (BlockSet.threads = {blocks})"
    return f"one block at a time, {blas_threads()} BLAS thread(s)"


def blas_threads() -> int | str:
    if not threadpool_ok():
        return "?"
    from threadpoolctl import threadpool_info

    return max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"),
               default="?")


def one_core(run, fn: Callable[[], object]) -> Callable[[], None]:
    """fn on one core: one BLAS thread and, where the engine has block threads, one."""
    local = run.pool.local

    def run_() -> None:
        old = getattr(local, "threads", None)
        if old is not None:
            local.threads = 1
        try:
            with threads_limit(1):
                fn()
        finally:
            if old is not None:
                local.threads = old
    return run_


def workload_l(rep: Report, sz: Sizes, args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from gradpipe.reduce import reduce
    from gradpipe.train import Run, TrainConfig
    from gradpipe.worker import StepRequest

    rep.say("## Workload L: full-batch gradient, MLP 128-256-64-10")
    rep.say()
    path = dataset(rep, "L", sz.l_rows, 128, 8)
    rows = sz.l_rows

    def prepared(workers: int, out: str | None = None, dtype: str = "float32",
                 threads: bool = False) -> Run:
        cfg = TrainConfig(data=path, hidden=L_HIDDEN, workers=workers, steps=sz.execute_steps,
                          out=out, overwrite=True, record_every=0, checkpoint_every=0,
                          dtype=dtype)
        run = Run(cfg)
        t = time.perf_counter()
        with in_process_threads() if threads else contextlib.nullcontext():
            run.prepare()
        rep.say(f"prepared workers={workers}{' (block threads)' * threads} {dtype}: "
                f"{time.perf_counter() - t:.1f} s ({mib(run.data_bytes)} of blocks)")
        return run

    def stepper(run: Run) -> Callable[[], object]:
        req = StepRequest(step=0, arch=run.arch, params=run.params,
                          standardize=run.standardize)
        return lambda: reduce(run.pool.step(req))

    have_tp = threadpool_ok()
    if not have_tp:
        rep.say("threadpoolctl is not installed: the 1-core rows are skipped.")
    run0 = prepared(0)  # the default for --workers 0: worker processes for long steps
    run0t = prepared(0, threads=True)  # block threads in this process
    arch, params = run0.arch, run0.params
    P = arch.n_params
    step0, step0t = stepper(run0), stepper(run0t)
    layout0, layout0t = engine_layout(run0), engine_layout(run0t)
    IN0, INT, IN1, RAY2 = ("gradpipe --workers 0 (the default: 2 worker processes)",
                           "gradpipe in-process, 2 block threads",
                           "gradpipe in-process, 1 core",
                           "gradpipe Ray 2 workers (1 BLAS thread each)")
    systems = [System(IN0, step0, pids=tuple(run0.pool.pids()), rows=rows),
               System(INT, step0t, rows=rows)]
    if have_tp:
        systems.append(System(IN1, one_core(run0t, step0t), rows=rows))
    exec_out = tempfile.mkdtemp(prefix="L-execute-", dir=OUT)
    run2 = prepared(2, out=exec_out)
    pids2 = tuple(run2.pool.pids())
    step2 = stepper(run2)
    systems.append(System(RAY2, step2, pids=pids2, rows=rows))

    # numpy's matmuls alone: the same 8 products per 8192-row chunk, for all the rows, in
    # each thread layout the engines use.
    chunk = engine_chunk(arch)
    ops = matmul_mix(arch.sizes, chunk, "float32")
    ops_b = matmul_mix(arch.sizes, chunk, "float32", seed=1)  # a second set for a 2nd thread
    chunks = -(-rows // chunk)
    half = [chunks // 2, chunks - chunks // 2]
    mix_flops = sum(f for _, _, f in ops) * chunks

    def matmuls(ops_, n: int) -> None:
        for _ in range(n):
            for _, fn, _ in ops_:
                fn()

    pool2 = ThreadPoolExecutor(max_workers=2)

    def matmuls_py_threads() -> None:
        with threads_limit(1):
            list(pool2.map(matmuls, (ops, ops_b), half))

    mm_actors = matmul_actors(arch.sizes, 2, chunk)

    def matmuls_ray() -> None:
        import ray

        ray.get([a.run.remote(n) for a, n in zip(mm_actors, half, strict=True)])

    MM2, MM1, MMT, MMR = ("numpy matmuls only, 2 BLAS threads", "numpy matmuls only, 1 thread",
                          "numpy matmuls only, 2 Python threads x 1 BLAS thread",
                          "numpy matmuls only, 2 Ray actors x 1 thread")
    systems.append(System(MM2, lambda: matmuls(ops, chunks), rows=rows))
    if have_tp:
        systems.append(System(MM1, one_core(run0t, lambda: matmuls(ops, chunks)), rows=rows))
        systems.append(System(MMT, matmuls_py_threads, rows=rows))
    systems.append(System(MMR, matmuls_ray, rows=rows))
    # numpy's matrix-product rate, measured in the same rounds: what the targets are against.
    SQ2, SQ1 = (f"numpy {SQUARE}x{SQUARE} product, float32, 2 BLAS threads",
                f"numpy {SQUARE}x{SQUARE} product, float32, 1 thread")
    sq2, sq_flops = square_product("float32", 2)
    systems.append(System(SQ2, sq2))
    if have_tp:
        systems.append(System(SQ1, square_product("float32", 1)[0]))
    torch_grads = None
    T2, T1 = "PyTorch loss.backward(), 2 threads", "PyTorch loss.backward(), 1 thread"
    if torch_ok():
        x, y = concat_blocks(run0t.pool.local.data)
        tstep2, torch_grads = torch_mlp(params, x, y, threads=2, arch=arch)
        tstep1, _ = torch_mlp(params, x, y, threads=1, arch=arch)
        systems.append(System(T2, with_torch_threads(tstep2, 2), rows=rows))
        systems.append(System(T1, with_torch_threads(tstep1, 1), rows=rows))
    else:
        rep.say("PyTorch is not installed: its rows are skipped.")
    for s_ in systems:
        s_.min_seconds = 0.5  # only --quick steps are shorter
    rep.say(f"{rows:,} rows, {P:,} parameters, {len(run0.dataset.blocks)} blocks; "
            f"--workers 0: {layout0}; in-process threads: {layout0t}; {sz.reps} rounds after "
            f"one warm-up round; ratios are medians of per-round ratios; load average "
            f"{os.getloadavg()[0]:.2f}")
    rep.say()
    interleave(systems, sz.reps)
    pool2.shutdown()
    base = systems[0]
    by = {s.name: s for s in systems}
    timing_table(rep, systems, base)

    # Correctness: the engines compute the same gradient.
    g0 = reduce(run0.pool.step(StepRequest(0, arch, params))).flat()
    g2 = reduce(run2.pool.step(StepRequest(0, arch, params))).flat()
    gt = reduce(run0t.pool.step(StepRequest(0, arch, params))).flat()
    rep.say(f"gradient, Ray 2 workers vs --workers 0: bitwise equal = {bool((g0 == g2).all())}"
            f" (max relative difference {float(np.abs(g0 - g2).max() / np.abs(g0).max()):.1e});"
            f" vs in-process block threads: bitwise equal = {bool((gt == g2).all())}")
    if have_tp:
        g1 = []
        one_core(run0t, lambda: g1.append(reduce(run0t.pool.step(StepRequest(0, arch, params)))))()
        g1f = g1[0].flat()
        rep.say(f"gradient, Ray 2 workers vs in-process on 1 core: bitwise equal = "
                f"{bool((g1f == g2).all())}")
    if torch_grads is not None:
        tg = torch_grads()
        flat = np.concatenate([t.ravel() for pair in zip(tg[:arch.L], tg[arch.L:], strict=True)
                               for t in pair])
        rel = float(np.abs(flat - g0).max() / np.abs(g0).max())
        rep.say(f"gradient, PyTorch float32 vs gradpipe: max abs difference / max |g| = "
                f"{rel:.1e}")
    rep.say()

    # Run.execute cross-check: per-step `seconds` of metrics.parquet (steps after the first),
    # then as many direct steps right after it.
    import pyarrow.parquet as pq

    run2.execute()
    metrics = Path(exec_out) / "metrics"  # a folder of parts (metrics.parquet before)
    if not metrics.exists():
        metrics = Path(exec_out) / "metrics.parquet"
    secs = pq.read_table(metrics).sort_by("step").column("seconds").to_pylist()
    direct = []
    for _ in range(len(secs)):
        t = time.perf_counter()
        step2()
        direct.append(time.perf_counter() - t)
    exec_median = median(secs[1:]) if len(secs) > 1 else secs[0]
    rep.say(f"Run.execute, 2 workers, {len(secs)} steps: median `seconds` of steps 1.. = "
            f"{ms(exec_median)}; {len(direct)} direct Pool.step + reduce calls right after: "
            f"{ms(median(direct))}")
    rep.say()
    run2.close()
    import ray

    for a in mm_actors:
        ray.kill(a)
    shutil.rmtree(exec_out, ignore_errors=True)

    # One worker on a local instance: it gets every CPU.
    run1 = prepared(1)
    b2 = System(IN0 + " (second table)", step0, rows=rows)
    r1 = System("gradpipe Ray 1 worker (all CPUs)", stepper(run1),
                pids=tuple(run1.pool.pids()), rows=rows)
    for s_ in (b2, r1):
        s_.min_seconds = 0.5
    interleave([b2, r1], sz.reps)
    timing_table(rep, [b2, r1], b2)
    run1.close()
    rep.data["L"] = {"rows": rows, "params": P, "engine": layout0, "engine_threads": layout0t,
                     "execute_seconds": secs,
                     "direct_after_execute": direct, "ray1_vs_inproc": ratio(r1, b2)}

    inproc, ray2, inthreads = by[IN0], by[RAY2], by[INT]
    rep.target("L step, Ray 2 workers / in-process workers=0 (same data, all cores)",
               f"{ms(ray2.median)} vs {ms(inproc.median)}; {fastest(ray2, inproc)}",
               ratio(ray2, inproc), 1.05, False)
    one = by.get(IN1)
    if one is not None:
        rep.say(f"(Ray 2 workers / in-process on 1 core: {fmt(ratio(ray2, one))}; in-process "
                f"all cores / 1 core: {fmt(ratio(inproc, one))})")
    if T2 in by:
        t2, t1 = by[T2], by[T1]
        rep.target("L step, gradpipe Ray 2 workers / PyTorch loss.backward() 2 threads (float32)",
                   f"{ms(ray2.median)} vs {ms(t2.median)}; {fastest(ray2, t2)}",
                   ratio(ray2, t2), 1.0, False)
        rep.say(f"(in-process all cores / PyTorch 2 threads: {fmt(ratio(inproc, t2))}; "
                + (f"in-process 1 core / PyTorch 1 thread: {fmt(ratio(one, t1))}; "
                   if one is not None else "")
                + f"PyTorch 2 threads / 1 thread: {fmt(ratio(t2, t1))})")
    else:
        rep.target("L step vs PyTorch", "torch missing", None, 1.0, False)
    flops = 6 * rows * P

    def rate_vs(s_: System, ref: System, ref_flops: float) -> float:
        """Median over rounds of (6NP / step time) / (ref FLOPs / ref time), same round."""
        return median([(flops / a) / (ref_flops / b)
                       for a, b in zip(s_.times, ref.times, strict=True)])

    # The targets: the nominal 6NP rate against numpy's square product in the same rounds.
    rep.say(f"(in-process block threads / {SQ2}: {fmt(rate_vs(inthreads, by[SQ2], sq_flops))}; "
            f"--workers 0 / in-process block threads, step time: "
            f"{fmt(ratio(inproc, inthreads))})")
    for s_ in (ray2, inproc):
        rep.target(f"L float32 FLOP rate 6NP/step, {s_.name} / {SQ2}",
                   f"{fmt(flops / s_.median / 1e9)} vs {fmt(sq_flops / by[SQ2].median / 1e9)}"
                   f" GFLOP/s; fastest runs "
                   f"{fmt((flops / min(s_.times)) / (sq_flops / min(by[SQ2].times)))}",
                   rate_vs(s_, by[SQ2], sq_flops), 0.7, True)
    pairs = [(ray2, by[MMR]), (inproc, by[MMR]),
             (inthreads, by[MMT] if MMT in by else by[MM2])]
    if one is not None:
        pairs.append((one, by[MM1]))
        rep.say(f"(in-process on 1 core / {SQ1}: {fmt(rate_vs(one, by[SQ1], sq_flops))})")
    # Beside them: against the step's own products, in the same thread layout.
    rep.say("The same rate against numpy running only the step's products (chunks of "
            f"{chunk:,} rows, as the engine), in the same thread layout: "
            + "; ".join(f"{s_.name} / {mm.name}: {fmt(rate_vs(s_, mm, mix_flops))}"
                        for s_, mm in pairs)
            + f". The step's products do {mix_flops / flops:.3f} x 6NP FLOPs: a step made only "
            f"of them would score {flops / mix_flops:.2f} on that measure; their time / step "
            "time: " + "; ".join(f"{fmt(ratio(mm, s_))}" for s_, mm in pairs) + ".")
    rep.say()
    rep.data["L"].update({"square_gflops_2t": sq_flops / by[SQ2].median / 1e9,
                          "mix_chunk_rows": chunk})
    run0t.close()
    run0.close()
    workload_l64(rep, sz, path, prepared, stepper)
    if not args.no_profile:
        profile(rep, sz, path, L_HIDDEN, "L")
        malloc_ab(rep, sz, path, L_HIDDEN, threads=1)


def workload_l64(rep: Report, sz: Sizes, path: str, prepared, stepper) -> None:
    """Workload L in float64: in-process and Ray with 2 workers against numpy's float64
    square product and the step's own float64 products, in the same rounds."""
    from concurrent.futures import ThreadPoolExecutor

    from gradpipe.reduce import reduce
    from gradpipe.worker import StepRequest

    rep.say("### Workload L in float64 (`--dtype float64`)")
    rep.say()
    rows = sz.l_rows
    run0 = prepared(0, dtype="float64")
    run0t = prepared(0, dtype="float64", threads=True)
    run2 = prepared(2, dtype="float64")
    arch = run0.arch
    P = arch.n_params
    chunk = engine_chunk(arch)
    ops = matmul_mix(arch.sizes, chunk, "float64")
    ops_b = matmul_mix(arch.sizes, chunk, "float64", seed=1)
    chunks = -(-rows // chunk)
    half = [chunks // 2, chunks - chunks // 2]
    mix_flops = sum(f for _, _, f in ops) * chunks
    pool2 = ThreadPoolExecutor(max_workers=2)

    def matmuls(ops_, n: int) -> None:
        for _ in range(n):
            for _, fn, _ in ops_:
                fn()

    def matmuls_py_threads() -> None:
        with threads_limit(1):
            list(pool2.map(matmuls, (ops, ops_b), half))

    IN0, INT, RAY2 = ("gradpipe --workers 0 (the default: 2 worker processes), float64",
                      "gradpipe in-process, 2 block threads, float64",
                      "gradpipe Ray 2 workers (1 BLAS thread each), float64")
    SQ2 = f"numpy {SQUARE}x{SQUARE} product, float64, 2 BLAS threads"
    MMT = "numpy float64 matmuls only, 2 Python threads x 1 BLAS thread"
    sq2, sq_flops = square_product("float64", 2)
    systems = [System(IN0, stepper(run0), pids=tuple(run0.pool.pids()), rows=rows),
               System(INT, stepper(run0t), rows=rows),
               System(RAY2, stepper(run2), pids=tuple(run2.pool.pids()), rows=rows),
               System(SQ2, sq2)]
    if threadpool_ok():
        systems.append(System(MMT, matmuls_py_threads, rows=rows))
    for s_ in systems:
        s_.min_seconds = 0.5
    rep.say(f"{rows:,} rows, {P:,} parameters, chunks of {chunk:,} rows; {sz.reps} rounds after "
            f"one warm-up round; load average {os.getloadavg()[0]:.2f}")
    rep.say()
    interleave(systems, sz.reps)
    pool2.shutdown()
    timing_table(rep, systems, systems[0])
    by = {s.name: s for s in systems}
    g0 = reduce(run0.pool.step(StepRequest(0, arch, run0.params))).flat()
    g2 = reduce(run2.pool.step(StepRequest(0, arch, run2.params))).flat()
    gt = reduce(run0t.pool.step(StepRequest(0, arch, run0t.params))).flat()
    rep.say(f"gradient float64, Ray 2 workers vs --workers 0: bitwise equal = "
            f"{bool((g0 == g2).all())}; vs in-process block threads: {bool((gt == g2).all())}")
    rep.say()
    flops = 6 * rows * P
    rep.say("(in-process block threads / " + SQ2 + ": " + fmt(median(
        [(flops / a) / (sq_flops / b) for a, b in zip(by[INT].times, by[SQ2].times, strict=True)]))
        + f"; --workers 0 / in-process block threads, step time: "
        f"{fmt(ratio(by[IN0], by[INT]))})")
    for name in (RAY2, IN0):
        s_ = by[name]
        frac = median([(flops / a) / (sq_flops / b)
                       for a, b in zip(s_.times, by[SQ2].times, strict=True)])
        rep.target(f"L float64 FLOP rate 6NP/step, {name} / {SQ2}",
                   f"{fmt(flops / s_.median / 1e9)} vs {fmt(sq_flops / by[SQ2].median / 1e9)}"
                   " GFLOP/s", frac, 0.7, True)
    for name in (RAY2, IN0):
        rep.target(f"L float64 step seconds, {name} (Spark MLlib took 16.8 s a pass here: "
                   "2.5x faster is 6.7 s)", f"{ms(by[name].median)}", by[name].median, 6.7,
                   False)
    if MMT in by:
        def vs_mix(n: str) -> float:
            return median([(flops / a) / (mix_flops / b)
                           for a, b in zip(by[n].times, by[MMT].times, strict=True)])
        rep.say("(against numpy running only the step's float64 products in 2 Python threads x "
                "1 BLAS thread: " + "; ".join(f"{n}: {fmt(vs_mix(n))}"
                                              for n in (RAY2, IN0, INT))
                + ")")
        rep.say()
    rep.data["L64"] = {"rows": rows, "params": P, "chunk_rows": chunk,
                       "square_gflops_2t": sq_flops / by[SQ2].median / 1e9,
                       "bitwise_equal": bool((g0 == g2).all()),
                       "bitwise_equal_threads": bool((gt == g2).all())}
    run2.close()
    run0t.close()
    run0.close()


def with_torch_threads(fn: Callable[[], None], threads: int) -> Callable[[], None]:
    """torch.set_num_threads is process-wide: set it before each call."""
    def run_() -> None:
        import torch

        torch.set_num_threads(threads)
        fn()
    return run_


def engine_chunk(arch) -> int:
    """Rows per chunk the engine uses for this model (backprop.chunk_rows_for; older
    engines: CHUNK)."""
    from gradpipe import backprop

    fn = getattr(backprop, "chunk_rows_for", None)
    return fn(arch) if fn is not None else CHUNK


def matmul_actors(sizes: tuple[int, ...], n: int, chunk: int = CHUNK,
                  dtype: str = "float32") -> list:
    """n Ray actors with one BLAS thread each that run the step's matmuls on demand.

    num_cpus=0: they run beside gradpipe's workers (which hold the CPUs), taking turns
    with them as the benchmark runs one system at a time.
    """
    import ray

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    class Matmuls:
        def __init__(self, sizes, m, dtype):
            self.ops = matmul_mix(sizes, m, dtype)

        def run(self, chunks: int) -> None:
            for _ in range(chunks):
                for _, fn, _ in self.ops:
                    fn()

    actors = [Matmuls.remote(sizes, chunk, dtype) for _ in range(n)]
    ray.get([a.run.remote(0) for a in actors])
    return actors


def threadpool_ok() -> bool:
    try:
        import threadpoolctl  # noqa: F401
        return True
    except ImportError:
        return False


def torch_ok() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------ profile


def profile(rep: Report, sz: Sizes, path: str, hidden: tuple[int, ...], name: str,
            threads_list: tuple[int, ...] = (2, 1), mode: str = "none",
            rows: int | None = None) -> None:
    """py-spy (or cProfile) of the in-process engine's steps, grouped by source line.

    The child runs the steps as `Run` does (Pool.step + reduce, workers=0); `mode` is the
    per_sample option (norms and full write Parquet); `rows` limits the step to a batch.
    """
    what = f"per_sample={mode}" + (f", {rows:,} rows" if rows else "")
    rep.say(f"### Profile: in-process engine, workload {name}, {what}")
    rep.say()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    have_pyspy = Path(pyspy).exists()
    for threads in threads_list:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
        child = [sys.executable, str(Path(__file__)), "_profile-child", path,
                 ",".join(map(str, hidden)), str(sz.profile_steps), str(sz.profile_seconds),
                 mode, str(rows or 0), str(threads)]
        raw = OUT / f"profile-{name}-{mode}-{threads}t.txt"
        if not have_pyspy:
            child += ["--cprofile", str(raw)]
        # The child loads and warms up, says "ready", and runs the measured steps on "go";
        # py-spy attaches in between, so only the measured steps are sampled.
        proc = subprocess.Popen(child, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        if proc.stdout.readline().strip() != "ready":
            rep.say(f"profile child failed: {proc.wait()}")
            continue
        spy = None
        if have_pyspy:
            spy = subprocess.Popen([pyspy, "record", "--pid", str(proc.pid), "--idle",
                                    "--nonblocking", "--rate", "100", "--format", "raw", "-o",
                                    str(raw)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out_line = proc.stdout.readline()
        proc.stdin.close()
        proc.wait()
        if spy is not None:
            spy.wait(timeout=60)
        if not out_line.startswith("{"):
            rep.say(f"profile child failed ({proc.returncode})")
            continue
        info = json.loads(out_line)
        a = info["default"]
        label = "engine default, all cores" if threads > 1 else "1 core (1 BLAS thread)"
        rep.say(f"{label}, {len(a['steps'])} steps: step median "
                f"{ms(a['step'])}; per step {a['minflt']:,.0f} minor page faults, "
                f"{a['stime']:.2f} s system CPU, {a['utime']:.2f} s user CPU (system = "
                f"{a['stime'] / max(a['stime'] + a['utime'], 1e-9):.0%} of the CPU time)")
        rep.say()
        if have_pyspy:
            lines, leaves, total, main, bp = pyspy_breakdown(raw)
            rep.say(f"py-spy, 100 Hz, wall clock, all threads: {total:,} samples of threads "
                    f"inside block_step (the work; {bp / max(total, 1):.0%} of them inside "
                    f"block_partial), against {main:,} samples of the main thread inside the "
                    f"measured steps (work / main = {total / max(main, 1):.2f}: the blocks "
                    "computed at once, on average). Shares of the work by the innermost line "
                    "of gradpipe (a matmul line includes its BLAS call):")
            rep.say()
            rep.table(["share of work", "where", "code"],
                      [[f"{v:.1%}", k, code] for k, v, code in lines])
            rep.say("By innermost Python frame (numpy and pyarrow helpers included):")
            rep.say()
            rep.table(["share of work", "frame"], [[f"{v:.1%}", k] for k, v in leaves])
            rep.data.setdefault("profile", {})[f"{name}-{mode}-{threads}t"] = {
                "lines": lines, "leaves": leaves, "work": total, "main": main,
                "block_partial": bp / max(total, 1), **info}
        else:
            rep.say("py-spy missing: cProfile top functions by cumulative time:")
            rep.say("```\n" + Path(raw).read_text()[:3000] + "\n```")


def pyspy_breakdown(raw: Path, only: str | None = None, top: int = 20):
    """Shares of the engine's work samples by innermost gradpipe line and by leaf frame.

    Work samples are those of any thread inside block_step (the engine may run blocks on
    threads); `main` counts the main thread's samples inside Pool.step (wall time of the
    steps), restricted to stacks through `only` (the measured loop, not load or warm-up).
    Returns (lines, leaves, work samples, main samples, work samples in block_partial).
    """
    import gradpipe

    pkg = Path(gradpipe.__file__).parent
    by_line: dict[str, int] = {}
    by_leaf: dict[str, int] = {}
    total = main = bp = 0
    for text in raw.read_text().splitlines():
        stack, _, count = text.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        if any(f.startswith("Pool.step (gradpipe/worker.py") for f in frames) and (
                only is None or any(f.startswith(only) for f in frames)):
            main += n
        if not any(f.startswith("block_step (gradpipe/worker.py") for f in frames):
            continue
        total += n
        if any(f.startswith("block_partial ") for f in frames):
            bp += n
        inner = [f for f in frames if "(gradpipe/" in f]
        key = re.sub(r"^([\w.<>]+) \(gradpipe/(.*)\)$", r"\2 \1", inner[-1]) if inner else "?"
        by_line[key] = by_line.get(key, 0) + n
        leaf = re.sub(r"^.*?([\w.<>]+) \((?:.*/)?([^/]*)\)$", r"\1 (\2)", frames[-1])
        by_leaf[leaf] = by_leaf.get(leaf, 0) + n
    import linecache

    lines = []
    for key, n in sorted(by_line.items(), key=lambda kv: -kv[1])[:top]:
        m = re.match(r"(.*):(\d+) ", key)
        code = ""
        if m:
            code = linecache.getline(str(pkg / m.group(1)), int(m.group(2))).strip()
        lines.append((key, n / max(total, 1), code.replace("|", "\\|")))
    leaves = [(k, n / max(total, 1)) for k, n in
              sorted(by_leaf.items(), key=lambda kv: -kv[1])[:12]]
    return lines, leaves, total, main, bp


def _child_run(argv: list[str]):
    """(run, request, out) for a child: PATH HIDDEN STEPS SECONDS MODE ROWS THREADS."""
    import numpy as np

    from gradpipe.train import Run, TrainConfig
    from gradpipe.worker import StepRequest

    path, hidden = argv[0], tuple(int(h) for h in argv[1].split(","))
    mode, rows = argv[4], int(argv[5])
    run = Run(TrainConfig(data=path, hidden=hidden, workers=0, steps=1))
    with in_process_threads():  # the work in this process, where the profiler looks
        run.prepare()
    if int(argv[6]) == 1 and hasattr(run.pool.local, "threads"):
        run.pool.local.threads = 1  # one core: one block at a time (BLAS threads: the env)
    out = tempfile.mkdtemp(prefix="child-", dir=OUT) if mode != "none" else None
    batch = np.arange(rows, dtype=np.int64) if rows else None
    req = StepRequest(0, run.arch, run.params, per_sample=mode, out_dir=out, batch=batch)
    return run, req, out


def _one_step(run, req, out) -> dict:
    """One timed step with its page faults and CPU times; removes what it wrote."""
    import resource

    from gradpipe.reduce import reduce

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    reduce(run.pool.step(req))
    dt = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if out is not None:
        shutil.rmtree(Path(out) / "per_sample", ignore_errors=True)
    return {"t": dt, "minflt": r1.ru_minflt - r0.ru_minflt,
            "utime": r1.ru_utime - r0.ru_utime, "stime": r1.ru_stime - r0.ru_stime}


def profile_child(argv: list[str]) -> None:
    """Run in-process steps (at least K, at least S seconds); print their figures as JSON."""
    steps, min_total = int(argv[2]), float(argv[3])
    cprof = argv[argv.index("--cprofile") + 1] if "--cprofile" in argv else None
    run, req, out = _child_run(argv)
    _one_step(run, req, out)  # warm-up
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    prof = None
    if cprof:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()

    def measure() -> dict:
        res: list[dict] = []
        while len(res) < steps or sum(r["t"] for r in res) < min_total:
            res.append(_one_step(run, req, out))
        return {"step": median([r["t"] for r in res]), "steps": [r["t"] for r in res],
                **{k: median([r[k] for r in res]) for k in ("minflt", "utime", "stime")}}

    default = measure()
    if prof is not None:
        import io
        import pstats

        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
        Path(cprof).write_text(s.getvalue())
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"default": default}), flush=True)


def stepper_child(argv: list[str]) -> None:
    """A step server: loads like _profile-child, then one step per line read on stdin."""
    run, req, out = _child_run(argv)
    _one_step(run, req, out)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(json.dumps(_one_step(run, req, out)), flush=True)
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)


def malloc_ab(rep: Report, sz: Sizes, path: str, hidden: tuple[int, ...], threads: int = 1,
              reps: int | None = None) -> None:
    """Per-chunk allocation cost: the same in-process step in two processes, taking turns,
    one with glibc's defaults and one told to keep freed memory instead of returning it to
    the kernel (so the next chunk's arrays are not page-faulted in and zeroed again)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    keep = dict(env, MALLOC_MMAP_THRESHOLD_=str(32 * 2**20), MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
    cmd = [sys.executable, str(Path(__file__)), "_stepper-child", path,
           ",".join(map(str, hidden)), "0", "0", "none", "0", str(threads)]
    procs = {name: subprocess.Popen(cmd, env=e, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
             for name, e in (("glibc defaults", env), ("keep freed memory", keep))}
    for p in procs.values():
        assert p.stdout.readline().strip() == "ready"
    res: dict[str, list[dict]] = {k: [] for k in procs}
    for r in range(reps or sz.reps):
        order = list(procs) if r % 2 == 0 else list(procs)[::-1]
        for name in order:
            p = procs[name]
            p.stdin.write("step\n")
            p.stdin.flush()
            res[name].append(json.loads(p.stdout.readline()))
    for p in procs.values():
        p.stdin.close()
        p.wait()
    a, b = res["glibc defaults"], res["keep freed memory"]
    r_ = median([y["t"] / x["t"] for x, y in zip(a, b, strict=True)])
    rep.say(f"Per-chunk allocation, {threads} BLAS thread(s): two in-process engines taking "
            f"turns, {len(a)} steps each (MALLOC_MMAP_THRESHOLD_=32 MiB, "
            "MALLOC_TRIM_THRESHOLD_=2 GiB in the second):")
    rep.say()
    rows = [[name, ms(median([x["t"] for x in v])), f"{median([x['minflt'] for x in v]):,.0f}",
             f"{median([x['stime'] for x in v]):.2f} s", f"{median([x['utime'] for x in v]):.2f} s"]
            for name, v in res.items()]
    rep.table(["malloc", "step median", "minor faults / step", "system CPU / step",
               "user CPU / step"], rows)
    rep.say(f"keep freed memory / glibc defaults, per-round median: {fmt(r_)} (the step time "
            f"the page faults cost: {1 - r_:.0%})")
    rep.say()
    rep.data.setdefault("malloc_ab", {})[f"{Path(path).name}-{threads}t"] = {
        "ratio": r_, "default": a, "keep": b}


def torch_per_sample(params, threads: int, arch=None):
    """torch.func vmap(grad) per-sample gradients of gradpipe's MLP and loss (softmax +
    cross-entropy when `arch` says so, else sigmoid + squared): (grads(x, y), norms(x, y))."""
    import torch
    import torch.nn.functional as F
    from torch.func import grad, vmap

    torch.set_num_threads(threads)
    L = len(params.w) - 1
    tp = {f"w{l}": torch.tensor(params.w[l]) for l in range(1, L + 1)}
    tp.update({f"b{l}": torch.tensor(params.b[l]) for l in range(1, L + 1)})

    softmax = arch is not None and arch.output_activation == "softmax"

    def loss_i(p, x, y):
        a = x
        for l in range(1, L + 1):
            z = F.linear(a, p[f"w{l}"], p[f"b{l}"])
            if l == L and softmax:
                return -(y * torch.log_softmax(z, dim=-1)).sum()
            a = torch.sigmoid(z)
        return ((a - y) ** 2).sum()

    per_sample = vmap(grad(loss_i), in_dims=(None, 0, 0))

    def grads(x, y):
        return per_sample(tp, x, y)

    def norms(x, y):
        g = per_sample(tp, x, y)
        sq = [(g[f"w{l}"] ** 2).sum(dim=(1, 2)) + (g[f"b{l}"] ** 2).sum(dim=1)
              for l in range(1, L + 1)]
        return torch.stack(sq, dim=1).sqrt()  # (m, L) per layer; total = sqrt(sum sq)

    return grads, norms


def workload_p(rep: Report, sz: Sizes, args) -> None:
    import numpy as np

    from gradpipe.backprop import block_partial
    from gradpipe.data import DataSpec, plan
    from gradpipe.reduce import reduce
    from gradpipe.train import Run, TrainConfig
    from gradpipe.worker import BlockSet, StepRequest

    rep.say("## Workload P: per-sample norms and per-sample gradients, MLP 64-128-10")
    rep.say()
    path = dataset(rep, "P", sz.p_rows, 64, 2)
    run0 = Run(TrainConfig(data=path, hidden=P_HIDDEN, workers=0, steps=1))
    run0.prepare()  # the default for --workers 0: worker processes for steps this long
    run0t = Run(TrainConfig(data=path, hidden=P_HIDDEN, workers=0, steps=1))
    with in_process_threads():
        run0t.prepare()  # block threads in this process
    run2 = Run(TrainConfig(data=path, hidden=P_HIDDEN, workers=2, steps=1))
    run2.prepare()
    arch, params = run0.arch, run0.params
    blocks = run0t.pool.local.data
    rows = sz.p_rows
    tmp = Path(tempfile.mkdtemp(prefix="P-", dir=OUT))
    counter = iter(range(10**9))

    def step(run: Run, mode: str, batch=None) -> Callable[[], object]:
        def fn():
            # As in a training run: one run folder, a new per_sample/step=S/ each step.
            return reduce(run.pool.step(StepRequest(next(counter), arch, params,
                                                    per_sample=mode, out_dir=str(tmp / "run"),
                                                    batch=batch)))
        return fn

    def clean() -> None:
        for p in tmp.iterdir():
            shutil.rmtree(p, ignore_errors=True)

    def discard(*_):
        return None

    # block_partial alone, laid out over the cores as the engine lays out its blocks (blocks
    # on BlockSet.threads threads with one BLAS thread each, where the engine does that),
    # with the engine's options (one reused array for per-sample gradients, as block_step).
    engine_threads = getattr(run0t.pool.local, "threads", 1)
    import inspect

    reuse_ok = "reuse_grads" in inspect.signature(block_partial).parameters

    def compute(blocks_, full: bool, limit: int | None = None,
                parallel: bool = True) -> Callable[[], None]:
        from concurrent.futures import ThreadPoolExecutor

        # `limit` rows in all: split over as many blocks as the engine computes at once, as a
        # step over that many rows spread over blocks is (one block is one thread's work).
        jobs, left = [], limit if limit is not None else 10**18
        lanes = min(len(blocks_), engine_threads if parallel else 1)
        share = -(-left // lanes) if limit is not None else 10**18
        for d in blocks_:
            if left > 0:
                take = min(left, len(d.x), share)
                jobs.append((d, take))
                left -= take

        def one(job) -> None:
            d, n = job
            block_partial(arch, params, d.x[:n], d.y[:n], block=d.block.index,
                          classify=True, sink=discard, full=full,
                          **({"reuse_grads": True} if reuse_ok else {}))

        def fn():
            if engine_threads == 1 or not parallel:
                for job in jobs:
                    one(job)
                return
            with threads_limit(1), ThreadPoolExecutor(engine_threads) as ex:
                list(ex.map(one, jobs))
        return fn

    pids2, pids0 = tuple(run2.pool.pids()), tuple(run0.pool.pids())
    rep.say(f"--workers 0: {engine_layout(run0)}")
    rep.say()
    norms_sys = [
        System("gradpipe --workers 0 step, per_sample=none", step(run0, "none"), pids=pids0,
               rows=rows),
        System("gradpipe --workers 0 step, per_sample=norms -> Parquet", step(run0, "norms"),
               pids=pids0, post=clean, rows=rows),
        System("gradpipe in-process block_partial, norms to a discarding sink",
               compute(blocks, False), rows=rows),
        System("gradpipe Ray 2 workers step, per_sample=none", step(run2, "none"),
               pids=pids2, rows=rows),
        System("gradpipe Ray 2 workers step, per_sample=norms -> Parquet",
               step(run2, "norms"), pids=pids2, post=clean, rows=rows),
        System("gradpipe in-process block threads step, per_sample=none", step(run0t, "none"),
               rows=rows),
        System("gradpipe in-process block threads step, per_sample=norms -> Parquet",
               step(run0t, "norms"), post=clean, rows=rows),
    ]
    x, y = concat_blocks(blocks)
    if torch_ok():
        import torch

        tgrads, tnorms = torch_per_sample(params, threads=2, arch=arch)
        X, Y = torch.from_numpy(x), torch.from_numpy(y)

        def torch_chunks(fn, n: int, chunk: int) -> Callable[[], None]:
            def run_():
                with torch.no_grad():
                    for s in range(0, n, chunk):
                        fn(X[s:s + chunk], Y[s:s + chunk])
            return run_

        # Chunk size for torch: pick its best of a few (fair to torch), on a small slice.
        best = {}
        for chunk in (256, 1024, 4096):
            f = torch_chunks(tnorms, min(sz.p_sub_rows, 8192), chunk)
            best[chunk] = min(time_calls(f, 0.3) for _ in range(2))
        t_chunk = min(best, key=best.get)
        rep.say(f"torch.func chunk size: {t_chunk} rows (seconds for 8,192 rows by chunk: "
                + ", ".join(f"{c}: {v:.3f}" for c, v in best.items()) + ")")
        tstep, _ = torch_mlp(params, x, y, threads=2, arch=arch)
        norms_sys += [
            System("PyTorch loss.backward() full batch", tstep, rows=rows),
            System(f"torch.func vmap(grad) + norms, {sz.p_sub_rows:,} rows",
                   torch_chunks(tnorms, sz.p_sub_rows, t_chunk), rows=sz.p_sub_rows),
        ]
    for s_ in norms_sys:
        s_.min_seconds = 0.5  # P steps are short: repeat them within a timed call
    rep.say(f"{rows:,} rows, {arch.n_params:,} parameters, blocks of "
            f"{', '.join(str(len(d.x)) for d in blocks)} rows")
    rep.say()
    interleave(norms_sys, sz.reps)
    timing_table(rep, norms_sys, norms_sys[0])
    by = {s.name: s for s in norms_sys}
    none0, norms0 = norms_sys[0], norms_sys[1]
    # The norms targets from adjacent pairs (see `paired`); the rounds above give the same
    # ratio with the host's drift between a round's calls in it.
    pairs = {name: paired(a, b, sz.p_pairs) for name, a, b in
             (("--workers 0", none0, norms0), ("Ray 2 workers", norms_sys[3], norms_sys[4]),
              ("in-process block threads", norms_sys[5], norms_sys[6]))}
    rep.data["P_norms_pairs"] = pairs
    rep.say(f"Norms against none in {sz.p_pairs} adjacent pairs, order alternating (ratio "
            "norms / none per pair; median, 95% interval of the median, quartiles): "
            + "; ".join(f"{k} {median(v):.3f} ({'-'.join(f'{x:.3f}' for x in median_interval(v))}"
                        f"; quartiles {quartiles(v)})" for k, v in pairs.items())
            + f". From the rounds above: --workers 0 {ratio(norms0, none0):.3f}, Ray "
            f"{ratio(norms_sys[4], norms_sys[3]):.3f}, in-process block threads "
            f"{ratio(norms_sys[6], norms_sys[5]):.3f}.")
    rep.say()
    for name, (a, b) in (("--workers 0", (none0, norms0)),
                         ("Ray 2 workers", (norms_sys[3], norms_sys[4]))):
        lo, hi = median_interval(pairs[name])
        rep.target(f"P per-sample norms to Parquet, added to the step ({name}; "
                   f"{sz.p_pairs} adjacent pairs)",
                   f"{ms(b.median)} vs {ms(a.median)} in the rounds; 95% interval of the "
                   f"pairs' median {lo - 1:+.3f}..{hi - 1:+.3f}",
                   median(pairs[name]) - 1, 0.10, False)
    tname = f"torch.func vmap(grad) + norms, {sz.p_sub_rows:,} rows"
    if tname in by:
        tn = by[tname]
        # rows/s per round: gradpipe rows / its time over torch rows / its time
        thr = [(rows / a) / (sz.p_sub_rows / b)
               for a, b in zip(norms0.times, tn.times, strict=True)]
        thr2 = [(rows / a) / (sz.p_sub_rows / b)
                for a, b in zip(norms_sys[4].times, tn.times, strict=True)]
        rep.target("P norms throughput, gradpipe --workers 0 (norms -> Parquet) / torch.func",
                   f"{rows / norms0.median:,.0f} vs {sz.p_sub_rows / tn.median:,.0f} rows/s",
                   median(thr), 10, True)
        thr3 = [(rows / a) / (sz.p_sub_rows / b)
                for a, b in zip(norms_sys[2].times, tn.times, strict=True)]
        rep.say(f"(Ray 2 workers / torch.func: {fmt(median(thr2))}; in-process compute only "
                f"(discarding sink) / torch.func: {fmt(median(thr3))})")
    else:
        rep.target("P norms throughput vs torch.func", "torch missing", None, 10, True)
    rep.say()

    # Full per-sample gradients: compute alone, and written to Parquet (float64 lists).
    R = sz.p_full_rows
    batch = np.arange(R, dtype=np.int64)  # the first R rows: one block
    full_sys = [
        System(f"gradpipe block_partial full=True, discarding sink, {R:,} rows",
               compute(blocks, True, R), rows=R),
        System(f"gradpipe --workers 0 step, per_sample=full -> Parquet, {R:,} rows",
               step(run0, "full", batch), post=clean, rows=R),
    ]
    if torch_ok():
        full_sys.append(System(f"torch.func vmap(grad) per-sample grads, {R:,} rows",
                               torch_chunks(tgrads, R, t_chunk), rows=R))
    for s_ in full_sys:
        s_.min_seconds = 0.5
    reps_full = max(2, min(sz.reps, 3))
    interleave(full_sys, reps_full)
    size = arch.n_params * np.dtype(arch.dtype).itemsize / 1024
    rep.say(f"Full per-sample gradients ({reps_full} rounds; gradpipe materializes "
            f"{arch.dtype}, {size:.0f} KiB per sample; torch float32):")
    rep.say()
    timing_table(rep, full_sys, full_sys[0])
    if torch_ok():
        tf = full_sys[2]
        for s in full_sys[:2]:
            kind = " (compute)" if "discarding" in s.name else " (-> Parquet)"
            rep.target(f"P full per-sample throughput, {s.name.split(',')[0]}{kind} / torch.func",
                       f"{R / s.median:,.0f} vs {R / tf.median:,.0f} rows/s",
                       median([b / a for a, b in zip(s.times, tf.times, strict=True)]), 1.0, True)

    # Memory: bounded by the chunk, not by the block? Same work on blocks of different sizes.
    big = len(blocks[0].x)
    small_spec = DataSpec(path, block_rows=2048)
    ds_small = plan(small_spec)
    bs_small = BlockSet(ds_small, list(ds_small.blocks), "float32")
    bs_small.load()
    mem_rows = []

    def peak_of(fn) -> int:
        me = os.getpid()
        reset_peak(me)
        before = rss(me)
        fn()
        return hwm(me) - before

    lim = min(2 * R, big)
    for label, fn in (  # one block at a time (the engine runs BlockSet.threads of these at once)
        (f"compute, {R:,} rows in one block", compute(blocks, True, R, parallel=False)),
        (f"compute, {big:,}-row block (all its rows)",
         compute(blocks[:1], True, parallel=False)),
        (f"compute, {lim:,} rows in 2,048-row blocks",
         compute(bs_small.data, True, lim, parallel=False)),
        (f"compute, {lim:,} rows in 2,048-row blocks, {engine_threads} blocks at once",
         compute(bs_small.data, True, lim)),
        (f"-> Parquet (engine step), {R:,} rows in one block", step(run0t, "full", batch)),
        (f"-> Parquet (engine step), {lim:,} rows in one block",
         step(run0t, "full", np.arange(lim, dtype=np.int64))),
    ):
        t = time.perf_counter()
        d = peak_of(fn)
        mem_rows.append([label, mib(d), f"{time.perf_counter() - t:.1f} s"])
        clean()
    if torch_ok():
        mem_rows.append([f"torch.func, {R:,} rows in chunks of {t_chunk}",
                         mib(peak_of(torch_chunks(tgrads, R, t_chunk))), ""])
    rep.say("Peak RSS added by full per-sample gradients (driver VmHWM - RSS before; "
            "in-process, 64 MiB materialization chunks; one block at a time unless said):")
    rep.say()
    rep.table(["what", "peak added", "time (once)"], mem_rows)
    rep.data["P_memory"] = mem_rows
    # The whole big block against 2,048-row blocks: both hold at least one materialization
    # chunk (872 float64 rows), so a difference would come from the block size.
    growth = None
    try:
        small = float(re.sub(r"[^\d.]", "", mem_rows[2][1]))
        large = float(re.sub(r"[^\d.]", "", mem_rows[1][1]))
        growth = large / small if small else None
    except ValueError:
        pass
    rep.target(f"P full per-sample memory, {big:,}-row block / 2,048-row blocks (chunk-bounded)",
               f"{mem_rows[1][1]} vs {mem_rows[2][1]}", growth, 1.10, False)
    rep.say()
    parquet_options(rep, arch, params, blocks[0])
    if not args.no_profile:
        profile(rep, sz, path, P_HIDDEN, "P", threads_list=(2,), mode="norms")
        profile(rep, sz, path, P_HIDDEN, "P", threads_list=(2,), mode="full", rows=R)
    run2.close()
    run0t.close()
    run0.close()
    shutil.rmtree(tmp, ignore_errors=True)


def parquet_options(rep: Report, arch, params, block) -> None:
    """Where per-sample gradient writing goes: one materialized chunk written with the
    writer gradpipe uses and with other Parquet options (same values, same rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradpipe.backprop import block_partial
    from gradpipe.outputs import PerSampleWriter

    got: list = []

    def keep_first(start, losses, sq, grads):
        if not got:
            got.append((start, losses.copy(), sq.copy(), grads.copy()))

    block_partial(arch, params, block.x[:8192], block.y[:8192], classify=True, sink=keep_first,
                  full=True)
    start, losses, sq, grads = got[0]
    m, p = grads.shape
    ids = np.arange(m, dtype=np.int64)
    labels = block.labels[:m] if block.labels is not None else None
    tmp = Path(tempfile.mkdtemp(prefix="pq-", dir=OUT))

    def gradpipe_writer() -> int:
        path = tmp / "gp.parquet"
        w = PerSampleWriter(path, arch.L, full=True, classify=labels is not None)
        w.write(ids, labels, losses, sq, grads)
        w.close()
        return path.stat().st_size

    def variant(dtype, **opts) -> Callable[[], int]:
        def fn() -> int:
            offsets = pa.array(np.arange(0, (m + 1) * p, p, dtype=np.int32))
            col = pa.ListArray.from_arrays(offsets, pa.array(grads.astype(dtype, copy=False)
                                                             .ravel()))
            path = tmp / "v.parquet"
            pq.write_table(pa.table({"sample": ids, "grad": col}), path, **opts)
            return path.stat().st_size
        return fn

    def build_only() -> int:
        offsets = pa.array(np.arange(0, (m + 1) * p, p, dtype=np.int32))
        pa.ListArray.from_arrays(offsets, pa.array(grads.ravel()))
        return 0

    cases = [
        ("gradpipe's PerSampleWriter (float64 here, grad lz4)", gradpipe_writer),
        ("float64, zstd, defaults (dictionary on, statistics on)",
         variant("float64", compression="zstd")),
        ("float64, zstd, use_dictionary=False, write_statistics=False",
         variant("float64", compression="zstd", use_dictionary=False, write_statistics=False)),
        ("float64, snappy, no dictionary, no statistics",
         variant("float64", compression="snappy", use_dictionary=False, write_statistics=False)),
        ("float64, uncompressed, no dictionary, no statistics",
         variant("float64", compression="none", use_dictionary=False, write_statistics=False)),
        ("float32, zstd, no dictionary, no statistics",
         variant("float32", compression="zstd", use_dictionary=False, write_statistics=False)),
        ("building the list column only (no file)", build_only),
    ]
    rows_ = []
    payload = m * p * 8
    for name, fn in cases:
        times = []
        size = 0
        for _ in range(3):
            t = time.perf_counter()
            size = fn()
            times.append(time.perf_counter() - t)
        t = median(times)
        rows_.append([name, ms(t), f"{m / t:,.0f}", f"{payload / t / 2**20:,.0f}",
                      f"{size / payload:.2f}" if size else ""])
    shutil.rmtree(tmp, ignore_errors=True)
    rep.say(f"Writing one chunk of per-sample gradients ({m:,} rows x {p:,} float64 = "
            f"{mib(payload)}), median of 3:")
    rep.say()
    rep.table(["writer", "time", "rows/s", "MiB/s of float64 payload", "file / payload"],
              rows_)
    rep.data["P_parquet_options"] = rows_


# --------------------------------------------------------------------------- workload M


def workload_m(rep: Report, sz: Sizes, args) -> None:
    import threading

    import ray

    from gradpipe.data import DataSpec, plan
    from gradpipe.model import Architecture, init_params
    from gradpipe.reduce import reduce
    from gradpipe.worker import Pool, StepRequest, ray_init

    scales = tuple(int(s) for s in args.m_scales.split(",")) if args.m_scales else sz.m_scales
    rep.say(f"## Workload M: peak worker RSS, 2 workers, rows x {', x'.join(map(str, scales))}"
            f" of {sz.m_rows:,}")
    rep.say()
    ray_init("local")
    rows_out = []
    peaks: dict = {}
    for scale in scales:
        n = sz.m_rows * scale
        path = dataset(rep, "L" if sz.m_files == 8 else "M", n, 128, sz.m_files)
        ds = plan(DataSpec(path))
        rep.say(f"x{scale}: {n:,} rows, {len(ds.blocks)} blocks of at most "
                f"{max(b.n for b in ds.blocks):,} rows")
        arch = Architecture((128, *L_HIDDEN, 10))
        req = StepRequest(0, arch, init_params(arch, 0))
        for mode in ("memory", "stream"):
            # Run.prepare builds exactly this Pool (stream=True where a worker's share of the
            # rows exceeds --memory-budget) and then calls load().
            pool = Pool(ds, 2, "float32", stream=mode == "stream")
            pids = pool.pids()
            base = {p: rss(p) for p in pids}
            sampled = {p: 0 for p in pids}
            stop = threading.Event()

            # A psutil-free sampler, a cross-check of VmHWM.
            def sample(stop=stop, pids=pids, sampled=sampled) -> None:
                while not stop.is_set():
                    for p in pids:
                        sampled[p] = max(sampled[p], rss(p))
                    stop.wait(0.05)

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            for p in pids:
                reset_peak(p)
            t = time.perf_counter()
            held_total = pool.load()
            t_load = time.perf_counter() - t
            held = ray.get([a.nbytes.remote() for a in pool.actors])
            load_peak = {p: hwm(p) for p in pids}
            for p in pids:
                reset_peak(p)
            t = time.perf_counter()
            reduce(pool.step(req))
            t_step = time.perf_counter() - t
            step_peak = {p: hwm(p) for p in pids}
            stop.set()
            th.join()
            pool.close()
            for i, p in enumerate(pids):
                peak = max(load_peak[p], step_peak[p])
                peaks[(scale, mode, i)] = peak
                rows_out.append([f"x{scale} ({n:,})", mode, i, mib(base[p]), mib(held[i]),
                                 mib(load_peak[p]), mib(step_peak[p]), mib(sampled[p]),
                                 fmt(peak / held[i]) if held[i] else "-",
                                 fmt((peak - base[p]) / held[i]) if held[i] else "-",
                                 f"{t_load:.1f} s", f"{t_step:.1f} s"])
            rep.data.setdefault("M", []).append(
                {"scale": scale, "rows": n, "mode": mode, "held_total": held_total,
                 "held": held, "base": list(base.values()), "load_peak": list(load_peak.values()),
                 "step_peak": list(step_peak.values()), "sampled": list(sampled.values()),
                 "load_s": t_load, "step_s": t_step})
            print(f"  M x{scale} {mode}: load {t_load:.1f} s, step {t_step:.1f} s", flush=True)
    rep.table(["rows", "mode", "worker", "RSS idle", "blocks held", "peak in load",
               "peak in step", "peak sampled", "peak / held", "(peak - idle) / held", "load",
               "1 step"], rows_out)
    lo, hi = min(scales), max(scales)
    s_lo = max(peaks[(lo, "stream", i)] for i in (0, 1))
    s_hi = max(peaks[(hi, "stream", i)] for i in (0, 1))
    rep.target(f"M streaming peak worker RSS, x{hi} / x{lo} rows",
               f"{mib(s_hi)} vs {mib(s_lo)}", s_hi / s_lo, 1.10, False)
    for scale in scales:
        entries = [e for e in rep.data["M"] if e["scale"] == scale and e["mode"] == "memory"]
        e = entries[-1]
        worst = max(max(lp, sp) / h for lp, sp, h in zip(e["load_peak"], e["step_peak"],
                                                          e["held"], strict=True) if h)
        rep.target(f"M in-memory peak worker RSS / blocks held, x{scale}",
                   f"worst worker of {len(e['held'])}", worst, 1.3, False)
    rep.say()


# --------------------------------------------------------------------------- workload S


QUICKSTART = ["train", "data/digits", "--per-sample", "norms"]  # README's Quickstart command
NOT_ON_QUICKSTART = ("ray", "matplotlib", "rich", "pandas", "torch")


def workload_s(rep: Report, sz: Sizes, args) -> None:
    rep.say("## Workload S: start-up, the Quickstart and a Ray run's start, end to end")
    rep.say()
    digits = str(ROOT / "data" / "digits")
    base = Path(tempfile.mkdtemp(prefix="S-", dir=OUT))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    gp = gradpipe_bin()

    def cli(argv: list[str]) -> float:
        out = base / f"run-{time.monotonic_ns()}"
        t = time.perf_counter()
        subprocess.run([gp, *argv, "--out", str(out)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        return time.perf_counter() - t

    commands = {
        "gradpipe train data/digits --per-sample norms --out X (the README's Quickstart, "
        "300 steps, in-process by default)": QUICKSTART,
        "gradpipe train data/digits --steps 1 --out X (in-process by default)":
            ["train", digits, "--steps", "1"],
        "gradpipe train data/digits --steps 1 --workers 2 --out X (a local Ray instance)":
            ["train", digits, "--steps", "1", "--workers", "2"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    parts = []
    reps = max(3, sz.s_reps)
    for r in range(reps):  # interleaved, rotating: a change in load hits every command
        names = list(commands)
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(cli(commands[name]))
        out = base / f"bd-{time.monotonic_ns()}"
        t = time.perf_counter()
        spawned = time.time()
        res = subprocess.run([sys.executable, str(Path(__file__)), "_s-breakdown", digits,
                              str(out), repr(spawned), "2"], capture_output=True, text=True,
                             env=env, cwd=ROOT)
        wall = time.perf_counter() - t
        if res.returncode != 0:
            rep.say(f"breakdown child failed: {res.stderr[-2000:]}")
            continue
        d = json.loads(res.stdout.strip().splitlines()[-1])
        d["exit"] = wall - d["total_in_process"]
        parts.append(d)
    rep.say(f"{reps} rounds; load average {os.getloadavg()[0]:.2f} at the end")
    rep.say()
    rep.table(["command", "median wall", "runs"],
              [[k, f"{median(v):.2f} s", ", ".join(f"{t:.2f}" for t in v)]
               for k, v in times.items()])
    if parts:
        keys = ["interpreter start (spawn to first line)", "import gradpipe.cli",
                "cli parse + config + plan + model",
                "ray_init (import ray + ray.init)", "actor start + load (Pool + load)",
                "step (Pool.step + reduce)", "execute minus step (writing run folder)",
                "close (kill actors)", "ray.shutdown", "exit"]
        med = {k: median([p[k] for p in parts]) for k in keys}
        total = sum(med.values())
        rep.say("Where the time of the Ray run goes (`--steps 1 --workers 2` in a child "
                "process with timestamps; medians). gradpipe's own part is everything but "
                "`ray.init`, `ray.shutdown` and the interpreter:")
        rep.say()
        rep.table(["phase", "seconds", "share"],
                  [[k, f"{v:.2f}", f"{v / total:.0%}"] for k, v in med.items()]
                  + [["sum", f"{total:.2f}", ""]])
        rep.data["S_breakdown"] = parts
    # What the Quickstart imports: none of the heavy optional modules should be there.
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "gradpipe", "train", digits,
                          "--steps", "1", "--out", str(base / "imports")],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    found = {}
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S.*)$", line)
        if m and m.group(4).strip() in NOT_ON_QUICKSTART:
            found[m.group(4).strip()] = int(m.group(2)) / 1e6
    rep.say("Imported by `gradpipe train data/digits --steps 1` (in-process) among "
            f"{', '.join(NOT_ON_QUICKSTART)}: "
            + (", ".join(f"{k} ({v:.2f} s cumulative)" for k, v in found.items()) or "none"))
    rep.say()
    imp = importtime()
    rep.say("`python -X importtime -c 'import gradpipe.cli, gradpipe.train, ray'`: modules "
            "over 20 ms, top level and one level down (indented), cumulative:")
    rep.say()
    rep.table(["module", "cumulative"], [[m.replace("  ", "&nbsp;&nbsp;"), f"{us / 1e6:.2f} s"]
                                         for m, us in imp])
    rep.data["S"] = {"commands": times, "importtime": imp, "quickstart_imports": found,
                     "load_end": os.getloadavg()[0]}
    quick, ray_ = times[list(commands)[0]], times[list(commands)[2]]
    rep.target("S the README's Quickstart, gradpipe train data/digits --per-sample norms, "
               "end to end", f"{median(quick):.2f} s (runs {', '.join(f'{t:.2f}' for t in quick)})",
               median(quick), 3.0, False)
    rep.say(f"(`--steps 1 --workers 2`, a local Ray instance: {median(ray_):.2f} s)")
    rep.say()
    shutil.rmtree(base, ignore_errors=True)


def importtime() -> list[tuple[str, int]]:
    """Modules imported at the top level or one level down, slowest first (over 20 ms)."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-c",
                          "import gradpipe.cli, gradpipe.train, ray"],
                         capture_output=True, text=True)
    top = []
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S.*)$", line)
        if m and len(m.group(3)) <= 2 and int(m.group(2)) > 20_000:
            top.append(("  " * (len(m.group(3)) // 2) + m.group(4).strip(), int(m.group(2))))
    return top  # in import order: an indented module is inside the one above it


def _s_breakdown(argv: list[str]) -> None:
    t_entry = time.time()
    digits, out, start = argv[0], argv[1], float(argv[2])  # start: when the parent spawned us
    workers = argv[3:4]  # --workers N, when given
    marks: dict[str, float] = {}
    t = time.time()
    import gradpipe.cli as cli_mod  # click, and what cli imports at module level
    import gradpipe.train as train_mod

    marks["import gradpipe.cli"] = time.time() - t
    import gradpipe.worker as worker_mod  # start_pool calls ray_init and Pool from here

    pool_home = worker_mod if hasattr(worker_mod, "start_pool") else train_mod
    real_ray_init, real_pool = pool_home.ray_init, pool_home.Pool
    acc = {"ray_init": 0.0, "pool": 0.0, "step": 0.0, "execute": 0.0, "close": 0.0,
           "prepare": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.time()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.time() - t0
        return wrapper

    class TimedPool(real_pool):
        def __init__(self, *a, **k):
            t0 = time.time()
            super().__init__(*a, **k)
            acc["pool"] += time.time() - t0

        def load(self):
            t0 = time.time()
            try:
                return super().load()
            finally:
                acc["pool"] += time.time() - t0

        def step(self, req):
            t0 = time.time()
            try:
                return super().step(req)
            finally:
                acc["step"] += time.time() - t0

    pool_home.ray_init = timed("ray_init", real_ray_init)
    pool_home.Pool = TimedPool
    real_reduce = train_mod.reduce
    train_mod.reduce = timed("step", real_reduce)
    train_mod.Run.prepare = timed("prepare", train_mod.Run.prepare)
    train_mod.Run.execute = timed("execute", train_mod.Run.execute)
    train_mod.Run.close = timed("close", train_mod.Run.close)
    t_cli = time.time()
    cli_mod.cli.main(["train", digits, "--steps", "1", "--out", out]
                     + (["--workers", workers[0]] if workers else []), prog_name="gradpipe",
                     standalone_mode=False)
    t_cli = time.time() - t_cli
    t = time.time()
    import ray

    ray.shutdown()
    t_shutdown = time.time() - t
    prepare_rest = acc["prepare"] - acc["ray_init"] - acc["pool"]
    res = {
        "interpreter start (spawn to first line)": t_entry - start,
        "import gradpipe.cli": marks["import gradpipe.cli"],
        "cli parse + config + plan + model": t_cli - acc["prepare"] - acc["execute"]
        - acc["close"] + prepare_rest,
        "ray_init (import ray + ray.init)": acc["ray_init"],
        "actor start + load (Pool + load)": acc["pool"],
        "step (Pool.step + reduce)": acc["step"],
        "execute minus step (writing run folder)": acc["execute"] - acc["step"],
        "close (kill actors)": acc["close"],
        "ray.shutdown": t_shutdown,
    }
    res["total_in_process"] = time.time() - start  # from spawn to here
    print(json.dumps(res))


# ----------------------------------------------------------------------------- machine


def machine(rep: Report, argv: list[str]) -> None:
    import numpy as np

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                have = line.split()
                flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16")
                                 if x in have)
                break
    blas = []
    if threadpool_ok():
        from threadpoolctl import threadpool_info

        blas = [f"{i['internal_api']} {i['version']} ({i.get('architecture')}, "
                f"{i['num_threads']} threads, {i.get('threading_layer')})"
                for i in threadpool_info()]
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("ray", "torch", "pyarrow"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "missing"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *argv]),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "cpu flags": flags,
        "memory": f"{mem / 2**30:.1f} GiB",
        "blas": "; ".join(blas) or "threadpoolctl missing",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "gradpipe measured": source_state(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    rep.say("## Machine")
    rep.say()
    rep.table(["", ""], [[k, v] for k, v in info.items()])
    rep.data["machine"] = info


def reexec_with_snapshot(rev: str | None) -> None:
    """Copy src/gradpipe now (or from git revision `rev`) and run again importing it
    (PYTHONPATH beats the editable install; Ray's workers, the CLI and the children
    inherit it)."""
    OUT.mkdir(parents=True, exist_ok=True)
    snap = Path(tempfile.mkdtemp(prefix="src-", dir=OUT))
    if rev:
        archive = subprocess.run(["git", "archive", rev, "src/gradpipe"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(snap), "--strip-components=1"], input=archive,
                       check=True)
    else:
        shutil.copytree(ROOT / "src" / "gradpipe", snap / "gradpipe",
                        ignore=shutil.ignore_patterns("__pycache__"))
    path = os.pathsep.join([str(snap)] + ([os.environ["PYTHONPATH"]]
                                          if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, PYTHONPATH=path, GRADPIPE_BENCH_SRC=str(snap),
               GRADPIPE_BENCH_REV=rev or "HEAD")
    code = subprocess.run([sys.executable, str(Path(__file__)), *sys.argv[1:]], env=env).returncode
    shutil.rmtree(snap, ignore_errors=True)
    sys.exit(code)


def source_state() -> str:
    """Which gradpipe was measured: the commit, and the files where it differs from it."""
    import gradpipe

    pkg = Path(gradpipe.__file__).parent
    rev = os.environ.get("GRADPIPE_BENCH_REV", "HEAD")
    head = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    changed = []
    for f in sorted(pkg.glob("*.py")):
        old = subprocess.run(["git", "show", f"{rev}:src/gradpipe/{f.name}"], cwd=ROOT,
                             capture_output=True, text=True)
        if old.returncode != 0 or old.stdout != f.read_text():
            changed.append(f.name)
    where = ("a copy of src/ taken at the start" if os.environ.get("GRADPIPE_BENCH_SRC")
             else str(pkg))
    return (f"{head}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")
            + f" ({where})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_profile-child":
        return profile_child(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_stepper-child":
        return stepper_child(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_s-breakdown":
        return _s_breakdown(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="scaled-down workloads (~2 minutes)")
    ap.add_argument("--only", default="L,P,S,M", help="workloads to run, e.g. L,P (default all)")
    ap.add_argument("--reps", type=int, help="timed rounds per comparison (default 5, quick 3)")
    ap.add_argument("--m-scales", help="row multiples for M, e.g. 1,2,4 (default 1,4,8)")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    ap.add_argument("--json", help="also write the raw results to this file (e.g. "
                    "benches/bench-DATE.json, committed beside RESULTS.md)")
    ap.add_argument("--rev", help="measure src/gradpipe as committed in this git revision "
                    "(default: the working tree as it is at the start)")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="import gradpipe as installed instead of from a copy of src/ taken at "
                         "the start (the copy keeps a run consistent while src/ is edited)")
    args = ap.parse_args()
    if not args.no_snapshot and "GRADPIPE_BENCH_SRC" not in os.environ:
        return reexec_with_snapshot(args.rev)
    sz = QUICK if args.quick else FULL
    if args.reps:
        sz = Sizes(**{**sz.__dict__, "reps": args.reps})
    only = {s.strip().upper() for s in args.only.split(",")}
    OUT.mkdir(parents=True, exist_ok=True)
    DATA.mkdir(parents=True, exist_ok=True)
    rep = Report()
    t0 = time.perf_counter()
    rep.say(f"# gradpipe benchmarks{' (--quick)' if args.quick else ''}")
    rep.say()
    machine(rep, sys.argv)
    roofline(rep, sz)
    sections = [("L", workload_l), ("P", workload_p), ("M", workload_m), ("S", workload_s)]
    for key, fn in sections:
        if key not in only:
            continue
        if key == "S":  # the CLI starts its own Ray instance: do not run two
            import ray

            if ray.is_initialized():
                ray.shutdown()
        t = time.perf_counter()
        fn(rep, sz, args)
        rep.say(f"({key} took {time.perf_counter() - t:.0f} s)")
        rep.say()
    rep.say("## Targets")
    rep.say()
    rep.table(["target", "measured", "value", "need", "status"],
              [[t["target"], t["measured"], fmt3(t["value"]), t["limit"], t["status"]]
               for t in rep.targets])
    rep.say(f"total {time.perf_counter() - t0:.0f} s; load average at the end: "
            + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    (OUT / f"report-{stamp}.md").write_text("\n".join(rep.lines) + "\n")
    rep.data["targets"] = rep.targets
    rep.data["load_average_by_round"] = LOADS
    rep.data["load_average_end"] = os.getloadavg()
    raw = json.dumps(rep.data, indent=1, default=str)
    (OUT / f"results-{stamp}.json").write_text(raw)
    if args.json:
        Path(args.json).write_text(raw)
    print(f"wrote {OUT / f'report-{stamp}.md'}")


if __name__ == "__main__":
    main()
