"""Does recording cost the same at step 2,000 as at step 200? (issue 9)

Trains a ~300,000-parameter model on a few thousand rows for 2,000 steps in-process with
--record-every 20 --checkpoint-every 100 (100 records of the whole gradient) and reports
the driver's resident memory (VmRSS) and peak (VmHWM) at steps 200 and 2,000, and the
time spent in the recorder per recorded step, early against late.

    python benches/record_memory.py [--steps 2000] [--out benches/out]

Writes benches/out/record-memory-YYYYmmdd-HHMMSS.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import gradpipe.recorder as recorder
from gradpipe.synth import synth
from gradpipe.train import TrainConfig, train


def vm(field: str) -> int:
    """A /proc/self/status field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()

    timings: list[tuple[int, str, float]] = []  # (step, what, seconds)
    current = {"step": 0}
    for name in ("metrics", "gradients", "checkpoint"):
        real = getattr(recorder.Recorder, name)

        def timed(self, *a, _real=real, _name=name, **k):
            t0 = time.perf_counter()
            _real(self, *a, **k)
            timings.append((current["step"], _name, time.perf_counter() - t0))

        setattr(recorder.Recorder, name, timed)

    memory: dict[int, dict] = {}

    def progress(done: int, metrics: dict) -> None:
        current["step"] = done
        if done in (1, 200, 1000, args.steps):
            memory[done] = {"rss": vm("VmRSS"), "peak": vm("VmHWM")}

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synth(data, rows=args.rows, features=64, classes=10, seed=0)
        config = TrainConfig(data=str(data), out=str(Path(tmp) / "run"), workers=0,
                             hidden=(512, 512), steps=args.steps, record_every=20,
                             checkpoint_every=100, lr=0.5)
        t0 = time.perf_counter()
        train(config, progress)
        wall = time.perf_counter() - t0
        run_bytes = sum(p.stat().st_size for p in (Path(tmp) / "run").rglob("*") if p.is_file())

    def per_step(lo: int, hi: int) -> float:
        """Median recorder seconds of the recorded-gradient steps in [lo, hi)."""
        by_step: dict[int, float] = {}
        for step, _, s in timings:
            by_step[step] = by_step.get(step, 0.0) + s
        chosen = [v for k, v in by_step.items() if lo <= k < hi and k % 20 == 0]
        return statistics.median(chosen)

    n = args.steps
    report = {
        "steps": n, "rows": args.rows, "parameters": 64 * 512 + 512 + 512 * 512 + 512 + 512 * 10
        + 10, "record_every": 20, "checkpoint_every": 100, "wall_s": round(wall, 1),
        "run_folder_mb": round(run_bytes / 2**20, 1),
        "memory_mb": {k: {m: round(v / 2**20, 1) for m, v in d.items()} for k, d in memory.items()},
        "peak_ratio_end_vs_200": round(memory[n]["peak"] / memory[200]["peak"], 4),
        "rss_ratio_end_vs_200": round(memory[n]["rss"] / memory[200]["rss"], 4),
        "record_s_per_recorded_step": {"steps_1_400": round(per_step(1, 400), 5),
                                       f"steps_{n - 400}_{n}": round(per_step(n - 400, n + 1), 5)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"record-memory-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
