"""TracIn-CP influence of training samples on test samples, by ghost dot products.

    influence(i, j) = sum_c eta_c  grad C_i(w_c) . grad C_j(w_c)       (Pruthi et al. 2020)

over the run's checkpoints c (checkpoints/step-S holds w_S; eta_c is the learning rate of
step S). Each layer's per-sample gradient is rank one (BP3, BP4), so with a~[l-1] = [a[l-1], 1]

    grad C_i . grad C_j = sum_l (delta[l]_i . delta[l]_j) (a~[l-1]_i . a~[l-1]_j)

and a tile of m training rows against n test rows costs two matrix products per layer,
(m, n_l) @ (n_l, n) and (m, n_{l-1}+1) @ (n_{l-1}+1, n): no per-sample gradient (P numbers a
sample) is ever formed. The math (`ghost_factors`, `ghost_add`, `select`) is pure numpy;
`influence_block` is what a worker runs on each training block it holds; `influence` is the
driver, which merges the workers' top K per test sample.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from . import store
from .backprop import deltas
from .config import TrainConfig  # the execution options, declared there
from .data import BlockData, Dataset, filesystem, read_block, schema_line
from .errors import ConfigError, DataError
from .model import Architecture, Params, forward
from .options import check_paths, check_values
from .outputs import no_final_weights, read_model, read_run_json, read_weights, write_table
from .recorder import check_apart, recorded_steps

if TYPE_CHECKING:
    from .worker import Pool

Array = NDArray[np.floating]
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
Scale = tuple[F64, F64]  # (mean, std)
KINDS = ("proponent", "opponent")
# The tile: TRAIN_ROWS training rows (fixed chunks from each block's first row) against one
# test block of at most TEST_ROWS rows. Fixed, never tied to the worker count, so every
# influence value is the same product of the same matrices for any split of the blocks.
# Memory: the float64 tile and two temporaries, 3 * 8 * TRAIN_ROWS * TEST_ROWS = 96 MiB.
TRAIN_ROWS = 2048
TEST_ROWS = 2048


# --- the math ---------------------------------------------------------------------------------


# Per layer l = 1..L: (delta[l] (n, n_l), a~[l-1] (n, n_{l-1}+1)).
Factors = list[tuple[Array, Array]]


def ghost_factors(arch: Architecture, params: Params, x: Array, y: Array,
                  eta: float = 1.0) -> Factors:
    """(eta delta[l], [a[l-1], 1]) for l = 1..L: the two factors of every layer's per-sample
    gradient (grad_w[l]_i = outer(delta[l]_i, a[l-1]_i), grad_b[l]_i = delta[l]_i), with
    the checkpoint's learning rate folded into delta."""
    a, z = forward(arch, params, x)
    delta = deltas(arch, params, a, z, y)
    out: Factors = []
    for l in range(1, arch.L + 1):
        ones = np.ones((x.shape[0], 1), a[l - 1].dtype)
        out.append((delta[l] * a[l - 1].dtype.type(eta), np.hstack([a[l - 1], ones])))
    return out


def ghost_add(train: Factors, test: Factors, out: F64, rows: int = 512) -> F64:
    """out += sum_l (delta_tr[l] delta_te[l]^T) * (a~_tr[l-1] a~_te[l-1]^T), (m, n).

    Computed `rows` training rows at a time, so that the two products and their sum stay
    in cache (2x faster than whole 2,048 x 1,000 tiles on a 2-core EPYC); the products run in the
    compute dtype and are added into the float64 `out`.
    """
    m, n = out.shape
    dtype = train[0][0].dtype
    dd_buf, aa_buf = np.empty((min(rows, m), n), dtype), np.empty((min(rows, m), n), dtype)
    for start in range(0, m, rows):
        part = slice(start, start + rows)
        o = out[part]  # (r, n), a view
        dd, aa = dd_buf[: o.shape[0]], aa_buf[: o.shape[0]]
        for (d_tr, a_tr), (d_te, a_te) in zip(train, test, strict=True):
            np.matmul(d_tr[part], d_te.T, out=dd)  # delta_i . delta_j
            np.matmul(a_tr[part], a_te.T, out=aa)  # a_i . a_j + 1
            dd *= aa
            o += dd
    return out


@dataclass
class Ranked:
    """The top training samples of one kind for some test samples, sorted by test sample,
    then rank: three arrays of equal length."""

    test: I64  # test sample id
    train: I64  # training sample id
    value: F64  # influence

    @classmethod
    def empty(cls) -> "Ranked":
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0))

    def __len__(self) -> int:
        return len(self.test)


