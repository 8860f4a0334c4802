"""Per-sample scores of a run, from its recorded per-sample rows: `gradpipe scores`.

Over the steps t whose per-sample rows were recorded (`--per-sample norms|full` with
`--per-sample-every K`), for every sample i:

    self_influence    = sum_t eta_t |grad C_i(w_t)|^2        TracIn-CP self-influence
    grand_mean        = mean_t |grad C_i(w_t)|                GraNd (the grad_norm column)
    el2n_mean         = mean_t |p_i(w_t) - y_i|               EL2N (the el2n column)
    loss_last         = C_i(w_t) at the last of those steps
    forgetting_events = #{consecutive t < t': correct at t, incorrect at t'}
    first_learned     = the first t from which the sample is correct at every later t

`block_scores` is the math for one block's rows, pure numpy; `scores_block` is what a
worker runs on each block it holds (reads the block's per-sample parts across steps and
writes one part of scores); `scores` is the driver, which starts the workers, writes the
marker and merges the workers' top rows. No per-sample row passes through the driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from . import store
from .atomic import atomic_dir, refuse_bucket_root
from .config import TrainConfig  # the execution options, declared there
from .data import Block, Dataset
from .errors import ConfigError, DataError
from .options import check_paths, check_values
from .outputs import per_sample_path, read_run_json, write_json, write_table
from .recorder import read_metrics, recorded_steps

if TYPE_CHECKING:
    from .worker import Pool

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
MARKER = "_scores.json"  # the summary, in every scores folder; readers skip "_" files
# Scores `--by` can rank on (largest first): the suspicious end of each.
RANKABLE = ("self_influence", "el2n_mean", "grand_mean", "loss_last", "forgetting_events")
COLUMNS = ("sample", "label", "steps", *RANKABLE, "first_learned")


# --- the math: one block's rows over the recorded steps -> one row per sample -------------


@dataclass
class StepRows:
    """One block's per-sample rows at one recorded step (the columns scores read)."""

    step: int
    eta: float  # the learning rate of that step
    sample: I64  # (m,)
    loss: F64
    grad_norm: F64
    label: I64 | None = None  # class index (classification)
    el2n: F64 | None = None  # |p - y|, where the run recorded it
    correct: NDArray[np.bool_] | None = None  # classification, where the run recorded it


def block_scores(rows: list[StepRows]) -> dict[str, np.ndarray]:
    """One row per sample of the block, sorted by sample id: sample, label, steps and the
    scores (module docstring), from the block's rows at each recorded step, in step order.

    Sums run over steps in step order, in float64, sample by sample, so a block's scores
    do not depend on anything but its own rows. A sample missing from a step (a
    mini-batch step that did not draw it) is skipped at that step: `steps` counts its
    recorded steps, the means are over those, and forgetting is counted between them.
    Scores a run did not record the inputs of (el2n, correct) are NaN or -1 (null).
    """
    rows = sorted(rows, key=lambda r: r.step)
    ids = np.unique(np.concatenate([r.sample for r in rows])) if rows else np.empty(0, np.int64)
    n = len(ids)
    steps = np.zeros(n, np.int64)
    self_influence, grand_sum, el2n_sum = np.zeros(n), np.zeros(n), np.zeros(n)
    loss_last, label = np.full(n, np.nan), np.full(n, -1, np.int64)
    has_el2n = bool(rows) and all(r.el2n is not None for r in rows)
    has_correct = bool(rows) and all(r.correct is not None for r in rows)
    forgetting = np.zeros(n, np.int64)
    was_correct = np.zeros(n, bool)  # at the sample's previous recorded step
    learned = np.full(n, -1, np.int64)  # first step of the current run of correct steps
    for r in rows:
        i = np.searchsorted(ids, r.sample)  # (m,) positions; ids are unique within a step
        steps[i] += 1
        g = r.grad_norm.astype(np.float64)
        self_influence[i] += r.eta * (g * g)  # eta_t |grad C_i|^2
        grand_sum[i] += g
        loss_last[i] = r.loss
        if r.label is not None:
            label[i] = r.label
        if has_el2n:
            assert r.el2n is not None
            el2n_sum[i] += r.el2n
        if has_correct:
            assert r.correct is not None
            c = r.correct.astype(bool)
            forgetting[i] += was_correct[i] & ~c
            learned[i] = np.where(c, np.where(was_correct[i], learned[i], r.step), -1)
            was_correct[i] = c
    counted = np.maximum(steps, 1)
    out: dict[str, np.ndarray] = {
        "sample": ids.astype(np.int64),
        "label": label,
        "steps": steps,
        "self_influence": self_influence,
        "el2n_mean": el2n_sum / counted if has_el2n else np.full(n, np.nan),
        "grand_mean": grand_sum / counted,
        "loss_last": loss_last,
        "forgetting_events": forgetting if has_correct else np.full(n, -1, np.int64),
        "first_learned": learned if has_correct else np.full(n, -1, np.int64),
    }
    return out


