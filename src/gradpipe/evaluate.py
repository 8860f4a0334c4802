"""Held-out metrics and predictions of a trained model: `gradpipe evaluate` and `predict`.

The math is pure numpy and works block by block: `block_sums` gives one block's float64
sums (loss, correct, confusion; squared and absolute errors and target moments for
regression), `metrics_from_sums` adds them in block order, so the metrics do not depend on
how many workers there were; `predict_rows` gives a block's predictions. The workers
(worker.py) call `evaluate_block` / `predict_block` on the blocks they hold; the drivers
`evaluate` and `predict` below read the model, plan the data by the model's column names
and fan out through a worker Pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from . import store
from .atomic import atomic_dir, check_replaceable
from .backprop import CHUNK_ROWS, output_losses
from .config import TrainConfig  # the execution options, declared there
from .data import (
    BLOCK_ROWS,
    BlockData,
    ClassValue,
    Dataset,
    DataSpec,
    column_names,
    describe_columns,
    imported_without_target,
    plan,
    schema_line,
    shared_files,
)
from .errors import ConfigError, DataError
from .model import Architecture, Params, forward
from .options import check_paths, check_values
from .outputs import Model, read_model, read_run_json, write_json, write_table
from .recorder import check_apart

if TYPE_CHECKING:
    from .worker import Pool

F64 = NDArray[np.float64]
Scale = tuple[F64, F64]  # (mean, std)
MARKER = "_predictions.json"  # the summary, in every predictions folder; readers skip "_" files


# --- the math: one block's sums, their reduction, predictions ------------------------------


@dataclass
class EvalSums:
    """One block's sums for the metrics, float64, never means (classification or regression)."""

    block: int
    n: int
    loss_sum: float  # sum_i C_i, the model's loss in its training units
    correct: int = 0  # samples whose arg-max output is their class
    confusion: NDArray[np.int64] | None = None  # (K, K): rows true class, columns predicted
    sse: F64 | None = None  # (T,) sum of squared errors, in the targets' original units
    sae: F64 | None = None  # (T,) sum of absolute errors
    y_sum: F64 | None = None  # (T,) sum of the targets
    y_m2: F64 | None = None  # (T,) sum of squared deviations from this block's target mean


def _merge_m2(n_a: int, sum_a: F64, m2_a: F64, n_b: int, sum_b: F64, m2_b: F64) -> F64:
    """Sum of squared deviations of two parts joined (Chan et al.); no cancellation, unlike
    sum(y^2) - sum(y)^2 / n, when the mean is large against the spread."""
    if n_a == 0 or n_b == 0:
        return m2_a + m2_b
    d = sum_b / n_b - sum_a / n_a
    return m2_a + m2_b + d * d * (n_a * n_b / (n_a + n_b))


def to_original_units(out: NDArray[np.floating], target_scale: Scale | None) -> F64:
    """Regression outputs in the targets' units: a[L] * std + mean, float64 (n, T)."""
    out64 = out.astype(np.float64)
    if target_scale is None:
        return out64
    mean, std = target_scale
    return out64 * std + mean


def class_probabilities(arch: Architecture, a_L: NDArray[np.floating]) -> F64:
    """Rows of class probabilities from the output layer, float64 (n, K).

    softmax: a[L] itself. Other outputs (one unit per class, trained on one-hot targets):
    a[L] clipped at 0 and divided by its row sum; a row with no positive unit is uniform.
    The predicted class is argmax a[L] either way, as training's accuracy counts it.
    """
    a = a_L.astype(np.float64)
    if arch.output_activation == "softmax":
        return a
    a = np.maximum(a, 0.0)
    total = a.sum(axis=1, keepdims=True)  # (n, 1)
    uniform = np.full_like(a, 1.0 / a.shape[1])
    return np.divide(a, total, out=uniform, where=total > 0)


