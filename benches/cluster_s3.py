"""A simulated cluster on object storage (issue 13, point 3).

A local S3 server (moto's standalone server on 127.0.0.1), a dataset on it, and a Ray
cluster of 4 nodes of 1 CPU each on this machine (ray.cluster_utils.Cluster). gradpipe
trains on the S3 dataset with a --memory-budget that makes every worker stream its blocks
from the store at every step, and writes its run folder to the store. Then:

- the records (gradients, checkpoints, weights, metrics but their timings) are bitwise
  those of the same run with --workers 0 (in one process);
- each worker read only its own blocks (the block assignment), each once per pass, and the
  4 workers sat on 4 different nodes;
- the driver's resident memory is flat over the steps.

    python benches/cluster_s3.py [--rows 2000000] [--steps 3] [--json OUT.json]

Needs moto[server] (the test extra). tests/test_s3.py runs it small.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BUCKET = "gradpipe-cluster"
WORKER_COLUMNS = ("seconds", "partials", "partial_bytes")
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto's S3 server did not start")


def records(loc: str) -> dict[str, bytes]:
    """The run's records that must be bitwise equal (metrics without WORKER_COLUMNS)."""
    import pyarrow.parquet as pq

    from gradpipe import store

    out = {}
    for rel in store.walk(loc):
        if rel.startswith(("gradients/", "checkpoints/")) or rel == "weights.parquet":
            out[rel] = store.read_bytes(store.join(loc, rel))
        elif rel.startswith("metrics/"):
            table = pq.read_table(store.open_input(store.join(loc, rel)))
            # seconds, and the partials that reached the driver, depend on the workers
            # by design (README, Scaling); every other column must not.
            table = table.drop([c for c in WORKER_COLUMNS if c in table.column_names])
            out[rel] = repr(table.to_pydict()).encode()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--row-group-size", type=int, default=65_536)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    os.environ.update(ENV)

    import pyarrow.fs as pafs
    import ray
    from ray.cluster_utils import Cluster

    from gradpipe import store
    from gradpipe.config import TrainConfig
    from gradpipe.synth import synth
    from gradpipe.train import Run, train
    from gradpipe.worker import assign_blocks

    server, url = start_s3()
    store.configure(url)  # AWS_ENDPOINT_URL: the cluster's nodes, started below, inherit it
    report: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "load_before": os.getloadavg()[0]},
                    "rows": args.rows, "features": args.features, "nodes": args.nodes,
                    "steps": args.steps}
    cluster = None
    try:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gp-cluster-") as tmp:
            synth(Path(tmp) / "data", rows=args.rows, features=args.features, classes=10,
                  files=args.files, row_group_size=args.row_group_size, seed=0)
            s3 = pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True,
                                   region="us-east-1")
            s3.create_dir(BUCKET)
            pafs.copy_files(str(Path(tmp) / "data"), f"{BUCKET}/data",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
        report["upload_seconds"] = round(time.perf_counter() - t0, 2)
        data = f"s3://{BUCKET}/data"
        common = dict(data=data, hidden=(16,), steps=args.steps, record_every=1,
                      checkpoint_every=1)

        t0 = time.perf_counter()
        train(TrainConfig(out=f"s3://{BUCKET}/zero", workers=0, **common))
        report["workers_0_seconds"] = round(time.perf_counter() - t0, 2)

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)

        rss: list[int] = []

        def progress(done: int, metrics: dict) -> None:
            rss.append(rss_bytes())

        per_worker = args.rows * args.features * 4 // args.nodes
        budget = max(1, per_worker // 8)  # far below a worker's share: it streams
        t0 = time.perf_counter()
        # train() itself, step by step, to ask the pool before it closes.
        run = Run(TrainConfig(out=f"s3://{BUCKET}/cluster", workers=args.nodes,
                              address=cluster.address, memory_budget=budget, **common))
        try:
            run.prepare()
            run.execute(progress)
            report["cluster_seconds"] = round(time.perf_counter() - t0, 2)
            pool = run.pool
            nodes = pool.nodes()
            reads = pool.reads()
            stream = pool.stream
        finally:
            run.close()
        blocks = run.dataset.blocks
        assigned = [[b.index for b in group] for group in assign_blocks(blocks, args.nodes)]
        report.update(
            memory_budget=budget, streaming=stream, blocks=len(blocks),
            distinct_nodes=len(set(nodes)),
            reads_match_assignment=all(sorted(r) == a for r, a in zip(reads, assigned,
                                                                       strict=True)),
            reads_per_block=sorted({n for r in reads for n in r.values()}),
            driver_rss_mb=[round(b / 2**20, 1) for b in rss],
        )
        zero, clustered = records(f"s3://{BUCKET}/zero"), records(f"s3://{BUCKET}/cluster")
        report["files_compared"] = len(zero)
        report["bitwise_equal"] = zero == clustered
        report["differing_files"] = sorted(k for k in zero if zero[k] != clustered.get(k))
        report["driver_rss_growth"] = round(rss[-1] / rss[0], 4) if rss else None
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        server.kill()
        server.wait()
    report["load_after"] = os.getloadavg()[0]
    print(json.dumps(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