def top_rows(cols: dict[str, np.ndarray], by: str, k: int) -> list[int]:
    """Indices of the k rows with the largest `by` (nulls never), ties by smaller sample id."""
    v = cols[by].astype(np.float64)
    if by == "forgetting_events":
        v = np.where(cols[by] < 0, np.nan, v)
    keep = np.flatnonzero(~np.isnan(v))
    order = np.lexsort((cols["sample"][keep], -v[keep]))
    return keep[order[:k]].tolist()


# --- what the workers run on each block they hold --------------------------------------------


@dataclass(frozen=True)
class ScoresRequest:
    """What `gradpipe scores` asks of every worker (one object-store reference)."""

    run: str  # the run folder, absolute
    steps: tuple[int, ...]  # the recorded steps to score over, increasing
    etas: tuple[float, ...]  # their learning rates
    out_dir: str  # the folder of part-BLOCK.parquet files (a temporary one until complete)
    classify: bool
    top: int = 0  # rows per block to return for the driver's --top
    by: str = "self_influence"


def _column(table: pa.Table, name: str, dtype: Any) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    col = table.column(name)
    if col.null_count:
        return None
    return col.to_numpy().astype(dtype, copy=False)


def read_step_rows(path: str, step: int, eta: float) -> StepRows:
    """One per-sample part as StepRows; a missing or unreadable part is refused by name."""
    wanted = ("sample", "label", "loss", "grad_norm", "el2n", "correct")  # not `grad`
    try:
        pf = pq.ParquetFile(store.open_input(path))
        names = pf.schema_arrow.names
        table = pf.read(columns=[c for c in wanted if c in names])
    except DataError:
        if store.exists(path):
            raise
        raise DataError(f"{path}: missing: the run recorded step {step} for other blocks "
                        "but not this one. Was the run folder copied in part?") from None
    except FileNotFoundError:
        raise DataError(f"{path}: missing: the run recorded step {step} for other blocks "
                        "but not this one. Was the run folder copied in part?") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for name in ("sample", "loss", "grad_norm"):
        if name not in table.column_names:
            raise DataError(f"{path}: no column {name!r}; not a gradpipe per-sample file")
    sample = table.column("sample").to_numpy().astype(np.int64)
    if len(np.unique(sample)) != len(sample):
        raise DataError(f"{path}: sample ids repeat within the step; scores need one row per "
                        "sample (a unique --id-column)")
    return StepRows(step, eta, sample, table.column("loss").to_numpy().astype(np.float64),
                    table.column("grad_norm").to_numpy().astype(np.float64),
                    _column(table, "label", np.int64), _column(table, "el2n", np.float64),
                    _column(table, "correct", bool))


def scores_table(cols: dict[str, np.ndarray], classify: bool) -> pa.Table:
    """The scores as Arrow columns: NaN and -1 stand for null (not recorded / never)."""
    def f64(v: np.ndarray) -> pa.Array:
        return pa.array(v, type=pa.float64(), mask=np.isnan(v))

    def i64(v: np.ndarray) -> pa.Array:
        return pa.array(v, type=pa.int64(), mask=v < 0)

    out: dict[str, pa.Array] = {"sample": pa.array(cols["sample"], type=pa.int64())}
    if classify:
        out["label"] = i64(cols["label"])
    out["steps"] = pa.array(cols["steps"], type=pa.int64())
    for name in ("self_influence", "el2n_mean", "grand_mean", "loss_last"):
        out[name] = f64(cols[name])
    out["forgetting_events"] = i64(cols["forgetting_events"])
    out["first_learned"] = i64(cols["first_learned"])
    return pa.table(out)


def part_path(out_dir: str | Path, block: int) -> str:
    return store.join(str(out_dir), f"part-{block:05d}.parquet")


def scores_block(block: int, req: ScoresRequest) -> tuple[int, int, list[dict]]:
    """Score one block from its per-sample parts at req.steps; write OUT/part-BLOCK.parquet.
    Returns (block, rows, the block's req.top rows by req.by as dicts)."""
    rows = [read_step_rows(per_sample_path(req.run, s, block), s, eta)
            for s, eta in zip(req.steps, req.etas, strict=True)]
    cols = block_scores(rows)
    # The per-sample files' metadata maps `label` (a class index) back to the class values.
    meta = pq.read_schema(per_sample_path(req.run, req.steps[-1], block)).metadata
    table = scores_table(cols, req.classify).replace_schema_metadata(meta)
    write_table(table, part_path(req.out_dir, block))
    top = table.take(pa.array(top_rows(cols, req.by, req.top), type=pa.int64())).to_pylist() \
        if req.top else []
    return block, table.num_rows, top