def block_sums(
    arch: Architecture,
    params: Params,
    x: NDArray[np.floating],
    y: NDArray[np.floating],
    *,
    classify: bool,
    target_scale: Scale | None = None,
    block: int = 0,
    chunk_rows: int = CHUNK_ROWS,
) -> EvalSums:
    """The sums of one block: x (n, n_0) standardized features, y (n, n_L) one-hot classes or
    targets in their original units, both in the compute dtype of `arch`.

    Regression losses compare a[L] with the targets as training saw them,
    (y - mean) / std with `target_scale`; errors compare a[L] * std + mean with y.
    """
    n, n_L = x.shape[0], arch.sizes[-1]
    loss_sum, correct = 0.0, 0
    confusion = np.zeros((n_L, n_L), dtype=np.int64)  # (K, K), classification
    sse, sae, y_sum, y_m2 = np.zeros(n_L), np.zeros(n_L), np.zeros(n_L), np.zeros(n_L)
    for start in range(0, n, chunk_rows):
        xc, yc = x[start : start + chunk_rows], y[start : start + chunk_rows]
        m = xc.shape[0]
        a, z = forward(arch, params, xc)
        if classify:
            loss_sum += float(output_losses(arch, a[-1], z[-1], yc).sum())
            true, pred = yc.argmax(axis=1), a[-1].argmax(axis=1)  # (m,)
            confusion += np.bincount(true * n_L + pred, minlength=n_L * n_L).reshape(n_L, n_L)
            correct += int((true == pred).sum())
            continue
        y_model = yc
        if target_scale is not None:  # as training scales them (worker.BlockSet._apply)
            y_model = yc - target_scale[0].astype(yc.dtype)
            y_model /= target_scale[1].astype(yc.dtype)
        loss_sum += float(output_losses(arch, a[-1], z[-1], y_model).sum())
        y64 = yc.astype(np.float64)  # (m, T)
        err = to_original_units(a[-1], target_scale) - y64
        sse += (err * err).sum(axis=0)
        sae += np.abs(err).sum(axis=0)
        chunk_sum = y64.sum(axis=0)
        chunk_m2 = ((y64 - chunk_sum / m) ** 2).sum(axis=0)
        y_m2 = _merge_m2(start, y_sum, y_m2, m, chunk_sum, chunk_m2)
        y_sum += chunk_sum
    if classify:
        return EvalSums(block, n, loss_sum, correct, confusion)
    return EvalSums(block, n, loss_sum, sse=sse, sae=sae, y_sum=y_sum, y_m2=y_m2)


def metrics_from_sums(
    parts: list[EvalSums],
    classes: tuple[ClassValue, ...] | None = None,
    targets: tuple[str, ...] | None = None,
) -> dict:
    """samples, loss (mean C_i), accuracy and confusion (classification), mse, mae and r2
    (regression: overall, and per target in `per_target`), from block sums added in block order.

    r2 = 1 - SSE / SST per target (None where a target is constant); the overall r2 is
    their mean, mse and mae the means over all targets' errors. Keys that do not apply are
    None.
    """
    parts = sorted(parts, key=lambda p: p.block)
    n = sum(p.n for p in parts)
    loss = 0.0
    for p in parts:
        loss += p.loss_sum
    out: dict[str, Any] = {
        "samples": n, "loss": loss / n if n else None, "accuracy": None, "confusion": None,
        "mse": None, "mae": None, "r2": None, "classes": None, "targets": None,
        "per_target": None, "per_class": None, "balanced_accuracy": None, "majority": None,
    }
    if not parts or n == 0:
        return out
    if parts[0].confusion is not None:
        confusion = np.zeros_like(parts[0].confusion)
        for p in parts:
            assert p.confusion is not None
            confusion += p.confusion
        out["accuracy"] = sum(p.correct for p in parts) / n
        out["confusion"] = confusion.tolist()
        out["classes"] = list(classes) if classes is not None else list(range(len(confusion)))
        out.update(class_metrics(confusion, out["classes"]))
        return out
    assert parts[0].sse is not None
    T = len(parts[0].sse)
    sse, sae, y_sum, y_m2, seen = np.zeros(T), np.zeros(T), np.zeros(T), np.zeros(T), 0
    for p in parts:
        assert p.sse is not None and p.sae is not None
        assert p.y_sum is not None and p.y_m2 is not None
        sse += p.sse
        sae += p.sae
        y_m2 = _merge_m2(seen, y_sum, y_m2, p.n, p.y_sum, p.y_m2)
        y_sum += p.y_sum
        seen += p.n
    names = list(targets) if targets else [f"t{t}" for t in range(T)]
    r2 = [None if y_m2[t] == 0 else float(1 - sse[t] / y_m2[t]) for t in range(T)]
    defined = [v for v in r2 if v is not None]
    out.update(
        mse=float(sse.sum() / (n * T)), mae=float(sae.sum() / (n * T)),
        r2=float(np.mean(defined)) if len(defined) == T else None, targets=names,
        per_target=[{"target": name, "mse": float(sse[t] / n), "mae": float(sae[t] / n),
                     "r2": r2[t]} for t, name in enumerate(names)],
    )
    return out


