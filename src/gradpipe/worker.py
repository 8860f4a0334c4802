"""Workers: blocks -> Partials. A plain class does the work; Ray actors are a thin wrapper.

`BlockSet` loads its blocks once (checking them) and keeps them, or streams them from
Parquet each step when they exceed the memory budget; per step it folds its blocks'
Partials into the nodes of the reduction tree (tree.py) inside its blocks, O(log B) of
them, and, when asked, writes the blocks' per-sample rows itself. `Pool` plans which
worker holds which blocks and fans each step out: to Ray actors, or in-process when
workers == 0. Nothing here depends on which worker holds a block, so any split gives the
same bits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from numpy.typing import NDArray

from . import raycompat, store
from .backprop import Partial, block_partial, row_sq
from .data import Block, BlockData, Dataset, filesystem, read_block
from .errors import JobError
from .evaluate import (
    EvalRequest,
    EvalSums,
    PredictRequest,
    class_probabilities,
    evaluate_block,
    predict_block,
)
from .model import Architecture, Params
from .outputs import PerSampleWriter, per_sample_path
from .privacy import poisson_rows
from .tree import held_nodes, tree_fold

if TYPE_CHECKING:
    from .local import LocalWorkers

F64 = NDArray[np.float64]


def cores() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class StepRequest:
    """What one step asks of every worker (sent once per step through the object store)."""

    step: int
    arch: Architecture
    params: Params
    per_sample: str = "none"  # none | norms | full
    out_dir: str | None = None  # run folder, for per-sample files
    batch: NDArray[np.int64] | None = None  # sorted global row indexes; None: full batch
    standardize: tuple[F64, F64] | None = None  # (mean, std) of the features
    target_scale: tuple[F64, F64] | None = None  # (mean, std) of regression targets
    second_moment: bool = False  # also sum_i (dC_i/dtheta)^2 (Partial.sq_w, sq_b)
    classes: tuple | None = None  # class values in output order, for per-sample metadata
    class_type: str | None = None
    # Poisson sampling (privacy.poisson_rows): each sample in the batch with probability
    # batch_rate, decided by this step's key and the sample's id alone.
    batch_rate: float | None = None
    sample_key: tuple[int, int] | None = None
    clip: float | None = None  # DP-SGD: sum the clipped per-sample gradients (backprop)
    targets: tuple[str, ...] = ()  # regression: the target names, for per-sample residuals
    # Also sum_i (a[L]_i - y_i)^2 per output unit (Partial.out_sse): each regression
    # target's r2 of the saved weights.
    output_sse: bool = False


@dataclass
class Moments:
    """Feature count, mean and sum of squared deviations (M2) of one block, in float64."""

    block: int
    n: int
    mean: F64
    m2: F64


def combine_moments(parts: list[Moments]) -> tuple[F64, F64]:
    """Mean and population std over all blocks, combined in block order (Chan et al.),
    with std 1 for the constant columns of `column_moments`."""
    mean, std, constant = column_moments(parts)
    return mean, np.where(constant, 1.0, std)


def column_moments(parts: list[Moments]) -> tuple[F64, F64, NDArray[np.bool_]]:
    """Mean, population std and which columns are constant, over all blocks, combined in
    block order (Chan et al.).

    combine_moments gives a constant column std 1, so that it is only centred: x - mean is 0 (or its
    rounding) in float32 and float64 alike. Its computed std is rounding, not 0: a block's
    mean sums n equal values one row at a time, off by up to n eps / 4 of the value, and
    each block of Chan's update adds about eps. So a column whose std is at most
    4 eps (rows of the largest block + blocks) times its size, sqrt(mean^2 + std^2), is
    constant. (Dividing by that std would blow the rounding up to values of order 1 that
    differ between the dtypes: 2e-16 was taken as the std of a column of 0.1s.)
    """
    parts = sorted(parts, key=lambda p: p.block)
    n, mean, m2 = 0, np.zeros_like(parts[0].mean), np.zeros_like(parts[0].m2)
    for p in parts:
        if p.n == 0:
            continue
        total = n + p.n
        d = p.mean - mean
        mean = mean + d * (p.n / total)
        m2 = m2 + p.m2 + d * d * (n * p.n / total)
        n = total
    std = np.sqrt(m2 / max(n, 1))
    rows = max(p.n for p in parts)
    rounding = 4 * float(np.finfo(np.float64).eps) * (rows + len(parts))
    constant = std <= rounding * np.hypot(mean, std)  # also std 0, mean 0
    return mean, std, constant


def _block_moments(d: BlockData, values: NDArray[np.floating]) -> Moments:
    x = values.astype(np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    return Moments(d.block.index, len(x), mean, ((x - mean) ** 2).sum(axis=0))


def sample_outputs(arch: Architecture, a_L: NDArray[np.floating], y: NDArray[np.floating],
                   prediction: NDArray[np.intp] | None, *,
                   overwrite: bool = False, residual: bool = False,
                   target_scale: tuple[F64, F64] | None = None) -> dict[str, NDArray]:
    """What the model did with each sample, from the output layer a[L] (m, n_L) and the
    target y (m, n_L) as training sees it (one-hot classes, or standardized targets).

    el2n = |a[L] - y|_2 (EL2N, Paul et al. 2021; the softmax probabilities for softmax),
    in the compute dtype of a[L]. Classification (`prediction`: argmax_j a[L]_j, the class
    indices block_partial found) also: prediction, and confidence = its probability
    (evaluate.class_probabilities: a[L] for softmax, else a[L] clipped at 0 over its row
    sum), in that dtype too. `overwrite`: a_L is the caller's own copy, and becomes a[L] - y
    (no new array of the block's outputs). `residual` (regression): also each target's
    residual, target - prediction in the targets' units, (y - a[L]) std with
    `target_scale`, (m, n_L) in the compute dtype.
    """
    out: dict[str, NDArray] = {}
    if prediction is not None:
        if arch.output_activation == "softmax":  # the probabilities are a[L] itself
            # a_L[i, prediction[i]] picked from the flat array: take_along_axis, or a max
            # over each row of 10 values, took 2 to 20 times as long.
            flat = np.arange(0, a_L.size, a_L.shape[1]) + prediction
            chosen = np.ravel(a_L).take(flat)
        else:
            probabilities = class_probabilities(arch, a_L)  # (m, K) float64
            chosen = probabilities[np.arange(len(prediction)), prediction]
        out["prediction"] = prediction.astype(np.int64, copy=False)
        out["confidence"] = chosen.astype(a_L.dtype, copy=False)
    err = np.subtract(a_L, y, out=a_L if overwrite else None)  # (m, n_L)
    el2n = row_sq(err)
    out["el2n"] = np.sqrt(el2n, out=el2n)
    if residual:
        scale = -np.ones(err.shape[1]) if target_scale is None else -target_scale[1]
        out["residual"] = err * scale.astype(err.dtype)  # y - a[L], in the targets' units
    return out


class BlockRows:
    """One block's per-sample norms rows, kept chunk by chunk in arrays of the block's
    length and written in one call at the end (each write converts a dozen columns to
    Arrow; chunks are 1 MiB of a layer). The outputs are computed once over the block's
    a[L]: sample_outputs chunk by chunk cost 2.6 times as much (25 chunks of 2,048 rows)."""

    def __init__(self, arch: Architecture, n: int, classify: bool) -> None:
        self.arch = arch
        self.losses = np.empty(n)
        # (n, L+1) as the engine gives it, laid out column by column: the writer's square
        # roots and their sum then read each layer's norms as one contiguous run.
        self.sq = np.empty((arch.L + 1, n)).T
        self.a_L = np.empty((n, arch.sizes[-1]), arch.dtype)
        self.prediction = np.empty(n, np.int64) if classify else None

    def outputs(self, start: int, a_L: NDArray[np.floating], y: NDArray[np.floating],
                prediction: NDArray[np.intp] | None) -> None:
        """block_partial's OutputSink: keeps this chunk's a[L] and predicted classes."""
        self.a_L[start : start + len(a_L)] = a_L
        if self.prediction is not None and prediction is not None:
            self.prediction[start : start + len(a_L)] = prediction

    def rows(self, start: int, losses: F64, sq: F64, grads: NDArray | None) -> None:
        """block_partial's Sink (norms: no gradients)."""
        self.losses[start : start + len(losses)] = losses
        self.sq[start : start + len(losses)] = sq


def block_step(data: BlockData, req: StepRequest, classify: bool) -> Partial:
    """One block's Partial for one step; writes its per-sample rows when asked."""
    x, y, ids, labels = data.x, data.y, data.ids, data.labels
    if req.batch is not None:
        # Rows of this block drawn for the mini-batch: global indexes first_id .. first_id+n-1.
        first = data.block.first_id
        lo, hi = np.searchsorted(req.batch, [first, first + data.block.n])
        rows = req.batch[lo:hi] - first
        x, y, ids = x[rows], y[rows], ids[rows]
        labels = labels[rows] if labels is not None else None
    if req.batch_rate is not None and req.batch_rate < 1.0:
        assert req.sample_key is not None, "Poisson sampling without the step's key"
        rows = poisson_rows(ids, req.sample_key, req.batch_rate)
        x, y, ids = x[rows], y[rows], ids[rows]
        labels = labels[rows] if labels is not None else None
    writer = None
    if req.per_sample != "none" and req.out_dir is not None:
        writer = PerSampleWriter(
            per_sample_path(req.out_dir, req.step, data.block.index),
            req.arch.L,
            full=req.per_sample == "full",
            classify=classify,
            dtype=req.arch.dtype,
            outputs=True,
            classes=req.classes,
            class_type=req.class_type,
            targets=req.targets,
        )
    full = req.per_sample == "full"
    residual = not classify and bool(req.targets)
    kept = BlockRows(req.arch, len(x), classify) if writer is not None and not full else None
    # Full gradients: the current chunk's outputs; the sink gets pieces of that chunk.
    chunk: dict[str, Any] = {"start": 0, "outputs": {}}

    def on_outputs(start: int, a_L: NDArray[np.floating], y_chunk: NDArray[np.floating],
                   prediction: NDArray[np.intp] | None) -> None:
        chunk["start"], chunk["outputs"] = start, sample_outputs(
            req.arch, a_L, y_chunk, prediction, residual=residual,
            target_scale=req.target_scale)

    def sink(start: int, losses: F64, sq: F64, grads: NDArray[np.floating] | None) -> None:
        m = len(losses)
        assert writer is not None and grads is not None
        at = start - chunk["start"]
        outs = {k: v[at : at + m] for k, v in chunk["outputs"].items()}
        writer.write(
            ids[start : start + m],
            labels[start : start + m] if labels is not None else None,
            losses,
            sq,
            grads,
            outs,
        )

    # Norms go to `kept`, full gradients through `sink` to the writer, else nothing.
    sinks = ((kept.rows, kept.outputs) if kept is not None
             else (sink, on_outputs) if writer is not None else (None, None))
    outputs = sinks[1]
    out_sse = np.zeros(req.arch.sizes[-1]) if req.output_sse else None
    if out_sse is not None:
        rows_out = outputs

        def outputs(start: int, a_L: NDArray[np.floating], y_chunk: NDArray[np.floating],
                    prediction: NDArray[np.intp] | None) -> None:
            assert out_sse is not None
            err = a_L.astype(np.float64) - y_chunk  # (m, n_L)
            np.add(out_sse, (err * err).sum(axis=0), out=out_sse)
            if rows_out is not None:
                rows_out(start, a_L, y_chunk, prediction)

    try:
        partial = block_partial(
            req.arch,
            req.params,
            x,
            y,
            block=data.block.index,
            classify=classify,
            sink=sinks[0],
            full=full,
            second_moment=req.second_moment,
            outputs=outputs,
            clip=req.clip,
            reuse_grads=True,  # the writer writes each piece of gradients before returning
            labels=labels,
        )
        if kept is not None:
            assert writer is not None
            writer.write(ids, labels, kept.losses, kept.sq, None,
                         sample_outputs(req.arch, kept.a_L, y, kept.prediction,
                                        overwrite=True, residual=residual,
                                        target_scale=req.target_scale))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    partial.out_sse = out_sse
    return partial


def _release_arrow_memory() -> None:
    """Hand Arrow's freed read buffers back to the OS: blocks live on as numpy arrays, and
    the pool would otherwise keep the Parquet tables' memory resident (about 100 MiB)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


@functools.cache
def _threadpools() -> Any:
    """This process's BLAS and OpenMP libraries, found once: finding them walks every loaded
    library, which took 3 ms, as long as a small step."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Limit numpy's BLAS to one thread in this process for the duration."""
    return _threadpools().limit(limits=1, user_api="blas")


class BlockSet:
    """The blocks one worker holds, loaded once (or streamed), and the work on them."""

    def __init__(
        self, dataset: Dataset, blocks: list[Block], dtype: str, stream: bool = False,
        threads: int = 1,
    ) -> None:
        self.dataset = dataset
        self.blocks = blocks
        self.dtype = dtype
        self.stream = stream
        self.threads = max(1, threads)  # blocks computed at once, one BLAS thread each
        self.fs, _ = filesystem(dataset.source)
        self._opened: dict = {}  # each file opened once (its footer parsed once)
        self._reads: dict[int, int] = {}  # block index -> times read (Pool.reads)
        self._scaled = False  # in-memory blocks are scaled once, at their first step
        self._executor: ThreadPoolExecutor | None = None  # started at the first step
        self.data: list[BlockData] | None = None
        self.loaded = False

    def load(self) -> int:
        """Read and check every block; keep them unless streaming. Returns the bytes held.

        Called before anything is written, so bad data is refused early; called again
        (lazily) by a restarted actor, which starts empty.
        """
        if not self.loaded:
            if self.stream:
                for b in self.blocks:  # check each block, keep none
                    self._read(b)
            else:
                self.data = [self._read(b) for b in self.blocks]
            self.loaded = True
            _release_arrow_memory()
        return self.nbytes()

    def _read(self, block: Block) -> BlockData:
        self._reads[block.index] = self._reads.get(block.index, 0) + 1
        return read_block(self.dataset, block, self.dtype, self.fs, self._opened)

    def _apply(self, data: BlockData, standardize: tuple[F64, F64] | None,
               target_scale: tuple[F64, F64] | None = None) -> BlockData:
        for values, scale in ((data.x, standardize), (data.y, target_scale)):
            if scale is not None:
                mean, std = scale
                values -= mean.astype(values.dtype)
                values /= std.astype(values.dtype)
        return data

    def iter_blocks(self, standardize: tuple[F64, F64] | None = None,
                    target_scale: tuple[F64, F64] | None = None) -> Iterator[BlockData]:
        """The blocks, standardized as asked; streaming reads the next while one is used."""
        if not self.stream:
            self.load()
            assert self.data is not None
            if (standardize is not None or target_scale is not None) and not self._scaled:
                for d in self.data:
                    self._apply(d, standardize, target_scale)
                self._scaled = True
            yield from self.data
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._read, self.blocks[0]) if self.blocks else None
            for i in range(len(self.blocks)):
                assert pending is not None
                data = pending.result()
                _release_arrow_memory()
                if i + 1 < len(self.blocks):
                    pending = pool.submit(self._read, self.blocks[i + 1])
                yield self._apply(data, standardize, target_scale)

    def moments(self, targets: bool = False) -> list[Moments]:
        """Per-block moments of the raw features (or targets), for --standardize."""
        return [_block_moments(d, d.y if targets else d.x) for d in self.iter_blocks(None)]

    def both_moments(self) -> list[tuple[Moments, Moments]]:
        """Per-block moments of the raw features and of the targets, in one read."""
        return [(_block_moments(d, d.x), _block_moments(d, d.y)) for d in self.iter_blocks(None)]

    def step(self, req: StepRequest) -> list[Partial]:
        """The nodes of the reduction tree inside this worker's blocks, each the sum of
        its blocks' Partials along the tree (tree.held_nodes: one node for all the blocks
        in-process, O(log B) for a run of them), folded as the blocks are computed, so
        that a few partials are held at a time, not one per block."""
        nodes = held_nodes((b.index for b in self.blocks), len(self.dataset.blocks))
        return tree_fold(self._map_blocks(block_step, req, req.target_scale), nodes)

    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.data) if self.data is not None else 0

    def reads(self) -> dict[int, int]:
        """How many times this worker read each block (its own blocks only, by design)."""
        return dict(self._reads)

    def pid(self) -> int:
        return os.getpid()

    def blas_threads(self) -> int | None:
        """BLAS threads numpy uses while this worker computes a step."""
        from threadpoolctl import threadpool_info

        with one_blas_thread():
            return max((i["num_threads"] for i in threadpool_info()
                        if i["user_api"] == "blas"), default=None)

    def node(self) -> str | None:
        """The Ray node this worker runs on (None in-process)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def evaluate(self, req: EvalRequest) -> list[EvalSums]:
        """One EvalSums per block (features standardized, targets in their own units)."""
        return self._each_block(evaluate_block, req)  # targets in their own units

    def predict(self, req: PredictRequest) -> list[tuple[int, int]]:
        """Write each block's predictions to req.out_dir; (block, rows) per block."""
        return self._each_block(predict_block, req)

    def _each_block(self, fn: Any, req: Any, target_scale: tuple[F64, F64] | None = None
                    ) -> list:
        """fn(block data, req, classify) for every block, in block order, as a list."""
        return list(self._map_blocks(fn, req, target_scale))

    def _map_blocks(self, fn: Any, req: Any, target_scale: tuple[F64, F64] | None = None
                    ) -> Iterator:
        """fn(block data, req, classify) for every block, yielded in block order.

        Each block is computed with one BLAS thread, and cores are used by computing
        `threads` blocks at once (numpy releases the GIL): a block's bits must not depend on
        how many threads its matrix products were split over, which OpenBLAS does not
        promise. The thread pool lives as long as the worker (starting threads at every
        step cost as much as a small step)."""
        classify = self.dataset.classify
        with one_blas_thread():
            blocks = self.iter_blocks(req.standardize, target_scale)
            if self.threads == 1:
                for d in blocks:
                    yield fn(d, req, classify)
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.threads)
            # One block more than threads in flight: a thread that finishes before the
            # oldest block does starts the next at once, instead of idling until the oldest
            # is collected (6% of an in-process step of workload L on 2 threads). The bound
            # keeps streamed blocks in memory to threads + 1.
            running: deque = deque()
            try:
                for d in blocks:
                    running.append(self._executor.submit(fn, d, req, classify))
                    if len(running) > self.threads:
                        yield running.popleft().result()
                while running:
                    yield running.popleft().result()
            finally:
                # A failed block (or a caller that stopped early) leaves the others: they
                # must not write into an output that the caller is about to clean up.
                for f in running:
                    f.cancel()
                wait(running)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def scores(self, req: Any) -> list[tuple[int, int, list[dict]]]:
        """Score each block from its own per-sample parts across req.steps and write its part
        of the scores (scores.scores_block); (block, rows, top rows) per block, in block
        order. The blocks' data is not read: the per-sample files hold all it takes."""
        from .scores import scores_block  # here: scores.py starts pools through this module

        return [scores_block(b.index, req) for b in self.blocks]

    def influence(self, req: Any) -> list:
        """The top proponents and opponents among this worker's training samples for every
        test sample (influence.influence_block on each block, merged here): one
        (proponents, opponents) pair."""
        from .influence import influence_block, merge

        found = self._each_block(influence_block, req, req.target_scale)
        return [tuple(merge([f[i] for f in found], req.top, kind)
                      for i, kind in enumerate(("proponent", "opponent")))]