# --- the command: run folder -> workers -> RUN/scores/ ------------------------------------------


@dataclass(frozen=True)
class ScoresConfig:
    """The options of `gradpipe scores`."""

    run: str  # the run folder
    out: str | None = None  # the scores folder; None: RUN/scores
    top: int = 10  # samples to list, by `by`
    by: str = "self_influence"
    workers: int | None = None  # Ray actors; None: in-process when small, else the CPUs
    address: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.by not in RANKABLE:
            raise ConfigError(f"--by {self.by!r}: choose one of {', '.join(RANKABLE)}")
        if self.top < 0:
            raise ConfigError(f"--top {self.top}: must be >= 0")
        check_values(TrainConfig, workers=self.workers, address=self.address)
        check_paths(out=self.out)


def step_rates(run: str | Path) -> dict[int, float]:
    """The learning rate of every step with a metrics row."""
    metrics = read_metrics(run)
    if metrics is None or "lr" not in metrics.column_names:
        return {}
    return dict(zip(metrics.column("step").to_pylist(), metrics.column("lr").to_pylist(),
                    strict=True))


def scored_steps(run: str | Path) -> tuple[list[int], list[float]]:
    """The recorded per-sample steps that completed (they have a metrics row), and their
    learning rates. A step the run was killed in has per-sample parts but no metrics row."""
    rates = step_rates(run)
    steps = [s for s in recorded_steps(run, "per_sample") if s in rates]
    if not steps:
        raise ConfigError(
            f"{run}: no per-sample rows to score. Train with --per-sample norms and "
            "--per-sample-every K (rows every K steps) to record them.")
    return steps, [float(rates[s]) for s in steps]


def per_sample_dataset(run: str | Path, info: dict, last_step: int) -> Dataset:
    """The run's blocks, as the workers are planned over them: numbered as in training,
    their rows taken from the last scored step's per-sample parts (footers only)."""
    d = info.get("dataset", {})
    n_blocks = int(d.get("blocks", 0))
    if n_blocks < 1:
        raise ConfigError(f"{run}/run.json: no dataset blocks recorded; not a training run")
    blocks = []
    first = 0
    for b in range(n_blocks):
        path = per_sample_path(run, last_step, b)
        try:
            rows = pq.read_metadata(store.open_input(path)).num_rows
        except (FileNotFoundError, OSError, pa.ArrowInvalid, DataError):
            raise DataError(f"{path}: missing or unreadable; the run's step {last_step} "
                            "is incomplete") from None
        blocks.append(Block(b, str(path), 0, 0, max(rows, 1), 0, first))
        first += rows
    classify = d.get("task") == "classification"
    return Dataset(
        source=store.resolve(str(run)), blocks=tuple(blocks), features=(), feature_list=False,
        n_features=0, target=tuple(d.get("target", ())), task=d.get("task", "regression"),
        n_outputs=int(d.get("n_outputs", 1)), id_column=d.get("id_column"), n_rows=first,
        fingerprint=str(d.get("fingerprint", "")),
        classes=tuple(d.get("classes", ())) if classify else (),
        class_type=d.get("class_type"))


def _check_out(out: str, run: str) -> None:
    """Refuse to replace a non-empty folder that is not an earlier scores folder, or a
    folder in another run's folder (its `scores` would be this run's, and `inspect` and
    every query of that run would read them as its own)."""
    refuse_bucket_root(out, f"--out {out}", "scores")
    store.check_bucket(out)
    parent = store.parent(out)
    if parent != run and store.is_file(store.join(parent, "run.json")):
        raise ConfigError(f"--out {out}: is in the folder of another run, {parent}, which "
                          f"would read {run}'s scores as its own. Choose another --out.")
    if store.is_file(out):
        raise ConfigError(f"--out {out}: exists and is not a folder. Choose another --out.")
    if store.listdir(out) and not store.is_file(store.join(out, MARKER)):
        raise ConfigError(f"--out {out}: exists and is not a gradpipe scores folder (no "
                          f"{MARKER}); choose another --out.")


Note = Callable[[str], None]


def merge_top(tops: list[dict], by: str, k: int) -> list[dict]:
    """The k rows with the largest `by` over the workers' per-block top rows, ties by sample
    id; the same for any split of blocks over workers."""
    ranked = [r for r in tops if r.get(by) is not None and not (
        isinstance(r[by], float) and math.isnan(r[by]))]
    ranked.sort(key=lambda r: (-float(r[by]), r["sample"]))
    return ranked[:k]