def class_metrics(confusion: NDArray[np.int64], classes: list) -> dict:
    """From the confusion matrix (rows: true class, columns: predicted): each class's
    support, precision, recall and F1 (None where undefined: a class never predicted, or
    absent), balanced accuracy (the mean recall over the classes present) and the accuracy
    of always answering the most common class (`majority`), for imbalanced classes."""
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    hits = np.diag(confusion)
    rows = []
    for i, c in enumerate(classes):
        precision = float(hits[i] / predicted[i]) if predicted[i] else None
        recall = float(hits[i] / support[i]) if support[i] else None
        f1 = (2 * precision * recall / (precision + recall) if precision and recall else
              0.0 if precision is not None and recall is not None else None)
        rows.append({"class": c, "support": int(support[i]), "precision": precision,
                     "recall": recall, "f1": f1})
    recalls = [r["recall"] for r in rows if r["recall"] is not None]
    top = int(np.argmax(support))
    return {"per_class": rows,
            "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
            "majority": {"class": classes[top], "accuracy": float(support[top] / support.sum())}}


def predict_rows(
    arch: Architecture, params: Params, x: NDArray[np.floating], *, classify: bool,
    target_scale: Scale | None = None, chunk_rows: int = CHUNK_ROWS,
) -> tuple[NDArray[np.int64] | None, F64]:
    """(class index (n,), probabilities (n, K)) for classification, or (None, outputs in the
    targets' original units (n, T)) for regression, from standardized features x (n, n_0)."""
    pieces: list[NDArray[np.floating]] = []
    for start in range(0, x.shape[0], chunk_rows):
        pieces.append(forward(arch, params, x[start : start + chunk_rows])[0][-1])
    a_L = np.concatenate(pieces) if pieces else np.empty((0, arch.sizes[-1]), arch.dtype)
    if classify:
        return a_L.argmax(axis=1).astype(np.int64), class_probabilities(arch, a_L)
    return None, to_original_units(a_L, target_scale)


# --- what the workers run on each block they hold --------------------------------------------


@dataclass(frozen=True)
class EvalRequest:
    """What an evaluation asks of every worker (one object-store reference)."""

    arch: Architecture
    params: Params
    standardize: Scale | None = None  # features' (mean, std), applied before the net
    target_scale: Scale | None = None  # regression targets' (mean, std) in training


@dataclass(frozen=True)
class PredictRequest:
    """What a prediction asks of every worker: the model, and where each writes its parts."""

    arch: Architecture
    params: Params
    out_dir: str  # the folder of part-BLOCK.parquet files (a temporary one until complete)
    standardize: Scale | None = None
    target_scale: Scale | None = None
    classes: tuple[ClassValue, ...] = ()  # classification: the values, in output order
    class_type: str | None = None  # their Arrow type name: int64, bool, string, ...
    targets: tuple[str, ...] = ()  # regression: one prediction column per target


def evaluate_block(data: BlockData, req: EvalRequest, classify: bool) -> EvalSums:
    """One block's EvalSums (the block's features are already standardized)."""
    return block_sums(req.arch, req.params, data.x, data.y, classify=classify,
                      target_scale=req.target_scale, block=data.block.index)


def _arrow_type(classes: tuple[ClassValue, ...], class_type: str | None) -> pa.DataType:
    """The label column's type, so predictions come back as int, bool or string."""
    if class_type:
        try:
            return pa.type_for_alias(class_type)
        except ValueError:
            pass
    return pa.array(list(classes)).type


