"""Datasets in from CSV or Parquet: `gradpipe data import`, streamed, checked, then moved in place.

The source is read batch by batch (a CSV with pyarrow.csv.open_csv, Parquet as record
batches), never whole, and re-written as part-00000.parquet.. with row groups of a fixed
size, zstd. Every batch gets the checks training makes, naming the source file, column and
row; the result goes to a hidden folder next to OUT, is planned and read again with
`data.plan` and `data.read_block`, and only then renamed to OUT. What a dataset must look
like is data.py's; this module only converts and refuses.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .data import (
    DataSpec,
    describe_columns,
    filesystem,
    list_files,
    plan,
    read_block,
    select_features,
)
from .errors import ConfigError, DataError

ROW_GROUP_SIZE = 65536  # default rows per row group: one block each, data.BLOCK_ROWS
CSV_SUFFIXES = (".csv", ".tsv")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")  # pyarrow decompresses these by name
CSV_NULLS = "empty, NA, NaN or null"  # what pyarrow.csv reads as null by default


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


# --------------------------------------------------------------------------- the source


def source_format(source: str) -> str:
    """'csv' or 'parquet': a folder is Parquet; a file by its name, else by the PAR1 magic."""
    fs, path = filesystem(source)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise DataError(f"{source}: cannot read: {_one_line(e)}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{source}: no such file or folder")
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
    names: list[str], features: tuple[str, ...], target: tuple[str, ...], where: str
) -> list[str]:
    """The columns to write, features then targets; features are names or globs, as in data.py."""
    for t in target:
        if t not in names:
            raise DataError(
                f"{where}: missing target column {t!r} (found: {describe_columns(names)}). "
                "Pass --target with the right name."
            )
    chosen = select_features(names, features, set(target), where)
    columns = chosen + list(target)
    duplicates = sorted({c for c in columns if names.count(c) > 1})
    if duplicates:
        raise DataError(f"{where}: column name {duplicates[0]!r} appears more than once. "
                        "Rename the columns so that each name is unique.")
    return columns


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
            raise DataError(f"{self.source}: not a readable CSV file ({_one_line(e)})") from None

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
                    raise DataError(f"{self.source}: {_one_line(e)}") from None
                yield batch

    def names(self) -> list[str]:
        """The header's column names (reads only the first block)."""
        stream, reader = self._reader(None, None)
        with stream:
            return reader.schema.names

    def scan(self, columns: list[str]) -> tuple[int, dict[str, pa.DataType]]:
        """First pass: count the rows and type each column, int64 if every value is an integer.

        Values are read as text and cast as pyarrow.csv itself would convert them (it trims
        blanks first), so the second pass, with these types, parses the same way.
        """
        types = {c: pa.int64() for c in columns}
        rows = 0
        for batch in self._batches(columns, {c: pa.string() for c in columns}):
            for name in columns:
                values = pc.utf8_trim_whitespace(batch.column(name))
                if types[name] == pa.int64() and _parses(values, pa.int64()):
                    continue
                if _parses(values, pa.float64()):
                    types[name] = pa.float64()
                    continue
                i = _first_unparsable(values, pa.float64())
                raise DataError(
                    f"{self.source}: column {name!r} is not numeric ({values[i].as_py()!r} at "
                    f"row {rows + i}). Drop it, or pass --features with the numeric columns."
                )
            rows += batch.num_rows
        return rows, types

    def batches(self, columns: list[str], types: dict[str, pa.DataType]
                ) -> Iterator[tuple[str, int, pa.RecordBatch]]:
        """Second pass: (file, first row, batch) with `columns` in this order and `types`."""
        row = 0
        for batch in self._batches(columns, types):
            yield self.source, row, batch
            row += batch.num_rows


def _parses(values: pa.Array, to: pa.DataType) -> bool:
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
    for path in files:
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield path, row, pa.RecordBatch.from_arrays(
                    [batch.column(c) for c in columns], names=columns)
                row += batch.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None


# --------------------------------------------------------------------------- checks


