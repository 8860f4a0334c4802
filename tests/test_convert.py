"""`gradpipe data import`: CSV and Parquet in, checked Parquet shards out, or nothing at all.

Round trips are compared with DuckDB (read_csv / read_parquet) and pyarrow; layouts with
the Parquet metadata; refused inputs must leave the folder as it was: no OUT, no temporary
folder, no parent folder created.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from conftest import make_classification, ok, one_line_error, write_parquet

from gradpipe import convert
from gradpipe.cli import cli
from gradpipe.data import DataSpec, plan, read_block
from gradpipe.errors import DataError


def import_(src: Path, out: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["data", "import", str(src), str(out), *args])




def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def layout(folder: Path) -> dict[str, list[int]]:
    """File name -> rows of each row group, from the Parquet metadata."""
    out = {}
    for f in sorted(folder.iterdir()):
        md = pq.ParquetFile(f).metadata
        out[f.name] = [md.row_group(r).num_rows for r in range(md.num_row_groups)]
    return out


def read(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])


def write_csv(path: Path, rows: int = 60, seed: int = 0, classes: int = 3) -> Path:
    """A CSV of float features (one of them integer-valued) and an integer label."""
    rng = np.random.default_rng(seed)
    table = pa.table({
        "f0": rng.normal(size=rows),
        "f1": rng.normal(size=rows) * 1e6,
        "count": rng.integers(0, 100, size=rows),
        "label": np.arange(rows) % classes,
    })
    pacsv.write_csv(table, path)
    return path


def same_as_csv(csv: Path, out: Path) -> None:
    """DuckDB reads the same rows from the CSV and from the Parquet files."""
    con = duckdb.connect()
    a = f"read_csv('{csv}')"
    b = f"read_parquet('{out}/*.parquet')"
    assert con.sql(f"select count(*) from {a}").fetchall() == \
        con.sql(f"select count(*) from {b}").fetchall()
    assert con.sql(f"select * from {a} except all select * from {b}").fetchall() == []
    assert con.sql(f"select * from {b} except all select * from {a}").fetchall() == []


# --------------------------------------------------------------------------- CSV


def test_csv_round_trip_and_layout(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "in.csv", rows=60)
    out = tmp_path / "out"
    result = ok(import_(csv, out, "--files", "3", "--row-group-size", "7"))
    assert result.stdout.splitlines()[0] == \
        f"wrote 60 rows of csv {csv} in 3 files (9 row groups) to {out}"
    assert result.stdout.splitlines()[1].startswith("  classification on 'label'")
    same_as_csv(csv, out)
    # In order, too: the sample id (global row index) is the CSV's row.
    expected = pacsv.read_csv(csv)
    assert read(out).equals(expected)
    assert layout(out) == {f"part-0000{i}.parquet": [7, 7, 6] for i in range(3)}
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.names == ["f0", "f1", "count", "label"]
    assert schema.types == [pa.float64(), pa.float64(), pa.int64(), pa.int64()]
    md = pq.ParquetFile(out / "part-00000.parquet").metadata
    assert md.row_group(0).column(0).compression == "ZSTD"
    assert listing(tmp_path) == {"in.csv", "out", *(f"out/part-0000{i}.parquet" for i in range(3))}
    ds = plan(DataSpec(str(out)))
    assert ds.n_rows == 60 and ds.classify and ds.n_outputs == 3 and len(ds.blocks) == 9


@pytest.mark.parametrize(("rows", "files", "group", "expected"), [
    (10, 1, 65536, [[10]]),
    (10, 4, 1000, [[2], [3], [2], [3]]),  # the split of `data synth`
    (100, 2, 16, [[16, 16, 16, 2], [16, 16, 16, 2]]),
    (5, 5, 1, [[1]] * 5),
])
def test_files_and_row_groups(tmp_path: Path, rows: int, files: int, group: int,
                              expected: list[list[int]]) -> None:
    csv = write_csv(tmp_path / "in.csv", rows=rows, classes=2)
    ok(import_(csv, tmp_path / "out", "--files", str(files), "--row-group-size", str(group)))
    assert list(layout(tmp_path / "out").values()) == expected
    same_as_csv(csv, tmp_path / "out")


def test_large_csv_streams_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSV of several read blocks: row groups span batches, a later float widens a column."""
    rows = 60_000
    rng = np.random.default_rng(3)
    count = rng.integers(0, 1000, size=rows).astype(str).astype(object)
    count[rows - 5] = "2.5"  # an integer column until its last block: float64
    table = pa.table({"x": rng.normal(size=rows), "count": pa.array(count, pa.string()),
                      "label": rng.integers(0, 4, size=rows)})
    csv = tmp_path / "big.csv"
    pacsv.write_csv(table, csv)
    # pyarrow reads 1 MiB blocks; inferring types from the first one alone fails on "2.5".
    as_text = pacsv.ConvertOptions(column_types={"count": pa.string()})
    assert sum(1 for _ in pacsv.open_csv(csv, convert_options=as_text)) >= 2
    with pytest.raises(pa.ArrowInvalid, match="2.5"):
        list(pacsv.open_csv(csv))

    def whole_file(*args, **kwargs):
        raise AssertionError("read_csv loads the whole file; import must stream")

    monkeypatch.setattr(pacsv, "read_csv", whole_file)
    ok(import_(csv, tmp_path / "out", "--files", "3", "--row-group-size", "7000"))
    monkeypatch.undo()
    assert list(layout(tmp_path / "out").values()) == [[7000, 7000, 6000]] * 3
    written = read(tmp_path / "out")
    assert written.schema.field("count").type == pa.float64()
    np.testing.assert_array_equal(written["count"].to_numpy(),
                                  np.array(count, dtype=np.float64))
    np.testing.assert_array_equal(written["x"].to_numpy(), table["x"].to_numpy())
    same_as_csv(csv, tmp_path / "out")