def prediction_table(ids: NDArray[np.int64], index: NDArray[np.int64] | None, values: F64,
                     req: PredictRequest) -> pa.Table:
    """sample, prediction, confidence, probabilities (classification) or sample and one
    column per target (regression)."""
    cols: dict[str, pa.Array] = {"sample": pa.array(ids, type=pa.int64())}
    if index is None:
        for t, name in enumerate(req.targets):
            cols[name] = pa.array(values[:, t], type=pa.float64())
        return pa.table(cols)
    class_values = pa.array(list(req.classes), type=_arrow_type(req.classes, req.class_type))
    n, K = values.shape
    cols["prediction"] = class_values.take(pa.array(index))
    cols["confidence"] = pa.array(values[np.arange(n), index], type=pa.float64())
    offsets = pa.array(np.arange(0, (n + 1) * K, K, dtype=np.int32))
    cols["probabilities"] = pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))
    return pa.table(cols)


def part_path(out_dir: str | Path, block: int) -> str:
    return store.join(str(out_dir), f"part-{block:05d}.parquet")


def predict_block(data: BlockData, req: PredictRequest, classify: bool) -> tuple[int, int]:
    """Write one block's predictions to OUT/part-BLOCK.parquet (atomically); (block, rows)."""
    index, values = predict_rows(req.arch, req.params, data.x, classify=classify,
                                 target_scale=req.target_scale)
    write_table(prediction_table(data.ids, index, values, req),
                part_path(req.out_dir, data.block.index))
    return data.block.index, len(data.ids)


def evaluate_with(pool: Pool, arch: Architecture, params: Params, standardize: Scale | None,
                  target_scale: Scale | None = None) -> dict:
    """The metrics of (arch, params) on the dataset a Pool holds (its targets read), as
    `metrics_from_sums` gives them. The pool's blocks are standardized in place once."""
    dataset = pool.dataset
    parts = pool.evaluate(EvalRequest(arch, params.astype(arch.dtype), standardize,
                                      target_scale))
    return metrics_from_sums(parts, dataset.classes if dataset.classify else None,
                             None if dataset.classify else dataset.target)


# --- the commands: model + data -> planned dataset -> workers -> result ----------------------


@dataclass(frozen=True)
class EvalConfig:
    """The options of `gradpipe evaluate` and `gradpipe predict`."""

    model: str  # a run folder or a weights.parquet
    data: str  # Parquet file, folder or URI
    workers: int | None = None  # as TrainConfig's --workers
    address: str | None = None  # Ray cluster; None: a private local instance
    block_rows: int = BLOCK_ROWS  # largest block, in rows
    memory_budget: int | None = None  # bytes per worker above which blocks are streamed
    out: str | None = None  # predict: the folder of Parquet parts
    overwrite: bool = False  # predict: replace an earlier predictions folder at --out
    id_column: str | None = None  # sample ids; None: the model's id column, else row index
    verbose: bool = False  # show Ray's own logs

    def __post_init__(self) -> None:
        check_values(TrainConfig, workers=self.workers, address=self.address,
                     block_rows=self.block_rows, memory_budget=self.memory_budget)
        check_paths(out=self.out)


def exact_name(name: str) -> str:
    """A column name as a glob that matches only itself (DataSpec.features takes globs)."""
    return re.sub(r"[][*?]", lambda m: f"[{m.group()}]", name)


def _run_json(model: Model) -> dict:
    """run.json of the model's run, if RUN is a run folder; else {}."""
    run = model.path
    if not store.is_file(store.join(run, "run.json")):
        return {}
    return read_run_json(run)


def training_files(dataset: Dataset, run: dict) -> tuple[bool, str]:
    """Whether DATA is the run's training data (`run`: its run.json): the same files (the
    fingerprint), or copies of them wherever they lie (data.shared_files, where the run's
    DATA, by its absolute data_path, can still be read), and what the schema line says of
    it ("" when it is held out)."""
    run_dataset = run.get("dataset", {})
    if dataset.fingerprint == run_dataset.get("fingerprint"):
        return True, "; the run's own training data, not held out"
    source = run.get("data_path") or run_dataset.get("source")
    try:
        shared = shared_files(dataset, source) if source else 0
    except (DataError, OSError):  # moved or gone since: nothing to compare with
        shared = 0
    files = len({b.file for b in dataset.blocks})
    if not shared:
        return False, ""
    if shared == files:
        return True, ("; copies of the run's training files (the same bytes), not held out"
                      if files > 1 else "; a copy of a training file of the run (the same "
                      "bytes), not held out")
    copies = "is a copy" if shared == 1 else "are copies"
    return False, (f"; {shared} of its {files} files {copies} of the run's training files "
                   "(the same bytes): not held out")


