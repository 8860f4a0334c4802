"""Datasets in: list Parquet files, number their blocks, settle the task, read and validate a block.

A dataset is a Parquet file, a folder of them (read recursively, files sorted by path) or
a URI that pyarrow.fs opens. A block is one row group of one file, or a fixed-size row
range of a large row group; blocks are numbered once, from metadata alone, so the
numbering does not depend on the number of workers. A sample's id is its global row index
in block order, or the value of `id_column`. The task and the class values come from the
target column's type and values (read alone, file by file), never guessed in silence:
`schema_line` says what was chosen. Every check raises a DataError naming file and column.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import math
import os
import re
import shlex
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from numpy.typing import NDArray

from . import store
from .errors import ConfigError, DataError
from .store import filesystem


def _look_for_pandas_now() -> None:
    """Have pyarrow look for pandas now, with Ctrl-C held until it has.

    pyarrow imports pandas, where installed, at the first array it converts, inside a shim
    that catches what the import raises: a Ctrl-C landing in that import (0.4 s, during a
    command's first block) was lost, and the run went on to its end, or failed with pandas'
    "partially initialized module" error. Here it happens when this module is imported, with
    SIGINT blocked; a Ctrl-C pressed meanwhile arrives as soon as it is done.
    """
    hold = (hasattr(signal, "pthread_sigmask")
            and threading.current_thread() is threading.main_thread())
    if hold:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pa.array(np.zeros(1))
    finally:
        if hold:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


_look_for_pandas_now()

# An integer feature named like this is said on the schema line (an id, a saved index?).
ID_NAME = re.compile(r"(?i:(^|[_\W])(id|idx|index|key|rowid|uuid)$|^(id|idx|index|rowid)([_\W]|$))"
                     r"|[a-z](Id|ID|Idx|Key)$")  # and camelCase: PassengerId, customerKey
# Feature names that read as a target (scikit-learn's frames hold 'target'; a user who adds
# a 'species' column and trains on it leaves the integer 'target' as a feature: a leak).
# Not 'y': it is as often a coordinate beside 'x' (make_moons written as x, y, label).
TARGET_NAME = re.compile(r"(?i)^(target|targets|label|labels|class|outcome)$")

# Rows per block when a row group is larger: bounds the memory of one block's pass.
BLOCK_ROWS = 65536
# The schema line names row groups this small (rows a block, on average), when there are
# at least TINY_BLOCKS of them: 1,257 one-row groups took a 300-step run 107 s, one group 2.5 s.
TINY_BLOCK_ROWS = 64
TINY_BLOCKS = 32
TASKS = ("auto", "classification", "regression")
# The key of the file metadata in which `data import` keeps the --target and --task it
# checked the data with (JSON: {"target": [...], "task": "..."}): train's defaults for them.
IMPORT_KEY = b"gradpipe.import"
DEFAULT_TARGET = ("label",)
# Rows of target values per read while settling the task and classes in `plan`.
SCAN_ROWS = 65536
# |sum - 1| allowed in a row of probability targets (DataSpec.probability_targets).
PROBABILITY_TOLERANCE = 1e-6

ClassValue = int | bool | str

# Index columns: pandas writes a nameless index as __index_level_N__; a CSV export's
# index has an empty header, which pyarrow and polars read as "" and pandas as "Unnamed: 0"
# ("Unnamed: 0.1" when an already imported index is exported again).
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")
_UNNAMED = re.compile(r"(Unnamed: \d+(\.\d+)*)?")


@dataclass(frozen=True)
class DataSpec:
    """Which dataset, and which of its columns are features, target and id."""

    path: str  # file, folder or URI (file://, s3://, gs://, hdfs://)
    # Names or globs; empty: all but target, id and index columns. A glob skips index
    # columns; an exact name takes one on purpose.
    features: tuple[str, ...] = ()
    target: tuple[str, ...] = DEFAULT_TARGET  # one class column, or numeric columns (regression)
    id_column: str | None = None  # None: the global row index is the id
    # The class values of a model (from its weights): labels outside them are refused, a
    # split lacking some is fine. An int K means the values 0..K-1. None: from the data.
    classes: tuple[ClassValue, ...] | int | None = None
    block_rows: int = BLOCK_ROWS  # largest block, in rows
    # "auto": an integer, bool, string or dictionary target is classification, a float
    # target regression, a float target of whole numbers refused (ambiguous); several
    # target columns are regression. Or "classification" / "regression" explicitly.
    task: str = "auto"
    # Regression targets must be rows of probabilities (each >= 0, summing to 1 within
    # PROBABILITY_TOLERANCE): read_block refuses other rows. Set for softmax + cross_entropy.
    probability_targets: bool = False
    # False: the target is not read and need not exist (gradpipe predict); `task` must then
    # be "classification" (with `classes`) or "regression". Its names are never features.
    read_target: bool = True
    # The features are a trained model's (evaluate, predict): a column of the wrong type is
    # the data's to fix, not a choice of --features.
    features_from_model: bool = False


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
    """A planned dataset: the blocks, resolved columns, task and classes."""

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
    # Class values, sorted (Python int, bool or str); label i in BlockData.labels is classes[i].
    classes: tuple[ClassValue, ...] = ()
    class_type: str | None = None  # the target column's type: "int64", "bool", "string", ...
    ignored_columns: tuple[str, ...] = ()  # index columns (pandas, CSV export) left out
    # Integer features that count the rows (0..N-1 or 1..N, through the dataset or through
    # each file), by the row groups' statistics: a saved index, most likely. Said on the
    # schema line, still used (the user chose no features, or chose these).
    counting_columns: tuple[str, ...] = ()
    # Integer features named like an id (row_id, index, ID, sample_idx): said on the schema
    # line, still used; a split's saved index counts no rows, and its name is all there is.
    id_named_columns: tuple[str, ...] = ()
    # Features named like a target (TARGET_NAME) while the target is another column: said
    # on the schema line, still used.
    target_named_columns: tuple[str, ...] = ()
    # An ignored index column of integers (pandas' index), which --id-column could name.
    ignored_integer_index: str | None = None
    probability_targets: bool = False  # see DataSpec.probability_targets
    has_target: bool = True  # False: blocks carry no targets (DataSpec.read_target)
    # Hive partition keys in the files' folder names (split=train/), {key: values}: not
    # columns of the files, so not read; said on the schema line.
    partition_keys: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (column, min, max) of the numeric features and targets whose every row group has
    # statistics: from the files' metadata alone (coarse_columns, target outliers).
    ranges: tuple[tuple[str, float, float], ...] = ()
    # What of `data import`'s --target and --task the files declared and this plan took
    # ("--target target --task regression"): said on the schema line.
    declared: str | None = None
    # Files in the folder not named *.parquet, not read: (relative name, Parquet by its
    # contents); said on the schema line, and train warns of the Parquet ones.
    unread_files: tuple[tuple[str, bool], ...] = ()

    @property
    def scales_targets(self) -> bool:
        """Whether --standardize scales the targets too: regression targets, but not
        probability rows, which cross_entropy needs summing to 1."""
        return not self.classify and not self.probability_targets

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
            "classes": list(self.classes),
            "class_type": self.class_type,
            "id_column": self.id_column,
            "ignored_columns": list(self.ignored_columns),
            "counting_columns": list(self.counting_columns),
            "id_named_columns": list(self.id_named_columns),
            "target_named_columns": list(self.target_named_columns),
            "probability_targets": self.probability_targets,
            "partition_keys": {k: list(v) for k, v in self.partition_keys},
            "unread_files": [name for name, _ in self.unread_files],
            "rows": self.n_rows,
            "files": len({b.file for b in self.blocks}),
            "blocks": len(self.blocks),
            "fingerprint": self.fingerprint,
        }


def existing(source: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    """The filesystem, path and file info of a file or folder that exists (else DataError)."""
    if not str(source).strip():  # "" would be the current folder, read recursively
        raise DataError("an empty path was given for data: pass a Parquet file, folder or URI")
    fs, path = filesystem(source)
    info = store.info(source)
    if info.type == pafs.FileType.NotFound:
        store.check_bucket(source)
        raise DataError(f"{source}: no such file or folder")
    return fs, path, info


# Bytes read from each end of a file for `shared_files`: the start holds column data, the
# end the footer with every row group's sizes and statistics.
SIGNATURE_BYTES = 1 << 20


def _signature(fs: pafs.FileSystem, path: str, size: int) -> str:
    """sha256 of a file's size and first and last SIGNATURE_BYTES: a copy's is the same."""
    digest = hashlib.sha256(str(size).encode())
    with fs.open_input_file(path) as f:
        digest.update(f.read_at(min(size, SIGNATURE_BYTES), 0))
        if size > SIGNATURE_BYTES:
            tail = min(size - SIGNATURE_BYTES, SIGNATURE_BYTES)
            digest.update(f.read_at(tail, size - tail))
    return digest.hexdigest()


def shared_files(a: Dataset, b: Dataset | str) -> int:
    """How many of a's files have the contents of one of b's (a dataset, or its source:
    only its files are listed), wherever they lie: a copy of a file, or of the folder, is
    data already seen. Only files of equal sizes are read (2 MiB of each at most, by
    `_signature`)."""
    def sized(ds: Dataset | str) -> tuple[pafs.FileSystem, dict[str, int]]:
        if isinstance(ds, str):
            fs, files = list_files(ds)
        else:
            fs, _ = filesystem(ds.source)
            files = sorted({blk.file for blk in ds.blocks})
        return fs, {i.path: i.size for i in fs.get_file_info(files)}

    (fs_a, size_a), (fs_b, size_b) = sized(a), sized(b)
    sizes = set(size_a.values()) & set(size_b.values())
    theirs = {_signature(fs_b, p, n) for p, n in size_b.items() if n in sizes}
    return sum(_signature(fs_a, p, n) in theirs for p, n in size_a.items() if n in sizes)


def list_files(source: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of a dataset, sorted by path."""
    fs, _, files, _ = _listing(source)
    return fs, files


def _listing(source: str) -> tuple[pafs.FileSystem, str, list[str], list[str]]:
    """(filesystem, root, the *.parquet files, the other files) of a dataset, sorted by
    path. Hidden and underscore names (_SUCCESS, .tmp: writer bookkeeping) are neither."""
    fs, root, info = existing(source)
    if info.type == pafs.FileType.File:
        return fs, root, [root], []
    _refuse_run_folder(fs, root, source)
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    found = sorted(
        e.path
        for e in entries
        if e.type == pafs.FileType.File
        and not any(p.startswith((".", "_")) for p in os.path.relpath(e.path, root).split("/"))
    )
    files = [f for f in found if f.endswith(".parquet")]
    if not files:
        raise DataError(f"{source}: no Parquet files (*.parquet) in this folder")
    return fs, root, files, [f for f in found if not f.endswith(".parquet")]


# Files of a folder not named *.parquet whose first and last bytes are looked at for
# Parquet's magic (a renamed part, part-3.PARQUET, a Hive file 000000_0), at most.
UNREAD_CHECKED = 16


def parquet_magic(fs: pafs.FileSystem, path: str) -> bool:
    """Whether a file begins and ends with Parquet's magic bytes, PAR1 (OSError if it cannot
    be read)."""
    with fs.open_input_file(path) as f:
        size = f.size()
        return size >= 12 and f.read_at(4, 0) == b"PAR1" and f.read_at(4, size - 4) == b"PAR1"


def _unread(fs: pafs.FileSystem, root: str, others: list[str]) -> tuple[tuple[str, bool], ...]:
    """(name relative to the folder, Parquet by its contents) of the files a folder holds
    besides its *.parquet ones, which are not read: said on the schema line."""
    out = []
    for i, path in enumerate(others):
        parquet = False
        if i < UNREAD_CHECKED:
            try:
                parquet = parquet_magic(fs, path)
            except OSError:
                parquet = False
        out.append((os.path.relpath(path, root), parquet))
    return tuple(out)


def _refuse_run_folder(fs: pafs.FileSystem, root: str, source: str) -> None:
    """A gradpipe run folder given as data (its weights and records are Parquet too, and
    were read as rows with a missing target or a non-numeric 'param' column)."""
    marker = f"{root.rstrip('/')}/run.json"
    if fs.get_file_info(marker).type != pafs.FileType.File:
        return
    try:
        with fs.open_input_stream(marker) as f:
            data = json.loads(f.read()).get("config", {}).get("data")
    except (OSError, ValueError, AttributeError):
        data = None
    raise DataError(f"{source}: a gradpipe run folder (it has run.json), not a dataset: "
                    + (f"pass the data, such as the run's own {data}" if data else
                       "pass the data"))


def _open(fs: pafs.FileSystem, path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        if "AWS Error" in str(e):
            raise store.failure(path, e) from None
        if path.lower().endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
            raise DataError(f"{path}: a CSV file, not Parquet. Convert it first: gradpipe data "
                            f"import {path} OUT_FOLDER --target TARGET_COLUMN (or --no-target for "
                            "rows to predict)") from None
        raise DataError(
            f"{path}: not a readable Parquet file ({str(e).rstrip('.')}). Check that it is "
            "complete and not another format (a CSV file: gradpipe data import)."
        ) from None


def _is_numeric(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_decimal(t))


def _numbers(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A decimal column (DuckDB writes 1.0 literals as DECIMAL) as float64; others as they are."""
    return col.cast(pa.float64()) if pa.types.is_decimal(col.type) else col


def _value_type(t: pa.DataType) -> pa.DataType:
    """The type of the values: a dictionary-encoded column's dictionary type."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_class_type(t: pa.DataType) -> bool:
    """Types whose values are class labels under task "auto": integer, bool, string."""
    t = _value_type(t)
    return (pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t))


def type_name(t: pa.DataType) -> str:
    """A short name of a column's value type: int64, float64, bool, string, ..."""
    t = _value_type(t)
    if pa.types.is_large_string(t):
        return "string"
    return {pa.float64(): "float64", pa.float32(): "float32",
            pa.float16(): "float16"}.get(t, str(t))


def describe_columns(names: list[str], near: str | None = None) -> str:
    """Column names for a message: all of them, or the first six and the count; with `near`
    (a name that was not found), the names closest to it too, which the cut may leave out
    ('Target' for 'target')."""
    shown = [repr(n) if "," in n or n != n.strip() or not n else n for n in names]
    text = ", ".join(shown) if len(shown) <= 8 else f"{', '.join(shown[:6])}, ... ({len(shown)})"
    if near is None:
        return text
    folded = {n.casefold(): n for n in names}
    close = ([folded[near.casefold()]] if near.casefold() in folded else
             difflib.get_close_matches(near, names, n=2, cutoff=0.7))
    return text + (f"; closest to {near!r}: {', '.join(map(repr, close))}" if close else "")


def target_advice(names: list[str], missing: str) -> str:
    """What to do about a target column that is not there: name the columns called like a
    target (scikit-learn's frames call theirs 'target', the default is 'label'), which the
    list of names may have cut."""
    like = [n for n in names if TARGET_NAME.match(n) and n != missing]
    if not like:
        return "Pass --target with the right name."
    return ("Pass --target with the right name; named like a target: "
            + ", ".join(f"{n!r} (--target {shlex.quote(n)})" for n in like[:3]) + ".")


def _show(name: str) -> str:
    """A column name for a line of text: quoted when it is empty or padded."""
    return name if name and name.strip() == name else repr(name)


def describe_values(values: Iterable[ClassValue], limit: int = 12) -> str:
    """Class values for a line of text: all of them, or the first and last few."""
    shown = [repr(v) if isinstance(v, str) else str(v) for v in values]
    if len(shown) <= limit:
        return ", ".join(shown)
    return f"{', '.join(shown[:limit - 3])}, ..., {', '.join(shown[-2:])}"


def _describe_classes(values: tuple[ClassValue, ...]) -> str:
    """Class values for a refusal: 0..K-1 when they are that range, else the values."""
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    if len(values) > 2 and len(ints) == len(values) and ints == list(
            range(ints[0], ints[0] + len(values))):
        return f"{ints[0]}..{ints[-1]}"
    return describe_values(values)


def pandas_metadata(schema: pa.Schema) -> dict | None:
    """The metadata pandas wrote into a Parquet schema, or None (also when unreadable)."""
    try:
        return schema.pandas_metadata
    except (ValueError, json.JSONDecodeError):
        return None


def index_columns(names: list[str], metadata: dict | None = None) -> list[str]:
    """Columns that hold a DataFrame index, not data: never features unless named.

    Those pandas wrote (`__index_level_N__`, or named in the pandas metadata's
    `index_columns`; a RangeIndex is stored there as a dict and has no column), and the
    leading unnamed columns of a CSV export ("" for pyarrow and polars, "Unnamed: 0" for
    pandas).
    """
    found = {n for n in names if _PANDAS_INDEX.fullmatch(n)}
    if metadata:
        listed = metadata.get("index_columns", [])
        found |= {c for c in listed if isinstance(c, str)} if isinstance(listed, list) else set()
    for n in names:
        if not _UNNAMED.fullmatch(n):
            break
        found.add(n)
    return [n for n in names if n in found]


def select_features(
    names: list[str], patterns: tuple[str, ...], excluded: set[str], where: str,
    index: Iterable[str] = (), *, all_names: Callable[[], list[str]] | None = None,
) -> list[str]:
    """Feature columns: those matching the names or globs in order, or all but `excluded`;
    then without those matching a pattern `!NAME` (`!region` alone: all but region), which
    must match a column here, or of another file (`all_names()`: the columns of all).

    A pattern that is exactly a column's name is that column, brackets and all. Index
    columns (`index`) are left out, unless a pattern is exactly their name.
    """
    index = set(index)

    def matches(pattern: str, kind: str) -> list[str]:
        hits = ([pattern] if pattern in names else
                [n for n in names if fnmatch.fnmatchcase(n, pattern)])
        if not hits and kind != "feature" and all_names is not None:
            every = all_names()
            if any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in every):
                return []  # a column of another file
            raise DataError(
                f"{where}: no column of any file matches the left-out feature {pattern!r} "
                f"(found: {describe_columns(every, pattern)}). Check --features."
            )
        if not hits:
            raise DataError(
                f"{where}: no column matches {kind} {pattern!r} "
                f"(found: {describe_columns(names, pattern)}). Check --features."
            )
        return hits

    leave_out = [p for p in patterns if p.startswith("!") and p not in names]
    dropped = [p[1:] for p in leave_out]
    wanted = [p for p in patterns if p not in leave_out]
    if not wanted:
        chosen = [n for n in names if n not in excluded and n not in index]
    else:
        chosen = []
        for pattern in wanted:
            hits = matches(pattern, "feature")
            if pattern in excluded:  # named, not swept in by a glob
                raise DataError(f"{where}: --features names {pattern!r}, the target or the id "
                                "column; it cannot be a feature too")
            # A glob may sweep in the target, the id or an index; they are never features.
            chosen += [h for h in hits if h not in chosen and h not in excluded
                       and (h == pattern or h not in index)]
    for pattern in dropped:
        left_out = set(matches(pattern, "the left-out feature"))
        chosen = [c for c in chosen if c not in left_out]
    if not chosen:
        raise DataError(f"{where}: no feature columns left besides the target. Check --features.")
    return chosen


def _resolve_features(
    schema: pa.Schema, spec: DataSpec, path: str,
    all_names: Callable[[], list[str]] | None = None,
) -> tuple[tuple[str, ...], bool, int, tuple[str, ...]]:
    """(features, one list column?, n_features, index columns left out)."""
    names = schema.names
    excluded = set(spec.target) | ({spec.id_column} if spec.id_column is not None else set())
    index = index_columns(names, pandas_metadata(schema))
    chosen = select_features(names, spec.features, excluded, path, index,
                             all_names=all_names)
    ignored = tuple(c for c in index if c not in chosen and c not in excluded)
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
        return tuple(chosen), True, t.list_size, ignored
    varying = [c for c in chosen if pa.types.is_list(types[c]) or
               pa.types.is_large_list(types[c])]
    if varying:
        raise DataError(
            f"{path}: column {varying[0]!r} is a list of varying length ({types[varying[0]]}); "
            "a list feature needs a fixed size, the same in every row: cast the column to "
            "pa.list_(pa.float64(), SIZE) (polars: pl.Array(pl.Float64, SIZE)), or store one "
            "column a feature")
    bad = [c for c in chosen if not _is_numeric(types[c])]
    if bad:
        plural = "s" * (len(bad) > 1)
        kinds = ", ".join(f"{c!r} is {types[c]}" for c in bad[:5]) + (
            f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(
            f"{path}: column{plural} not numeric: {kinds}. "
            + ("The model was trained on them as numbers: cast them to a number type."
               if spec.features_from_model else
               "Leave them out with --features '" + ",".join(f"!{c}" for c in bad) + "', or "
               "convert them to numbers first")
        )
    return tuple(chosen), False, len(chosen), ignored


def first_repeated(names: list[str] | tuple[str, ...]) -> str | None:
    """The first name given a second time, or None."""
    return next((n for i, n in enumerate(names) if n in names[:i]), None)


def _check_unique_names(schema: pa.Schema, path: str) -> None:
    """Columns are read by name: a name twice in one file cannot be read."""
    names = schema.names
    twice = first_repeated(names)
    if twice is not None:
        raise DataError(f"{path}: column {twice!r} appears {names.count(twice)} times; "
                        "columns are read by name, so each must be unique")


_PARTITION = re.compile(r"^([^=]+)=(.*)$")


def partition_keys(files: list[str], columns: list[str], root: str = "") -> dict[str, list[str]]:
    """{key: sorted values} of the hive partitions in the files' folder names below `root`
    (species=setosa/part-0.parquet, as pandas' partition_cols and Spark write them), but for
    names that are columns of the files too. Folders above the dataset (DATA given as
    wine/split=train) are not its partitions: all its rows have that value."""
    found: dict[str, set[str]] = {}
    prefix = root.rstrip("/") + "/" if root else ""
    for path in files:
        inside = path[len(prefix):] if prefix and path.startswith(prefix) else path
        for part in inside.split("/")[:-1]:
            if (m := _PARTITION.match(part)) and m.group(1) not in columns:
                found.setdefault(m.group(1), set()).add(m.group(2))
    return {k: sorted(v) for k, v in found.items()}


# A partition key that splits rows into training and held-out sets, by its name or values.
SPLIT_KEY = re.compile(r"(?i)^(split|splits|fold|folds|subset|set|dataset|partition|phase|"
                       r"stage|part)$")
SPLIT_VALUE = re.compile(r"(?i)^(train|training|test|testing|val|valid|validation|eval|"
                         r"evaluation|dev|holdout|heldout)$")


def split_keys(dataset: Dataset) -> list[tuple[str, tuple[str, ...]]]:
    """The dataset's partition keys that look like a train/test split (SPLIT_KEY names, or
    a SPLIT_VALUE among their values): every folder's rows are read, held-out ones too."""
    return [(k, v) for k, v in dataset.partition_keys if len(v) > 1
            and (SPLIT_KEY.match(k) or any(SPLIT_VALUE.match(x) for x in v))]


def _check_partition_keys(keys: dict[str, list[str]], spec: DataSpec, path: str) -> None:
    """A target, id or feature named as a partition key: said so, not 'missing'."""
    asked = [*(spec.target if spec.read_target else ()),
             *([spec.id_column] if spec.id_column is not None else []), *spec.features]
    named = next((n for n in asked if n in keys), None)
    if named is not None:
        raise DataError(
            f"{path}: {named!r} is a partition key in the folder names ({named}="
            f"{keys[named][0]}/...), not a column of the files, and gradpipe reads the files' "
            f"columns. Write the column into the files: pandas.read_parquet(FOLDER)"
            f".to_parquet(FILE) (without partition_cols)")


def _import_record(schema: pa.Schema) -> tuple[tuple[str, ...], str, object] | None:
    """(target, task, id column) that `data import` kept in the files' metadata
    (IMPORT_KEY); None where there is none, or not ours. A target of () is --no-target."""
    raw = (schema.metadata or {}).get(IMPORT_KEY)
    if raw is None:
        return None
    try:
        found = json.loads(raw)
        # id_column is absent in files of before it was kept
        return tuple(str(t) for t in found["target"]), str(found["task"]), found.get("id_column")
    except (ValueError, KeyError, TypeError, AttributeError):  # not ours, or damaged
        return None


def _declared(schema: pa.Schema, spec: DataSpec) -> tuple[DataSpec, str | None]:
    """The spec with what `data import` declared in the files' metadata (IMPORT_KEY) where
    the user said nothing else: its id column where --id-column was not given, its target
    where --target was left at its default and the files have no such column, and its
    --task where the target is the declared one and --task is auto. Also the flags taken,
    for the schema line (None: none)."""
    record = _import_record(schema)
    if record is None:
        return spec, None
    target, task, id_column = record
    if spec.read_target and not target and not all(t in schema.names for t in spec.target):
        raise DataError(f"{spec.path}: imported without a target (data import --no-target): "
                        "rows for gradpipe predict; training and evaluating need their target")
    taken = []
    if spec.read_target:
        if (spec.target == DEFAULT_TARGET and DEFAULT_TARGET[0] not in schema.names and target
                and all(t in schema.names for t in target)):
            spec = replace(spec, target=target)
            taken.append(f"--target {shlex.quote(','.join(target))}")
        if spec.target == target and spec.task == "auto" and task in TASKS[1:]:
            spec = replace(spec, task=task)
            taken.append(f"--task {task}")
    if spec.id_column is None and isinstance(id_column, str) and id_column in schema.names:
        spec = replace(spec, id_column=id_column)
        taken.append(f"--id-column {shlex.quote(id_column)}")
    return spec, " ".join(taken) or None


def imported_without_target(source: str) -> bool:
    """Whether DATA's files were written by `data import --no-target` (rows to predict)."""
    fs, files = list_files(source)
    record = _import_record(_open(fs, files[0]).schema_arrow)
    return record is not None and record[0] == ()


def _check_columns(schema: pa.Schema, spec: DataSpec, path: str) -> None:
    """The target (if read) and id columns exist, and the id is an integer column."""
    names = schema.names
    for t in spec.target if spec.read_target else ():
        if t not in names:
            comma = next((c for c in names if "," in c and t in
                          [p.strip() for p in c.split(",")]), None)
            raise DataError(
                f"{path}: missing target column {t!r} (found: {describe_columns(names, t)}). "
                + (target_advice(names, t) if comma is None else
                   f"--target splits names at commas: name {comma!r} in a job file, "
                   f"target = [{json.dumps(comma)}]")
            )
    if spec.id_column is not None:
        if spec.id_column not in names:
            raise DataError(f"{path}: missing id column {spec.id_column!r}")
        if not pa.types.is_integer(schema.field(spec.id_column).type):
            raise DataError(f"{path}: id column {spec.id_column!r} is not an integer column")


def _target_batches(
    fs: pafs.FileSystem, files: list[str], column: str
) -> Iterable[tuple[str, int, pa.Array]]:
    """(file, first row in the file, values) of one column, SCAN_ROWS at a time, decoded."""
    for path in files:
        pf = _open(fs, path)
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=SCAN_ROWS, columns=[column]):
                values = batch.column(0)
                if pa.types.is_dictionary(values.type):
                    values = values.dictionary_decode()
                yield path, row, values
                row += batch.num_rows
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise DataError(f"{path}: cannot read column {column!r} ({e})") from None


def check_unique_ids(dataset: Dataset, why: str) -> None:
    """Refuse a dataset whose --id-column repeats a value, naming the two rows and `why`
    ids must be unique (a private run's guarantee is per row and its Poisson draw keys on
    the id; per-sample rows, scores and influence are keyed by it). Reads the id column
    whole (8 bytes a row)."""
    if dataset.id_column is None:
        return
    fs, _ = filesystem(dataset.source)
    files = list(dict.fromkeys(b.file for b in dataset.blocks))
    parts = [values.to_numpy(zero_copy_only=False).astype(np.int64)
             for _, _, values in _target_batches(fs, files, dataset.id_column)]
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if not len(same):
        return
    first, second = int(order[same[0]]), int(order[same[0] + 1])  # global rows, in order

    def where(row: int) -> str:
        block = next(b for b in dataset.blocks if b.first_id <= row < b.first_id + b.n)
        return f"row {block.file_row + row - block.first_id} of {block.file}"

    raise DataError(
        f"--id-column {dataset.id_column!r}: id {int(ids[first])} is on {where(first)} and "
        f"{where(second)} ({len(same)} repeated id{'s' * (len(same) != 1)} in all); {why} "
        "(without --id-column the row index is the id)")


def _whole_numbers(fs: pafs.FileSystem, files: list[str], column: str) -> bool:
    """True if every finite value of a float column is a whole number (stops at the first not)."""
    for path, row, values in _target_batches(fs, files, column):
        if values.null_count:  # said first: --task would not help
            first = row + int(np.argmax(pc.is_null(values).to_numpy(zero_copy_only=False)))
            raise DataError(f"{path}: target column {column!r} has {values.null_count} null "
                            f"value{'s' * (values.null_count != 1)} (first at row {first}). "
                            "Drop or impute them first.")
        a = _numbers(values).to_numpy(zero_copy_only=False)
        nan = np.isnan(a)
        if nan.any():  # as nulls: neither task takes them
            raise DataError(f"{path}: target column {column!r} has {int(nan.sum())} NaN "
                            f"value{'s' * (int(nan.sum()) != 1)} (first at row "
                            f"{row + int(np.argmax(nan))}). Drop or impute them first.")
        a = a[np.isfinite(a)]
        if (a != np.floor(a)).any():
            return False
    return True


def _key(value: ClassValue) -> tuple[bool, ClassValue]:
    # True == 1 in Python; a bool class and an int class are different values here.
    return isinstance(value, bool), value


def _class_values(
    fs: pafs.FileSystem, files: list[str], column: str, allowed: tuple[ClassValue, ...] | None
) -> set[ClassValue]:
    """The distinct values of a class column, file by file; memory grows with their number.

    Floats must be whole numbers and are kept as ints; nulls and NaN are left to read_block,
    which names their row. With `allowed` (a model's classes), other values are refused.
    """
    allowed_keys = None if allowed is None else {_key(v) for v in allowed}
    found: set[ClassValue] = set()
    for path, row, values in _target_batches(fs, files, column):
        if pa.types.is_floating(values.type):
            a = values.to_numpy(zero_copy_only=False)
            bad = np.isfinite(a) & (a != np.floor(a))
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(
                    f"{path}: column {column!r} has {float(a[i])!r} at row {row + i}, not a whole "
                    "number; class labels must be whole numbers. Pass --task regression if "
                    "it is a numeric target."
                )
            values = pc.unique(values).to_numpy(zero_copy_only=False)
            new = {int(v) for v in values if np.isfinite(v)}
        else:
            new = {v for v in pc.unique(values).to_pylist() if v is not None}
        if allowed_keys is not None:
            outside = sorted(v for v in new if _key(v) not in allowed_keys)
            if outside:
                assert allowed is not None
                numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in outside)
                retyped = _retyped_hint(outside, allowed, allowed_keys, column)
                raise DataError(
                    f"{path}: column {column!r} has labels {describe_values(outside, 6)}, "
                    f"not among the model's {len(allowed)} classes "
                    f"({_describe_classes(allowed)}): a model can only be used on its own "
                    "classes." + (retyped or (f" If {column!r} counts or measures rather than "
                                              "names a class, train with --task regression."
                                              if numbers else ""))
                )
        found |= new
    return found