def test_compressed_csv_and_blank_padded_values(tmp_path: Path) -> None:
    src = tmp_path / "in.csv.gz"
    with gzip.open(src, "wt") as f:
        f.write("a,b,label\n1, 2 ,0\n4,5.5,1\n-3,16,1\n")
    ok(import_(src, tmp_path / "out"))
    table = read(tmp_path / "out")
    assert table.schema.types == [pa.int64(), pa.float64(), pa.int64()]
    assert table.to_pylist() == [{"a": 1, "b": 2.0, "label": 0}, {"a": 4, "b": 5.5, "label": 1},
                                 {"a": -3, "b": 16.0, "label": 1}]


def test_features_pick_columns_and_drop_the_rest(tmp_path: Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text("name,x0,x1,y0,label\na,1,2,3,0\nb,4,5,6,1\nc,7,8,9,1\n")
    ok(import_(csv, tmp_path / "out", "--features", "x*"))
    assert read(tmp_path / "out").to_pylist() == [
        {"x0": 1, "x1": 2, "label": 0}, {"x0": 4, "x1": 5, "label": 1},
        {"x0": 7, "x1": 8, "label": 1}]


def test_regression_targets(tmp_path: Path) -> None:
    csv = tmp_path / "in.csv"
    rng = np.random.default_rng(1)
    pacsv.write_csv(pa.table({"x0": rng.normal(size=30), "x1": rng.normal(size=30),
                              "t0": rng.normal(size=30), "t1": rng.normal(size=30)}), csv)
    summary = json.loads(ok(import_(csv, tmp_path / "out", "--target", "t0,t1",
                                    "--json")).stdout)
    assert summary["task"] == "regression" and summary["columns"] == ["x0", "x1", "t0", "t1"]
    ds = plan(DataSpec(str(tmp_path / "out"), target=("t0", "t1")))
    assert ds.task == "regression" and ds.n_features == 2
    same_as_csv(csv, tmp_path / "out")


# --------------------------------------------------------------------------- Parquet


def test_parquet_reshard(tmp_path: Path) -> None:
    src = make_classification(tmp_path / "src", rows=60, files=3, row_group_size=7)
    summary = json.loads(ok(import_(src, tmp_path / "out", "--files", "2",
                                    "--row-group-size", "16", "--json")).stdout)
    assert summary == {"out": str(tmp_path / "out"), "source": str(src), "format": "parquet",
                       "rows": 60, "files": 2, "row_groups": 4,
                       "columns": ["x0", "x1", "x2", "x3", "x4", "label"], "target": ["label"],
                       "task": "classification", "classes": [0, 1, 2], "class_type": "int64",
                       "id_column": None,
                       "declared": {"target": ["label"], "task": "auto", "id_column": None},
                       "ignored_columns": [], "partition_keys": {}, "unread_files": [],
                       "unread_parquet": [],
                       "schema": "classification on 'label': 3 classes (0, 1, 2); 5 features "
                                 "(x0, x1, x2, x3, x4); 60 rows in 4 blocks of 2 files"}
    assert layout(tmp_path / "out") == {"part-00000.parquet": [16, 14],
                                        "part-00001.parquet": [16, 14]}
    assert read(tmp_path / "out").equals(read(src))  # same rows, order and types
    con = duckdb.connect()
    assert con.sql(f"select * from read_parquet('{src}/*.parquet') except all "
                   f"select * from read_parquet('{tmp_path}/out/*.parquet')").fetchall() == []


def test_parquet_single_file(tmp_path: Path) -> None:
    src = make_classification(tmp_path / "d", rows=40, files=1, row_group_size=40)
    ok(import_(src / "part-0.parquet", tmp_path / "one", "--row-group-size", "10"))
    assert layout(tmp_path / "one") == {"part-00000.parquet": [10, 10, 10, 10]}
    assert read(tmp_path / "one").equals(read(src))


def test_writing_into_the_source_is_refused(tmp_path: Path) -> None:
    # Changed with issue 10: OUT == SRC was an in-place reshard; OUT inside SRC would make
    # the source take in the new files, SRC inside OUT be deleted by --overwrite.
    src = make_classification(tmp_path / "d", rows=40, files=1, row_group_size=40)
    csv = write_csv(tmp_path / "d" / "in.csv", rows=20)
    before = listing(tmp_path)
    for source, out, name in [
        (src, src, "is the source"),
        (src, src / "out", "inside the source"),
        (src / "part-0.parquet", src, "holds the source"),
        (csv, tmp_path / "d", "holds the source"),
        (csv, tmp_path, "holds the source"),
    ]:
        one_line_error(import_(source, out, "--overwrite"), str(out), name, "outside")
    assert listing(tmp_path) == before


def test_parquet_list_feature_column(tmp_path: Path) -> None:
    values = np.arange(24, dtype=np.float32)
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(values), 4)
    write_parquet(tmp_path / "src" / "a.parquet", {"pixels": pixels, "label": [0, 1, 0, 1, 0, 1]})
    ok(import_(tmp_path / "src", tmp_path / "out", "--row-group-size", "4"))
    table = read(tmp_path / "out")
    assert table.schema.field("pixels").type == pa.list_(pa.float32(), 4)
    assert table.equals(read(tmp_path / "src"))
    assert plan(DataSpec(str(tmp_path / "out"))).n_features == 4


