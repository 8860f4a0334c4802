"""Datasets in: list Parquet files, number their blocks from metadata, read and validate a block.

A dataset is a Parquet file, a folder of them (read recursively, files sorted by path) or
a URI that pyarrow.fs opens. A block is one row group of one file, or a fixed-size row
range of a large row group; blocks are numbered once, from metadata alone, so the
numbering does not depend on the number of workers. A sample's id is its global row index
in block order, or the value of `id_column`. Every check raises a DataError that names the
file and the column.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from numpy.typing import NDArray

from .errors import DataError

# Rows per block when a row group is larger: bounds the memory of one block's pass.
BLOCK_ROWS = 65536


@dataclass(frozen=True)
class DataSpec:
    """Which dataset, and which of its columns are features, target and id."""

    path: str  # file, folder or URI (file://, s3://, gs://, hdfs://)
    features: tuple[str, ...] = ()  # names or globs; empty: all but target and id
    target: tuple[str, ...] = ("label",)  # one integer column (classes) or float columns
    id_column: str | None = None  # None: the global row index is the id
    classes: int | None = None  # K for classification; None: max label + 1 from the data
    block_rows: int = BLOCK_ROWS  # largest block, in rows


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of one row group of one file."""

    index: int  # block number in plan order
    file: str  # path inside the dataset's filesystem
    row_group: int
    start: int  # first row, within the row group
    stop: int
    file_row: int  # row of `start` within the file (for messages)
    first_id: int  # global row index of `start`

    @property
    def n(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Dataset:
    """A planned dataset: the blocks and resolved columns, from metadata alone."""

    source: str  # what the user passed (a URI is reopened from it in each worker)
    blocks: tuple[Block, ...]
    features: tuple[str, ...]  # feature columns (one fixed-size list column, or scalars)
    feature_list: bool  # True: `features` is one fixed-size list column
    n_features: int
    target: tuple[str, ...]
    task: str  # "classification" or "regression"
    n_outputs: int  # K classes, or the number of target columns
    id_column: str | None
    n_rows: int
    fingerprint: str  # sha256 of the files' paths, sizes, modification times, row counts, schema

    @property
    def classify(self) -> bool:
        return self.task == "classification"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "features": list(self.features),
            "n_features": self.n_features,
            "target": list(self.target),
            "task": self.task,
            "n_outputs": self.n_outputs,
            "id_column": self.id_column,
            "rows": self.n_rows,
            "files": len({b.file for b in self.blocks}),
            "blocks": len(self.blocks),
            "fingerprint": self.fingerprint,
        }


def filesystem(source: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a path or URI, and the path inside it."""
    if "://" in source:
        try:
            return pafs.FileSystem.from_uri(source)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise DataError(f"{source}: cannot open: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(source)


def list_files(source: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of a dataset, sorted by path."""
    fs, root = filesystem(source)
    try:
        info = fs.get_file_info(root)
    except OSError as e:
        raise DataError(f"{source}: cannot read: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{source}: no such file or folder")
    if info.type == pafs.FileType.File:
        return fs, [root]
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        e.path
        for e in entries
        if e.type == pafs.FileType.File
        and e.path.endswith(".parquet")
        # Hidden and underscore files (_SUCCESS, .tmp) are writer bookkeeping, not data.
        and not any(p.startswith((".", "_")) for p in os.path.relpath(e.path, root).split("/"))
    )
    if not files:
        raise DataError(f"{source}: no Parquet files (*.parquet) in this folder")
    return fs, files