def _retyped_hint(outside: Sequence[ClassValue], allowed: tuple[ClassValue, ...],
                  allowed_keys: set, column: str) -> str:
    """Labels of another type than the model's classes that would be among them once
    converted ('2' for 2, 2 for '2'): said, with the conversion; "" otherwise."""
    theirs, ours = {type(v) for v in outside}, type(allowed[0])
    if len(theirs) != 1 or ours in theirs or not {type(v) for v in allowed} == {ours}:
        return ""
    try:
        converted = [ours(v) for v in outside]
    except (TypeError, ValueError):
        return ""
    if not all(_key(v) in allowed_keys for v in converted):
        return ""
    kind = {str: "text", int: "integers", bool: "booleans"}
    return (f" The labels here are {kind.get(theirs.pop(), 'values')} and the model's classes "
            f"{kind.get(ours, 'values')}: convert the column to the model's type first "
            f"(pandas: df[{column!r}].astype({ours.__name__})).")


def _reads_as_number(text: str) -> bool:
    """'14,265.83', ' 3.5 ', '-1e3': a number once thousands separators and spaces go."""
    try:
        float(text.replace(",", "").replace("_", "").strip())
    except ValueError:
        return False
    return True


def _model_classes(classes: tuple[ClassValue, ...] | int | None) -> tuple[ClassValue, ...] | None:
    if isinstance(classes, int):
        return tuple(range(classes))  # the older form: K classes 0..K-1
    return None if classes is None else tuple(classes)  # a list from JSON, too