def test_train_runs_on_imported_data(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "in.csv", rows=90)
    ok(import_(csv, tmp_path / "data", "--files", "2", "--row-group-size", "20"))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "data"), "--workers", "0",
                                      "--steps", "2", "--standardize", "--quiet",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = pq.read_table(tmp_path / "run" / "metrics")
    assert metrics.num_rows == 2 and metrics["samples"].to_pylist() == [90, 90]


def test_train_takes_the_target_and_task_data_import_was_told(tmp_path: Path) -> None:
    # scikit-learn's diabetes as a CSV: a float target of whole numbers, which auto refuses
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3))
    pacsv.write_csv(pa.table({"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2],
                              "target": np.round(100 + 30 * x[:, 0]).astype(float)}),
                    tmp_path / "in.csv")
    result = ok(import_(tmp_path / "in.csv", tmp_path / "data", "--target", "target",
                        "--task", "regression"))
    assert ("gradpipe train takes --target target --task regression from these files unless "
            "told otherwise") in result.output

    def train(*flags: str) -> Result:
        result = CliRunner().invoke(cli, ["train", str(tmp_path / "data"), "--workers", "0",
                                          "--steps", "2", "--overwrite", *flags, "--out",
                                          str(tmp_path / "run")])
        assert result.exit_code == 0, result.output
        return result

    said = train().output.splitlines()[0]
    assert said.startswith("regression on 'target' (--target target --task regression, as "
                           "data import was told); 3 features (x0, x1, x2)"), said
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["dataset"]["target"] == ["target"] and run["dataset"]["task"] == "regression"
    # the target named again: the task still comes from the files
    said = train("--target", "target").output.splitlines()[0]
    assert said.startswith("regression on 'target' (--task regression, as data import"), said
    # told otherwise: the user's word wins
    said = train("--target", "target", "--task", "classification").output
    assert said.startswith("classification on 'target': "), said
    said = train("--target", "x0").output  # another target: the files' task is not its
    assert said.startswith("regression on 'x0'; "), said
    # a label column of the data's own: the default target, as before
    ok(import_(write_csv(tmp_path / "l.csv"), tmp_path / "l"))
    assert pq.read_schema(next((tmp_path / "l").glob("*.parquet"))).metadata == {
        b"gradpipe.import": b'{"target": ["label"], "task": "auto", "id_column": null}'}
    assert "gradpipe train takes" not in ok(import_(write_csv(tmp_path / "l.csv"), tmp_path / "l",
                                     "--overwrite")).output


