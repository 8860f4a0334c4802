"""Datasets in from CSV or Parquet: `gradpipe data import`, streamed, checked, then moved in place.

The source is read batch by batch (a CSV with pyarrow.csv.open_csv, Parquet as record
batches), never whole, and re-written as part-00000.parquet.. with row groups of a fixed
size, zstd. Index columns (pandas, a CSV export's unnamed first column) are left out. Every
batch gets the checks training makes, naming the source file, column and row; the result
goes to a hidden temporary folder next to OUT (atomic.atomic_dir), is planned and read
again with `data.plan` and `data.read_block`, and only then renamed to OUT. What a dataset
must look like is data.py's; this module only converts and refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .atomic import atomic_dir, check_replaceable
from .data import (
    DEFAULT_TARGET,
    IMPORT_KEY,
    Dataset,
    DataSpec,
    describe_columns,
    existing,
    filesystem,
    index_columns,
    list_files,
    plan,
    read_block,
    schema_line,
    select_features,
    target_advice,
)
from .errors import ConfigError, DataError

ROW_GROUP_SIZE = 65536  # default rows per row group: one block each, data.BLOCK_ROWS
CSV_SUFFIXES = (".csv", ".tsv")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")  # pyarrow decompresses these by name
CSV_NULLS = "empty, NA, NaN or null"  # what pyarrow.csv reads as null by default
# What pyarrow.csv reads as bool besides 0 and 1 (its default true_values / false_values).
CSV_BOOLS = ("True", "TRUE", "true", "False", "FALSE", "false")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


# --------------------------------------------------------------------------- the source


def source_format(source: str) -> str:
    """'csv' or 'parquet': a folder is Parquet; a file by its name, else by the PAR1 magic."""
    fs, path, info = existing(source)
    if info.type == pafs.FileType.Directory:
        return "parquet"
    name = path.lower()
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    try:
        with fs.open_input_file(path) as f:
            magic = f.read(4)
    except OSError as e:
        raise DataError(f"{source}: cannot read: {_one_line(e)}") from None
    if magic != b"PAR1":
        raise DataError(
            f"{source}: neither a CSV file (.csv or .tsv, optionally .gz, .bz2, .zst) nor "
            "Parquet (no PAR1 magic). Rename a CSV file to .csv."
        )
    return "parquet"


def select_columns(
    names: list[str], features: tuple[str, ...], target: tuple[str, ...], where: str,
    id_column: str | None = None,
) -> tuple[list[str], list[str]]:
    """(columns to write, features then targets then the id column; index columns left
    out), as in data.py.

    Features are names or globs; a CSV export's unnamed first column is an index, not a
    feature, unless --features names it (or --id-column keeps it as the id).
    """
    if id_column is not None and id_column not in names:
        raise DataError(f"{where}: missing id column {id_column!r} (found: "
                        f"{describe_columns(names, id_column)})")
    for t in target:
        if t not in names:
            one = len(names) == 1 and next((d for d in ";|\t" if d in names[0]), None)
            raise DataError(
                f"{where}: missing target column {t!r} (found: {describe_columns(names, t)}). "
                + (f"The header reads as one column: the file seems separated by {one!r}; data "
                   "import reads ',' in .csv and tab in .tsv files: convert it first (pandas: "
                   f"pd.read_csv(path, sep={one!r}).to_parquet(...))." if one else
                   target_advice(names, t))
            )
    index = index_columns(names)
    kept = set(target) | ({id_column} if id_column is not None else set())
    chosen = select_features(names, features, kept, where, index)
    columns = chosen + list(target) + ([id_column] if id_column is not None else [])
    duplicates = sorted({c for c in columns if names.count(c) > 1})
    if duplicates:
        raise DataError(f"{where}: column name {duplicates[0]!r} appears more than once. "
                        "Rename the columns so that each name is unique.")
    return columns, [c for c in index if c not in columns]


class CsvSource:
    """A CSV file read twice as a stream: once to count rows and type columns, once to write."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.fs, self.path = filesystem(source)
        name = self.path.lower()
        for suffix in COMPRESSED_SUFFIXES:
            name = name.removesuffix(suffix)
        self.parse = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")

    def _reader(self, columns: list[str] | None, types: dict[str, pa.DataType] | None):
        stream = self.fs.open_input_stream(self.path, compression="detect")
        convert = pacsv.ConvertOptions(column_types=types, include_columns=columns,
                                       strings_can_be_null=True)
        try:
            return stream, pacsv.open_csv(stream, parse_options=self.parse,
                                          convert_options=convert)
        except (pa.ArrowInvalid, OSError) as e:
            stream.close()
            raise DataError(f"{self.source}: not a readable CSV file ({_one_line(e)})"
                            f"{self._separator_hint(e)}") from None

    def _batches(self, columns: list[str], types: dict[str, pa.DataType]
                 ) -> Iterator[pa.RecordBatch]:
        stream, reader = self._reader(columns, types)
        with stream:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowInvalid, OSError) as e:
                    raise DataError(f"{self.source}: {_one_line(e)}"
                                    f"{self._separator_hint(e)}") from None
                yield batch

    def _separator_hint(self, error: Exception) -> str:
        """For a header read as one column ('a;b;c', rows then split at decimal commas):
        the separator it seems to use, and the pandas line that converts it."""
        if "Expected 1 columns" not in str(error):
            return ""
        with self.fs.open_input_stream(self.path, compression="detect") as stream:
            header = stream.read(1 << 16).split(b"\n", 1)[0].decode("utf-8", "replace")
        one = next((d for d in ";|\t" if d in header), None) if "," not in header else None
        if one is None:
            return ""
        decimal = ", decimal=','" if one == ";" else ""
        return (f". The header reads as one column: the file seems separated by {one!r}"
                f"{' with decimal commas' if decimal else ''}; data import reads ',' in .csv "
                f"and tab in .tsv files: convert it first (pandas: pd.read_csv(path, "
                f"sep={one!r}{decimal}).to_parquet(...))")

    def names(self) -> list[str]:
        """The header's column names (reads only the first block)."""
        stream, reader = self._reader(None, None)
        with stream:
            return reader.schema.names

    def scan(self, columns: list[str], labels: tuple[str, ...] = ()
             ) -> tuple[int, dict[str, pa.DataType]]:
        """First pass: count the rows and type each column: the first of int64, float64,
        bool (True/False) that every value parses as; else string for a class column in
        `labels`, and a refusal for any other.

        Values are read as text and cast as pyarrow.csv itself would convert them (it trims
        blanks first), so the second pass, with these types, parses the same way.
        """
        possible = {c: [pa.int64(), pa.float64(), pa.bool_()] for c in columns}
        rows = 0
        for batch in self._batches(columns, {c: pa.string() for c in columns}):
            bad = []  # every column of this batch that failed, said at once
            for name in columns:
                values = pc.utf8_trim_whitespace(batch.column(name))
                before = possible[name]
                possible[name] = [t for t in before if _parses(values, t)]
                if possible[name] or name in labels or not before:
                    continue
                # The row of the first value that is no number (or, in a bool column,
                # no bool): an int column's first float is not the culprit.
                i = _first_unparsable(values, pa.float64() if pa.float64() in before
                                      else before[0])
                bad.append((name, values[i].as_py(), rows + i))
            if bad:
                shown = ", ".join(f"{name!r} ({value!r} at row {row}{_what_text(value)})"
                                  for name, value, row in bad[:6])
                more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
                raise DataError(
                    f"{self.source}: column{'s' * (len(bad) > 1)} not numeric: {shown}{more}. "
                    "Fix those values first, or leave the columns out with --features '"
                    + ",".join(f"!{name}" for name, _, _ in bad) + "'")
            rows += batch.num_rows
        return rows, {c: possible[c][0] if possible[c] else pa.string() for c in columns}

    def batches(self, columns: list[str], types: dict[str, pa.DataType]
                ) -> Iterator[tuple[str, int, pa.RecordBatch]]:
        """Second pass: (file, first row, batch) with `columns` in this order and `types`."""
        row = 0
        for batch in self._batches(columns, types):
            yield self.source, row, batch
            row += batch.num_rows