# The schema line points out integer classes with gaps (0..21, 23) from this many classes
# on: counts taken as classes; a test split's 22 is then refused as an unknown class.
GAPPED_CLASSES = 10
# --task auto refuses a class target with more classes than this and fewer rows a class.
MANY_CLASSES = 20
ROWS_PER_CLASS = 5
ROWS_PER_NAME = 2  # strings: 26 letters of 4.6 rows each are classes, names a row are not
# ... and from SOME_CLASSES classes on, fewer than ROWS_PER_NAME rows a class of any type:
# linnerud's Weight stored as integers is 16 values in 20 rows, a measure, not 16 classes.
SOME_CLASSES = 10


def _resolve_task(
    fs: pafs.FileSystem, files: list[str], schema: pa.Schema, spec: DataSpec, n_rows: int
) -> tuple[str, tuple[ClassValue, ...], str | None]:
    """(task, class values, class type) from the target's type, and its values if needed.

    With --task auto, a class target with more than MANY_CLASSES classes and fewer than
    ROWS_PER_CLASS rows a class on average (ROWS_PER_NAME for strings), or with SOME_CLASSES
    classes or more and fewer than ROWS_PER_NAME rows a class, is refused as ambiguous: a
    count or a measure stored as integers (scikit-learn's diabetes target cast to int: 214
    classes of 442 rows), as a float target of whole numbers is, or a column of names or
    ids, or of numbers written as text (a string a row).
    """
    names = spec.target
    if len(names) > 1:
        if spec.task == "classification":
            raise DataError(
                f"{files[0]}: classification takes one target column, got "
                f"{', '.join(map(repr, names))}. Pass one --target, or --task regression."
            )
        for t in names:
            if not _is_numeric(schema.field(t).type):
                raise DataError(
                    f"{files[0]}: target column {t!r} is {schema.field(t).type}, not numeric; "
                    "several target columns are regression targets."
                )
        bools = [t for t in names if pa.types.is_boolean(_value_type(schema.field(t).type))]
        if bools and spec.task == "auto":
            raise DataError(
                f"{files[0]}: target column{'s' * (len(bools) > 1)} "
                f"{', '.join(map(repr, bools))} {'are' if len(bools) > 1 else 'is'} bool: "
                "several class targets at once (multi-label) are not supported. Pass one "
                "--target to classify, or --task regression to fit them as numbers 0 and 1."
            )
        return "regression", (), None
    name = names[0]
    t = schema.field(name).type
    value_type = _value_type(t)
    if spec.task == "regression":
        if not _is_numeric(value_type):
            raise DataError(
                f"{files[0]}: target column {name!r} is {t}, not numeric; regression needs "
                "numbers. Pass --task classification for class labels."
            )
        return "regression", (), None
    if spec.task == "auto":
        if pa.types.is_floating(value_type) or pa.types.is_decimal(value_type):
            if _whole_numbers(fs, files, name):
                raise DataError(
                    f"{spec.path}: target column {name!r} is {type_name(t)} and all its values "
                    "are whole numbers: class labels or numbers? Pass --task classification "
                    "or --task regression."
                )
            return "regression", (), None
        if not _is_class_type(t):
            raise DataError(
                f"{files[0]}: target column {name!r} is {t}: neither class labels (integer, "
                "bool, string) nor numbers (float). Pass --target with the right column."
            )
    elif not (_is_class_type(t) or pa.types.is_floating(value_type)):
        raise DataError(
            f"{files[0]}: target column {name!r} is {t}, not class labels (integer, bool, "
            "string, or float whole numbers)."
        )
    model = _model_classes(spec.classes)
    found = _class_values(fs, files, name, model)
    if model is not None:
        try:
            pa.array(list(model), type=value_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            raise DataError(
                f"{files[0]}: target column {name!r} is {type_name(t)} but the model's "
                f"classes are {describe_values(model, 6)}: a model can only be used on its own "
                "classes."
            ) from None
        return "classification", model, type_name(t)
    classes = tuple(sorted(found))
    numbers = pa.types.is_integer(value_type)
    # integers: a count or a measure; strings: names or ids, most of them once
    per_class = ROWS_PER_CLASS if numbers else ROWS_PER_NAME
    if spec.task == "auto" and (
            (len(classes) > MANY_CLASSES and n_rows < per_class * len(classes))
            or (len(classes) >= SOME_CLASSES and n_rows < ROWS_PER_NAME * len(classes))):
        text = [str(c) for c in classes[:50]]
        written = not numbers and all(_reads_as_number(v) for v in text)
        raise DataError(
            f"{spec.path}: target column {name!r} is {type_name(t)} with {len(classes)} "
            f"distinct values in {n_rows} rows ({n_rows / len(classes):.1f} a value): "
            + ("class labels or numbers? Pass --task classification or --task regression."
               if numbers else
               f"numbers written as text ({text[0]!r}, ...)? Convert the column to numbers "
               "first, without any thousands separators (pandas: "
               "pd.to_numeric(s.str.replace(',', '')))." if written else
               "names or ids rather than class labels? Pass --target with the label column, "
               "or --task classification to train on these classes."))
    if len(classes) < 2:
        what = f"one class only ({describe_values(classes)})" if classes else "no labels"
        raise DataError(
            f"{spec.path}: column {name!r} has {what}; classification needs two or more."
        )
    return "classification", classes, type_name(t)


def plan(spec: DataSpec) -> Dataset:
    """`_plan`, with the errors of a dataset on an object store naming its files as URIs
    (s3://bucket/key), as the user wrote them, not as the filesystem's bucket/key."""
    try:
        return _plan(spec)
    except DataError as e:
        scheme, _, rest = str(spec.path).partition("://")
        text = str(e)
        if rest and scheme != "file" and text.startswith(rest.split("/", 1)[0] + "/"):
            raise DataError(f"{scheme}://{text}") from None
        raise


def _plan(spec: DataSpec) -> Dataset:
    """Check the files' metadata and columns, number the blocks, settle task and classes.

    Only metadata is read, and then the target column alone, file by file, when the
    classes (or whether a float target holds only whole numbers) must be known.
    """
    if spec.block_rows < 1:
        raise DataError(f"block size must be >= 1 row, got {spec.block_rows}")
    if spec.task not in TASKS:
        raise ConfigError(f"--task {spec.task!r}: choose one of {', '.join(TASKS)}")
    fs, root, files, others = _listing(spec.path)
    unread = _unread(fs, root, others) if others else ()
    # The reference schema is the first file with rows: an empty DataFrame written by pandas
    # has null-typed columns, and a file without rows adds nothing to check.
    reference, first = files[0], _open(fs, files[0])
    for path in files[1:]:
        if first.metadata.num_rows:
            break
        reference, first = path, _open(fs, path)
    schema = first.schema_arrow
    spec, declared = _declared(schema, spec)
    _check_unique_names(schema, reference)
    keys = partition_keys(files, schema.names,
                          root if files != [root] else root.rsplit("/", 1)[0])  # a file's folder
    _check_partition_keys(keys, spec, reference)
    _check_columns(schema, spec, reference)  # first: a missing target explains the rest

    def all_names() -> list[str]:  # a left-out feature not in the first file: rare
        return list(dict.fromkeys(n for p in files for n in _open(fs, p).schema_arrow.names))

    features, feature_list, n_features, ignored = _resolve_features(schema, spec, reference,
                                                                    all_names)

    blocks: list[Block] = []
    digest = hashlib.sha256(str(schema).encode())
    row = 0
    counting = _Counting(schema, () if feature_list else features)
    ranges = _Ranges(schema, (() if feature_list else features) + (
        spec.target if spec.read_target else ()))
    used = {*features, *spec.target,
            *([spec.id_column] if spec.id_column is not None else [])}
    # With --features, the columns a dataset does not use may differ between its files.
    columns = _data_columns(schema, used, features, only_used=bool(spec.features))
    for path in files:
        pf = first if path == reference else _open(fs, path)
        other = pf.schema_arrow if pf.metadata.num_rows else schema  # empty: nothing to check
        _check_unique_names(other, path)
        # Columns are read by name: the same columns in another order are the same data, and
        # an index column that is not used may be in one file and not in another (pandas
        # writes a RangeIndex as metadata and a shuffled one as a column).
        theirs = columns if other.equals(schema) else _data_columns(
            other, used, features, only_used=bool(spec.features))
        if theirs != columns:
            diff = _schema_difference(columns, theirs)
            raise DataError(
                f"{path}: schema differs from {reference}: {diff}. All files of a dataset "
                "must have the same columns, of the same types (a number feature may be "
                "integer in one file and float in another)"
                + ("; with --features, only the columns used." if not spec.features else ".")
            )
        if spec.features and not other.equals(schema) and tuple(select_features(
                other.names, spec.features, used - set(features), path,
                index_columns(other.names, pandas_metadata(other)),
                all_names=all_names)) != features:
            raise DataError(f"{path}: --features {','.join(spec.features)} matches other "
                            f"columns here than in {reference}; name the columns, or make "
                            "the files' columns the same")
        ignored += tuple(c for c in index_columns(other.names, pandas_metadata(other))
                         if c not in used and c not in ignored)  # said on the schema line
        md = pf.metadata
        info = fs.get_file_info(path)
        digest.update(f"{path}\0{info.size}\0{info.mtime_ns}\0{md.num_rows}\0"
                      f"{md.num_row_groups}\0{md.serialized_size}".encode())
        file_row = 0
        counting.file(md, row)
        ranges.file(md)
        for rg in range(md.num_row_groups):
            rows = md.row_group(rg).num_rows
            for start in range(0, rows, spec.block_rows):
                stop = min(rows, start + spec.block_rows)
                blocks.append(Block(len(blocks), path, rg, start, stop, file_row + start, row))
                row += stop - start
            file_row += rows
    if row == 0:
        raise DataError(f"{spec.path}: the dataset has zero rows")

    if spec.read_target:
        task, classes, class_type = _resolve_task(fs, files, schema, spec, row)
    else:
        task, classes, class_type = _unread_task(spec)
    return Dataset(
        source=spec.path,
        blocks=tuple(blocks),
        features=features,
        feature_list=feature_list,
        n_features=n_features,
        target=spec.target,
        task=task,
        n_outputs=len(classes) if task == "classification" else len(spec.target),
        id_column=spec.id_column,
        n_rows=row,
        fingerprint=digest.hexdigest(),
        classes=classes,
        class_type=class_type,
        ignored_columns=ignored,
        ignored_integer_index=next((c for c in ignored if c in schema.names  # 1st file
                                    and pa.types.is_integer(schema.field(c).type)), None),
        counting_columns=(counting_found := counting.found(row)),
        target_named_columns=() if feature_list or spec.features_from_model else tuple(
            c for c in features if TARGET_NAME.match(c) and c not in spec.features),
        id_named_columns=() if feature_list else tuple(
            c for c in features if ID_NAME.search(c) and c not in counting_found
            and pa.types.is_integer(schema.field(c).type) and _spans_rows(c, ranges, row)),
        probability_targets=spec.probability_targets and task == "regression",
        has_target=spec.read_target,
        partition_keys=tuple((k, tuple(v)) for k, v in keys.items()),
        ranges=ranges.found(),
        declared=declared,
        unread_files=unread,
    )


COUNTING_MIN_ROWS = 20
# Counting that restarts in each file is said only when every file has this many rows: a
# day's 24 hours (0..23 a file) or a month's days count their file's rows too.
PER_FILE_COUNTING_MIN_ROWS = 100


def _column_positions(md: pq.FileMetaData) -> dict[str, int]:
    """{column path: its index} in a file's row groups (the statistics are by index)."""
    group = md.row_group(0)
    return {group.column(j).path_in_schema: j for j in range(group.num_columns)}


class _Counting:
    """Finds the integer features whose values are the row numbers (0..N-1 or 1..N, over
    the dataset or restarting in each file), from the row groups' min and max alone: row
    group g of n rows starting at row r must hold exactly [r + s, r + s + n - 1]."""

    def __init__(self, schema: pa.Schema, features: tuple[str, ...]) -> None:
        self.names = [n for n in features
                      if pa.types.is_integer(schema.field(n).type)]
        # (start offset s, per file?) hypotheses still standing, for each column
        self.alive = {n: {(0, False), (1, False), (0, True), (1, True)} for n in self.names}
        self.smallest_file: int | None = None

    def file(self, md: pq.FileMetaData, first_row: int) -> None:
        if md.num_rows:
            self.smallest_file = min(md.num_rows, self.smallest_file or md.num_rows)
        if not any(self.alive.values()) or md.num_row_groups == 0:
            return
        where = _column_positions(md)
        row = 0
        for rg in range(md.num_row_groups):
            group = md.row_group(rg)
            for name in self.names:
                if not self.alive[name]:
                    continue
                stats = group.column(where[name]).statistics if name in where else None
                if (stats is None or not stats.has_min_max or stats.null_count
                        or group.num_rows == 0):
                    self.alive[name] = set()
                    continue
                lo, hi = stats.min, stats.max
                self.alive[name] = {
                    (s, per_file) for s, per_file in self.alive[name]
                    if lo == (row if per_file else first_row + row) + s
                    and hi == lo + group.num_rows - 1}
            row += group.num_rows

    def found(self, rows: int) -> tuple[str, ...]:
        """The counting columns; none below COUNTING_MIN_ROWS rows, where a small feature
        such as 1, 2, 3, 4 counts the rows by chance."""
        if rows < COUNTING_MIN_ROWS:
            return ()
        per_file = (self.smallest_file or 0) >= PER_FILE_COUNTING_MIN_ROWS
        return tuple(n for n in self.names
                     if any(not each or per_file for _, each in self.alive[n]))


def _spans_rows(name: str, ranges: _Ranges, rows: int) -> bool:
    """Whether an integer column could hold a distinct value a row (max - min + 1 >= rows),
    as ids do; True where the statistics do not say (a pitch 'key' of 0..11 holds no ids)."""
    bound = ranges.bounds.get(name)
    return bound is None or bound[1] - bound[0] + 1 >= rows


class _Ranges:
    """Each numeric column's min and max over the dataset, from the row groups' statistics;
    a column any row group has none for (or nulls, or NaN bounds) is left out."""

    def __init__(self, schema: pa.Schema, columns: tuple[str, ...]) -> None:
        self.bounds: dict[str, tuple[float, float] | None] = {
            n: (math.inf, -math.inf) for n in dict.fromkeys(columns)
            if n in schema.names and _is_numeric(_value_type(schema.field(n).type))
            and not pa.types.is_boolean(_value_type(schema.field(n).type))}

    def file(self, md: pq.FileMetaData) -> None:
        if md.num_row_groups == 0 or not any(self.bounds.values()):
            return
        where = _column_positions(md)
        for rg in range(md.num_row_groups):
            group = md.row_group(rg)
            for name, bound in self.bounds.items():
                if bound is None or group.num_rows == 0:
                    continue
                stats = group.column(where[name]).statistics if name in where else None
                if stats is None or not stats.has_min_max or stats.null_count:
                    self.bounds[name] = None
                    continue
                try:
                    lo, hi = float(stats.min), float(stats.max)
                except (TypeError, ValueError):  # a dictionary page's bytes, say
                    self.bounds[name] = None
                    continue
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    self.bounds[name] = None
                    continue
                self.bounds[name] = (min(bound[0], lo), max(bound[1], hi))

    def found(self) -> tuple[tuple[str, float, float], ...]:
        return tuple((n, b[0], b[1]) for n, b in self.bounds.items()
                     if b is not None and b[0] <= b[1])


# A column whose range holds fewer than this many values of the compute dtype is said to
# lose its digits: 1e8 + N(0, 1) in float32 (steps of 8) became one value, a constant; a
# timestamp of 1.7e9 seconds spread over 6,000 s kept 47 values (test r2 0.994 against
# 0.998). 256 values keep 8 bits, as an image's pixels do: longitudes over 2 km (2,600
# values) are not said.
COARSE_LEVELS = 256


def coarse_columns(dataset: Dataset, dtype: str) -> list[tuple[str, float, float, float]]:
    """(column, min, max, step) of the numeric features and targets whose values, read into
    `dtype`, keep fewer than COARSE_LEVELS distinct steps over their range (a large offset
    and a small spread: timestamps, positions), from the files' statistics."""
    out = []
    for name, lo, hi in dataset.ranges:
        if hi <= lo:
            continue
        step = float(np.spacing(np.asarray(max(abs(lo), abs(hi)), dtype=dtype)))
        if step <= 1 and lo.is_integer() and hi.is_integer():
            continue  # whole numbers (zip codes, counts) below 2^24 are exact in float32
        if (hi - lo) / step < COARSE_LEVELS:
            out.append((name, lo, hi, step))
    return out


def _unread_task(spec: DataSpec) -> tuple[str, tuple[ClassValue, ...], str | None]:
    """(task, classes, class type) as the spec states them, for data whose target is not read."""
    if spec.task == "regression":
        return "regression", (), None
    classes = _model_classes(spec.classes)
    if spec.task != "classification" or not classes:
        raise ConfigError("data read without its target needs the task stated: regression, "
                          "or classification with the class values")
    return "classification", classes, None


def column_names(source: str) -> list[str]:
    """The column names of a dataset's first file (plan checks that the others agree)."""
    fs, files = list_files(source)
    return list(_open(fs, files[0]).schema_arrow.names)


def schema_line(dataset: Dataset) -> str:
    """One line that says what a dataset means before any work starts.

    e.g. "classification on 'label': 3 classes (0, 1, 2); 13 features (alcohol, malic_acid,
    ash, ..., proline); 124 rows in 1 block; ignored index column __index_level_0__"
    """
    targets = ", ".join(repr(t) for t in dataset.target)
    if not dataset.has_target:
        targets += " (not read)"
    if not dataset.target:  # data import --no-target
        head = "no target (rows for gradpipe predict)"
    elif dataset.classify:
        head = (f"classification on {targets}: {len(dataset.classes)} classes "
                f"({describe_values(dataset.classes)})")
        ints = [c for c in dataset.classes if isinstance(c, int) and not isinstance(c, bool)]
        span = ints[-1] - ints[0] + 1 if ints else 0
        # mostly a run of integers, a few missing: a count (not a coding like 0, 10, 20)
        if len(ints) == len(dataset.classes) > GAPPED_CLASSES and len(ints) < span < 1.5 * len(
                ints):
            missing = next(v for v in range(ints[0], ints[-1]) if v not in set(ints))
            head += (f" with gaps (no {missing}): if {targets} counts or measures something, "
                     "--task regression")
    else:
        head = f"regression on {targets}"
        if dataset.probability_targets:
            head += " (probability rows)"
    n = dataset.n_features
    if dataset.feature_list:
        features = f"{n} features (list column {_show(dataset.features[0])})"
    else:
        names = [_show(f) for f in dataset.features]
        shown = (", ".join(names) if len(names) <= 8
                 else f"{', '.join(names[:3])}, ..., {names[-1]}")
        features = f"{n} feature{'s' * (n != 1)} ({shown})"
    n_blocks = len(dataset.blocks)
    n_files = len({b.file for b in dataset.blocks})
    rows = (f"{dataset.n_rows} row{'s' * (dataset.n_rows != 1)} in {n_blocks} "
            f"block{'s' * (n_blocks != 1)}" + (f" of {n_files} files" if n_files > 1 else ""))
    if dataset.declared:
        head += f" ({dataset.declared}, as data import was told)"
    parts = [head, features, rows]
    if n_blocks >= TINY_BLOCKS and dataset.n_rows < TINY_BLOCK_ROWS * n_blocks:
        # each block costs a step about 0.2 ms of Python however few its rows
        parts[-1] += (f" (about {dataset.n_rows // n_blocks} rows a block: row groups this "
                      "small slow every step; gradpipe data import DATA OUT rewrites them)")
    if dataset.id_column is not None:
        parts.append(f"id column {_show(dataset.id_column)}")
    for name in dataset.counting_columns:
        parts.append(f"feature {_show(name)} counts the rows: a saved index? If so, "
                     f"--id-column {_show(name)} makes it the sample id instead")
    for name in dataset.target_named_columns:
        parts.append(f"feature {_show(name)} is named like a target: if it is one, it gives "
                     f"the answer away (--features '!{name}' leaves it out)")
    for name in dataset.id_named_columns:
        parts.append(f"feature {_show(name)} is named like an id: if it is one, --id-column "
                     f"{_show(name)} makes it the sample id instead")
    for key, values in dataset.partition_keys:
        shown = ", ".join(f"{key}={v}" for v in values[:4]) + (", ..." if len(values) > 4
                                                               else "")
        parts.append(f"partition key {_show(key)} in the folder names not read ({shown}): "
                     "every folder's rows are used")
    if dataset.unread_files:
        names = [_show(n) for n, _ in dataset.unread_files]
        n = len(names)
        parts.append(f"not read: {n} file{'s' * (n != 1)} not named *.parquet ("
                     + ", ".join(names[:4]) + (", ..." if n > 4 else "") + ")")
    if dataset.ignored_columns:
        plural = "s" * (len(dataset.ignored_columns) != 1)
        parts.append(f"ignored index column{plural} "
                     f"{', '.join(_show(c) for c in dataset.ignored_columns)}")
        if dataset.id_column is None and dataset.ignored_integer_index is not None:
            name = _show(dataset.ignored_integer_index)
            parts[-1] += f" (--id-column {name} makes it the sample id)"
    return "; ".join(parts)


_NUMBER = pa.float64()  # the type every numeric feature column compares as


def _data_columns(schema: pa.Schema, used: set[str], features: Iterable[str] = (),
                  only_used: bool = False) -> dict[str, pa.DataType]:
    """{name: type} of the columns that make two files the same data: all but the index
    columns that are not `used` (features, target, id), or only the `used` ones; scalar
    numeric features as one type, since they are read into the compute dtype whatever they
    are (int64 in one file, double in another: pandas writes a column with a missing value
    as double)."""
    index = set(index_columns(schema.names, pandas_metadata(schema))) - used
    numeric = {f for f in features if f in schema.names and _is_numeric(schema.field(f).type)}
    return {f.name: _NUMBER if f.name in numeric else f.type
            for f in schema if f.name not in index and (f.name in used or not only_used)}


def _schema_difference(a: dict[str, pa.DataType], b: dict[str, pa.DataType]) -> str:
    for name, type_a in a.items():
        if name not in b:
            return f"column {name!r} is missing"
        if not type_a.equals(b[name]):
            return f"column {name!r} is {b[name]} here, {type_a} there"
    return f"extra column {next(n for n in b if n not in a)!r}"  # a and b differ


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
            f"{block.file}: column {name!r} has {col.null_count} null "
            f"value{'s' * (col.null_count != 1)} in rows "
            f"{block.file_row}..{block.file_row + block.n - 1} (first at row "
            f"{block.file_row + int(np.argmax(nulls))}). Drop or impute them first "
            "(missing values: pandas writes NaN as null)."
        )
    return col