def check_batch(batch: pa.RecordBatch, where: str, first_row: int, labels: tuple[str, ...],
                nulls: str = "null") -> None:
    """Refuse nulls, NaN and infinities in any column, and negative labels, as training does."""
    last = first_row + batch.num_rows - 1
    for name in batch.schema.names:
        column = batch.column(name)
        values, width = column, 1  # width: values per row
        if pa.types.is_fixed_size_list(column.type) and not column.null_count:
            values, width = column.flatten(), column.type.list_size
        if values.null_count:
            i = int(np.argmax(values.is_null().to_numpy(zero_copy_only=False))) // width
            raise DataError(
                f"{where}: column {name!r} has {values.null_count} {nulls} values in rows "
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
        if name in labels:
            array = values.to_numpy(zero_copy_only=False)
            if (array < 0).any():
                i = int(np.argmax(array < 0))
                raise DataError(
                    f"{where}: column {name!r} has negative labels ({int(array[i])} at row "
                    f"{first_row + i}). Labels must be class indices 0..K-1."
                )


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Cuts a stream of batches into `files` files of contiguous rows and row groups of R rows."""

    def __init__(self, folder: Path, total_rows: int, files: int, row_group_size: int) -> None:
        self.folder = folder
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
            self.schema = batch.schema.remove_metadata()
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
    """OUT may be new, an empty folder, or (with overwrite) a folder holding only Parquet files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder. Choose a folder for the dataset.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{out}: folder exists and is not empty. Pass --overwrite to replace "
                          "it, or choose another folder.")
    for dirpath, _, filenames in os.walk(out):
        for name in filenames:
            if not (name.endswith(".parquet") or name.startswith((".", "_"))):
                raise ConfigError(
                    f"{out}: holds {Path(dirpath, name).relative_to(out)}, which is not a "
                    "Parquet file; refusing to replace this folder with --overwrite."
                )


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


def _verify(source: str, tmp: Path, out: Path, target: tuple[str, ...], rows: int) -> None:
    """Plan and read every block of the written dataset, as `gradpipe train OUT` will."""
    try:
        dataset = plan(DataSpec(str(tmp), target=target))
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


# --------------------------------------------------------------------------- import


def import_dataset(
    source: str,
    out: str | Path,
    *,
    row_group_size: int = ROW_GROUP_SIZE,
    files: int = 1,
    target: tuple[str, ...] = ("label",),
    features: tuple[str, ...] = (),
    overwrite: bool = False,
) -> dict:
    """Re-write a CSV or Parquet dataset as checked Parquet shards in OUT; returns a summary.

    Rows keep the source order (so a sample id, the global row index, is the source row)
    and are split evenly over `files` contiguous files, as `data synth` does; each file is
    cut into row groups of `row_group_size` rows, the last one shorter. Splitting needs the
    row count up front: Parquet has it in its metadata; a CSV is streamed twice, a first
    pass counting rows and settling each column's type (int64 when every value is an
    integer, else float64; a single int64 target means class labels), a second writing.
    Only the features and the target are written. On any error nothing is left behind.
    """
    for name, value in (("row-group-size", row_group_size), ("files", files)):
        if value < 1:
            raise ConfigError(f"--{name} {value}: must be >= 1")
    if not target:
        raise ConfigError("--target: give at least one target column")
    out = Path(out)
    check_out(out, overwrite)
    fmt = source_format(source)

    labels: tuple[str, ...] = ()
    batches: Iterator[tuple[str, int, pa.RecordBatch]]
    if fmt == "csv":
        csv = CsvSource(source)
        columns = select_columns(csv.names(), features, target, source)
        rows, types = csv.scan(columns)
        if rows == 0:
            raise DataError(f"{source}: the CSV file has a header but zero rows")
        if len(target) == 1 and types[target[0]] == pa.int64():
            labels = target
        nulls = f"missing ({CSV_NULLS})"
        batches = csv.batches(columns, types)  # a generator: nothing is read yet
    else:
        # plan checks the schemas, column types and label range from metadata, naming files.
        dataset = plan(DataSpec(source, features=features, target=target))
        columns = [f for f in dataset.features if f not in target] + list(target)
        rows = dataset.n_rows
        labels = target if dataset.classify else ()
        nulls = "null"
        batches = parquet_batches(source, columns, min(row_group_size, ROW_GROUP_SIZE))
    if files > rows:
        raise ConfigError(f"--files {files}: more files than the {rows} rows of {source}")

    # Write to a hidden folder next to OUT, so that the final rename stays on one filesystem.
    out_abs = out.absolute()
    created = next((p for p in reversed(out_abs.parents) if not p.exists()), None)
    tmp = out_abs.with_name(f".{out_abs.name}.import-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        writer = ShardWriter(tmp, rows, files, row_group_size)
        try:
            for where, first_row, batch in batches:
                check_batch(batch, where, first_row, labels, nulls)
                writer.write(batch)
        finally:
            writer.close_file()
        if writer.rows != rows:
            raise DataError(f"{source}: read {writer.rows} rows but counted {rows} before. "
                            "Did it change while importing?")
        _verify(source, tmp, out, target, rows)
        _move_into_place(tmp, out_abs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return {"out": str(out), "source": source, "format": fmt, "rows": rows, "files": files,
            "row_groups": writer.row_groups, "columns": columns, "target": list(target),
            "task": "classification" if labels else "regression"}