def _model_id_column(model: Model) -> str | None:
    """The id column the model's run used (its run.json), if RUN is a run folder."""
    return _run_json(model).get("dataset", {}).get("id_column")


def plan_for_model(config: EvalConfig, model: Model, read_target: bool) -> Dataset:
    """Plan DATA as the model reads it: its feature columns by name (in any order), its
    target, task and classes; missing columns are refused by name, before any work."""
    classify = model.classify
    task = model.task or ("classification" if classify else "regression")
    target = model.target or ("label",)
    names = column_names(config.data)
    missing = [f for f in model.features if f not in names]
    if missing:
        plural = "s" * (len(missing) > 1)
        raise DataError(
            f"{config.data}: missing feature column{plural} "
            f"{', '.join(map(repr, missing))} that the model {model.path} takes (found: "
            f"{describe_columns(names, missing[0])}). The data needs every feature column by "
            "name.")
    absent = [t for t in target if t not in names]
    if read_target and absent:
        if imported_without_target(config.data):
            raise DataError(f"{config.data}: imported without a target (data import "
                            "--no-target): rows for gradpipe predict; evaluating needs the "
                            f"target {', '.join(map(repr, absent))}")
        raise DataError(
            f"{config.data}: no target column {', '.join(map(repr, absent))} of the model "
            f"{model.path} (found: {describe_columns(names, absent[0])}): its loss on these "
            "rows needs the targets (gradpipe predict alone goes without).")
    id_column = config.id_column
    if id_column is None:
        id_column = _model_id_column(model)
        id_column = id_column if id_column in names else None
    classes: tuple | int | None = None
    if classify:
        classes = model.classes if model.classes is not None else model.arch.sizes[-1]
    spec = DataSpec(config.data, tuple(exact_name(f) for f in model.features), target, id_column,
                    classes=classes, block_rows=config.block_rows, task=task,
                    probability_targets=not classify and model.arch.loss == "cross_entropy",
                    read_target=read_target, features_from_model=bool(model.features))
    dataset = plan(spec)
    sizes = model.arch.sizes
    if dataset.n_features != sizes[0]:
        raise DataError(
            f"the model {model.path} expects {sizes[0]} features but {config.data} has "
            f"{dataset.n_features} feature columns ({describe_columns(list(dataset.features))}).")
    if dataset.n_outputs != sizes[-1]:
        what = "classes" if dataset.classify else "target columns"
        raise DataError(f"the model {model.path} has {sizes[-1]} outputs but {config.data} "
                        f"gives {dataset.n_outputs} {what}.")
    return dataset


def start_pool(config: EvalConfig, dataset: Dataset, dtype: str, flops: tuple[float, int]
               ) -> Pool:
    """The workers, as in training (worker.start_pool; small work runs in-process)."""
    from .worker import start_pool  # here: worker.py imports this module's math

    return start_pool(dataset, config.workers, dtype, address=config.address,
                      memory_budget=config.memory_budget, verbose=config.verbose,
                      flops=flops)


Note = Callable[[str], None]


def _pool(config: EvalConfig, dataset: Dataset, model: Model, note: Note | None,
          said: str = "") -> Pool:
    """The workers (one forward pass: about 2 N P operations), then the schema line (and
    `said` at its end)."""
    pool = start_pool(config, dataset, model.arch.dtype,
                      flops=(2.0 * dataset.n_rows * model.arch.n_params, 1))
    if note is not None:
        where = pool.where(config.address, config.workers)
        note(schema_line(dataset) + where + said)
    return pool