def _check_finite(values: NDArray, name: str, block: Block) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        n_nan = int(np.isnan(values).sum())
        kind = ("NaN" if n_nan == int(bad.sum())
                else "infinite" if n_nan == 0 else "NaN or infinite")
        row = int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1)))
        # read into float32, a finite value beyond its range is infinite too
        beyond = (" (or beyond float32's range, 3.4e38: --dtype float64 reads those)"
                  if values.dtype == np.float32 and n_nan < int(bad.sum()) else "")
        raise DataError(
            f"{block.file}: column {name!r} has {int(bad.sum())} {kind}{beyond} "
            f"value{'s' * (int(bad.sum()) != 1)} in rows "
            f"{block.file_row}..{block.file_row + block.n - 1} (first at row "
            f"{block.file_row + row}). Drop or impute them first."
        )


def _decoded(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A dictionary-encoded column as plain values."""
    return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


def class_indices(dataset: Dataset, col: pa.ChunkedArray, block: Block) -> NDArray[np.int64]:
    """Each label's index in dataset.classes, (n,); a label outside them is refused by row."""
    values = _decoded(col)
    try:
        value_set = pa.array(list(dataset.classes), type=values.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        raise DataError(
            f"{block.file}: column {dataset.target[0]!r} is {type_name(values.type)}, but the "
            f"classes are {describe_values(dataset.classes, 6)}."
        ) from None
    index = pc.index_in(values, value_set=value_set)
    if index.null_count:
        i = int(np.argmax(pc.is_null(index).to_numpy(zero_copy_only=False)))
        value = values[i].as_py()
        if isinstance(value, float) and value != value:  # NaN: a missing label, no class
            raise DataError(
                f"{block.file}: column {dataset.target[0]!r} has a NaN label at row "
                f"{block.file_row + i}. Drop or impute the rows without a label first.")
        raise DataError(
            f"{block.file}: column {dataset.target[0]!r} has label {values[i].as_py()!r} at row "
            f"{block.file_row + i}, not one of the {len(dataset.classes)} classes "
            f"({_describe_classes(dataset.classes)}): a model can only be used on its own "
            "classes."
        )
    return index.to_numpy().astype(np.int64)


def check_probability_rows(y: NDArray, columns: tuple[str, ...], block: Block) -> None:
    """Refuse target rows that are not probabilities: each value >= 0, |row sum - 1| <= 1e-6.

    y is (n, T) in float64, the targets of `block` in `columns` order. softmax +
    cross_entropy compares a^(L) with y as distributions; other targets make its loss
    and gradient meaningless, so the caller sets DataSpec.probability_targets for it.
    """
    sums = y.sum(axis=1)
    bad = (np.abs(sums - 1) > PROBABILITY_TOLERANCE) | (y < 0).any(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        found = f"they sum to {sums[i]:.9g}"
        negative = [(c, v) for c, v in zip(columns, y[i], strict=True) if v < 0]
        if negative:
            found += f" and column {negative[0][0]!r} is {negative[0][1]:.9g}"
        raise DataError(
            f"{block.file}: target columns {', '.join(map(repr, columns))} at row "
            f"{block.file_row + i} are not probabilities: {found}. softmax + cross_entropy "
            "needs rows of values >= 0 that sum to 1; normalize them, or leave "
            "--output-activation and --loss to auto (identity and squared for numbers)."
        )


def read_block(
    dataset: Dataset, block: Block, dtype: str, fs: pafs.FileSystem | None = None,
    opened: dict[str, pq.ParquetFile] | None = None,
) -> BlockData:
    """Read one block with an explicit column list, check it, and convert it to arrays.

    `opened` keeps each file open (its footer parsed once) across the blocks of a caller:
    reopening a file of G row groups for each of its blocks costs O(G^2).
    """
    if fs is None:
        fs, _ = filesystem(dataset.source)
    target = dataset.target if dataset.has_target else ()
    columns = list(dict.fromkeys(
        [*dataset.features, *target,
         *([dataset.id_column] if dataset.id_column is not None else [])]
    ))
    if opened is None:
        pf = _open(fs, block.file)
    elif block.file not in opened:
        pf = opened[block.file] = _open(fs, block.file)
    else:
        pf = opened[block.file]
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
        flat = col.flatten().to_numpy(zero_copy_only=False)  # the rows' values, from offset
        with np.errstate(over="ignore"):
            # A copy, always: Arrow's buffer is read-only, and blocks are standardized in place.
            x = flat.reshape(n, dataset.n_features).astype(dtype)
        _check_finite(x, name, block)
    else:
        x = np.empty((n, dataset.n_features), dtype=dtype)  # (n, n_0)
        for k, name in enumerate(dataset.features):
            values = _numbers(_column(table, name, block)).to_numpy()
            if values.dtype.kind == "f":
                _check_finite(values, name, block)
            with np.errstate(over="ignore"):  # too large for float32: inf, refused below
                x[:, k] = values
        if not np.isfinite(x).all():  # a float64 too large for float32 turns into inf
            k = int(np.argmax(~np.isfinite(x).all(axis=0)))
            _check_finite(x[:, k], dataset.features[k], block)

    labels = None
    if not dataset.has_target:
        y = np.empty((n, 0), dtype=dtype)  # no targets: the caller only predicts
    elif dataset.classify:
        labels = class_indices(dataset, _column(table, dataset.target[0], block), block)
        y = np.zeros((n, dataset.n_outputs), dtype=dtype)  # one-hot, (n, K)
        y[np.arange(n), labels] = 1
    else:
        y64 = np.empty((n, len(dataset.target)), dtype=np.float64)  # (n, T)
        for j, name in enumerate(dataset.target):
            values = _numbers(_decoded(_column(table, name, block))).to_numpy()
            if values.dtype.kind == "f":
                _check_finite(values, name, block)
            y64[:, j] = values
        if dataset.probability_targets:
            check_probability_rows(y64, dataset.target, block)
        with np.errstate(over="ignore"):  # too large for float32: inf, refused below
            y = y64.astype(dtype, copy=False)
        if not np.isfinite(y).all():
            j = int(np.argmax(~np.isfinite(y).all(axis=0)))
            _check_finite(y[:, j], dataset.target[j], block)

    if dataset.id_column is not None:
        ids = _column(table, dataset.id_column, block).to_numpy().astype(np.int64)
    else:
        ids = np.arange(block.first_id, block.first_id + n, dtype=np.int64)
    return BlockData(block, ids, x, y, labels)


def read_rows(
    dataset: Dataset, rows: list[int], dtype: str
) -> tuple[NDArray[np.int64], NDArray[np.floating], NDArray[np.floating]]:
    """Read the samples at these global row indexes: (ids, x, y), in the order given."""
    fs, _ = filesystem(dataset.source)
    opened: dict[str, pq.ParquetFile] = {}
    starts = np.array([b.first_id for b in dataset.blocks])
    cache: dict[int, BlockData] = {}
    ids, xs, ys = [], [], []
    for r in rows:
        if not 0 <= r < dataset.n_rows:
            raise DataError(f"--sample {r}: outside 0..{dataset.n_rows - 1}, "
                            f"the rows of {dataset.source}")
        b = int(np.searchsorted(starts, r, side="right")) - 1
        if b not in cache:
            cache[b] = read_block(dataset, dataset.blocks[b], dtype, fs, opened)
        d = cache[b]
        i = r - d.block.first_id
        ids.append(d.ids[i])
        xs.append(d.x[i])
        ys.append(d.y[i])
    return np.array(ids, dtype=np.int64), np.stack(xs), np.stack(ys)