def scores(config: ScoresConfig, note: Note | None = None) -> dict:
    """Score every sample of the run in config.run; the workers write the parts into a
    temporary folder that becomes the output (RUN/scores) only when complete. Returns the
    summary (written as _scores.json) with the `top` rows."""
    run = store.resolve(config.run)
    info = read_run_json(run)
    steps, etas = scored_steps(run)
    out = store.resolve(config.out) if config.out else store.join(run, "scores")
    _check_out(out, run)
    dataset = per_sample_dataset(run, info, steps[-1])
    if config.by == "forgetting_events" and not dataset.classify and config.top:
        raise ConfigError(f"--by forgetting_events: {config.run} is a regression run, which "
                          "has no right or wrong answers to forget (null there); rank by "
                          f"{', '.join(r for r in RANKABLE if r != 'forgetting_events')}")
    from .worker import start_pool  # here: worker.py imports this module's block function

    pool: Pool = start_pool(dataset, config.workers, "float64", address=config.address,
                            verbose=config.verbose,
                            flops=(50.0 * dataset.n_rows * len(steps), 1))
    rows_in_data = int(info.get("dataset", {}).get("rows", dataset.n_rows))
    config_run = info.get("config", {})
    sampled = config_run.get("batch") is not None or config_run.get("batch_rate") is not None
    if note is not None:
        where = pool.where(config.address, config.workers)
        what = (f"the samples drawn at {len(steps)} recorded step"
                f"{'s' * (len(steps) != 1)} of a sampled run ({_steps_text(steps)}; of the "
                f"{rows_in_data} rows, those never drawn at these steps have no score), in "
                if sampled else
                f"{dataset.n_rows} samples over {len(steps)} recorded step"
                f"{'s' * (len(steps) != 1)} ({_steps_text(steps)}), in ")
        note(f"scoring {what}{len(dataset.blocks)} block{'s' * (len(dataset.blocks) != 1)}"
             f"{where}")
    classify = dataset.classify
    try:
        with atomic_dir(out) as tmp:
            req = ScoresRequest(run, tuple(steps), tuple(etas), tmp, classify, config.top,
                                config.by)
            written = pool.scores(req)
            rows = sum(r for _, r, _ in written)
            columns = [c for c in COLUMNS if classify or c != "label"]
            summary: dict[str, Any] = {
                "out": config.out or f"{config.run.rstrip('/')}/scores", "run": config.run,
                "rows": rows, "rows_in_data": rows_in_data, "parts": len(written),
                "steps": steps, "lr": etas, "columns": columns,
                "el2n": _recorded(run, steps[-1], "el2n"),
                "correct": classify and _recorded(run, steps[-1], "correct"),
                "classes": list(dataset.classes) if classify else None,
            }
            write_json(summary, store.join(tmp, MARKER))
    finally:
        pool.close()
    summary["by"] = config.by
    # An unfinished run (interrupted, failed, or still running): its later steps are not in
    # these scores, which the caller says (inspect says so too once the run has them).
    summary["run_status"] = info.get("status")
    summary["run_steps"] = info.get("config", {}).get("steps")
    from .report import with_class_values

    summary["top"] = with_class_values(
        merge_top([r for _, _, top in written for r in top], config.by, config.top),
        summary["classes"])
    return summary


def _recorded(run: str, step: int, column: str) -> bool:
    """Whether the run's per-sample rows have `column` (el2n and correct came later)."""
    return column in pq.ParquetFile(store.open_input(per_sample_path(run, step, 0))
                                    ).schema_arrow.names


def _steps_text(steps: list[int]) -> str:
    if len(steps) <= 4:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def read_scores(path: str | Path) -> pa.Table | None:
    """A run's scores (RUN/scores) or a scores folder, in block order; None if there are none."""
    path = str(path)
    folder = store.join(path, "scores") if store.is_file(store.join(path, "run.json")) else path
    if not store.is_file(store.join(folder, MARKER)):
        return None
    fs, root = store.filesystem(folder)
    return pq.read_table(root, filesystem=fs)


def render_top(summary: dict) -> list[str]:
    """The --top rows as lines of text, with what they are ranked by."""
    top = summary["top"]
    if not top:
        return []
    names = [c for c in summary["columns"] if c in top[0]]
    lines = [f"top {len(top)} by {summary['by']} (largest first)"]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    table = [[cell(r[c]) for c in names] for r in top]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(names)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(names, widths, strict=True)))
    for row in table:
        lines.append("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    return lines
