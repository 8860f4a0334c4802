"""Prototypes of changes that would close the targets bench.py reports as missed, timed
against the code in src/ they would replace. Nothing here is used by gradpipe.

    python benches/whatif.py [--only grads,norms,arrow] [--reps N]

grads   per-sample gradients (P, --per-sample full): backprop.per_sample_grads against
        one outer product per layer written straight into the (m, P) output, in float64
        and float32, and against torch.func vmap(grad) on the same rows.
norms   per-sample rows (P, --per-sample norms): outputs.PerSampleWriter, one row group per
        8,192-row chunk as now, against other writer options and one row group per block.
arrow   worker memory (M): RSS after loading / streaming L blocks with pyarrow's default
        memory pool, with release_unused() after each block, and with the system allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def timeit(fn, reps: int, min_seconds: float = 0.3) -> float:
    """Median seconds per call over `reps` loops of at least min_seconds each."""
    fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t >= min_seconds:
            break
        n *= 2
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print(flush=True)


def p_chunk(rows: int):
    """delta and a of the first `rows` rows of workload P, as block_partial sees them."""
    from gradpipe.backprop import deltas
    from gradpipe.data import DataSpec, plan, read_block
    from gradpipe.model import Architecture, forward, init_params

    path = OUT / "data" / "P-100000"
    if not path.exists():
        sys.exit(f"{path} missing: run benches/bench.py --only P first")
    ds = plan(DataSpec(str(path)))
    block = read_block(ds, ds.blocks[0], "float32")
    arch = Architecture((64, 128, 10))
    params = init_params(arch, 0)
    x, y = block.x[:rows], block.y[:rows]
    a, z = forward(arch, params, x)
    return arch, params, x, y, a, deltas(arch, params, a, z, y), block


def fused_grads(delta, a, dtype) -> "object":
    """BP3/BP4 per sample, each layer's outer product written into its slice of one (m, P)."""
    import numpy as np

    m = a[0].shape[0]
    sizes = [d.shape[1] for d in delta[1:]]
    P = sum(n * (a[l].shape[1] + 1) for l, n in enumerate(sizes))
    out = np.empty((m, P), dtype)
    pos = 0
    for l in range(1, len(delta)):
        nj, nk = delta[l].shape[1], a[l - 1].shape[1]
        view = out[:, pos:pos + nj * nk].reshape(m, nj, nk)  # a view: rows are contiguous
        np.multiply(delta[l][:, :, None], a[l - 1][:, None, :], out=view, dtype=dtype,
                    casting="unsafe")
        pos += nj * nk
        out[:, pos:pos + nj] = delta[l]
        pos += nj
    return out