def _open(fs: pafs.FileSystem, path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise DataError(
            f"{path}: not a readable Parquet file ({e}). Check that it is complete and not "
            "another format."
        ) from None


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def describe_columns(names: list[str]) -> str:
    """Column names for a message: all of them, or the first six and the count."""
    return ", ".join(names) if len(names) <= 8 else f"{', '.join(names[:6])}, ... ({len(names)})"


def select_features(
    names: list[str], patterns: tuple[str, ...], excluded: set[str], where: str
) -> list[str]:
    """Feature columns: those matching the names or globs in order, or all but `excluded`."""
    if not patterns:
        chosen = [n for n in names if n not in excluded]
    else:
        chosen = []
        for pattern in patterns:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise DataError(
                    f"{where}: no column matches feature {pattern!r} "
                    f"(found: {describe_columns(names)}). Check --features."
                )
            # A glob may sweep in the target or the id; they are never features.
            chosen += [h for h in hits if h not in chosen and h not in excluded]
    if not chosen:
        raise DataError(f"{where}: no feature columns left besides the target. Check --features.")
    return chosen


def _resolve_features(
    schema: pa.Schema, spec: DataSpec, path: str
) -> tuple[tuple[str, ...], bool, int]:
    names = schema.names
    excluded = set(spec.target) | ({spec.id_column} if spec.id_column else set())
    chosen = select_features(names, spec.features, excluded, path)
    types = {c: schema.field(c).type for c in chosen}
    lists = [c for c in chosen if pa.types.is_fixed_size_list(types[c])]
    if lists:
        if len(chosen) != 1:
            raise DataError(
                f"{path}: list column {lists[0]!r} must be the only feature column "
                f"(got {describe_columns(chosen)}). Pass --features {lists[0]}."
            )
        t = types[lists[0]]
        if not _is_numeric(t.value_type):
            raise DataError(
                f"{path}: column {lists[0]!r} is a list of {t.value_type}, not of numbers"
            )
        return tuple(chosen), True, t.list_size
    for c in chosen:
        if not _is_numeric(types[c]):
            raise DataError(
                f"{path}: column {c!r} is {types[c]}, not numeric. Drop it or pass --features "
                "with the numeric columns."
            )
    return tuple(chosen), False, len(chosen)


def _resolve_target(schema: pa.Schema, spec: DataSpec, path: str) -> str:
    names = schema.names
    for t in spec.target:
        if t not in names:
            raise DataError(
                f"{path}: missing target column {t!r} (found: {describe_columns(names)}). "
                "Pass --target with the right name."
            )
        if not _is_numeric(schema.field(t).type):
            raise DataError(f"{path}: target column {t!r} is {schema.field(t).type}, not numeric")
    if spec.id_column is not None:
        if spec.id_column not in names:
            raise DataError(f"{path}: missing id column {spec.id_column!r}")
        if not pa.types.is_integer(schema.field(spec.id_column).type):
            raise DataError(f"{path}: id column {spec.id_column!r} is not an integer column")
    if len(spec.target) == 1 and pa.types.is_integer(schema.field(spec.target[0]).type):
        return "classification"
    return "regression"


def _label_range(fs: pafs.FileSystem, files: list[str], column: str) -> tuple[int, int, str]:
    """(min, max, file of the min) of an integer column, from statistics where they exist."""
    lo, hi, lo_file = None, None, files[0]
    for path in files:
        pf = _open(fs, path)
        md = pf.metadata
        col = pf.schema_arrow.get_field_index(column)
        stats = [md.row_group(r).column(col).statistics for r in range(md.num_row_groups)]
        if all(s is not None and s.has_min_max for s in stats):
            mins, maxs = [int(s.min) for s in stats], [int(s.max) for s in stats]
        else:  # no statistics: read just this column of this file
            values = pf.read(columns=[column]).column(0)
            mm = pc.min_max(values)
            mins, maxs = [mm["min"].as_py()], [mm["max"].as_py()]
        if mins and (lo is None or min(mins) < lo):
            lo, lo_file = min(mins), path
        if maxs:
            hi = max(maxs) if hi is None else max(hi, max(maxs))
    return int(lo or 0), int(hi or 0), lo_file


def plan(spec: DataSpec) -> Dataset:
    """Read the files' metadata, check the columns, and number the blocks."""
    if spec.block_rows < 1:
        raise DataError(f"block size must be >= 1 row, got {spec.block_rows}")
    fs, files = list_files(spec.path)
    first = _open(fs, files[0])
    schema = first.schema_arrow
    features, feature_list, n_features = _resolve_features(schema, spec, files[0])
    task = _resolve_target(schema, spec, files[0])

    blocks: list[Block] = []
    digest = hashlib.sha256(str(schema).encode())
    row = 0
    for path in files:
        pf = first if path == files[0] else _open(fs, path)
        other = pf.schema_arrow
        if not other.equals(schema):
            diff = _schema_difference(schema, other)
            raise DataError(
                f"{path}: schema differs from {files[0]}: {diff}. All files of a dataset "
                "must have the same columns and types."
            )
        md = pf.metadata
        info = fs.get_file_info(path)
        digest.update(f"{path}\0{info.size}\0{info.mtime_ns}\0{md.num_rows}\0"
                      f"{md.num_row_groups}\0{md.serialized_size}".encode())
        file_row = 0
        for rg in range(md.num_row_groups):
            rows = md.row_group(rg).num_rows
            for start in range(0, rows, spec.block_rows):
                stop = min(rows, start + spec.block_rows)
                blocks.append(Block(len(blocks), path, rg, start, stop, file_row + start, row))
                row += stop - start
            file_row += rows
    if row == 0:
        raise DataError(f"{spec.path}: the dataset has zero rows")

    if task == "classification":
        lo, hi, where = _label_range(fs, files, spec.target[0])
        n_outputs = spec.classes if spec.classes is not None else hi + 1
        if lo < 0 or hi >= n_outputs:
            raise DataError(
                f"{where if lo < 0 else spec.path}: column {spec.target[0]!r} has labels "
                f"outside 0..{n_outputs - 1} (min {lo}, max {hi}). Labels must be class "
                "indices 0..K-1."
            )
        if n_outputs < 2:
            raise DataError(
                f"{spec.path}: column {spec.target[0]!r} has a single class (0); "
                "classification needs at least two."
            )
    else:
        n_outputs = len(spec.target)
    return Dataset(
        source=spec.path,
        blocks=tuple(blocks),
        features=features,
        feature_list=feature_list,
        n_features=n_features,
        target=spec.target,
        task=task,
        n_outputs=n_outputs,
        id_column=spec.id_column,
        n_rows=row,
        fingerprint=digest.hexdigest(),
    )


def _schema_difference(a: pa.Schema, b: pa.Schema) -> str:
    for name in a.names:
        if name not in b.names:
            return f"column {name!r} is missing"
        if not a.field(name).type.equals(b.field(name).type):
            return f"column {name!r} is {b.field(name).type} here, {a.field(name).type} there"
    extra = [n for n in b.names if n not in a.names]
    if extra:
        return f"extra column {extra[0]!r}"
    return "the columns are in another order"


@dataclass
class BlockData:
    """One block in memory: ids (n,), x (n, n_0) and y (n, n_L) in the compute dtype."""

    block: Block
    ids: NDArray[np.int64]
    x: NDArray[np.floating]
    y: NDArray[np.floating]
    labels: NDArray[np.int64] | None  # class indices, classification only

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.x.nbytes + self.y.nbytes


def _column(table: pa.Table, name: str, block: Block) -> pa.ChunkedArray:
    col = table.column(name)
    if col.null_count:
        nulls = pc.is_null(col).to_numpy(zero_copy_only=False)
        raise DataError(
            f"{block.file}: column {name!r} has {col.null_count} null values in rows "
            f"{block.file_row}..{block.file_row + block.n - 1} (first at row "
            f"{block.file_row + int(np.argmax(nulls))}). Drop or impute them first."
        )
    return col


def _check_finite(values: NDArray, name: str, block: Block) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        n_nan = int(np.isnan(values).sum())
        kind = ("NaN" if n_nan == int(bad.sum())
                else "infinite" if n_nan == 0 else "NaN or infinite")
        row = int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1)))
        raise DataError(
            f"{block.file}: column {name!r} has {int(bad.sum())} {kind} values in rows "
            f"{block.file_row}..{block.file_row + block.n - 1} (first at row "
            f"{block.file_row + row}). Drop or impute them first."
        )