def select(test: I64, train: I64, value: F64, k: int, kind: str) -> Ranked:
    """The k training samples of largest positive influence (proponent) or most negative
    (opponent) per test sample, ties by smaller training id: a total order, so selecting
    from any split of the candidates and again from the union gives the same rows."""
    keep = value > 0 if kind == "proponent" else value < 0  # NaN and 0: neither
    test, train, value = test[keep], train[keep], value[keep]
    order = np.lexsort((train, -value if kind == "proponent" else value, test))
    test, train, value = test[order], train[order], value[order]
    if len(test) == 0:
        return Ranked(test, train, value)
    starts = np.flatnonzero(np.r_[True, test[1:] != test[:-1]])  # first row of each test id
    sizes = np.diff(np.r_[starts, len(test)])
    rank = np.arange(len(test)) - np.repeat(starts, sizes)
    keep = rank < k
    return Ranked(test[keep], train[keep], value[keep])


def merge(parts: list[Ranked], k: int, kind: str) -> Ranked:
    """select() over the union of several candidate sets."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Ranked.empty()
    return select(np.concatenate([p.test for p in parts]),
                  np.concatenate([p.train for p in parts]),
                  np.concatenate([p.value for p in parts]), k, kind)


TINY = float(np.nextafter(0.0, 1.0))  # the smallest positive float64


def floors(found: Ranked, test_ids: I64, k: int, kind: str) -> F64:
    """Per test sample (test_ids, unique): the k-th influence found so far, which a new
    candidate must reach; where fewer than k were found, the smallest value of the kind's
    sign (TINY, or -TINY for opponents)."""
    out = np.full(len(test_ids), TINY if kind == "proponent" else -TINY)
    if len(found):
        starts = np.flatnonzero(np.r_[True, found.test[1:] != found.test[:-1]])
        sizes = np.diff(np.r_[starts, len(found)])
        last = (starts + sizes - 1)[sizes >= k]  # the k-th of every complete list
        order = np.argsort(test_ids)
        at = order[np.searchsorted(test_ids, found.test[last], sorter=order)]
        out[at] = found.value[last]
    return out


def tile_candidates(values: F64, train_ids: I64, test_ids: I64, k: int,
                    floor: tuple[F64, F64] | None = None) -> tuple[Ranked, Ranked]:
    """(proponents, opponents) of one tile of influences (m training, n test rows).

    A value can enter a test sample's top k only if it reaches the k-th found so far
    (`floor`, from `floors`) and the tile's own k-th (found by one partition, skipped once
    every test sample has k); every value at or past both, ties included, goes to select(),
    which orders them exactly.
    """
    m, n = values.shape
    hi, lo = floor if floor is not None else (np.full(n, TINY), np.full(n, -TINY))
    if m > k and (np.any(hi == TINY) or np.any(lo == -TINY)):
        part = np.partition(values, [k - 1, m - k], axis=0)  # (m, n)
        hi, lo = np.maximum(hi, part[m - k]), np.minimum(lo, part[k - 1])
    out = []
    for kind, mask in (("proponent", values >= hi), ("opponent", values <= lo)):
        rows, cols = np.nonzero(mask)
        out.append(select(test_ids[cols], train_ids[rows], values[rows, cols], k, kind))
    return out[0], out[1]


def scaled(data: BlockData, standardize: Scale | None, target_scale: Scale | None) -> BlockData:
    """A block's features (and regression targets) scaled as training scaled them."""
    for values, scale in ((data.x, standardize), (data.y, target_scale)):
        if scale is not None:
            values -= scale[0].astype(values.dtype)
            values /= scale[1].astype(values.dtype)
    return data


# --- what the workers run on each training block they hold -----------------------------------


@dataclass(frozen=True)
class InfluenceRequest:
    """What `gradpipe influence` asks of every worker (one object-store reference)."""

    arch: Architecture  # in the compute dtype
    checkpoints: tuple[tuple[int, float, Params], ...]  # (step S, eta of step S, w_S)
    test: Dataset  # planned in blocks of at most TEST_ROWS rows; workers read it themselves
    top: int
    standardize: Scale | None = None  # the features' (mean, std), training's
    target_scale: Scale | None = None  # regression targets' (mean, std), training's


