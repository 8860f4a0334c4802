"""Run folders: write and read gradpipe's Parquet and JSON outputs, never half-written.

Every file is written under a temporary name in its own folder and renamed into place, so
a crash leaves the old file or the new one, never a mix. Nothing here pickles: weights and
checkpoints are Parquet with the model description as JSON metadata.

    RUN/run.json            resolved configuration, versions, dataset fingerprint, status
    RUN/gradients/...       step, layer, param, j, k, value, grad, [grad_sq]
    RUN/per_sample/step=S/part-BLOCK.parquet
    RUN/weights.parquet     layer, param, j, k, value

recorder.py decides where each record goes and when; this module says what a file holds.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from numpy.typing import NDArray

from . import store
from .atomic import Staged, atomic_file
from .backprop import total_sq
from .errors import ConfigError
from .model import Architecture, Params

F64 = NDArray[np.float64]
META_KEY = b"gradpipe"


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write a Parquet file atomically (atomic.py: a temporary name, then rename)."""
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def param_index(sizes: tuple[int, ...] | list[int]) -> dict[str, np.ndarray]:
    """Columns layer, param, j, k for every parameter, in the gradients row order."""
    layer, param, j, k = [], [], [], []
    for l in range(1, len(sizes)):
        n_out, n_in = sizes[l], sizes[l - 1]
        layer += [np.full(n_out * n_in, l), np.full(n_out, l)]
        param += [np.full(n_out * n_in, "w"), np.full(n_out, "b")]
        j += [np.repeat(np.arange(n_out), n_in), np.arange(n_out)]
        k += [np.tile(np.arange(n_in), n_out), np.full(n_out, -1)]
    return {
        "layer": np.concatenate(layer).astype(np.int32),
        "param": np.concatenate(param),
        "j": np.concatenate(j).astype(np.int32),
        "k": np.concatenate(k).astype(np.int32),
    }


def _index_columns(sizes: tuple[int, ...]) -> dict[str, pa.Array]:
    idx = param_index(sizes)
    return {
        "layer": pa.array(idx["layer"]),
        "param": pa.array(idx["param"]).dictionary_encode().cast(pa.string()),
        "j": pa.array(idx["j"]),
        "k": pa.array(idx["k"], mask=idx["k"] < 0),  # null for biases
    }


def gradient_table(step: int, sizes: tuple[int, ...], value: F64, grad: F64,
                   grad_sq: F64 | None = None) -> pa.Table:
    """One step's rows of gradients/: the weights w_s (`value`), dC/dw at w_s, and with
    --second-moment `grad_sq`, the mean of the squared per-sample gradients."""
    cols = _index_columns(sizes)
    n = len(value)
    extra = {} if grad_sq is None else {"grad_sq": pa.array(np.asarray(grad_sq, np.float64))}
    return pa.table(
        {
            "step": pa.array(np.full(n, step, dtype=np.int64)),
            **cols,
            "value": pa.array(np.asarray(value, dtype=np.float64)),
            "grad": pa.array(np.asarray(grad, dtype=np.float64)),
            **extra,
        }
    )


def model_metadata(arch: Architecture, extra: dict | None = None) -> dict[bytes, bytes]:
    return {META_KEY: json.dumps({"model": arch.to_dict(), **(extra or {})}).encode()}


def weights_table(
    arch: Architecture,
    params: Params,
    *,
    standardize: tuple[F64, F64] | None = None,
    velocity: F64 | None = None,
    meta: dict | None = None,
) -> pa.Table:
    """weights.parquet: layer, param, j, k, value (+ velocity in checkpoints); model in metadata.

    `standardize` (mean, std) of the features is stored in the metadata, so that later
    commands apply the same transform.
    """
    cols: dict[str, pa.Array] = {**_index_columns(arch.sizes), "value": pa.array(params.flat())}
    if velocity is not None:
        cols["velocity"] = pa.array(np.asarray(velocity, dtype=np.float64))
    extra = dict(meta or {})
    if standardize is not None:
        extra["standardize"] = {"mean": standardize[0].tolist(), "std": standardize[1].tolist()}
    return pa.table(cols).replace_schema_metadata(model_metadata(arch, extra))


def params_from_flat(sizes: tuple[int, ...], flat: F64, dtype: str) -> Params:
    """Inverse of Params.flat()."""
    w: list = [np.empty((0, 0), dtype)]
    b: list = [np.empty(0, dtype)]
    pos = 0
    for l in range(1, len(sizes)):
        n_out, n_in = sizes[l], sizes[l - 1]
        w.append(flat[pos : pos + n_out * n_in].reshape(n_out, n_in).astype(dtype))
        pos += n_out * n_in
        b.append(flat[pos : pos + n_out].astype(dtype))
        pos += n_out
    return Params(w, b)


