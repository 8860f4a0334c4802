"""Finding mislabeled samples with `gradpipe scores` (issue 11): the bundled digits with 10% of
the labels flipped (seeded), trained with per-sample rows every few steps, then scored; the
AUROC of each score for telling the flipped samples from the others.

    /work/venv/bin/python benches/mislabeled.py                 # seeds 0, 1, 2
    /work/venv/bin/python benches/mislabeled.py --seeds 0 --per-sample-every 5

A flipped label is replaced by one of the 9 other classes, uniformly (numpy PCG64, the seed).
The data keeps the files and row groups of data/digits, so sample ids are the same. The
runs use gradpipe's default model and optimizer for classes (64-32-10, sigmoid hidden,
softmax + cross_entropy, standardized features, full-batch lr 2), in-process. Needs
scikit-learn (the bench extra) for roc_auc_score. Writes benches/mislabeled-YYYYMMDD.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "data" / "digits"
SCORES = ("self_influence", "el2n_mean", "grand_mean", "loss_last", "forgetting_events")


def flip_labels(src: Path, dst: Path, fraction: float, seed: int) -> np.ndarray:
    """Copy src to dst with `fraction` of the labels flipped; returns the flipped sample ids."""
    files = sorted(src.glob("*.parquet"))
    n = sum(pq.read_metadata(f).num_rows for f in files)
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(n, size=round(fraction * n), replace=False))
    shift = rng.integers(1, 10, size=len(flipped))  # another class, uniformly
    first = 0
    for f in files:
        pf = pq.ParquetFile(f)
        table = pf.read()
        labels = table.column("label").to_numpy().copy()
        mine = (flipped >= first) & (flipped < first + len(labels))
        rows = flipped[mine] - first
        labels[rows] = (labels[rows] + shift[mine]) % 10
        table = table.set_column(table.column_names.index("label"), "label",
                                 pa.array(labels, type=table.schema.field("label").type))
        dst.mkdir(parents=True, exist_ok=True)
        # The same row groups as the original: the same blocks and ids.
        pq.write_table(table, dst / f.name, row_group_size=pf.metadata.row_group(0).num_rows)
        first += len(labels)
    return flipped


def gradpipe(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gradpipe", *args], check=True,
                         capture_output=True, text=True)
    return out.stdout


def one_seed(seed: int, args: argparse.Namespace, work: Path) -> dict:
    data, run = work / f"digits-flipped-{seed}", work / f"run-{seed}"
    flipped = flip_labels(DIGITS, data, args.fraction, seed)
    t0 = time.perf_counter()
    last = json.loads(gradpipe(
        "train", str(data), "--workers", "0", "--steps", str(args.steps),
        "--per-sample", "norms", "--per-sample-every", str(args.per_sample_every),
        "--out", str(run), "--json", "--quiet", *args.train_flags))
    t1 = time.perf_counter()
    summary = json.loads(gradpipe("scores", str(run), "--workers", "0", "--json", "--top", "0"))
    t2 = time.perf_counter()
    table = pq.read_table(run / "scores")
    sample = table.column("sample").to_numpy()
    is_flipped = np.isin(sample, flipped)
    auroc = {}
    for name in SCORES:
        v = table.column(name).to_numpy(zero_copy_only=False).astype(float)
        v = np.where(np.isnan(v), np.nanmin(v) - 1, v)  # null (not recorded): least suspicious
        auroc[name] = float(roc_auc_score(is_flipped, v))
    # first_learned: later is more suspicious, and never (null) the most
    first = table.column("first_learned").to_numpy(zero_copy_only=False).astype(float)
    auroc["first_learned (never = last)"] = float(
        roc_auc_score(is_flipped, np.where(np.isnan(first), args.steps + 1, first)))
    k = len(flipped)
    si = table.column("self_influence").to_numpy()
    top = np.argsort(-si, kind="stable")[:k]
    flipped_learned = table.column("first_learned").to_numpy(zero_copy_only=False)[is_flipped]
    return {
        "seed": seed, "flipped": int(k), "rows": int(len(sample)),
        "recorded_steps": len(summary["steps"]),
        "train_accuracy_on_flipped_labels": last["accuracy"], "final_loss": last["loss"],
        "auroc": auroc,
        "precision_at_flipped_count_self_influence": float(is_flipped[top].mean()),
        "flipped_fitted_at_the_end": float(np.mean(~np.isnan(flipped_learned.astype(float)))),
        "seconds": {"train": round(t1 - t0, 2), "scores": round(t2 - t1, 2)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="flip seeds, comma-separated")
    ap.add_argument("--fraction", type=float, default=0.10, help="labels to flip")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--per-sample-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="JSON report path")
    ap.add_argument("train_flags", nargs="*", help="more gradpipe train flags, after --")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="mislabeled-") as tmp:
        for seed in seeds:
            r = one_seed(seed, args, Path(tmp))
            results.append(r)
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["auroc"].items())
                  + f"; train {r['seconds']['train']} s, scores {r['seconds']['scores']} s",
                  flush=True)
    mean = {name: float(np.mean([r["auroc"][name] for r in results]))
            for name in results[0]["auroc"]}
    print("mean AUROC: " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    report = {
        "bench": "mislabeled", "date": date.today().isoformat(),
        "data": "data/digits (1,797 rows, 64 features, 10 classes)",
        "fraction_flipped": args.fraction, "steps": args.steps,
        "per_sample_every": args.per_sample_every,
        "train_flags": ["--workers", "0", "--steps", str(args.steps), "--per-sample", "norms",
                        "--per-sample-every", str(args.per_sample_every), *args.train_flags],
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
        "seeds": results, "mean_auroc": mean,
    }
    out = args.out or REPO / "benches" / f"mislabeled-{date.today():%Y%m%d}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