def read_block(
    dataset: Dataset, block: Block, dtype: str, fs: pafs.FileSystem | None = None
) -> BlockData:
    """Read one block with an explicit column list, check it, and convert it to arrays."""
    if fs is None:
        fs, _ = filesystem(dataset.source)
    columns = list(dict.fromkeys(
        [*dataset.features, *dataset.target, *([dataset.id_column] if dataset.id_column else [])]
    ))
    pf = _open(fs, block.file)
    try:
        table = pf.read_row_group(block.row_group, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise DataError(f"{block.file}: cannot read row group {block.row_group} ({e})") from None
    if block.start or block.stop < table.num_rows:
        table = table.slice(block.start, block.n)
    n = table.num_rows

    if dataset.feature_list:
        name = dataset.features[0]
        col = _column(table, name, block).combine_chunks()
        flat = col.values.to_numpy(zero_copy_only=False)
        with np.errstate(over="ignore"):
            x = flat.reshape(n, dataset.n_features).astype(dtype, copy=False)
        _check_finite(x, name, block)
    else:
        x = np.empty((n, dataset.n_features), dtype=dtype)  # (n, n_0)
        for k, name in enumerate(dataset.features):
            values = _column(table, name, block).to_numpy()
            if values.dtype.kind == "f":
                _check_finite(values, name, block)
            with np.errstate(over="ignore"):  # too large for float32: inf, refused below
                x[:, k] = values
        if not np.isfinite(x).all():  # a float64 too large for float32 turns into inf
            k = int(np.argmax(~np.isfinite(x).all(axis=0)))
            _check_finite(x[:, k], dataset.features[k], block)

    labels = None
    if dataset.classify:
        name = dataset.target[0]
        labels = _column(table, name, block).to_numpy().astype(np.int64)
        bad = (labels < 0) | (labels >= dataset.n_outputs)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{block.file}: column {name!r} has labels outside 0..{dataset.n_outputs - 1} "
                f"({int(labels[i])} at row {block.file_row + i})."
            )
        y = np.zeros((n, dataset.n_outputs), dtype=dtype)  # one-hot, (n, K)
        y[np.arange(n), labels] = 1
    else:
        y = np.empty((n, len(dataset.target)), dtype=dtype)
        for j, name in enumerate(dataset.target):
            values = _column(table, name, block).to_numpy()
            if values.dtype.kind == "f":
                _check_finite(values, name, block)
            y[:, j] = values

    if dataset.id_column:
        ids = _column(table, dataset.id_column, block).to_numpy().astype(np.int64)
    else:
        ids = np.arange(block.first_id, block.first_id + n, dtype=np.int64)
    return BlockData(block, ids, x, y, labels)


def read_rows(
    dataset: Dataset, rows: list[int], dtype: str
) -> tuple[NDArray[np.int64], NDArray[np.floating], NDArray[np.floating]]:
    """Read the samples at these global row indexes: (ids, x, y), in the order given."""
    fs, _ = filesystem(dataset.source)
    starts = np.array([b.first_id for b in dataset.blocks])
    cache: dict[int, BlockData] = {}
    ids, xs, ys = [], [], []
    for r in rows:
        if not 0 <= r < dataset.n_rows:
            raise DataError(f"--sample {r}: outside 0..{dataset.n_rows - 1}, "
                            f"the rows of {dataset.source}")
        b = int(np.searchsorted(starts, r, side="right")) - 1
        if b not in cache:
            cache[b] = read_block(dataset, dataset.blocks[b], dtype, fs)
        d = cache[b]
        i = r - d.block.first_id
        ids.append(d.ids[i])
        xs.append(d.x[i])
        ys.append(d.y[i])
    return np.array(ids, dtype=np.int64), np.stack(xs), np.stack(ys)