def grads(reps: int) -> None:
    import numpy as np

    from gradpipe.backprop import FULL_CHUNK_BYTES, per_sample_grads

    print("## Per-sample gradients (workload P, 9,610 parameters), compute only\n")
    arch, params, x, y, a, delta, _ = p_chunk(8192)
    rows = max(1, FULL_CHUNK_BYTES // (8 * arch.n_params))  # gradpipe's materialization chunk
    d_, a_ = [d[:rows] if d.size else d for d in delta], [t[:rows] for t in a]
    ref = per_sample_grads(d_, a_)
    for dt in ("float64", "float32"):
        got = fused_grads(d_, a_, dt)
        assert np.allclose(got, ref, rtol=1e-6 if dt == "float64" else 1e-5,
                           atol=1e-12 if dt == "float64" else 1e-7), dt
    cases = [
        ("backprop.per_sample_grads (float64 einsum per layer + concatenate)",
         lambda: per_sample_grads(d_, a_)),
        ("one outer product per layer into one (m, P) float64 array", lambda: fused_grads(
            d_, a_, "float64")),
        ("the same in float32", lambda: fused_grads(d_, a_, "float32")),
    ]
    cases = [(name, fn, rows) for name, fn in cases]
    for piece in (256, 2048):  # the chunk is 64 MiB of float64; a smaller one stays in cache
        ds_, as_ = [d[:piece] if d.size else d for d in delta], [t[:piece] for t in a]
        cases.append((f"the same in float32, {piece}-row pieces",
                      lambda ds_=ds_, as_=as_: fused_grads(ds_, as_, "float32"), piece))
    try:
        import torch

        from bench import torch_per_sample  # same directory

        torch.set_num_threads(1)
        tgrads, _ = torch_per_sample(params, threads=1)
        X, Y = torch.from_numpy(x[:rows].copy()), torch.from_numpy(y[:rows].copy())

        def tf():
            with torch.no_grad():
                tgrads(X, Y)

        cases.append(("torch.func vmap(grad), float32, forward + backward included", tf, rows))
    except ImportError:
        pass
    res = []
    base = None
    for name, fn, n in cases:
        t = timeit(fn, reps)
        base = base or n / t
        res.append([name, n, f"{t * 1e3:.2f} ms", f"{n / t:,.0f}", f"{n / t / base:.2f}"])
    print(f"gradpipe's chunk: {rows} rows (64 MiB of float64); 1 BLAS thread; median of {reps}; "
          f"gradpipe as imported from {Path(sys.modules['gradpipe'].__file__).parent}:\n")
    table(["per-sample gradients", "rows per call", "time", "rows/s", "speed-up"], res)


def norms(reps: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradpipe.backprop import block_partial
    from gradpipe.outputs import PerSampleWriter

    print("## Per-sample norms to Parquet (workload P, one 50,000-row block)\n")
    arch, params, _, _, _, _, block = p_chunk(8)
    got = []
    block_partial(arch, params, block.x, block.y, classify=True,
                  sink=lambda s, lo, sq, g: got.append((s, lo.copy(), sq.copy())))
    n = len(block.x)
    tmp = Path(tempfile.mkdtemp(prefix="whatif-", dir=OUT))

    def current() -> None:  # what block_step does: one writer per block, a write per chunk
        w = PerSampleWriter(tmp / "a.parquet", arch.L, full=False, classify=True)
        for s, lo, sq in got:
            m = len(lo)
            w.write(block.ids[s:s + m], block.labels[s:s + m], lo, sq, None)
        w.close()

    def table_of(parts) -> pa.Table:
        s0, lo, sq = parts
        m = len(lo)
        cols = {"sample": block.ids[s0:s0 + m], "label": block.labels[s0:s0 + m], "loss": lo,
                "grad_norm": np.sqrt(sq[:, 1:].sum(axis=1))}
        cols.update({f"grad_norm_l{l}": np.sqrt(sq[:, l]) for l in range(1, sq.shape[1])})
        return pa.table(cols)

    def per_chunk(**opts):
        def fn() -> None:
            with pq.ParquetWriter(tmp / "b.parquet", table_of(got[0]).schema, **opts) as w:
                for parts in got:
                    w.write_table(table_of(parts))
        return fn

    def per_block(**opts):
        def fn() -> None:
            pq.write_table(pa.concat_tables([table_of(p) for p in got]), tmp / "c.parquet",
                           **opts)
        return fn

    cases = [
        ("PerSampleWriter as now: zstd, a row group per 8,192-row chunk", current),
        ("zstd, per chunk, use_dictionary=False, write_statistics=False",
         per_chunk(compression="zstd", use_dictionary=False, write_statistics=False)),
        ("snappy, per chunk, no dictionary, no statistics",
         per_chunk(compression="snappy", use_dictionary=False, write_statistics=False)),
        ("zstd, one row group per block (chunks concatenated)",
         per_block(compression="zstd")),
        ("zstd, one row group per block, no dictionary, no statistics",
         per_block(compression="zstd", use_dictionary=False, write_statistics=False)),
        ("snappy, one row group per block, no dictionary, no statistics",
         per_block(compression="snappy", use_dictionary=False, write_statistics=False)),
        ("uncompressed, one row group per block, no dictionary, no statistics",
         per_block(compression="none", use_dictionary=False, write_statistics=False)),
    ]
    t_compute = timeit(lambda: block_partial(arch, params, block.x, block.y, classify=True),
                       reps)
    res = []
    for name, fn in cases:
        t = timeit(fn, reps)
        res.append([name, f"{t * 1e3:.1f} ms", f"{t / t_compute:.0%}"])
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n:,} rows; block_partial on the block (1 thread, BLAS threads as set): "
          f"{t_compute * 1e3:.1f} ms; median of {reps}:\n")
    table(["writing the block's per-sample rows", "time", "of the block's compute"], res)


def arrow_child(mode: str, blocks: int) -> None:
    """Stream (read, convert, drop) `blocks` L blocks; print RSS after, peak, and held."""
    import pyarrow as pa

    from gradpipe.data import DataSpec, plan, read_block

    ds = plan(DataSpec(str(OUT / "data" / "L-8000000")))
    pool = pa.default_memory_pool()

    def status(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    base = status("VmRSS")
    keep = []
    for b in ds.blocks[:blocks]:
        d = read_block(ds, b, "float32")
        if mode.startswith("hold"):
            keep.append(d)
        if mode.endswith("release"):
            pool.release_unused()
    held = sum(d.nbytes for d in keep)
    print(json.dumps({"rss": status("VmRSS") - base, "peak": status("VmHWM") - base,
                      "held": held, "pool": pool.backend_name,
                      "pool_bytes": pool.bytes_allocated(), "pool_max": pool.max_memory()}))


def arrow(reps: int) -> None:
    print("## Worker memory: pyarrow's memory pool while blocks are read (workload M blocks)\n")
    if not (OUT / "data" / "L-8000000").exists():
        print("benches/out/data/L-8000000 missing: run benches/bench.py --only M first\n")
        return
    rows = []
    for mode in ("stream", "stream+release", "hold", "hold+release"):
        for pool in ("mimalloc (default)", "system"):
            for blocks in (8, 64):
                env = dict(os.environ)
                if pool == "system":
                    env["ARROW_DEFAULT_MEMORY_POOL"] = "system"
                r = subprocess.run([sys.executable, __file__, "_arrow-child", mode, str(blocks)],
                                   env=env, capture_output=True, text=True, check=True)
                d = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append([mode, d["pool"], blocks, f"{d['held'] / 2**20:,.0f} MiB",
                             f"{d['rss'] / 2**20:,.0f} MiB", f"{d['peak'] / 2**20:,.0f} MiB",
                             f"{(d['peak'] - d['held']) / 2**20:,.0f} MiB"])
    print("RSS above the process's RSS before the first block (one process per row):\n")
    table(["blocks", "pool", "n (65,536 rows each)", "held", "RSS after", "peak",
           "peak - held"], rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_arrow-child":
        return arrow_child(sys.argv[2], int(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="grads,norms,arrow")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        for name in args.only.split(","):
            {"grads": grads, "norms": norms, "arrow": arrow}[name.strip()](args.reps)


if __name__ == "__main__":
    main()