@pytest.mark.parametrize("source", ["csv", "parquet"])
def test_id_column_keeps_an_index_as_the_sample_id(tmp_path: Path, source: str) -> None:
    # pandas' shuffled index: an unnamed first column in a CSV, __index_level_0__ in Parquet
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(4)
    df = pd.DataFrame({"x0": rng.normal(size=40), "x1": rng.normal(size=40),
                       "label": np.arange(40) % 2}).sample(frac=1, random_state=0)
    if source == "csv":
        df.to_csv(tmp_path / "src.csv")
        src, index = tmp_path / "src.csv", ""
    else:
        df.to_parquet(tmp_path / "src.parquet")
        src, index = tmp_path / "src.parquet", "__index_level_0__"
    shown = "''" if index == "" else index
    said = ok(import_(src, tmp_path / "left")).output  # left out, and said how to keep it
    assert f"ignored index column {shown} (--id-column {shown} makes it the sample id)" in said
    said = ok(import_(src, tmp_path / "data", "--id-column", index)).output
    assert f"; id column {shown}" in said
    assert f"gradpipe train takes --id-column {shown} from these files" in said
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "data"), "--workers", "0",
                                      "--steps", "1", "--per-sample", "norms", "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert f"(--id-column {shown}, as data import was told)" in result.output.splitlines()[0]
    rows = pq.read_table(tmp_path / "run" / "per_sample").to_pandas()
    assert sorted(rows["sample"]) == sorted(df.index) and list(rows["sample"]) == list(df.index)
    # not an integer column: refused, nothing written
    one_line_error(import_(src, tmp_path / "bad", "--id-column", "x0"), "'x0'", "integer")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("source", ["csv", "parquet"])