def assign_blocks(blocks: tuple[Block, ...], workers: int) -> list[list[Block]]:
    """Split blocks into `workers` contiguous runs of about equal rows (some may be empty)."""
    total = sum(b.n for b in blocks)
    groups: list[list[Block]] = [[] for _ in range(workers)]
    seen = 0
    for b in blocks:
        # Worker w takes the blocks whose middle row falls in its share of the rows.
        w = min(workers - 1, int((seen + b.n / 2) * workers / total))
        groups[w].append(b)
        seen += b.n
    return groups


def ray_init(address: str | None, *, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Start a local Ray instance on 127.0.0.1, or connect to the cluster at `address`.

    "local" or None starts a private instance (never joins another cluster by accident),
    with the dashboard off and token authentication on, with a fresh token that only this
    process and the instance's own processes hold (nothing in ~/.ray); "auto", HOST:PORT
    and ray://HOST:PORT connect to a cluster.
    Ray's own logs stay out of the terminal unless `verbose`; errors still reach us.
    """
    import logging

    local = address in (None, "", "local")
    if local:
        raycompat.loopback_only()  # before `import ray`, which reads the switch
    import ray

    if ray.is_initialized():
        return
    quiet: dict[str, Any] = {
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose,
    }
    if local:
        # Token authentication on, with a token of this instance's own (256 bits, never
        # written to disk), whatever the environment or Ray's default says.
        with raycompat.token_auth(secrets.token_hex(32)):
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                **raycompat.local_init_kwargs(),
                **quiet,
            )
    else:
        assert address is not None
        if address != "auto" and not address.startswith("ray://"):
            _probe(address)
        # The S3 endpoint and region this command uses reach the cluster's workers (a
        # local instance's workers inherit them); credentials stay with each node's own
        # AWS configuration.
        env = store.worker_env()
        try:
            ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                     **quiet)
        except ConnectionError as e:
            raise JobError(f"--address {address}: cannot connect to Ray ({e})") from None


def _probe(address: str) -> None:
    """Fail in seconds, with one clear line, where ray.init would retry for 20-40 s.

    Checks that something listens at HOST:PORT, then asks the GCS for the cluster id,
    which a cluster with token authentication refuses at once when we have no token.
    """
    import socket

    if address.startswith(("http://", "https://")):
        raise JobError(f"--address {address}: a URL, as the dashboard's (the Jobs API, which "
                       "gradpipe submit takes); this command takes the cluster's GCS address, "
                       "HEAD:6379 (or ray://HEAD:10001)")
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise JobError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as e:
        raise JobError(
            f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None
    if raycompat.gcs_refuses_token(address):
        raise JobError(
            f"--address {address}: the cluster uses token authentication and no valid token "
            "was found. Set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."
        )


def _unwrap(e: Exception) -> Exception:
    """The user-facing error inside a Ray error, if there is one."""
    from .errors import GradpipeError

    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, GradpipeError) else e


class Pool:
    """The workers of one run: `workers` Ray actors; for 0, one BlockSet in this process
    (its blocks on `threads` threads at once, default one per core) or, given `processes`,
    one in each of that many child processes (local.py)."""

    def __init__(
        self,
        dataset: Dataset,
        workers: int,
        dtype: str,
        *,
        stream: bool = False,
        processes: int = 0,
        threads: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.workers = workers
        self.stream = stream
        # Why the work runs in this process though Ray was not declined (start_pool): "small
        # work" or "one block"; None: it runs where it was asked to.
        self.small: str | None = None
        self.local: BlockSet | None = None
        self.children: LocalWorkers | None = None  # workers == 0 in child processes
        self.actors: list = []
        if workers == 0 and processes > 1:
            from .local import LocalWorkers

            groups = [(dataset, g, dtype, stream, 1)
                      for g in assign_blocks(dataset.blocks, processes) if g]
            self.children = LocalWorkers(groups)
            return
        if workers == 0:
            self.local = BlockSet(dataset, list(dataset.blocks), dtype, stream,
                                  threads=cores() if threads is None else threads)
            return
        import ray

        cpus = float(ray.cluster_resources().get("CPU", 1))
        per_worker = cpus / workers  # Ray takes fractions below 1, whole numbers above
        num_cpus = per_worker if per_worker < 1 else int(per_worker)
        threads = max(1, int(per_worker))
        actor_class = ray.remote(BlockSet)
        for group in assign_blocks(dataset.blocks, workers):
            self.actors.append(
                actor_class.options(
                    num_cpus=num_cpus,
                    # A crashed actor restarts empty, reloads its blocks on the next call,
                    # and the call is retried: the gradient call is idempotent.
                    max_restarts=-1,
                    max_task_retries=-1,
                    scheduling_strategy="SPREAD",
                ).remote(dataset, group, dtype, stream, threads)
            )

    @property
    def processes(self) -> int:
        """Worker processes computing without Ray (0: in this process, or Ray actors)."""
        return len(self.children.procs) if self.children is not None else 0

    def without_ray(self) -> str:
        """What a command's schema line adds when the work runs without Ray: why it runs
        in-process, or in how many worker processes; "" otherwise."""
        if self.small:
            return f"; in-process: {self.small}, --workers N to use Ray"
        if self.processes:
            return f"; without Ray: {self.processes} worker processes on this machine"
        return ""

    def where(self, address: str | None = None, asked: int | None = None) -> str:
        """What a command's schema line adds: where the work runs, and with `asked` (its
        --workers) why fewer Ray workers than asked, when the data has fewer blocks."""
        n = self.workers
        if n == 0:
            return self.without_ray() or ("; in-process (--workers 0)" if asked == 0
                                          else "; in-process")
        blocks = len(self.dataset.blocks)
        fewer = (f" (--workers {asked}, but {blocks} block{'s' * (blocks != 1)}: a smaller "
                 "--block-rows splits them)" if asked is not None and n < asked else "")
        cluster = address not in (None, "", "local")
        return (f"; {n} Ray worker{'s' * (n != 1)} on "
                f"{address if cluster else 'a local instance'}{fewer}")

    def _call(self, method: str, *args) -> list:
        """Call `method` on every worker and wait for all; results in worker order."""
        if self.local is not None:
            return [getattr(self.local, method)(*args)]
        if self.children is not None:
            return self.children.call(method, *args)
        import ray

        try:
            return ray.get([getattr(a, method).remote(*args) for a in self.actors])
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None

    def load(self) -> int:
        """Load and check every block; returns the bytes the workers hold."""
        return sum(self._call("load"))

    def moments(self, targets: bool = False) -> tuple[F64, F64]:
        """Feature (or target) mean and std over the whole dataset, reduced in block order."""
        return combine_moments([m for ms in self._call("moments", targets) for m in ms])

    def both_moments(self) -> tuple[tuple[F64, F64], tuple[F64, F64, NDArray[np.bool_]]]:
        """In one pass over the data: the features' (mean, std), as moments() gives it, and
        the targets' column_moments (mean, std, constant); the mean of one-hot class rows
        is each class's share of the rows."""
        pairs = [pair for ps in self._call("both_moments") for pair in ps]
        return (combine_moments([x for x, _ in pairs]),
                column_moments([y for _, y in pairs]))

    def step(self, req: StepRequest) -> list[Partial]:
        """Fan one step out, the weights travelling once as one object-store reference;
        the tree nodes of every worker (reduce.reduce completes the tree): at most
        (W - 1) log2(B) + 1 partials for W workers over B blocks, 1 in-process."""
        return self._fan("step", req)

    def pids(self) -> list[int]:
        return self._call("pid")

    def nodes(self) -> list[str | None]:
        return self._call("node")

    def reads(self) -> list[dict[int, int]]:
        """Per worker: block index -> times read (a streaming worker reads its blocks at
        every step)."""
        return self._call("reads")

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        if self.children is not None:
            self.children.close()
            self.children = None
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
            self.actors = []

    def evaluate(self, req: EvalRequest) -> list[EvalSums]:
        """Every block's EvalSums (evaluate.metrics_from_sums adds them in block order)."""
        return self._fan("evaluate", req)

    def predict(self, req: PredictRequest) -> list[tuple[int, int]]:
        """Every worker writes its blocks' prediction parts; (block, rows) per block."""
        return self._fan("predict", req)

    def _fan(self, method: str, req: Any) -> list:
        """Call `method` with `req` on every worker, the request travelling once as one
        object-store reference; the per-block results of all workers, in worker order."""
        if not self.actors:  # in this process, or in worker processes without Ray
            results = self._call(method, req)
        else:
            import ray

            ref = ray.put(req)
            try:
                results = ray.get([getattr(a, method).remote(ref) for a in self.actors])
            except ray.exceptions.RayTaskError as e:
                raise _unwrap(e) from None
        return [r for per_worker in results for r in per_worker]

    def scores(self, req: Any) -> list[tuple[int, int, list[dict]]]:
        """Every worker scores its blocks and writes their parts; (block, rows, top rows) per
        block."""
        return self._fan("scores", req)

    def influence(self, req: Any) -> list:
        """Every worker's (proponents, opponents) pair; influence.merge joins them."""
        return self._fan("influence", req)