def evaluate(config: EvalConfig, note: Note | None = None) -> dict:
    """The metrics of the model in config.model on config.data (see metrics_from_sums).
    `note` receives the data's schema line before any work starts."""
    model = read_model(config.model)
    dataset = plan_for_model(config, model, read_target=True)
    training, said = training_files(dataset, _run_json(model))
    pool = _pool(config, dataset, model, note, said)
    try:
        metrics = evaluate_with(pool, model.arch, model.params, model.standardize,
                                model.target_scale)
    finally:
        pool.close()
    return {"model": config.model, "data": config.data, "training_data": training, **metrics}


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse an existing --out, unless --overwrite and it is an earlier predictions folder."""
    check_replaceable(out, overwrite, name=f"--out {out}",
                      foreign=lambda folder: None if store.is_file(store.join(folder, MARKER)) else
                      f"is not a gradpipe predictions folder (no {MARKER})")


def predict(config: EvalConfig, note: Note | None = None) -> dict:
    """Write the model's predictions for config.data to config.out: part-BLOCK.parquet
    files, written by the workers into a temporary folder that becomes config.out only
    when every part and the _predictions.json marker are written."""
    if not config.out:
        raise ConfigError("predict needs --out, the folder for the predictions")
    _check_out(config.out, config.overwrite)
    check_apart(config.out, DATA=config.data)
    model = read_model(config.model)
    dataset = plan_for_model(config, model, read_target=False)
    classify = dataset.classify
    if not classify and "sample" in dataset.target:
        raise ConfigError(f"the model {model.path} predicts a target named 'sample', the name "
                          "of the predictions' id column; rename that target and retrain")
    pool = _pool(config, dataset, model, note)
    try:
        with atomic_dir(config.out) as tmp:
            req = PredictRequest(
                model.arch, model.params, tmp, model.standardize,
                model.target_scale, classes=dataset.classes if classify else (),
                class_type=model.class_type, targets=() if classify else dataset.target)
            written = pool.predict(req)
            columns = (["sample", "prediction", "confidence", "probabilities"] if classify
                       else ["sample", *dataset.target])
            summary = {
                "out": config.out, "model": config.model, "data": config.data,
                "rows": sum(rows for _, rows in written), "parts": len(written),
                "task": dataset.task, "columns": columns,
                "classes": list(dataset.classes) if classify else None,
                "targets": None if classify else list(dataset.target),
                "sample": dataset.id_column or "global row index",
            }
            write_json(summary, store.join(tmp, MARKER))
    finally:
        pool.close()
    return summary


def _num(v: float | None, form: str) -> str:
    return "-" if v is None else format(v, form)


def render_metrics(m: dict) -> list[str]:
    """The metrics as lines of text: samples, loss, then accuracy and the confusion matrix,
    or a table of mse, mae and r2 per target."""
    lines = [f"samples   {m['samples']}", f"loss      {m['loss']:.6g}"]
    if m["confusion"] is not None:
        major = m["majority"]
        lines.append(f"accuracy  {m['accuracy']:.4f}   (always answering the most common "
                     f"class, {major['class']!r}: {major['accuracy']:.4f})")
        lines.append(f"balanced accuracy  {m['balanced_accuracy']:.4f}   (mean recall over "
                     "the classes)")
        labels = [str(c) for c in m["classes"]]
        cw = max(5, *(len(s) for s in labels))

        lines.append(f"{'class'.ljust(cw)}  {'support':>8}  {'precision':>9}  {'recall':>9}  "
                     f"{'f1':>9}")
        for label, r in zip(labels, m["per_class"], strict=True):
            lines.append(f"{label.ljust(cw)}  {r['support']:>8}  "
                         + "  ".join(f"{_num(r[k], '.4f'):>9}" for k in ("precision", "recall",
                                                                          "f1")))
        width = max(max(len(s) for s in labels), max(len(str(v)) for row in m["confusion"]
                                                     for v in row))
        lines.append("confusion (rows: true class, columns: predicted)")
        lines.append(" " * (width + 2) + "  ".join(s.rjust(width) for s in labels))
        for label, row in zip(labels, m["confusion"], strict=True):
            lines.append(f"{label.rjust(width)}  " + "  ".join(str(v).rjust(width) for v in row))
        return lines
    rows = [(t["target"], t["mse"], t["mae"], t["r2"]) for t in m["per_target"]]
    if len(rows) > 1:
        rows.append(("(all)", m["mse"], m["mae"], m["r2"]))
    width = max(6, *(len(r[0]) for r in rows))
    lines.append(f"{'target'.ljust(width)}  {'mse':>12}  {'mae':>12}  {'r2':>12}")
    for name, mse, mae, r2 in rows:
        lines.append(f"{name.ljust(width)}  "
                     + "  ".join(f"{_num(v, '.6g'):>12}" for v in (mse, mae, r2)))
    return lines