def influence_block(data: BlockData, req: InfluenceRequest, classify: bool
                    ) -> tuple[Ranked, Ranked]:
    """The top req.top proponents and opponents among one training block's samples, for
    every test sample. Test blocks are read one at a time; per test block, each chunk of
    TRAIN_ROWS training rows makes one tile, summed over the checkpoints."""
    arch, k = req.arch, req.top
    fs, _ = filesystem(req.test.source)
    found: dict[str, list[Ranked]] = {kind: [] for kind in KINDS}
    for test_block in req.test.blocks:
        test = scaled(read_block(req.test, test_block, arch.dtype, fs), req.standardize,
                      req.target_scale)
        if len(np.unique(test.ids)) != len(test.ids):
            raise DataError(f"{test_block.file}: test sample ids repeat in rows "
                            f"{test_block.file_row}..{test_block.file_row + test_block.n - 1}; "
                            "influence needs one id per test sample (--id-column)")
        test_factors = [ghost_factors(arch, params, test.x, test.y, eta)
                        for _, eta, params in req.checkpoints]
        pro, opp = Ranked.empty(), Ranked.empty()  # this test block's top k so far
        for start in range(0, data.x.shape[0], TRAIN_ROWS):
            rows = slice(start, start + TRAIN_ROWS)
            tile = np.zeros((len(data.ids[rows]), len(test.ids)))  # (m, n) float64
            for (_, _, params), te in zip(req.checkpoints, test_factors, strict=True):
                ghost_add(ghost_factors(arch, params, data.x[rows], data.y[rows]), te, tile)
            floor = (floors(pro, test.ids, k, "proponent"), floors(opp, test.ids, k, "opponent"))
            got_pro, got_opp = tile_candidates(tile, data.ids[rows], test.ids, k, floor)
            pro, opp = merge([pro, got_pro], k, "proponent"), merge([opp, got_opp], k, "opponent")
        found["proponent"].append(pro)
        found["opponent"].append(opp)
    return merge(found["proponent"], k, "proponent"), merge(found["opponent"], k, "opponent")


# --- the command: run + test data -> workers -> one Parquet file -------------------------------


@dataclass(frozen=True)
class InfluenceConfig:
    """The options of `gradpipe influence`."""

    run: str  # the run folder
    test: str  # test data: Parquet file, folder or URI
    out: str  # the Parquet file to write
    top: int = 10  # proponents and opponents per test sample
    dtype: str | None = None  # compute dtype; None: the model's
    workers: int | None = None
    address: str | None = None
    memory_budget: int | None = None
    id_column: str | None = None  # test sample ids; None: the run's id column, else row index
    overwrite: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.top < 1:
            raise ConfigError(f"--top {self.top}: must be >= 1")
        check_values(TrainConfig, workers=self.workers, address=self.address,
                     memory_budget=self.memory_budget)
        check_paths(out=self.out)
        if self.dtype not in (None, "float32", "float64"):
            raise ConfigError(f"--dtype {self.dtype}: choose float32 or float64")


def checkpoint_rates(run: str | Path) -> list[tuple[int, float, str]]:
    """(S, eta_S, weights.parquet) of every complete checkpoint: eta_S is the learning rate
    of step S (its metrics row); the last checkpoint, written after the last step, has no
    step S and takes the rate of step S-1, the step that produced w_S."""
    from .scores import step_rates

    run = store.resolve(str(run))
    found = []
    rates = step_rates(run)
    for step in recorded_steps(run, "checkpoints"):
        folder = store.join(run, "checkpoints", f"step-{step:06d}")
        if not store.is_file(store.join(folder, "state.json")):
            continue  # written last: an incomplete checkpoint
        eta = rates.get(step, rates.get(step - 1))
        if eta is None:
            continue  # no step at or just before it was completed
        found.append((step, float(eta), store.join(folder, "weights.parquet")))
    if not found:
        raise ConfigError(
            f"{run}: no complete checkpoints with a learning rate (gradpipe train writes "
            "checkpoints/step-S every --checkpoint-every steps; gradpipe grad writes none)")
    return found


Note = Callable[[str], None]