# Work runs in-process by default when Ray could only make it slower (measured here: a
# local instance starts in 5-10 s, a step on Ray costs 7-9 ms more than in-process, one core
# computes an MLP step at about 20 GFLOP/s in float32, and in-process uses every core
# where blocks are large enough): when the whole run is below SMALL_WORK_FLOPS, or each
# step below SMALL_STEP_FLOPS. 200,000 rows x 64 features, 20 steps (5.8e10 operations)
# took 8.3 s end to end on a local instance and 2.4 s in-process (2 worker processes).
SMALL_WORK_FLOPS = 2e11  # about 10 s of one core's compute: Ray's start, 5-10 s
SMALL_STEP_FLOPS = 3e8  # about 15 ms a step: Ray's per-step overhead would eat any gain
# Without Ray (--workers 0), steps of at least PROCESS_STEP_FLOPS run in one child process
# per core (local.py) instead of one thread per core: two threads share one GIL, which cost
# workload L 8% of its step. Below it a step is too short for that to matter against a
# call's round trip through the pipes, and the process start (0.2-0.4 s) would show.
PROCESS_STEP_FLOPS = 1e9  # about 50 ms a step on one core
# In this process, blocks are computed one per core at once only when a block is at least
# THREAD_BLOCK_FLOPS of work; smaller blocks go one at a time on one thread. Two threads on
# small blocks mostly wait for each other's GIL: a step of workload P (64-128-10, 20,000
# rows) took 1.93x the one-thread time in blocks of 128 rows (7e6 operations a block),
# 1.25x at 512 rows, the same at 1,024 (6e7) and 0.71x at 2,048 (1.2e8); the Quickstart's
# 300 steps over 9 blocks of 200 rows took 2.48 s on 2 threads and 1.41 s on one.
THREAD_BLOCK_FLOPS = 1e8