def test_no_target_brings_in_rows_to_predict(tmp_path: Path, source: str) -> None:
    """New rows come without a target: --no-target writes every column but the index as a
    feature, predict takes them as any data, and train and evaluate refuse them in one
    line instead of a missing 'label'."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 2))
    df = pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "label": (x[:, 0] > 0).astype(int)})
    df.to_csv(tmp_path / "train.csv", index=False)
    ok(import_(tmp_path / "train.csv", tmp_path / "train"))
    run = tmp_path / "run"
    ok(CliRunner().invoke(cli, ["train", str(tmp_path / "train"), "--steps", "20", "-q",
                                "--out", str(run)]))
    new = df.drop(columns="label").iloc[::-1]
    if source == "csv":
        new.to_csv(tmp_path / "new.csv")  # with pandas' index, a column named ''
        src = tmp_path / "new.csv"
    else:
        new.to_parquet(tmp_path / "new.parquet")  # __index_level_0__
        src = tmp_path / "new.parquet"
    said = ok(import_(src, tmp_path / "new", "--no-target")).output
    assert "  no target (rows for gradpipe predict); 2 features (x0, x1); 60 rows" in said
    assert "gradpipe train takes" not in said
    assert pq.read_schema(next((tmp_path / "new").glob("*.parquet"))).names == ["x0", "x1"]
    ok(CliRunner().invoke(cli, ["predict", str(run), str(tmp_path / "new"), "--out",
                                str(tmp_path / "pred"), "-q"]))
    got = pq.read_table(tmp_path / "pred").to_pandas().sort_values("sample")
    ok(CliRunner().invoke(cli, ["predict", str(run), str(tmp_path / "train"), "--out",
                                str(tmp_path / "pred0"), "-q"]))
    want = pq.read_table(tmp_path / "pred0").to_pandas().sort_values("sample")
    # the rows came reversed: new row i is training row 59 - i
    assert list(got["prediction"]) == list(want["prediction"])[::-1]
    for command in (["train", str(tmp_path / "new"), "--out", str(tmp_path / "r2")],
                    ["evaluate", str(run), str(tmp_path / "new")]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    one_line_error(CliRunner().invoke(cli, ["train", str(tmp_path / "new"), "--out",
                                            str(tmp_path / "r3")]),
                   "imported without a target (data import --no-target)")
    one_line_error(CliRunner().invoke(cli, ["evaluate", str(run), str(tmp_path / "new")]),
                   "imported without a target (data import --no-target)", "'label'")
    one_line_error(import_(src, tmp_path / "both", "--no-target", "--target", "x0"),
                   "--no-target with --target")
    assert not (tmp_path / "both").exists() and not (tmp_path / "r3").exists()
    one_line_error(CliRunner().invoke(cli, ["predict", str(run), str(tmp_path / "train.csv"),
                                            "--out", str(tmp_path / "p")]),
                   "--no-target for rows to predict")


def test_import_says_which_files_it_did_not_import(tmp_path: Path) -> None:
    """A renamed Parquet part was dropped from the import in silence, and the written folder
    hid it from every later command: the warning names it, with --json too."""
    src = tmp_path / "src"
    make_classification(src, rows=30, files=3)
    (src / "part-2.parquet").rename(src / "part-2")
    (src / "notes.txt").write_text("not data")
    for extra in ([], ["--json"]):
        result = import_(src, tmp_path / "out", "--overwrite", *extra)
        assert result.exit_code == 0, result.output
        assert result.stderr == (f"gradpipe: warning: 2 files in {src} not named *.parquet were "
                                 "not imported: 'notes.txt', 'part-2'; 1 of them is Parquet: "
                                 "rename them to *.parquet and import again\n")
    summary = json.loads(result.stdout)
    assert summary["unread_files"] == ["notes.txt", "part-2"]
    assert summary["unread_parquet"] == ["part-2"] and summary["rows"] == 20


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(("text", "names"), [
    ("a,b,label\n1,2.5,0\n2,abc,1\n", ["'b'", "not numeric", "'abc'", "row 1"]),
    # every bad column of the batch at once, what each cell seems to be, the way out
    ('a,b,c,label\n1,"2,5",?,0\n2,3,4,1\n',
     ["columns not numeric: 'b' ('2,5' at row 0: a thousands separator or a decimal comma?",
      "'c' ('?' at row 0: a missing-value marker?", "--features '!b,!c'"]),
    ("a,b,label\n1,2.5,0\n2,NaN,1\n3,1,1\n", ["'b'", "missing", "row 1"]),
    ("a,b,label\n1,2.5,0\n2,,1\n", ["'b'", "missing", "row 1"]),
    ("a,b,label\n1,2.5,0\n2,NAN,1\n", ["'b'", "NaN", "row 1"]),
    ("a,b,label\n1,inf,0\n2,1,1\n", ["'b'", "infinite", "row 0"]),
    ("a,b,label\n1,2,0\n2,3,0\n", ["'label'", "one class only (0)"]),
    ("a,b,label\n1,2,x\n2,3,x\n", ["'label'", "one class only ('x')"]),
    ("a,b,label\n1,2,0.0\n2,3,1.0\n", ["'label'", "whole numbers", "--task classification"]),
    ("a,b,label\n1,2,0\n2,3\n", ["Expected 3 columns"]),
    ("a,b,label\n", ["zero rows"]),
    ("a,b,y\n1,2,0\n", ["'label'", "--target"]),
    ("a,a,label\n1,2,0\n3,4,1\n", ["'a'", "more than once"]),
])
def test_bad_csv_is_refused_and_nothing_is_written(tmp_path: Path, text: str,
                                                   names: list[str]) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text(text)
    out = tmp_path / "new" / "deeper" / "out"  # parents that do not exist yet
    one_line_error(import_(csv, out), str(csv), *names)
    assert listing(tmp_path) == {"in.csv"}


def test_bad_value_late_in_a_large_csv(tmp_path: Path) -> None:
    """Files are already being written when the bad row comes: they all go."""
    rows = 50_000
    x = np.random.default_rng(0).normal(size=rows).astype(str).astype(object)
    x[rows - 3] = "nan"
    csv = tmp_path / "big.csv"
    pacsv.write_csv(pa.table({"x": pa.array(x, pa.string()), "label": np.arange(rows) % 2}),
                    csv)
    one_line_error(import_(csv, tmp_path / "out", "--files", "2", "--row-group-size", "1000"),
                   str(csv), "'x'", f"row {rows - 3}")
    assert listing(tmp_path) == {"big.csv"}


def test_parquet_null_and_nan_are_refused(tmp_path: Path) -> None:
    src = make_classification(tmp_path / "src", rows=30, files=2, row_group_size=5)
    bad = tmp_path / "src" / "part-1.parquet"
    table = pq.read_table(bad)
    x2 = table["x2"].to_numpy().copy()
    x2[7] = np.nan
    pq.write_table(table.set_column(2, "x2", pa.array(x2)), bad, row_group_size=5)
    before = listing(tmp_path)
    one_line_error(import_(src, tmp_path / "out"), str(bad), "'x2'", "NaN", "row 7")
    x2[7] = 0
    pq.write_table(table.set_column(2, "x2", pa.array(x2, mask=np.arange(15) == 4)), bad,
                   row_group_size=5)
    one_line_error(import_(src, tmp_path / "out"), str(bad), "'x2'", "null", "row 4")
    assert listing(tmp_path) == before


def test_parquet_schema_checks_name_the_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_parquet(src / "a.parquet", {"x": [1.0, 2.0], "name": ["p", "q"], "label": [0, 1]})
    one_line_error(import_(src, tmp_path / "out"), "a.parquet", "'name'")
    ok(import_(src, tmp_path / "out", "--features", "x"))  # the string column is dropped
    assert read(tmp_path / "out").column_names == ["x", "label"]


def test_neither_csv_nor_parquet(tmp_path: Path) -> None:
    src = tmp_path / "data.txt"
    src.write_text("a,b\n1,2\n")
    one_line_error(import_(src, tmp_path / "out"), str(src), "CSV", "Parquet")
    one_line_error(import_(tmp_path / "nope.csv", tmp_path / "out"), "nope.csv")
    assert listing(tmp_path) == {"data.txt"}


def test_out_rules(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "in.csv", rows=20)
    out = tmp_path / "out"
    ok(import_(csv, out))
    first = layout(out)
    # An existing dataset: refused, then replaced with --overwrite.
    one_line_error(import_(csv, out, "--files", "2"), str(out), "--overwrite")
    assert layout(out) == first
    ok(import_(csv, out, "--files", "2", "--overwrite"))
    assert list(layout(out)) == ["part-00000.parquet", "part-00001.parquet"]
    # A folder with other files is never deleted.
    (out / "notes.txt").write_text("mine")
    one_line_error(import_(csv, out, "--overwrite"), str(out), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"
    # A file as OUT, and an empty folder (fine).
    (tmp_path / "other.csv").write_text("")
    one_line_error(import_(csv, tmp_path / "other.csv"), "other.csv", "not a folder")
    (tmp_path / "empty").mkdir()
    ok(import_(csv, tmp_path / "empty"))
    assert list(layout(tmp_path / "empty")) == ["part-00000.parquet"]
    # A failed --overwrite keeps the old dataset.
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\n1,0\nx,1\n")
    one_line_error(import_(bad, tmp_path / "empty", "--overwrite"), "'a'")
    assert list(layout(tmp_path / "empty")) == ["part-00000.parquet"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("args", "name"), [
    (["--files", "0"], "--files"),
    (["--files", "21"], "--files"),
    (["--row-group-size", "0"], "--row-group-size"),
])
def test_bad_options(tmp_path: Path, args: list[str], name: str) -> None:
    csv = write_csv(tmp_path / "in.csv", rows=20)
    one_line_error(import_(csv, tmp_path / "out", *args), name)
    assert listing(tmp_path) == {"in.csv"}


def test_interrupted_import_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a KeyboardInterrupt while writing removes the temporary folder."""
    csv = write_csv(tmp_path / "in.csv", rows=20)
    written = []

    def interrupted(self, batch):
        written.append(os.listdir(self.folder))
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.import_dataset(str(csv), tmp_path / "a" / "out")
    assert written and listing(tmp_path) == {"in.csv"}


