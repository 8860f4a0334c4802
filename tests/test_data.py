"""data.py: plan blocks from metadata, read and check blocks, read rows by global index.

The reference for what a block holds is DuckDB reading the same files as a user would
(rows ordered by file name, then row number within the file), and pyarrow's metadata for
the row-group layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DIGITS, make_classification, make_regression, write_parquet

from gradpipe import convert
from gradpipe.data import Dataset, DataSpec, list_files, plan, read_block, read_rows
from gradpipe.errors import DataError

DIGIT_FEATURES = [f"x{d}" for d in range(64)]


def duck(source: Path | str, columns: str = "*") -> dict[str, np.ndarray]:
    """All rows of a dataset in gradpipe's global order, read with DuckDB.

    `source` is a file, a folder (all *.parquet below it) or a glob pattern.
    """
    path = Path(source)
    pattern = str(path / "**" / "*.parquet") if path.is_dir() else str(source)
    con = duckdb.connect()
    try:
        return con.sql(
            f"SELECT {columns} FROM read_parquet('{pattern}', filename = true, "
            "file_row_number = true) ORDER BY filename, file_row_number"
        ).fetchnumpy()
    finally:
        con.close()


def all_x_y(dataset: Dataset, dtype: str = "float64") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = [read_block(dataset, b, dtype) for b in dataset.blocks]
    return (
        np.concatenate([d.ids for d in blocks]),
        np.concatenate([d.x for d in blocks]),
        np.concatenate([d.y for d in blocks]),
    )


# --------------------------------------------------------------------------- plan


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return plan(DataSpec(str(DIGITS)))


def test_plan_digits_sizes(digits: Dataset) -> None:
    assert digits.n_rows == 1797
    assert digits.n_features == 64
    assert digits.features == tuple(DIGIT_FEATURES)
    assert not digits.feature_list
    assert digits.task == "classification" and digits.classify
    assert digits.n_outputs == 10
    assert digits.target == ("label",)
    info = digits.to_dict()
    assert info["rows"] == 1797 and info["files"] == 3 and info["blocks"] == 9


def test_plan_digits_blocks_are_row_groups_in_file_order(digits: Dataset) -> None:
    files = sorted(str(p.resolve()) for p in DIGITS.glob("*.parquet"))
    expected = []  # (file, row_group, rows, file_row) from pyarrow's metadata
    for f in files:
        md = pq.ParquetFile(f).metadata
        file_row = 0
        for rg in range(md.num_row_groups):
            expected.append((f, rg, md.row_group(rg).num_rows, file_row))
            file_row += md.row_group(rg).num_rows
    got = [(b.file, b.row_group, b.n, b.file_row) for b in digits.blocks]
    assert got == expected
    assert [b.index for b in digits.blocks] == list(range(len(expected)))
    assert all(b.start == 0 for b in digits.blocks)
    # first_id is contiguous from 0: each block starts where the previous one stopped.
    ids = [b.first_id for b in digits.blocks]
    assert ids[0] == 0
    assert all(ids[i + 1] == ids[i] + digits.blocks[i].n for i in range(len(ids) - 1))
    assert ids[-1] + digits.blocks[-1].n == 1797


def test_plan_files_sorted_by_path(tmp_path: Path) -> None:
    # Written in reverse order, named so that sorting is by path, not creation time.
    for name in ["c.parquet", "b.parquet", "a.parquet"]:
        write_parquet(tmp_path / name, {"x0": [float(ord(name[0]))] * 3, "label": [0, 1, 0]})
    _, files = list_files(str(tmp_path))
    assert [Path(f).name for f in files] == ["a.parquet", "b.parquet", "c.parquet"]
    ds = plan(DataSpec(str(tmp_path)))
    assert [Path(b.file).name for b in ds.blocks] == ["a.parquet", "b.parquet", "c.parquet"]
    _, x, _ = all_x_y(ds)
    np.testing.assert_array_equal(x[:, 0], [97.0] * 3 + [98.0] * 3 + [99.0] * 3)


@pytest.mark.parametrize("block_rows", [1, 50, 100, 255, 256, 10_000])
def test_plan_splits_large_row_groups(block_rows: int) -> None:
    ds = plan(DataSpec(str(DIGITS), block_rows=block_rows))
    assert ds.n_rows == 1797
    assert all(1 <= b.n <= block_rows for b in ds.blocks)
    # Each row group is cut into [0, r), [r, 2r), ... ; ids stay the global row index.
    rg_rows = {  # (file, row group) -> rows, from pyarrow's metadata
        (str(f.resolve()), r): pq.ParquetFile(f).metadata.row_group(r).num_rows
        for f in DIGITS.glob("*.parquet")
        for r in range(pq.ParquetFile(f).metadata.num_row_groups)
    }
    expected_first_id = 0
    previous = None
    for i, b in enumerate(ds.blocks):
        assert b.index == i
        assert b.first_id == expected_first_id
        expected_first_id += b.n
        if previous is not None and (previous.file, previous.row_group) == (b.file, b.row_group):
            assert b.start == previous.stop
        else:
            assert b.start == 0
        assert b.start % block_rows == 0
        assert b.stop == min(rg_rows[b.file, b.row_group], b.start + block_rows)
        previous = b
    assert expected_first_id == 1797
    per_rg = 256 // block_rows + (256 % block_rows > 0)
    if block_rows == 100:
        assert [b.n for b in ds.blocks[:4]] == [100, 100, 56, 100]
        assert len(ds.blocks) == 3 * (2 * per_rg + 1)


def test_plan_split_blocks_read_the_same_rows() -> None:
    whole = plan(DataSpec(str(DIGITS)))
    split = plan(DataSpec(str(DIGITS), block_rows=100))
    ids_a, x_a, y_a = all_x_y(whole)
    ids_b, x_b, y_b = all_x_y(split)
    np.testing.assert_array_equal(ids_a, np.arange(1797))
    np.testing.assert_array_equal(ids_b, ids_a)
    np.testing.assert_array_equal(x_b, x_a)
    np.testing.assert_array_equal(y_b, y_a)
    # A split block's file_row is its first row within the file, for messages.
    for b in split.blocks:
        md = pq.ParquetFile(b.file).metadata
        assert b.file_row == sum(md.row_group(r).num_rows for r in range(b.row_group)) + b.start


def test_plan_reads_metadata_and_the_target_column_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Changed with issue 10: the classes are the target's distinct values, so plan reads
    # that one column (before, it read only metadata and took max label + 1).
    first = plan(DataSpec(str(DIGITS), block_rows=100))
    regression = make_regression(tmp_path / "r")
    iter_batches = pq.ParquetFile.iter_batches
    read_columns = []

    def target_only(self, *args, columns=None, **kwargs):
        read_columns.append(columns)
        return iter_batches(self, *args, columns=columns, **kwargs)

    def no_reads(*args, **kwargs):
        raise AssertionError("plan() read data pages beyond the target column")

    for name in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, no_reads)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", target_only)
    monkeypatch.setattr(pq, "read_table", no_reads)
    second = plan(DataSpec(str(DIGITS), block_rows=100))
    assert second.blocks == first.blocks
    assert second.fingerprint == first.fingerprint
    assert second == first
    assert read_columns == [["label"]] * 3  # one pass, file by file
    # Regression on several targets needs no values at all.
    read_columns.clear()
    plan(DataSpec(str(regression), target=("t0", "t1")))
    assert read_columns == []


def test_fingerprint_stable_across_copies_of_same_bytes(tmp_path: Path) -> None:
    a = plan(DataSpec(str(DIGITS))).fingerprint
    assert a == plan(DataSpec(str(DIGITS))).fingerprint
    # block_rows changes the blocks, not the dataset.
    assert a == plan(DataSpec(str(DIGITS), block_rows=100)).fingerprint
    assert len(a) == 64 and int(a, 16) >= 0


def test_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    data = make_classification(tmp_path / "d", rows=60, files=3)
    before = plan(DataSpec(str(data))).fingerprint
    # More rows in one file.
    make_classification(tmp_path / "d", rows=90, files=3)
    grown = plan(DataSpec(str(data))).fingerprint
    assert grown != before
    # A file more.
    write_parquet(data / "part-9.parquet", {**{f"x{d}": [0.5] for d in range(5)}, "label": [1]})
    assert plan(DataSpec(str(data))).fingerprint != grown


def test_fingerprint_changes_when_values_change(tmp_path: Path) -> None:
    make_classification(tmp_path / "d", rows=60, files=1, seed=0)
    before = plan(DataSpec(str(tmp_path / "d"))).fingerprint
    make_classification(tmp_path / "d", rows=60, files=1, seed=1)  # same shape, new values
    assert plan(DataSpec(str(tmp_path / "d"))).fingerprint != before


# --------------------------------------------------------------------------- read_block


@pytest.mark.parametrize("block_rows", [256, 100])
def test_read_block_matches_duckdb(digits: Dataset, block_rows: int) -> None:
    ds = plan(DataSpec(str(DIGITS), block_rows=block_rows))
    ref = duck(DIGITS)
    x_ref = np.stack([ref[c] for c in DIGIT_FEATURES], axis=1).astype(np.float64)
    labels = ref["label"]
    for b in ds.blocks:
        d = read_block(ds, b, "float64")
        rows = slice(b.first_id, b.first_id + b.n)
        np.testing.assert_array_equal(d.ids, np.arange(b.first_id, b.first_id + b.n))
        np.testing.assert_array_equal(d.x, x_ref[rows])
        np.testing.assert_array_equal(d.labels, labels[rows])
        # And the same file and row within it, as DuckDB names them.
        assert Path(ref["filename"][b.first_id]).resolve() == Path(b.file)
        assert ref["file_row_number"][b.first_id] == b.file_row
        assert d.x.dtype == np.float64 and d.y.dtype == np.float64
        assert d.x.shape == (b.n, 64) and d.y.shape == (b.n, 10)
        assert d.nbytes == d.ids.nbytes + d.x.nbytes + d.y.nbytes


def test_read_block_one_hot(digits: Dataset) -> None:
    d = read_block(digits, digits.blocks[4], "float32")
    assert d.x.dtype == np.float32 and d.y.dtype == np.float32
    assert d.labels is not None and d.labels.dtype == np.int64
    np.testing.assert_array_equal(d.y.sum(axis=1), np.ones(d.block.n))
    np.testing.assert_array_equal(d.y.argmax(axis=1), d.labels)
    assert set(np.unique(d.y)) == {0.0, 1.0}


def test_read_block_classes_from_spec(tmp_path: Path) -> None:
    data = make_classification(tmp_path / "d", classes=3)
    ds = plan(DataSpec(str(data), classes=5))
    assert ds.n_outputs == 5
    d = read_block(ds, ds.blocks[0], "float64")
    assert d.y.shape[1] == 5 and d.y[:, 3:].sum() == 0


def test_read_block_regression(tmp_path: Path) -> None:
    data = make_regression(tmp_path / "r", rows=40, features=4, targets=2)
    ds = plan(DataSpec(str(data), target=("t0", "t1")))
    assert ds.task == "regression" and not ds.classify
    assert ds.n_outputs == 2 and ds.n_features == 4
    assert ds.features == ("x0", "x1", "x2", "x3")
    assert [b.n for b in ds.blocks] == [9, 9, 9, 9, 4]
    ids, x, y = all_x_y(ds)
    ref = duck(data)
    np.testing.assert_array_equal(ids, np.arange(40))
    np.testing.assert_array_equal(x, np.stack([ref[f"x{d}"] for d in range(4)], axis=1))
    np.testing.assert_array_equal(y, np.stack([ref["t0"], ref["t1"]], axis=1))
    assert read_block(ds, ds.blocks[0], "float64").labels is None


def test_read_block_single_float_target_is_regression(tmp_path: Path) -> None:
    data = make_regression(tmp_path / "r", targets=1)
    ds = plan(DataSpec(str(data), target=("t0",)))
    assert ds.task == "regression" and ds.n_outputs == 1
    _, _, y = all_x_y(ds)
    np.testing.assert_array_equal(y[:, 0], duck(data)["t0"])


def test_features_glob_and_names() -> None:
    ds = plan(DataSpec(str(DIGITS), features=("x1*",)))
    assert ds.features == ("x1", "x10", "x11", "x12", "x13", "x14", "x15", "x16", "x17",
                           "x18", "x19")
    assert ds.n_features == 11
    ref = duck(DIGITS)
    d = read_block(ds, ds.blocks[1], "float64")
    rows = slice(d.block.first_id, d.block.first_id + d.block.n)
    np.testing.assert_array_equal(d.x, np.stack([ref[c][rows] for c in ds.features], axis=1))

    # Explicit names keep the order given, and a name matched twice counts once.
    ds = plan(DataSpec(str(DIGITS), features=("x5", "x2", "x5", "x4?")))
    assert ds.features == ("x5", "x2", "x40", "x41", "x42", "x43", "x44", "x45", "x46", "x47",
                           "x48", "x49")
    d = read_block(ds, ds.blocks[0], "float64")
    np.testing.assert_array_equal(d.x[:, 0], ref["x5"][: d.block.n])
    np.testing.assert_array_equal(d.x[:, 1], ref["x2"][: d.block.n])


def test_fixed_size_list_feature_column(tmp_path: Path) -> None:
    rows, dim = 50, 3
    x = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim) / 7
    pix = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)
    labels = np.arange(rows) % 4
    write_parquet(tmp_path / "l" / "part-0.parquet", {"pix": pix, "label": labels},
                  row_group_size=20)
    for spec in (DataSpec(str(tmp_path / "l")),  # the only non-target column: found alone
                 DataSpec(str(tmp_path / "l"), features=("pix",)),
                 DataSpec(str(tmp_path / "l"), features=("pix",), block_rows=7)):
        ds = plan(spec)
        assert ds.feature_list and ds.features == ("pix",) and ds.n_features == dim
        ids, got, y = all_x_y(ds)
        np.testing.assert_array_equal(ids, np.arange(rows))
        np.testing.assert_array_equal(got, x.astype(np.float64))
        np.testing.assert_array_equal(y.argmax(axis=1), labels)


def test_id_column(tmp_path: Path) -> None:
    rows = 30
    write_parquet(tmp_path / "d" / "a.parquet",
                  {"id": np.arange(1000, 1000 + rows), "x0": np.linspace(0, 1, rows),
                   "x1": np.linspace(1, 2, rows), "label": np.arange(rows) % 2},
                  row_group_size=8)
    ds = plan(DataSpec(str(tmp_path / "d"), id_column="id"))
    assert ds.features == ("x0", "x1")  # the id is not a feature
    assert ds.id_column == "id"
    ids, x, _ = all_x_y(ds)
    np.testing.assert_array_equal(ids, np.arange(1000, 1000 + rows))
    np.testing.assert_array_equal(x[:, 0], np.linspace(0, 1, rows))
    # Without id_column the id column is an ordinary feature and ids are row indexes.
    ds = plan(DataSpec(str(tmp_path / "d")))
    assert ds.features == ("id", "x0", "x1")
    np.testing.assert_array_equal(all_x_y(ds)[0], np.arange(rows))


# --------------------------------------------------------------------------- files


def test_nested_folders_skip_hidden_and_underscore(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_classification(root / "a", rows=20, files=2, seed=1)
    make_classification(root / "b" / "c", rows=12, files=1, seed=2)
    (root / "_SUCCESS").write_text("")
    (root / "a" / "_SUCCESS").write_bytes(b"")
    (root / "README.txt").write_text("not data")
    # Hidden and underscore Parquet files and folders: a different schema, so reading any
    # of them would fail the plan.
    junk = {"other": ["not", "numeric"]}
    write_parquet(root / ".x.parquet", junk)
    write_parquet(root / "a" / ".part-9.parquet.tmp", junk)
    write_parquet(root / "a" / "_metadata.parquet", junk)
    write_parquet(root / "_tmp" / "part-0.parquet", junk)
    write_parquet(root / ".hidden" / "part-0.parquet", junk)

    _, files = list_files(str(root))
    rel = [str(Path(f).relative_to(root.resolve())) for f in files]
    assert rel == ["a/part-0.parquet", "a/part-1.parquet", "b/c/part-0.parquet"]
    ds = plan(DataSpec(str(root)))
    assert ds.n_rows == 32 and ds.n_features == 5
    ids, x, _ = all_x_y(ds)
    ref = duck(f"{root}/a/part-*.parquet")  # DuckDB's glob would take _metadata.parquet too
    ref2 = duck(f"{root}/b/c/part-*.parquet")
    np.testing.assert_array_equal(ids, np.arange(32))
    np.testing.assert_array_equal(x[:20, 0], ref["x0"])
    np.testing.assert_array_equal(x[20:, 0], ref2["x0"])


def test_single_file_and_file_uri(tmp_path: Path) -> None:
    one = DIGITS / "part-1.parquet"
    ds = plan(DataSpec(str(one)))
    assert ds.n_rows == 600 and len(ds.blocks) == 3
    uri = plan(DataSpec(DIGITS.resolve().as_uri()))
    assert uri.source.startswith("file://")
    assert uri.n_rows == 1797 and uri.n_features == 64
    plain = plan(DataSpec(str(DIGITS)))
    assert [(b.row_group, b.start, b.stop, b.first_id) for b in uri.blocks] == \
        [(b.row_group, b.start, b.stop, b.first_id) for b in plain.blocks]
    ids_u, x_u, y_u = all_x_y(uri)
    ids_p, x_p, y_p = all_x_y(plain)
    np.testing.assert_array_equal(ids_u, ids_p)
    np.testing.assert_array_equal(x_u, x_p)
    np.testing.assert_array_equal(y_u, y_p)
    # A file:// URI of one file.
    single = plan(DataSpec(one.resolve().as_uri()))
    assert single.n_rows == 600


def test_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(DIGITS, tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    ds = plan(DataSpec("digits"))
    assert ds.n_rows == 1797
    assert all(Path(b.file).is_absolute() for b in ds.blocks)


# --------------------------------------------------------------------------- read_rows


def test_read_rows_returns_requested_global_rows() -> None:
    ds = plan(DataSpec(str(DIGITS), block_rows=100))
    ref = duck(DIGITS)
    x_ref = np.stack([ref[c] for c in DIGIT_FEATURES], axis=1).astype(np.float64)
    rows = [1796, 0, 599, 600, 255, 256, 1200, 7, 7, 1000]  # any order, repeats, boundaries
    ids, x, y = read_rows(ds, rows, "float64")
    np.testing.assert_array_equal(ids, rows)
    np.testing.assert_array_equal(x, x_ref[rows])
    np.testing.assert_array_equal(y.argmax(axis=1), ref["label"][rows])
    assert x.shape == (len(rows), 64) and y.shape == (len(rows), 10)


def test_read_rows_with_id_column(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "a.parquet",
                  {"id": np.arange(500, 520), "x0": np.arange(20.0), "label": np.arange(20) % 2},
                  row_group_size=6)
    ds = plan(DataSpec(str(tmp_path / "d"), id_column="id"))
    ids, x, _ = read_rows(ds, [19, 3, 6], "float64")
    np.testing.assert_array_equal(ids, [519, 503, 506])  # the id column, looked up by row
    np.testing.assert_array_equal(x[:, 0], [19.0, 3.0, 6.0])


def test_read_rows_out_of_range() -> None:
    from gradpipe.errors import DataError

    ds = plan(DataSpec(str(DIGITS)))
    for bad in (-1, 1797):
        with pytest.raises(DataError, match=rf"--sample {bad}: outside 0\.\.1796"):
            read_rows(ds, [bad], "float64")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_list_column_trains_evaluates_and_predicts_as_its_columns_do(tmp_path: Path, dtype):
    """The same features as one fixed-size list column (of the compute dtype: Arrow's buffer
    is then read-only, and blocks are standardized in place) and as separate columns give
    the same bits, in blocks that split row groups."""
    from click.testing import CliRunner

    from gradpipe.cli import cli

    rows, dim = 90, 4
    rng = np.random.default_rng(3)
    x = rng.normal(5, 2, size=(rows, dim)).astype(dtype)
    labels = rng.integers(0, 3, size=rows)
    pix = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)
    write_parquet(tmp_path / "list" / "a.parquet", {"pix": pix, "label": labels},
                  row_group_size=40)
    write_parquet(tmp_path / "cols" / "a.parquet",
                  {**{f"x{k}": x[:, k] for k in range(dim)}, "label": labels},
                  row_group_size=40)
    got = {}
    for kind in ("list", "cols"):
        out = tmp_path / f"run-{kind}"
        runner = CliRunner()
        for args in (["train", str(tmp_path / kind), "--out", str(out), "--steps", "3",
                      "--block-rows", "25", "--dtype", dtype, "--workers", "0"],
                     ["predict", str(out), str(tmp_path / kind), "--out",
                      str(tmp_path / f"pred-{kind}"), "--workers", "0"]):
            r = runner.invoke(cli, args)
            assert r.exit_code == 0, r.output
        r = runner.invoke(cli, ["evaluate", str(out), str(tmp_path / kind), "--json", "-q"])
        assert r.exit_code == 0, r.output
        metrics = {k: v for k, v in json.loads(r.stdout).items() if k not in ("model", "data")}
        got[kind] = (pq.read_table(out / "weights.parquet"), metrics,
                     pq.read_table(tmp_path / f"pred-{kind}").sort_by("sample"))
    for a, b in zip(got["list"], got["cols"], strict=True):
        assert a == b


def test_auto_refuses_an_integer_target_with_many_classes_of_few_rows(tmp_path: Path) -> None:
    """A count or a measure stored as integers (scikit-learn's diabetes target cast to int:
    214 values in 442 rows) is not silently taken as hundreds of classes: more than 20
    classes with fewer than 5 rows a class on average are refused under --task auto, as a
    float target of whole numbers is; --task says which it is."""
    rng = np.random.default_rng(0)
    for rows, many in ((100, True), (105, False)):  # 21 values: 4.8 and 5.0 rows a value
        path = write_parquet(tmp_path / f"d{rows}.parquet",
                             {"x0": rng.normal(size=rows), "y": np.arange(rows) % 21})
        if many:
            with pytest.raises(DataError, match="int64 with 21 distinct values in 100 rows "
                               r"\(4.8 a value\): class labels or numbers\? Pass --task"):
                plan(DataSpec(str(path), target=("y",)))
            for task in ("classification", "regression"):
                assert plan(DataSpec(str(path), target=("y",), task=task)).task == task
        else:
            assert plan(DataSpec(str(path), target=("y",))).n_outputs == 21


def test_auto_refuses_ten_classes_or_more_of_under_two_rows_each(tmp_path: Path) -> None:
    """Small data is not spared: linnerud's Weight stored as integers, 16 values in 20 rows,
    trained silently as 16 classes at accuracy 1.0. From 10 classes on, fewer than 2 rows a
    class on average is refused under --task auto; 9 classes of one row, or 10 of two, are
    still classes."""
    rng = np.random.default_rng(0)
    weights = [138, 154, 156, 157, 162, 166, 167, 169, 176, 182, 189, 191, 193, 202, 211, 247]
    path = write_parquet(tmp_path / "linnerud.parquet", {
        "x0": rng.normal(size=20), "Weight": np.array(weights + weights[:4], np.int64)})
    with pytest.raises(DataError, match=r"int64 with 16 distinct values in 20 rows \(1.2 a "
                       r"value\): class labels or numbers\? Pass --task"):
        plan(DataSpec(str(path), target=("Weight",)))
    assert plan(DataSpec(str(path), target=("Weight",), task="regression")).task == "regression"
    assert plan(DataSpec(str(path), target=("Weight",), task="classification")).n_outputs == 16
    for rows, classes in ((9, 9), (20, 10)):
        ok = write_parquet(tmp_path / f"ok{rows}.parquet", {
            "x0": rng.normal(size=rows), "y": np.arange(rows) % classes})
        assert plan(DataSpec(str(ok), target=("y",))).n_outputs == classes
    names = write_parquet(tmp_path / "names.parquet", {
        "x0": rng.normal(size=12), "name": [f"p{i}" for i in range(12)]})
    with pytest.raises(DataError, match="string with 12 distinct values in 12 rows"):
        plan(DataSpec(str(names), target=("name",)))


def test_auto_refuses_a_string_target_of_names_or_ids(tmp_path: Path) -> None:
    """A column of names (a string a row) taken as the target is not silently 178 classes:
    the same rule as for integers, with a hint to name the label column."""
    rng = np.random.default_rng(0)
    path = write_parquet(tmp_path / "d.parquet", {"x0": rng.normal(size=60),
                                                  "name": [f"w{i}" for i in range(60)]})
    with pytest.raises(DataError, match=r"string with 60 distinct values in 60 rows \(1.0 a "
                       r"value\): names or ids rather than class labels\? Pass --target"):
        plan(DataSpec(str(path), target=("name",)))
    assert plan(DataSpec(str(path), target=("name",), task="classification")).n_outputs == 60
    # 26 letters of about 4.6 rows each are classes, not names
    letters = write_parquet(tmp_path / "l.parquet", {"x0": rng.normal(size=120), "letter": [
        chr(65 + i % 26) for i in range(120)]})
    assert plan(DataSpec(str(letters), target=("letter",))).n_outputs == 26
    # numbers written as text, with thousands separators (a CSV export's quoted "1,628.9")
    path = write_parquet(tmp_path / "n.parquet", {"x0": rng.normal(size=60), "price": [
        f"{v:,.3f}" for v in rng.uniform(1000, 20000, 60)]})
    with pytest.raises(DataError, match=r"numbers written as text \('1,.*', ...\)\? Convert "
                       r"the column to numbers first, without any thousands separators"):
        plan(DataSpec(str(path), target=("price",)))


def test_a_nan_label_is_called_missing_under_either_task(tmp_path: Path) -> None:
    """A float target with a NaN (not a null) names the NaN and its row: under --task auto
    before asking which task (it is not a whole number), and under --task classification
    as a missing label, not as a label outside a model's classes."""
    from click.testing import CliRunner
    from conftest import one_line_error

    from gradpipe.cli import cli

    y = np.arange(40, dtype=np.float64) % 3
    y[9] = np.nan
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"x0": np.linspace(0, 1, 40), "y": pa.array(y, from_pandas=False)}),
                   path)
    for task, said in (("auto", "target column 'y' has 1 NaN value (first at row 9)"),
                       ("classification", "column 'y' has a NaN label at row 9")):
        result = CliRunner().invoke(cli, ["train", str(path), "--target", "y", "--task", task,
                                          "--out", str(tmp_path / "run"), "--workers", "0"])
        assert "model" not in one_line_error(result, said, "Drop or impute")
        assert not (tmp_path / "run").exists()