def start_pool(dataset: Dataset, workers: int | None, dtype: str, *, address: str | None = None,
               memory_budget: int | None = None, verbose: bool = False,
               flops: tuple[float, int] | None = None) -> Pool:
    """The workers of a command: `workers` Ray actors (None: one per CPU Ray offers) on a
    private local instance or the cluster at `address`, or in-process for 0. A worker
    streams its blocks from Parquet each step when its share of the rows exceeds
    `memory_budget` bytes (default: half this machine's memory over the workers; on a
    cluster, set it for the nodes).

    With neither `workers` nor `address` given, small work runs in-process (`Pool.small`
    then says why): `flops`, the caller's estimate (operations per step, steps), below
    SMALL_WORK_FLOPS in all or SMALL_STEP_FLOPS a step; so does a dataset of one block,
    which one worker would compute while Ray's start only adds to the wait. Work without
    Ray whose steps reach PROCESS_STEP_FLOPS runs in one child process per core
    (`Pool.processes`); shorter steps run in this process, on one thread where blocks are
    below THREAD_BLOCK_FLOPS. The bits
    are the same either way."""
    default = workers is None and address is None
    small = None
    if default and flops is not None and (flops[0] * flops[1] <= SMALL_WORK_FLOPS
                                          or flops[0] <= SMALL_STEP_FLOPS):
        small = "small work"
    elif default and len(dataset.blocks) == 1:  # a block is one worker's: Ray would only wait
        small = "one block (a smaller --block-rows splits it)"
    if small:
        workers = 0
    if workers != 0:
        ray_init(address, verbose=verbose)
    if workers is None:
        import ray

        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_workers = min(workers, len(dataset.blocks))
    processes, threads = 0, None
    if n_workers == 0 and flops is not None:
        if not small and flops[0] >= PROCESS_STEP_FLOPS:
            processes = min(cores(), len(dataset.blocks))
        elif flops[0] / max(1, len(dataset.blocks)) < THREAD_BLOCK_FLOPS:
            threads = 1
    holders = max(1, n_workers, processes)  # the processes that hold a share of the rows
    if memory_budget is None:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory_budget = physical // 2 // holders
    row_bytes = np.dtype(dtype).itemsize * (dataset.n_features + dataset.n_outputs) + 8  # + id
    stream = dataset.n_rows * row_bytes / holders > memory_budget
    pool = Pool(dataset, n_workers, dtype, stream=stream, processes=processes,
                threads=threads)
    pool.small = small
    return pool