# --------------------------------------------------------------------------- issue 10


def test_pandas_csv_export_index_is_left_out(tmp_path: Path) -> None:
    """df.to_csv writes the index as a first column with an empty header: not a feature."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": [0.5, 1.5, 2.5, 3.5], "b": [1, 2, 3, 4], "label": [0, 1, 1, 0]},
                      index=[7, 3, 9, 1])  # as after train_test_split
    df.to_csv(tmp_path / "in.csv")
    summary = convert.import_dataset(str(tmp_path / "in.csv"), tmp_path / "out")
    assert summary["columns"] == ["a", "b", "label"]
    assert summary["ignored_columns"] == [""]
    assert summary["schema"] == ("classification on 'label': 2 classes (0, 1); 2 features (a, b); "
                                 "4 rows in 1 block; ignored index column '' (--id-column "
                                 "'' makes it the sample id)")
    assert read(tmp_path / "out").column_names == ["a", "b", "label"]
    # Read back by pandas and exported again: "Unnamed: 0" and a new unnamed index.
    pd.read_csv(tmp_path / "in.csv").to_csv(tmp_path / "again.csv")
    summary = convert.import_dataset(str(tmp_path / "again.csv"), tmp_path / "again")
    assert summary["columns"] == ["a", "b", "label"]
    assert summary["ignored_columns"] == ["", "Unnamed: 0"]
    # --features may take an index column on purpose.
    summary = convert.import_dataset(str(tmp_path / "in.csv"), tmp_path / "kept",
                                     features=("", "a"))
    assert summary["columns"] == ["", "a", "label"] and summary["ignored_columns"] == []


def test_csv_string_and_bool_labels(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"x": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                       "species": ["b", "a", "c", "a", "b", "c"],
                       "flag": [True, False, True, True, False, False]})
    df.to_csv(tmp_path / "in.csv", index=False)
    summary = convert.import_dataset(str(tmp_path / "in.csv"), tmp_path / "s",
                                     target=("species",), features=("x",))
    assert summary["task"] == "classification" and summary["classes"] == ["a", "b", "c"]
    assert summary["class_type"] == "string"
    assert read(tmp_path / "s").schema.field("species").type == pa.string()
    ds = plan(DataSpec(str(tmp_path / "s"), target=("species",)))
    labels = read_block(ds, ds.blocks[0], "float64").labels
    assert [ds.classes[i] for i in labels] == ["b", "a", "c", "a", "b", "c"]

    # pandas writes bools as True/False: kept as bool, and as a feature too.
    summary = convert.import_dataset(str(tmp_path / "in.csv"), tmp_path / "f",
                                     target=("flag",), features=("x",))
    assert summary["classes"] == [False, True] and summary["class_type"] == "bool"
    assert read(tmp_path / "f").schema.field("flag").type == pa.bool_()
    convert.import_dataset(str(tmp_path / "in.csv"), tmp_path / "g", target=("x",),
                           features=("flag",), task="regression")
    assert read(tmp_path / "g").column("flag").to_pylist() == df["flag"].tolist()


def test_csv_float_labels_need_a_task(tmp_path: Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text("a,label\n1,0.0\n2,1.0\n3,1.0\n")
    with pytest.raises(DataError, match=r"'label'.*whole numbers.*--task classification"):
        convert.import_dataset(str(csv), tmp_path / "out")
    assert listing(tmp_path) == {"in.csv"}
    summary = convert.import_dataset(str(csv), tmp_path / "out", task="classification")
    assert summary["classes"] == [0, 1] and summary["class_type"] == "float64"
    summary = convert.import_dataset(str(csv), tmp_path / "reg", task="regression")
    assert summary["task"] == "regression" and "classes" not in summary


def test_csv_regression_targets_must_be_numbers(tmp_path: Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text("a,t0,t1\n1,0.5,x\n2,1.5,y\n")
    one_line_error(import_(csv, tmp_path / "out", "--target", "t0,t1"), str(csv), "'t1'",
                   "not numeric", "row 0")
    assert listing(tmp_path) == {"in.csv"}


def test_parquet_pandas_index_is_left_out(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": [0.5, 1.5, 2.5], "label": [2, 0, 2]}, index=[10, 4, 8])
    (tmp_path / "src").mkdir()
    df.to_parquet(tmp_path / "src" / "a.parquet")
    assert "__index_level_0__" in pq.read_schema(tmp_path / "src" / "a.parquet").names
    summary = convert.import_dataset(str(tmp_path / "src"), tmp_path / "out")
    assert summary["columns"] == ["a", "label"]
    assert summary["ignored_columns"] == ["__index_level_0__"]
    assert summary["classes"] == [0, 2]
    table = read(tmp_path / "out")
    # pandas' metadata is not carried over; data import's own is
    assert table.column_names == ["a", "label"] and set(table.schema.metadata) == {
        b"gradpipe.import"}


def test_interrupted_overwrite_keeps_the_old_dataset(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    csv = write_csv(tmp_path / "in.csv", rows=20)
    ok(import_(csv, tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def interrupted(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.import_dataset(str(csv), tmp_path / "out", files=2, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert listing(tmp_path) == {"in.csv", "out", "out/part-00000.parquet"}


@pytest.mark.parametrize("text,said", [
    ("a;b;label\n1;2;0\n3;4;1\n",
     ("missing target column 'label'", "seems separated by ';'", "sep=';'")),
    # the header reads as one column, then a row splits at its decimal commas
    ("a;b;label\n1,5;2,25;0\n3,5;4,0;1\n",
     ("not a readable CSV file", "seems separated by ';' with decimal commas",
      "pd.read_csv(path, sep=';', decimal=',')")),
])
def test_a_semicolon_separated_csv_is_named_as_such(tmp_path, text, said):
    from click.testing import CliRunner
    from conftest import one_line_error

    from gradpipe.cli import cli

    csv = tmp_path / "semi.csv"
    csv.write_text(text)
    r = CliRunner().invoke(cli, ["data", "import", str(csv), str(tmp_path / "out")])
    one_line_error(r, *said)
    assert not (tmp_path / "out").exists()
    # data import's --target, --task and --features are TrainConfig's: the same checks
    one_line_error(CliRunner().invoke(cli, ["data", "import", str(csv), str(tmp_path / "o"),
                                            "--task", "nope"]), "--task nope: must be one of")


def test_import_of_a_hive_partitioned_folder_says_the_key_is_not_written(tmp_path: Path):
    from conftest import write_parquet

    for store in ("a", "b"):
        write_parquet(tmp_path / "src" / f"store={store}" / "part-0.parquet",
                      {"x": np.arange(4.0), "label": np.arange(4) % 2})
    summary = convert.import_dataset(str(tmp_path / "src"), tmp_path / "out")
    assert summary["partition_keys"] == {"store": ["a", "b"]}
    assert ("partition key store in the folder names not read (store=a, store=b): every "
            "folder's rows are used") in summary["schema"]
    assert pq.read_table(tmp_path / "out").column_names == ["x", "label"]