@dataclass(frozen=True)
class Model:
    """A trained model as weights.parquet keeps it: the network and what its inputs and
    outputs mean, so later commands select columns by name and map outputs back."""

    path: str
    arch: Architecture
    params: Params
    standardize: tuple[F64, F64] | None  # features' (mean, std), applied before the net
    target_scale: tuple[F64, F64] | None  # regression targets' (mean, std) in training
    features: tuple[str, ...]  # feature columns in input order ((): not recorded)
    target: tuple[str, ...]
    task: str | None  # classification | regression (None: not recorded)
    classes: tuple | None  # class values in output order (classification)
    class_type: str | None

    @property
    def classify(self) -> bool:
        return self.task == "classification" or (self.task is None and self.arch.sizes[-1] > 1
                                                 and self.arch.loss == "cross_entropy")


def model_meta(dataset: Any, target_scale: tuple[F64, F64] | None = None) -> dict:
    """What weights.parquet records of the data a model was trained on (data.Dataset)."""
    meta: dict[str, Any] = {"features": list(dataset.features), "target": list(dataset.target),
                            "task": dataset.task, "feature_list": dataset.feature_list}
    if dataset.classify:
        meta["classes"] = list(dataset.classes)
        meta["class_type"] = dataset.class_type
    if target_scale is not None:
        meta["target_scale"] = {"mean": target_scale[0].tolist(), "std": target_scale[1].tolist()}
    return meta


def read_model(path: str | Path) -> Model:
    """A run folder or weights.parquet -> Model."""
    table, info = _read_weights_table(path)
    arch = Architecture.from_dict(info["model"])
    params = _params(table, arch, path)
    std = info.get("standardize")
    scale = info.get("target_scale")
    classes = info.get("classes")
    return Model(
        path=str(path), arch=arch, params=params,
        standardize=(np.array(std["mean"]), np.array(std["std"])) if std else None,
        target_scale=(np.array(scale["mean"]), np.array(scale["std"])) if scale else None,
        features=tuple(info.get("features", ())), target=tuple(info.get("target", ())),
        task=info.get("task"), classes=tuple(classes) if classes is not None else None,
        class_type=info.get("class_type"),
    )