def influence(config: InfluenceConfig, note: Note | None = None) -> dict:
    """Write the top config.top proponents and opponents of every test sample to config.out
    (one Parquet file, written by the driver from the workers' merged candidates)."""
    from .evaluate import EvalConfig, plan_for_model
    from .worker import start_pool  # here: worker.py imports this module's block function

    run = config.run
    info = read_run_json(run)
    if info.get("command") != "train":
        raise ConfigError(f"{run}: not a training run (run.json command "
                          f"{info.get('command')!r}); influence needs its checkpoints")
    checkpoints = checkpoint_rates(run)
    data = str(info.get("data_path") or info.get("config", {}).get("data", ""))
    out = config.out
    store.check_bucket(out)
    if store.is_dir(out) or out.endswith(("/", os.sep)):
        raise ConfigError(f"--out {out}: a folder; influence writes one Parquet file: name "
                          f"the file, such as {store.join(out, 'influence.parquet')}")
    if store.exists(out) and not config.overwrite:
        raise ConfigError(f"--out {out}: exists. Pass --overwrite to replace the file, or "
                          "choose another --out.")
    if store.exists(out) and not _is_influence_file(out):  # a run's weights.parquet, say
        raise ConfigError(f"--out {out}: is not an influence file (no test_sample, "
                          "train_sample and influence columns); refusing to replace it with "
                          "--overwrite")
    check_apart(out, DATA=data, **{"--test": config.test})
    if not store.is_file(store.join(run, "weights.parquet")):  # a checkpoint is no run here
        raise ConfigError(no_final_weights(run, checkpoint=False))
    model = read_model(run)
    dtype = config.dtype or model.arch.dtype
    arch = dataclasses.replace(model.arch, dtype=dtype)
    block_rows = int(info.get("config", {}).get("block_rows", 65536))
    train = plan_for_model(EvalConfig(model=str(run), data=data, block_rows=block_rows),
                           model, read_target=True)
    if train.fingerprint != info.get("dataset", {}).get("fingerprint"):
        raise ConfigError(f"{run}: its training data {data} changed since the run (files, "
                          "sizes or times differ from run.json); influence needs the same rows")
    try:
        test = plan_for_model(EvalConfig(model=str(run), data=config.test,
                                         block_rows=TEST_ROWS, id_column=config.id_column),
                              model, read_target=True)
    except DataError as e:  # said of the --test data, not of the run's
        raise DataError(f"--test: {e}") from None
    weights = []
    for step, eta, path in checkpoints:
        ck_arch, params, _, _ = read_weights(path)
        if ck_arch.sizes != arch.sizes:
            raise ConfigError(f"{path}: model {ck_arch.sizes} differs from the run's "
                              f"{arch.sizes}")
        weights.append((step, eta, params.astype(dtype)))
    per_pair = 2 * sum(arch.sizes[l] + arch.sizes[l - 1] + 1 for l in range(1, arch.L + 1))
    flops = len(weights) * (train.n_rows * test.n_rows * per_pair
                            + 6.0 * (train.n_rows + test.n_rows) * arch.n_params)
    pool: Pool = start_pool(train, config.workers, dtype, address=config.address,
                            memory_budget=config.memory_budget, verbose=config.verbose,
                            flops=(flops, 1))
    if note is not None:
        where = pool.where(config.address, config.workers)
        note(f"training data: {schema_line(train)}{where}")
        note(f"test data: {schema_line(test)}")
        note(f"{len(weights)} checkpoints (steps {', '.join(str(s) for s, _, _ in weights)}), "
             f"top {config.top} proponents and opponents per test sample")
    try:
        req = InfluenceRequest(arch, tuple(weights), test, config.top, model.standardize,
                               model.target_scale)
        parts = pool.influence(req)
    finally:
        pool.close()
    ranked = [merge([p[i] for p in parts], config.top, kind) for i, kind in enumerate(KINDS)]
    table = influence_table(*ranked)
    write_table(table, out)
    return {"out": str(out), "run": str(run), "test": config.test, "rows": table.num_rows,
            "test_samples": test.n_rows, "training_samples": train.n_rows, "top": config.top,
            "checkpoints": [s for s, _, _ in weights], "lr": [e for _, e, _ in weights],
            "columns": table.column_names,
            # a private run's influence is exact in its private rows: not covered by epsilon
            "private_run": bool(info.get("privacy"))}


def _is_influence_file(loc: str) -> bool:
    """Whether `loc` is a Parquet file with influence_table's columns: --overwrite replaces
    such a file only, never a run's weights or a dataset."""
    try:
        names = set(pq.read_schema(store.open_input(loc)).names)
    except (pa.ArrowInvalid, OSError):
        return False
    return {"test_sample", "kind", "rank", "train_sample", "influence"} <= names


def influence_table(proponents: Ranked, opponents: Ranked) -> pa.Table:
    """test_sample, kind, rank (1 = most influential), train_sample, influence; sorted by test
    sample, proponents before opponents, then rank."""
    test = np.concatenate([proponents.test, opponents.test])
    kind = np.r_[np.zeros(len(proponents), np.int8), np.ones(len(opponents), np.int8)]
    rank = np.concatenate([_ranks(proponents.test), _ranks(opponents.test)])
    order = np.lexsort((rank, kind, test))
    return pa.table({
        "test_sample": pa.array(test[order], type=pa.int64()),
        "kind": pa.DictionaryArray.from_arrays(pa.array(kind[order]),
                                               pa.array(list(KINDS))).cast(pa.string()),
        "rank": pa.array(rank[order], type=pa.int32()),
        "train_sample": pa.array(np.concatenate([proponents.train, opponents.train])[order],
                                 type=pa.int64()),
        "influence": pa.array(np.concatenate([proponents.value, opponents.value])[order],
                              type=pa.float64()),
    })


def _ranks(test: I64) -> NDArray[np.int32]:
    """1, 2, .. within each run of equal test ids (Ranked keeps them grouped, in rank order)."""
    if len(test) == 0:
        return np.empty(0, np.int32)
    starts = np.flatnonzero(np.r_[True, test[1:] != test[:-1]])
    sizes = np.diff(np.r_[starts, len(test)])
    return (np.arange(len(test)) - np.repeat(starts, sizes) + 1).astype(np.int32)