def test_an_unused_index_column_in_some_files_only_is_not_a_schema_difference(tmp_path: Path):
    """pandas writes a RangeIndex as metadata and a shuffled index as a column: two halves of
    one DataFrame saved with to_parquet are one dataset. A used column missing is still
    refused, by name."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x0": rng.normal(size=40), "x1": rng.normal(size=40),
                       "label": np.arange(40) % 2})
    (tmp_path / "d").mkdir()
    df.iloc[:20].to_parquet(tmp_path / "d" / "a.parquet")  # RangeIndex: no column
    df.iloc[20:].sample(frac=1, random_state=0).to_parquet(tmp_path / "d" / "b.parquet")
    assert "__index_level_0__" in pq.read_schema(tmp_path / "d" / "b.parquet").names
    ds = plan(DataSpec(str(tmp_path / "d")))
    assert ds.features == ("x0", "x1") and ds.n_rows == 40
    assert ds.ignored_columns == ("__index_level_0__",)  # said on the schema line
    df.iloc[20:].drop(columns="x1").to_parquet(tmp_path / "d" / "b.parquet")
    with pytest.raises(DataError, match="b.parquet: schema differs .*column 'x1' is missing"):
        plan(DataSpec(str(tmp_path / "d")))


def test_a_missing_column_message_names_the_closest_columns_the_cut_hides() -> None:
    from gradpipe.data import describe_columns

    names = [f"f{k}" for k in range(12)] + ["Target"]
    assert describe_columns(names) == "f0, f1, f2, f3, f4, f5, ... (13)"
    assert describe_columns(names, "target").endswith("(13); closest to 'target': 'Target'")
    assert describe_columns(names, "Traget").endswith("; closest to 'Traget': 'Target'")
    assert describe_columns(names, "label") == describe_columns(names)
    assert describe_columns(["a", "class, final", " b"]) == "a, 'class, final', ' b'"


def test_a_missing_default_target_names_the_column_called_like_one(tmp_path: Path) -> None:
    """scikit-learn's frames call their target 'target', past the six names an error lists:
    the default 'label' missing points at it, in train and in data import."""
    cols = {f"f{i}": np.arange(9.0) for i in range(12)} | {"target": np.arange(9) % 3}
    path = write_parquet(tmp_path / "d.parquet", cols)
    with pytest.raises(DataError, match=r"missing target column 'label' \(found: f0, .* "
                       r"\(13\)\)\. Pass --target with the right name; named like a target: "
                       r"'target' \(--target target\)\.$"):
        plan(DataSpec(str(path)))
    with pytest.raises(DataError, match=r"named like a target: 'target' \(--target target\)"):
        convert.import_dataset(str(path), tmp_path / "out")
    plain = write_parquet(tmp_path / "p.parquet", {"x0": np.arange(9.0), "y": np.arange(9) % 3})
    with pytest.raises(DataError, match=r"\(found: x0, y\)\. Pass --target with the right "
                       r"name\.$"):
        plan(DataSpec(str(plain)))


def test_a_target_name_with_a_comma_is_pointed_to_a_job_file(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"x0": np.arange(9.0),
                                                  "class, final": np.arange(9) % 3})
    with pytest.raises(DataError, match=r"missing target column 'class' .*--target splits names "
                       r"at commas: name 'class, final' in a job file, target = \[\"class, "
                       r"final\"\]"):
        plan(DataSpec(str(path), target=("class", "final")))
    assert plan(DataSpec(str(path), target=("class, final",))).n_outputs == 3


def test_a_feature_that_is_int_in_one_file_and_float_in_another_is_one_column(tmp_path: Path):
    """pandas writes a column with a missing value as double: the same feature as int64 in
    one file and double in another reads as numbers, into the compute dtype; a target or a
    string feature must still agree."""
    from gradpipe.convert import import_dataset

    write_parquet(tmp_path / "d" / "a.parquet", {"x0": np.arange(5), "x1": np.arange(5.0),
                                                 "label": np.arange(5) % 2})
    write_parquet(tmp_path / "d" / "b.parquet", {"x0": np.arange(5) + 0.5,
                                                 "x1": np.arange(5.0), "label": np.arange(5) % 2})
    ds = plan(DataSpec(str(tmp_path / "d")))
    _, x, _ = all_x_y(ds)
    np.testing.assert_array_equal(x[:, 0], np.r_[np.arange(5), np.arange(5) + 0.5])
    import_dataset(str(tmp_path / "d"), str(tmp_path / "imported"))
    table = pq.read_table(tmp_path / "imported")
    assert table.schema.field("x0").type == pa.float64()  # widened, not truncated
    assert table.column("x0").to_pylist() == list(x[:, 0])
    write_parquet(tmp_path / "d" / "b.parquet", {"x0": np.arange(5) + 0.5, "x1": np.arange(5.0),
                                                 "label": np.arange(5) % 2 + 0.0})
    with pytest.raises(DataError, match="column 'label' is double here, int64 there"):
        plan(DataSpec(str(tmp_path / "d")))


def test_decimal_columns_are_numbers(tmp_path: Path) -> None:
    """DuckDB writes 1.5 literals as DECIMAL: features and a regression target read as
    numbers (they were 'decimal128(21, 1), not numeric'); --task auto takes a decimal target
    as regression, as a float one."""
    path = tmp_path / "dec.parquet"
    duckdb.sql(f"copy (select i * 1.5 as a, (i % 7) * 0.25 as b, (i * 0.5)::decimal(6, 2) as y "
               f"from range(12) t(i)) to '{path}' (format parquet)")
    assert pa.types.is_decimal(pq.read_schema(path).field("a").type)
    ds = plan(DataSpec(str(path), target=("y",)))
    assert ds.task == "regression" and ds.features == ("a", "b")
    d = read_block(ds, ds.blocks[0], "float64")
    np.testing.assert_array_equal(d.x[:, 0], np.arange(12) * 1.5)
    np.testing.assert_array_equal(d.x[:, 1], (np.arange(12) % 7) * 0.25)
    np.testing.assert_array_equal(d.y[:, 0], np.arange(12) * 0.5)