def _read_weights_table(path: str | Path) -> tuple[pa.Table, dict]:
    path = str(path)
    found = store.info(path).type
    if found == pafs.FileType.Directory:
        folder, path = path, store.join(path, "weights.parquet")
        found = store.info(path).type
        if found != pafs.FileType.File and store.is_file(store.join(folder, "run.json")):
            raise ConfigError(no_final_weights(folder))
    if found != pafs.FileType.File:
        store.check_bucket(path)
        raise ConfigError(f"{path}: no such weights file. Pass a run folder or a weights.parquet.")
    try:
        table = pq.read_table(store.open_input(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from None
    meta = (table.schema.metadata or {}).get(META_KEY)
    if meta is None or "value" not in table.column_names:
        raise ConfigError(f"{path}: not a gradpipe weights file (no model in its metadata)")
    return table, json.loads(meta)


def no_final_weights(run: str, checkpoint: bool = True) -> str:
    """Why a run folder has no weights.parquet yet, and what to use instead (its last
    checkpoint too, for a command that takes one as RUN)."""
    from .recorder import latest_checkpoint

    info = read_run_json(run)
    status = info.get("status", "unknown")
    done = info.get("steps_done")
    why = {"interrupted": f"was interrupted after {done} steps",
           "diverged": f"diverged at step {info.get('diverged_at')}",
           "failed": f"failed after {done} steps ({info.get('error')})",
           "running": "is still running (or was killed)"}.get(status, f"has status {status}")
    found = latest_checkpoint(run)
    use = (f", or use its last checkpoint: {found[1]}" if found is not None and checkpoint
           else "")
    resume = (f"resume it (gradpipe train --resume --out {run})"
              if status != "diverged" else "retrain it with a smaller --lr")
    return f"{run}: the run {why} and has no final weights; {resume}{use}"


def _params(table: pa.Table, arch: Architecture, path: str | Path) -> Params:
    flat = table.column("value").to_numpy()
    if len(flat) != arch.n_params:
        raise ConfigError(
            f"{path}: holds {len(flat)} values but its model has {arch.n_params} parameters"
        )
    return params_from_flat(arch.sizes, flat, arch.dtype)


def read_weights(
    path: str | Path,
) -> tuple[Architecture, Params, tuple[F64, F64] | None, F64 | None]:
    """Read weights.parquet (or RUN/weights.parquet): architecture, params, standardize,
    velocity."""
    table, info = _read_weights_table(path)
    arch = Architecture.from_dict(info["model"])
    params = _params(table, arch, path)
    std = info.get("standardize")
    standardize = (np.array(std["mean"]), np.array(std["std"])) if std else None
    velocity = table.column("velocity").to_numpy() if "velocity" in table.column_names else None
    return arch, params, standardize, velocity


# The per-sample columns that say what the model did (PerSampleWriter with outputs=True):
# prediction, correct and confidence for classes only; el2n for both tasks; the residuals
# (residual_columns) for regression only.
OUTPUT_COLUMNS = ("prediction", "correct", "confidence", "el2n")


def residual_columns(targets: tuple[str, ...]) -> list[str]:
    """Per-sample residual columns of a regression run: `residual` for one target,
    `residual_NAME` for each of several."""
    return ["residual"] if len(targets) == 1 else [f"residual_{t}" for t in targets]


@functools.lru_cache(maxsize=32)
def per_sample_layout(L: int, full: bool, classify: bool, dtype: str, outputs: bool,
                      classes: tuple | None, class_type: str | None,
                      targets: tuple[str, ...] = ()) -> tuple[pa.Schema, Mapping[str, Any]]:
    """The schema and Parquet writer options of a per-sample part (PerSampleWriter): the
    same for every block of a run, so made once (0.1 ms of Python a block otherwise)."""
    # Values the engine computes in the compute dtype (norms: row sums of squares of
    # delta[l] and a[l-1]; the output layer's probabilities) are written in it: float32
    # unless --dtype float64, as `grad` is. float64 would only add digits that were never
    # computed, and twice the bytes. `loss` is float64: it is taken from the logits in
    # float64, and a confident right answer's loss can be below float32's range.
    value = pa.from_numpy_dtype(np.dtype(dtype))

    # Every column is declared not null (there are no nulls): the writer then encodes no
    # definition levels, 40% of the encoding time of a norms part.
    def field(name: str, kind: pa.DataType) -> pa.Field:
        return pa.field(name, kind, nullable=False)

    fields = [field("sample", pa.int64())]
    if classify:
        fields.append(field("label", pa.int64()))
    fields += [field("loss", pa.float64()), field("grad_norm", value)]
    fields += [field(f"grad_norm_l{l}", value) for l in range(1, L + 1)]
    if outputs and classify:
        fields += [field("prediction", pa.int64()), field("correct", pa.bool_()),
                   field("confidence", value)]
    if outputs:
        fields.append(field("el2n", value))
    if outputs and not classify and targets:
        fields += [field(name, value) for name in residual_columns(targets)]
    if full:
        fields.append(field("grad", pa.list_(field("element", value))))
    meta = None
    if classify and classes is not None:
        meta = {META_KEY: json.dumps({"classes": list(classes), "class_type": class_type},
                                     default=_jsonable).encode()}
    schema = pa.schema(fields, metadata=meta)
    names = [f.name for f in fields]
    # Writing norms rows costs about as much as computing them (a 50,000-row block:
    # 2 ms of encoding against a 60 ms step), so the file is kept small and cheap to
    # encode: integer columns as deltas (sample ids 1, 1, 1, ...: a few bytes a page;
    # class indices a few bits a row, encoded in two thirds of a dictionary's time),
    # floats plain and uncompressed (lz4 or zstd saved 10-20% of these high-entropy
    # values' bytes and cost more time than the smaller write saved), statistics on
    # `sample` only (readers prune by sample range; min/max of every float column cost
    # 15% of the encoding), batches of 65,536 rows (the default 1,024 cost 0.1 ms a
    # block more). The grad list is lz4-compressed, as before. A norms part names no
    # per-column compression: the writer looks each one up by its dotted path, per batch.
    options: dict[str, Any] = dict(
        compression={n: "none" for n in names if n != "grad"} | {"grad.list.element": "lz4"}
        if full else "none",
        use_dictionary=False,
        column_encoding={n: "DELTA_BINARY_PACKED"
                         for n in ("sample", "label", "prediction") if n in names},
        write_statistics=["sample"],
        write_batch_size=65536)
    return schema, MappingProxyType(options)


def _encoded_bound(table: pa.Table) -> int:
    """Bytes enough for `table` as a norms part: every column plain (a delta-encoded integer
    column takes at most 8 bytes a value and a 14-byte header every 128 values), the schema
    with its metadata (in the footer twice), plus 1 MiB for page headers and statistics."""
    data = sum(c.nbytes for c in table.columns)
    return int(data * 1.25) + 3 * table.schema.serialize().size + (1 << 20)


def _encode(table: pa.Table, options: Mapping[str, Any]) -> pa.Buffer:
    """`table` as Parquet bytes, encoded into a buffer sized once for it (a growing
    buffer's copies were a tenth of the encoding); a growing one if it did not fit."""
    buffer = pa.allocate_buffer(_encoded_bound(table))
    sink = pa.FixedSizeBufferWriter(buffer)
    try:
        pq.write_table(table, sink, **options)
        return buffer.slice(0, sink.tell())
    except (pa.ArrowInvalid, pa.ArrowIOError):  # past the end of the buffer
        stream = pa.BufferOutputStream()
        pq.write_table(table, stream, **options)
        return stream.getvalue()


class PerSampleWriter:
    """Writes one block's per-sample rows to part-BLOCK.parquet, chunk by chunk, atomically.

    Columns: sample, [label], loss, grad_norm, grad_norm_l1 .. grad_norm_lL,
    [prediction, correct, confidence] (classes), [el2n] (with `outputs`), [residual or
    residual_NAME..] (with `outputs` and regression `targets`), [grad] (`full`).
    `label` and `prediction` are class indices 0..K-1; with `classes` (the class values in
    output order) the schema metadata maps them back: {"gradpipe": {"classes": [...],
    "class_type": ...}}.
    """

    def __init__(self, path: str | Path, L: int, *, full: bool, classify: bool,
                 dtype: str = "float64", outputs: bool = False,
                 classes: tuple | None = None, class_type: str | None = None,
                 targets: tuple[str, ...] = ()) -> None:
        self.path = str(path)
        self.staged = Staged(path)  # a local temporary, committed whole at close
        self.dtype = np.dtype(dtype)
        self.outputs = outputs
        self.schema, self.options = per_sample_layout(
            L, full, classify, self.dtype.name, outputs,
            tuple(classes) if classes is not None else None, class_type,
            () if classify else tuple(targets))
        self.pending: list[pa.Table] = []
        # Full gradients stream to the file piece by piece; norms rows (1.5 MB a 50,000-row
        # block) are encoded in memory at close and written in one call.
        self.writer = None
        if full:
            self.writer = pq.ParquetWriter(self.staged.tmp, self.schema, **self.options)

    def write(
        self,
        ids: NDArray[np.int64],
        labels: NDArray[np.int64] | None,
        losses: F64,
        sq_norms: F64,
        grads: NDArray[np.floating] | None,
        outputs: dict[str, NDArray] | None = None,
    ) -> None:
        """One piece of rows; `outputs` holds the OUTPUT_COLUMNS arrays of these rows
        (prediction, confidence and el2n; `correct` is prediction == label)."""
        cols: list[pa.Array] = [pa.array(ids)]
        if labels is not None:
            cols.append(pa.array(labels))
        dt = self.dtype
        # The norms, whole and by layer, as rows of one array in the written dtype: the
        # square roots in one pass, each from the float64 sum of squares.
        n, width = sq_norms.shape
        roots = np.empty((width, n), dt)
        np.sqrt(total_sq(sq_norms), out=roots[0])
        np.sqrt(sq_norms[:, 1:].T, out=roots[1:])
        cols += [pa.array(losses)] + [pa.array(r) for r in roots]
        if self.outputs:
            assert outputs is not None, "this writer was opened with outputs=True"
            if labels is not None:
                prediction = outputs["prediction"]
                cols += [pa.array(prediction), pa.array(prediction == labels),
                         pa.array(outputs["confidence"].astype(dt, copy=False))]
            cols.append(pa.array(outputs["el2n"].astype(dt, copy=False)))
            if "residual" in outputs and labels is None:  # (m, T), one column a target
                residual = outputs["residual"].astype(dt, copy=False)
                cols += [pa.array(np.ascontiguousarray(residual[:, t]))
                         for t in range(residual.shape[1])]
        if grads is not None:
            m, p = grads.shape  # a piece of at most FULL_CHUNK_BYTES: int32 offsets suffice
            offsets = pa.array(np.arange(0, (m + 1) * p, p, dtype=np.int32))
            values = pa.array(grads.reshape(-1).astype(self.dtype, copy=False))
            cols.append(pa.ListArray.from_arrays(offsets, values,
                                                 type=self.schema.field("grad").type))
        table = pa.Table.from_arrays(cols, schema=self.schema)
        if self.writer is not None:
            self.writer.write_table(table)  # pieces of at most FULL_CHUNK_BYTES each
        else:
            self.pending.append(table)  # norms: one row group per block

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        else:
            # The block's rows as one row group; a writer that got none leaves a file with
            # the schema only.
            table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
            encoded = _encode(table, self.options)
            self.pending = []
            with open(self.staged.tmp, "wb") as f:
                f.write(encoded)
        self.staged.commit()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.staged.abort()


def per_sample_path(out_dir: str | Path, step: int, block: int) -> str:
    return store.join(str(out_dir), "per_sample", f"step={step}", f"part-{block:05d}.parquet")


def read_run_json(run_dir: str | Path) -> dict:
    path = store.join(str(run_dir), "run.json")
    if not store.is_file(path):
        store.check_bucket(str(run_dir))
        raise ConfigError(f"{run_dir}: not a gradpipe run folder (no run.json)")
    try:
        return json.loads(store.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