# Cells that stand for a missing value in CSV exports.
MISSING_MARKERS = {"?", "-", "--", "na", "n/a", "nan", "null", "none", "missing", "#n/a"}


def _what_text(value: str | None) -> str:
    """What a cell that is not a number seems to be, for the refusal ('': nothing known)."""
    text = (value or "").strip()
    if text.lower() in MISSING_MARKERS:
        return ": a missing-value marker? read the file with pandas' na_values, then impute"
    if any(c.isdigit() for c in text) and all(c.isdigit() or c in ",.-+ '_" for c in text):
        if "," in text:
            return (": a thousands separator or a decimal comma? convert with pandas "
                    "(thousands=',' or decimal=',')")
    return ""


def _parses(values: pa.Array, to: pa.DataType) -> bool:
    if to == pa.bool_():  # what pyarrow.csv reads as bool, not all that a cast accepts
        text = values.drop_null()
        return bool(pc.all(pc.is_in(text, value_set=pa.array(["0", "1", *CSV_BOOLS]))).as_py()
                    if len(text) else True)
    try:
        pc.cast(values, to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def _first_unparsable(values: pa.Array, to: pa.DataType) -> int:
    """Index of the first value that does not cast: a binary search over prefixes."""
    lo, hi = 0, len(values)  # values[:lo] cast; values[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _parses(values.slice(0, mid), to):
            lo = mid
        else:
            hi = mid
    return hi - 1


def parquet_batches(source: str, columns: list[str], batch_rows: int
                    ) -> Iterator[tuple[str, int, pa.RecordBatch]]:
    """(file, first row in that file, batch) of `columns`, file by file in sorted path order."""
    fs, files = list_files(source)
    # A numeric column of other types in other files (int64 here, double there: pandas
    # writes a column with a missing value as double) is written as double everywhere.
    types: dict[str, set[pa.DataType]] = {c: set() for c in columns}
    for path in files:
        try:
            schema = pq.read_schema(fs.open_input_file(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
        for c in columns:
            types[c].add(schema.field(c).type)
    widen = {c for c, ts in types.items() if len(ts) > 1}
    for path in files:
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield path, row, pa.RecordBatch.from_arrays(
                    [batch.column(c).cast(pa.float64()) if c in widen else batch.column(c)
                     for c in columns], names=columns)
                row += batch.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None


# --------------------------------------------------------------------------- checks


def check_batch(batch: pa.RecordBatch, where: str, first_row: int, nulls: str = "null") -> None:
    """Refuse nulls, NaN and infinities in any column, as training does.

    Labels are class values of any sign or type; which classes there are is data.plan's.
    """
    last = first_row + batch.num_rows - 1
    for name in batch.schema.names:
        column = batch.column(name)
        values, width = column, 1  # width: values per row
        if pa.types.is_fixed_size_list(column.type) and not column.null_count:
            values, width = column.flatten(), column.type.list_size
        if values.null_count:
            i = int(np.argmax(values.is_null().to_numpy(zero_copy_only=False))) // width
            raise DataError(
                f"{where}: column {name!r} has {values.null_count} {nulls} "
                f"value{'s' * (values.null_count != 1)} in rows "
                f"{first_row}..{last} (first at row {first_row + i}). Drop or impute them first."
            )
        if pa.types.is_floating(values.type):
            array = values.to_numpy(zero_copy_only=False)
            bad = ~np.isfinite(array)
            if bad.any():
                n_nan = int(np.isnan(array).sum())
                kind = ("NaN" if n_nan == int(bad.sum()) else
                        "infinite" if n_nan == 0 else "NaN or infinite")
                raise DataError(
                    f"{where}: column {name!r} has {int(bad.sum())} {kind} values in rows "
                    f"{first_row}..{last} (first at row {first_row + int(np.argmax(bad)) // width})"
                    ". Drop or impute them first."
                )


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Cuts a stream of batches into `files` files of contiguous rows and row groups of R rows."""

    def __init__(self, folder: Path, total_rows: int, files: int, row_group_size: int,
                 metadata: dict[bytes, bytes] | None = None) -> None:
        self.folder = folder
        self.metadata = metadata  # the files' key-value metadata (the source's is dropped)
        # The same even split as `data synth`: file f holds rows bounds[f]..bounds[f+1]-1.
        self.sizes = np.diff(np.linspace(0, total_rows, files + 1).astype(int)).tolist()
        self.row_group_size = row_group_size
        self.file = 0
        self.in_file = 0  # rows of the current file written or pending
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.row_groups = 0
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Add rows; full row groups are written, files closed when they hold their share."""
        if self.schema is None:
            self.schema = batch.schema.remove_metadata().with_metadata(self.metadata)
        batch = pa.RecordBatch.from_arrays(batch.columns, schema=self.schema)
        while batch.num_rows:
            if self.file >= len(self.sizes):
                raise DataError(f"{self.folder}: the source has more rows than it had when "
                                f"counted ({sum(self.sizes)}). Did it change while importing?")
            take = min(batch.num_rows, self.sizes[self.file] - self.in_file)
            self.pending.append(batch.slice(0, take))
            self.pending_rows += take
            self.in_file += take
            batch = batch.slice(take)
            self._flush(final=self.in_file == self.sizes[self.file])

    def _flush(self, final: bool) -> None:
        while self.pending_rows >= self.row_group_size or (final and self.pending_rows):
            table = pa.Table.from_batches(self.pending, schema=self.schema)
            group = table.slice(0, self.row_group_size)
            if self.writer is None:
                path = self.folder / f"part-{self.file:05d}.parquet"
                self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            self.writer.write_table(group, row_group_size=self.row_group_size)
            self.row_groups += 1
            self.rows += group.num_rows
            rest = table.slice(group.num_rows)
            self.pending, self.pending_rows = rest.to_batches(), rest.num_rows
        if final:
            self.close_file()
            self.file += 1
            self.in_file = 0

    def close_file(self) -> None:
        """Close the file being written, if any (also after an error)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --------------------------------------------------------------------------- OUT


def check_out(out: Path, overwrite: bool) -> None:
    local_only(out)
    """OUT may be new, an empty folder, or (with overwrite) a folder holding only Parquet files."""
    def foreign(folder: str) -> str | None:
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                if not (name.endswith(".parquet") or name.startswith((".", "_"))):
                    return (f"holds {Path(dirpath, name).relative_to(folder)}, which is not a "
                            "Parquet file")
        return None

    check_replaceable(out, overwrite, name=str(out), foreign=foreign)


def refuse_own_source(source: str, out: Path) -> None:
    """Refuse an OUT that is the source, inside it, or holds it: replacing OUT would lose the
    source, or the source would take in the new files as its own."""
    fs, path = filesystem(source)
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    src, dst = os.path.realpath(path), os.path.realpath(out)
    if src == dst:
        where = "is the source"
    elif dst.startswith(src.rstrip(os.sep) + os.sep):
        where = f"is inside the source {source}"
    elif src.startswith(dst.rstrip(os.sep) + os.sep):
        where = f"holds the source {source}"
    else:
        return
    raise ConfigError(f"{out}: {where}; write the dataset to a folder outside it.")


def local_only(out: str | Path) -> None:
    """`data import` and `data synth` write a local folder (Path("s3://b/x") would quietly
    become the local folder s3:/b/x)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:/", str(out)):
        raise ConfigError(f"{out}: data import and data synth write a local folder; write it "
                          "here, then copy it to the store (e.g. aws s3 cp --recursive)")


@contextlib.contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """A temporary folder to fill that replaces OUT on success (atomic.atomic_dir); on any
    error or Ctrl-C it goes, and so do the parent folders made for it."""
    local_only(out)
    out = out.absolute()
    created = next((p for p in reversed(out.parents) if not p.exists()), None)
    try:
        with atomic_dir(out) as tmp:
            yield Path(tmp)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _verify(source: str, tmp: Path, out: Path, target: tuple[str, ...], task: str,
            rows: int, id_column: str | None = None, no_target: bool = False) -> Dataset:
    """Plan and read every block of the written dataset, as `gradpipe train OUT` (or, for
    rows without a target, `gradpipe predict`) will."""
    try:
        dataset = plan(DataSpec(str(tmp), target=target,
                                task="regression" if no_target else task,
                                id_column=id_column, read_target=not no_target))
        fs = pafs.LocalFileSystem()
        for block in dataset.blocks:
            read_block(dataset, block, "float64", fs)
    except DataError as e:
        # Name what the user knows: the source, not the temporary folder about to go.
        message = re.sub(rf"^{re.escape(str(tmp))}[^:]*: ", "", str(e))
        raise DataError(f"{source}: {message.replace(str(tmp), str(out))}") from None
    if dataset.n_rows != rows:
        raise DataError(f"{out}: wrote {dataset.n_rows} rows but the source had {rows}. "
                        "Did it change while importing?")
    return dataset


# --------------------------------------------------------------------------- import


def import_dataset(
    source: str,
    out: str | Path,
    *,
    row_group_size: int = ROW_GROUP_SIZE,
    files: int = 1,
    target: tuple[str, ...] = DEFAULT_TARGET,
    features: tuple[str, ...] = (),
    overwrite: bool = False,
    task: str = "auto",
    id_column: str | None = None,
    no_target: bool = False,
) -> dict:
    """Re-write a CSV or Parquet dataset as checked Parquet shards in OUT; returns a summary.

    Rows keep the source order (so a sample id, the global row index, is the source row)
    and are split evenly over `files` contiguous files, as `data synth` does; each file is
    cut into row groups of `row_group_size` rows, the last one shorter. Splitting needs the
    row count up front: Parquet has it in its metadata; a CSV is streamed twice, a first
    pass counting rows and settling each column's type (int64, float64 or bool, whichever
    every value parses as; a single target may also be string class labels), a second
    writing. Only the features and the target are written: index columns are left out and
    listed in the summary's `ignored_columns`. The written data is planned with `task`, as
    `gradpipe train --task` would; the summary's `schema` is data.schema_line of it. The
    files keep `target`, `task` and `id_column` in their metadata (data.IMPORT_KEY, the
    summary's `declared`): train's defaults where it is told no other target, no task and
    no id column. `id_column` (an integer column, an index column included) is written
    after the targets, not as a feature. With `no_target` the rows have no target (data
    for gradpipe predict): every column but the id and index columns is a feature, and
    train refuses the files (data._declared).
    On any error or Ctrl-C nothing is left behind.
    """
    for name, value in (("row-group-size", row_group_size), ("files", files)):
        if value < 1:
            raise ConfigError(f"--{name} {value}: must be >= 1")
    if no_target:
        if target != DEFAULT_TARGET or task != "auto":
            given = "--target" if target != DEFAULT_TARGET else "--task"
            raise ConfigError(f"--no-target with {given}: rows without a target have none "
                              "to name")
        target = ()
    elif not target:
        raise ConfigError("--target: give at least one target column")
    out = Path(out)
    refuse_own_source(source, out)
    check_out(out, overwrite)
    fmt = source_format(source)

    batches: Iterator[tuple[str, int, pa.RecordBatch]]
    if fmt == "csv":
        csv = CsvSource(source)
        columns, ignored = select_columns(csv.names(), features, target, source, id_column)
        rows, types = csv.scan(columns, labels=target if len(target) == 1 else ())
        if rows == 0:
            raise DataError(f"{source}: the CSV file has a header but zero rows")
        if id_column is not None and types[id_column] != pa.int64():
            raise DataError(f"{source}: id column {id_column!r} is not an integer column "
                            f"(its values read as {types[id_column]})")
        nulls = f"missing ({CSV_NULLS})"
        batches = csv.batches(columns, types)  # a generator: nothing is read yet
        keys: tuple = ()
        unread: tuple = ()
    else:
        # plan checks the schemas, column types and classes, naming files.
        dataset = plan(DataSpec(source, features=features, target=target,
                                task="regression" if no_target else task,
                                id_column=id_column, read_target=not no_target))
        columns = ([f for f in dataset.features if f not in target] + list(target)
                   + ([id_column] if id_column is not None else []))
        ignored = list(dataset.ignored_columns)
        rows = dataset.n_rows
        nulls = "null"
        keys = dataset.partition_keys  # in the folder names, not read: said, not written
        unread = dataset.unread_files  # files not named *.parquet: said, not written
        batches = parquet_batches(source, columns, min(row_group_size, ROW_GROUP_SIZE))
    if files > rows:
        raise ConfigError(f"--files {files}: more files than the {rows} rows of {source}")

    # The temporary folder is next to OUT, so that the final rename stays on one filesystem.
    with new_folder(out) as tmp:
        # train's defaults for --target and --task, where it is told nothing else
        declared = json.dumps({"target": list(target), "task": task,
                               "id_column": id_column}).encode()
        writer = ShardWriter(tmp, rows, files, row_group_size, {IMPORT_KEY: declared})
        try:
            for where, first_row, batch in batches:
                check_batch(batch, where, first_row, nulls)
                writer.write(batch)
        finally:
            writer.close_file()
        if writer.rows != rows:
            raise DataError(f"{source}: read {writer.rows} rows but counted {rows} before. "
                            "Did it change while importing?")
        written = _verify(source, tmp, out, target, task, rows, id_column, no_target)
    summary = {"out": str(out), "source": source, "format": fmt, "rows": rows, "files": files,
               "row_groups": writer.row_groups, "columns": columns, "target": list(target),
               "task": written.task, "id_column": id_column,
               "declared": {"target": list(target), "task": task, "id_column": id_column}}
    if written.classify:
        summary |= {"classes": list(written.classes), "class_type": written.class_type}
    summary["ignored_columns"] = ignored
    summary["partition_keys"] = {k: list(v) for k, v in keys}
    summary["unread_files"] = [name for name, _ in unread]
    summary["unread_parquet"] = [name for name, parquet in unread if parquet]
    # An index column left out: --id-column would have kept it (schema_line says so).
    summary["schema"] = schema_line(dataclasses.replace(
        written, ignored_columns=tuple(ignored), partition_keys=keys,
        ignored_integer_index=ignored[0] if ignored and id_column is None else None))
    return summary
