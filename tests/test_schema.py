"""What a dataset means (issue 10): index columns, the task, class values, the schema line.

Datasets are written as a new user writes them: with pandas (after a split, so with an
index), polars, pyarrow, or exported as CSV. pandas and polars are not test dependencies:
their tests skip without them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_parquet

from gradpipe.data import (
    DataSpec,
    check_probability_rows,
    index_columns,
    plan,
    read_block,
    read_rows,
    schema_line,
    split_keys,
)
from gradpipe.errors import ConfigError, DataError

HINT = " (--id-column __index_level_0__ makes it the sample id)"


def labels_of(ds) -> list:
    """Every row's class value, read back through read_block's class indices."""
    out = []
    for b in ds.blocks:
        d = read_block(ds, b, "float64")
        assert d.labels is not None
        np.testing.assert_array_equal(d.y.argmax(axis=1), d.labels)
        out += [ds.classes[i] for i in d.labels]
    return out


def one_file(tmp_path: Path, columns: dict, **kwargs) -> Path:
    return write_parquet(tmp_path / "d" / "part-0.parquet", columns, **kwargs).parent


# --------------------------------------------------------------------------- index columns


def test_pandas_index_after_a_split_is_not_a_feature(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    # Sorted by class, as sklearn's wine is: the index would leak the label.
    df = pd.DataFrame({"a": np.arange(12.0), "b": np.arange(12.0) ** 2,
                       "label": np.repeat([0, 1, 2], 4)})
    train = df.sample(frac=0.75, random_state=0)  # what train_test_split leaves: a shuffled index
    (tmp_path / "d").mkdir()
    train.to_parquet(tmp_path / "d" / "train.parquet")
    assert "__index_level_0__" in pq.read_schema(tmp_path / "d" / "train.parquet").names
    ds = plan(DataSpec(str(tmp_path / "d")))
    assert ds.features == ("a", "b") and ds.ignored_columns == ("__index_level_0__",)
    assert ds.to_dict()["ignored_columns"] == ["__index_level_0__"]
    assert schema_line(ds).endswith("; ignored index column __index_level_0__" + HINT)
    _, x, _ = read_rows(ds, list(range(ds.n_rows)), "float64")
    np.testing.assert_array_equal(x, train[["a", "b"]].to_numpy())
    assert labels_of(ds) == train["label"].tolist()
    # An explicit feature list may take the index on purpose; a glob does not.
    ds = plan(DataSpec(str(tmp_path / "d"), features=("a", "__index_level_0__")))
    assert ds.features == ("a", "__index_level_0__") and ds.ignored_columns == ()
    assert plan(DataSpec(str(tmp_path / "d"), features=("*",))).features == ("a", "b")


def test_pandas_named_multi_and_range_index(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "k": [5, 9, 7], "label": [0, 1, 0]})
    # A named index is a column named in the pandas metadata (pandas stores 5, 6, 7 as a
    # range, so the values skip).
    write = {
        "named": df.set_index("k"),
        "multi": df.set_index("k", append=True).iloc[[2, 1]],  # __index_level_0__ and k
        "range": df.drop(columns="k"),  # a RangeIndex is metadata only: no column
    }
    for name, frame in write.items():
        (tmp_path / name).mkdir()
        frame.to_parquet(tmp_path / name / "part-0.parquet")
    assert plan(DataSpec(str(tmp_path / "named"))).ignored_columns == ("k",)
    ds = plan(DataSpec(str(tmp_path / "multi")))
    assert ds.features == ("a",) and set(ds.ignored_columns) == {"__index_level_0__", "k"}
    ds = plan(DataSpec(str(tmp_path / "range")))
    assert ds.features == ("a",) and ds.ignored_columns == ()
    # An index may serve as the sample id.
    ds = plan(DataSpec(str(tmp_path / "named"), id_column="k"))
    assert ds.ignored_columns == () and read_block(ds, ds.blocks[0], "float64").ids.tolist() == \
        [5, 9, 7]


def test_csv_export_index_columns(tmp_path: Path) -> None:
    # What a CSV export's index column becomes: "" (pyarrow, polars), "Unnamed: 0" (pandas),
    # "Unnamed: 0.1" once more when exported again; only leading ones are an index.
    assert index_columns(["", "a", "label"]) == [""]
    assert index_columns(["Unnamed: 0", "a"]) == ["Unnamed: 0"]
    assert index_columns(["Unnamed: 0.1", "Unnamed: 0", "a"]) == ["Unnamed: 0.1", "Unnamed: 0"]
    assert index_columns(["a", "Unnamed: 2", "__index_level_0__"]) == ["__index_level_0__"]
    assert index_columns(["a", "b"], {"index_columns": [{"kind": "range"}]}) == []
    assert index_columns(["a", "idx"], {"index_columns": ["idx"]}) == ["idx"]
    x = np.linspace(0, 1, 6)
    for first in ("", "Unnamed: 0"):
        d = one_file(tmp_path / first.replace(":", "").replace(" ", "_") / "x",
                     {first: np.arange(6), "x": x, "label": np.arange(6) % 2})
        ds = plan(DataSpec(str(d)))
        assert ds.features == ("x",) and ds.ignored_columns == (first,)


def test_pandas_csv_through_polars_and_pandas(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": [0.5, 1.5, 2.5, 3.5], "label": [1, 0, 1, 0]}, index=[9, 2, 5, 0])
    df.to_csv(tmp_path / "x.csv")
    (tmp_path / "pd").mkdir()
    pd.read_csv(tmp_path / "x.csv").to_parquet(tmp_path / "pd" / "a.parquet")
    ds = plan(DataSpec(str(tmp_path / "pd")))
    assert ds.features == ("a",) and ds.ignored_columns == ("Unnamed: 0",)
    pl = pytest.importorskip("polars")
    (tmp_path / "pl").mkdir()
    pl.read_csv(tmp_path / "x.csv").write_parquet(tmp_path / "pl" / "a.parquet")
    ds = plan(DataSpec(str(tmp_path / "pl")))
    assert ds.features == ("a",) and ds.ignored_columns == ("",)
    assert schema_line(ds).endswith("ignored index column '' (--id-column '' makes it the "
                                    "sample id)")
    ds = plan(DataSpec(str(tmp_path / "pl"), id_column=""))  # and it does
    assert ds.features == ("a",) and ds.id_column == "" and ds.ignored_columns == ()
    assert read_block(ds, ds.blocks[0], "float64").ids.tolist() == [9, 2, 5, 0]


# --------------------------------------------------------------------------- the task


def test_label_kinds_under_auto(tmp_path: Path) -> None:
    x = np.linspace(-1, 1, 6)
    cases = [  # (label column, classes, class_type)
        (pa.array([0, 1000, 0, 1000, 1000, 0]), (0, 1000), "int64"),
        (pa.array([3, -1, 3, 7, -1, 3], pa.int8()), (-1, 3, 7), "int8"),
        (pa.array([True, False, True, True, False, True]), (False, True), "bool"),
        (pa.array(["b", "a", "c", "a", "b", "c"]), ("a", "b", "c"), "string"),
        (pa.array(["b", "a", "c", "a", "b", "c"], pa.large_string()), ("a", "b", "c"), "string"),
        (pa.array(["dog", "cat", "dog", "cat", "cat", "dog"]).dictionary_encode(),
         ("cat", "dog"), "string"),
    ]
    for i, (label, classes, class_type) in enumerate(cases):
        ds = plan(DataSpec(str(one_file(tmp_path / str(i), {"x": x, "label": label}))))
        assert ds.task == "classification", label.type
        assert ds.classes == classes and ds.class_type == class_type
        assert ds.n_outputs == len(classes)
        assert labels_of(ds) == label.to_pylist()
        assert ds.to_dict()["classes"] == list(classes)
        assert ds.to_dict()["class_type"] == class_type


def test_pandas_bool_and_categorical_labels(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"x": [0.1, 0.2, 0.3, 0.4], "flag": [True, False, False, True],
                       "kind": pd.Categorical(["b", "a", "b", "a"], categories=["a", "b", "z"])})
    (tmp_path / "d").mkdir()
    df.to_parquet(tmp_path / "d" / "a.parquet")
    ds = plan(DataSpec(str(tmp_path / "d"), features=("x",), target=("flag",)))
    assert ds.classes == (False, True) and labels_of(ds) == [True, False, False, True]
    ds = plan(DataSpec(str(tmp_path / "d"), features=("x",), target=("kind",)))
    # The values present, not the declared categories: "z" has no row.
    assert ds.classes == ("a", "b") and labels_of(ds) == ["b", "a", "b", "a"]


def test_float_whole_number_labels_are_ambiguous(tmp_path: Path) -> None:
    d = one_file(tmp_path, {"x": np.arange(4.0), "label": [0.0, 1.0, 1.0, 0.0]})
    with pytest.raises(DataError) as e:
        plan(DataSpec(str(d)))
    message = str(e.value)
    assert "\n" not in message
    for part in (str(d), "'label'", "float64", "whole numbers", "--task classification",
                 "--task regression"):
        assert part in message
    ds = plan(DataSpec(str(d), task="classification"))
    assert ds.classes == (0, 1) and ds.class_type == "float64"
    assert labels_of(ds) == [0, 1, 1, 0]
    ds = plan(DataSpec(str(d), task="regression"))
    assert ds.task == "regression" and ds.n_outputs == 1 and ds.classes == ()
    # A float target with any fraction is regression under auto, refused as classes.
    d = one_file(tmp_path / "f", {"x": np.arange(4.0), "label": [0.0, 1.0, 1.5, 0.0]})
    assert plan(DataSpec(str(d))).task == "regression"
    with pytest.raises(DataError, match=r"'label' has 1\.5 at row 2, not a whole number"):
        plan(DataSpec(str(d), task="classification"))


def test_task_choices_and_refusals(tmp_path: Path) -> None:
    d = one_file(tmp_path, {"x": np.arange(4.0), "t0": np.arange(4.0) / 3, "t1": [1, 2, 3, 4],
                            "name": ["a", "b", "a", "b"], "when": pa.array([1, 2, 3, 4],
                                                                          pa.timestamp("ms"))})
    with pytest.raises(ConfigError, match="--task 'guess'"):
        plan(DataSpec(str(d), features=("x",), target=("t0",), task="guess"))
    # Several targets: regression; classification needs one.
    ds = plan(DataSpec(str(d), features=("x",), target=("t0", "t1")))
    assert ds.task == "regression" and ds.n_outputs == 2
    with pytest.raises(DataError, match="classification takes one target column"):
        plan(DataSpec(str(d), features=("x",), target=("t0", "t1"), task="classification"))
    with pytest.raises(DataError, match=r"target column 'name' is string, not numeric"):
        plan(DataSpec(str(d), features=("x",), target=("t0", "name")))
    with pytest.raises(DataError, match=r"'name' is string, not numeric; regression"):
        plan(DataSpec(str(d), features=("x",), target=("name",), task="regression"))
    with pytest.raises(DataError, match=r"'when' is timestamp\[ms\]: neither class labels"):
        plan(DataSpec(str(d), features=("x",), target=("when",)))
    # An integer target read as numbers, when asked.
    ds = plan(DataSpec(str(d), features=("x",), target=("t1",), task="regression"))
    assert ds.task == "regression"
    np.testing.assert_array_equal(read_block(ds, ds.blocks[0], "float64").y[:, 0], [1, 2, 3, 4])


def test_one_class_is_refused_by_value(tmp_path: Path) -> None:
    for label, shown in (([1, 1, 1], "(1)"), (["x", "x", "x"], "('x')"),
                         ([True, True, True], "(True)")):
        d = one_file(tmp_path / shown, {"x": [0.0, 1.0, 2.0], "label": label})
        with pytest.raises(DataError) as e:
            plan(DataSpec(str(d)))
        assert str(e.value) == (f"{d}: column 'label' has one class only {shown}; "
                                "classification needs two or more.")


# --------------------------------------------------------------------------- a model's classes


def test_model_classes_accept_a_split_lacking_some(tmp_path: Path) -> None:
    d = one_file(tmp_path, {"x": np.arange(4.0), "label": ["b", "c", "b", "c"]})
    ds = plan(DataSpec(str(d), classes=("a", "b", "c")))
    assert ds.classes == ("a", "b", "c") and ds.n_outputs == 3
    assert labels_of(ds) == ["b", "c", "b", "c"]
    np.testing.assert_array_equal(read_block(ds, ds.blocks[0], "float64").labels, [1, 2, 1, 2])
    # One class in the split is fine when the model has more.
    d = one_file(tmp_path / "one", {"x": np.arange(3.0), "label": [1000, 1000, 1000]})
    assert plan(DataSpec(str(d), classes=(0, 1000))).n_outputs == 2
    # The older form: an int K is the classes 0..K-1 (train.py passes it until it saves values).
    d = one_file(tmp_path / "k", {"x": np.arange(3.0), "label": [0, 2, 2]})
    assert plan(DataSpec(str(d), classes=5)).classes == (0, 1, 2, 3, 4)


def test_labels_outside_the_model_are_refused_by_name_and_value(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write_parquet(d / "a.parquet", {"x": np.arange(3.0), "label": [0, 1, 2]})
    f = write_parquet(d / "b.parquet", {"x": np.arange(3.0), "label": [5, 1, 4]})
    with pytest.raises(DataError) as e:
        plan(DataSpec(str(d), classes=(0, 1, 2)))
    assert str(e.value) == (f"{f}: column 'label' has labels 4, 5, not among the model's 3 "
                            "classes (0..2): a model can only be used on its own classes. If "
                            "'label' counts or measures rather than names a class, train with "
                            "--task regression.")
    # Bools are not the ints 0 and 1 here, nor strings ints.
    b = one_file(tmp_path / "b", {"x": np.arange(2.0), "label": [True, False]})
    with pytest.raises(DataError, match=r"has labels False, True, not among the model's"):
        plan(DataSpec(str(b), classes=(0, 1)))
    with pytest.raises(DataError, match=r"has labels False, True, not among .* \('a', 'b'\)"):
        plan(DataSpec(str(b), classes=("a", "b")))
    # ... but labels that would be the model's classes once converted are said to be so
    t = one_file(tmp_path / "t", {"x": np.arange(3.0), "label": ["2", "0", "2"]})
    with pytest.raises(DataError, match=r"has labels '0', '2', not among the model's 3 classes "
                       r"\(0..2\): a model can only be used on its own classes\. The labels "
                       r"here are text and the model's classes integers: convert the column to "
                       r"the model's type first \(pandas: df\['label'\]\.astype\(int\)\)\.$"):
        plan(DataSpec(str(t), classes=(0, 1, 2)))
    i = one_file(tmp_path / "i", {"x": np.arange(3.0), "label": [1, 0, 1]})
    with pytest.raises(DataError, match=r"The labels here are integers and the model's classes "
                       r"text: .*astype\(str\)"):
        plan(DataSpec(str(i), classes=("0", "1")))
    with pytest.raises(DataError) as e:  # 'x' is no class either way: no conversion to offer
        plan(DataSpec(str(one_file(tmp_path / "x", {"x": np.arange(2.0), "label": ["x", "1"]})),
                      classes=(0, 1)))
    assert "convert" not in str(e.value)


def test_read_block_refuses_a_label_outside_the_classes(tmp_path: Path) -> None:
    """Files changed after plan: read_block still maps each value, and names the row."""
    d = one_file(tmp_path, {"x": np.arange(4.0), "label": ["a", "b", "a", "b"]})
    ds = plan(DataSpec(str(d)))
    f = write_parquet(d / "part-0.parquet", {"x": np.arange(4.0), "label": ["a", "b", "q", "b"]})
    with pytest.raises(DataError) as e:
        read_block(ds, ds.blocks[0], "float64")
    assert str(e.value) == (f"{f}: column 'label' has label 'q' at row 2, not one of the 2 "
                            "classes ('a', 'b'): a model can only be used on its own classes.")


def test_class_scan_is_file_by_file_and_bounded(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import gradpipe.data as data

    monkeypatch.setattr(data, "SCAN_ROWS", 7)
    rng = np.random.default_rng(0)
    d = tmp_path / "d"
    labels = []
    for i in range(3):
        part = rng.choice([3, 10, 42], size=20)
        labels += part.tolist()
        write_parquet(d / f"p{i}.parquet", {"x": rng.normal(size=20), "label": part},
                      row_group_size=6)
    batches = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            batches.append((kwargs["columns"], batch.num_rows))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    ds = plan(DataSpec(str(d)))
    assert ds.classes == (3, 10, 42)
    assert all(cols == ["label"] and n <= 7 for cols, n in batches)
    assert sum(n for _, n in batches) == 60
    monkeypatch.undo()
    assert labels_of(ds) == labels


# --------------------------------------------------------------------------- probabilities


def test_probability_targets(tmp_path: Path) -> None:
    good = {"x": np.arange(3.0), "p0": [0.2, 1.0, 0.0], "p1": [0.8, 0.0, 1.0 - 1e-7]}
    d = one_file(tmp_path, good)
    spec = DataSpec(str(d), target=("p0", "p1"), probability_targets=True)
    ds = plan(spec)
    assert ds.probability_targets and ds.to_dict()["probability_targets"]
    assert "regression on 'p0', 'p1' (probability rows)" in schema_line(ds)
    read_block(ds, ds.blocks[0], "float32")
    # Without the flag anything finite goes; with it, a row off by more than 1e-6 is refused.
    f = write_parquet(d / "part-0.parquet", {**good, "p1": [0.8, 0.1, 1.0]})
    read_block(plan(DataSpec(str(d), target=("p0", "p1"))), ds.blocks[0], "float64")
    with pytest.raises(DataError) as e:
        read_block(plan(spec), ds.blocks[0], "float64")
    assert str(e.value).startswith(
        f"{f}: target columns 'p0', 'p1' at row 1 are not probabilities: they sum to 1.1. ")
    write_parquet(d / "part-0.parquet", {**good, "p0": [0.2, 1.5, 0.0], "p1": [0.8, -0.5, 1.0]})
    with pytest.raises(DataError, match=r"row 1 .* sum to 1 and column 'p1' is -0\.5"):
        read_block(plan(spec), ds.blocks[0], "float64")
    # The flag means nothing for classes.
    c = one_file(tmp_path / "c", {"x": np.arange(2.0), "label": [0, 1]})
    assert not plan(DataSpec(str(c), probability_targets=True)).probability_targets


def test_check_probability_rows_alone(tmp_path: Path) -> None:
    from gradpipe.data import Block

    block = Block(0, "f.parquet", 0, 0, 3, 10, 0)
    check_probability_rows(np.array([[0.5, 0.5], [1.0, 0.0], [0.3, 0.7 + 9e-7]]), ("a", "b"),
                           block)
    with pytest.raises(DataError, match=r"f\.parquet: .* at row 12 .* sum to 1\.00000201"):
        check_probability_rows(np.array([[0.5, 0.5], [1.0, 0.0], [0.3, 0.7 + 2.01e-6]]),
                               ("a", "b"), block)


# --------------------------------------------------------------------------- the schema line


def test_schema_line_and_to_dict(tmp_path: Path) -> None:
    names = ["alcohol", "malic_acid", "ash", "alcalinity", "magnesium", "phenols", "flavanoids",
             "nonflavanoid", "proanthocyanins", "color", "hue", "od280", "proline"]
    rng = np.random.default_rng(0)
    cols = {n: rng.normal(size=124) for n in names}
    cols["label"] = np.arange(124) % 3
    cols["__index_level_0__"] = rng.permutation(178)[:124]
    ds = plan(DataSpec(str(one_file(tmp_path, cols))))
    assert schema_line(ds) == (
        "classification on 'label': 3 classes (0, 1, 2); 13 features (alcohol, malic_acid, "
        "ash, ..., proline); 124 rows in 1 block; ignored index column __index_level_0__"
        + HINT)
    info = ds.to_dict()
    assert info["task"] == "classification" and info["classes"] == [0, 1, 2]
    assert info["features"] == names and info["ignored_columns"] == ["__index_level_0__"]
    assert info["n_outputs"] == 3 and info["class_type"] == "int64"

    # Many classes are abbreviated; regression names its targets; an id column is said.
    write_parquet(tmp_path / "m" / "a.parquet", {"x": np.arange(40.0), "id": np.arange(40),
                                                 "label": np.arange(40) * 10}, row_group_size=15)
    ds = plan(DataSpec(str(tmp_path / "m"), id_column="id", task="classification"))
    assert schema_line(ds) == ("classification on 'label': 40 classes (0, 10, 20, 30, 40, 50, "
                               "60, 70, 80, ..., 380, 390); 1 feature (x); 40 rows in 3 blocks; "
                               "id column id")
    write_parquet(tmp_path / "r" / "a.parquet", {"x": [1.0, 2.0], "y": [0.5, 0.25]})
    write_parquet(tmp_path / "r" / "b.parquet", {"x": [1.0, 2.0], "y": [0.5, 0.75]})
    ds = plan(DataSpec(str(tmp_path / "r"), target=("y",)))
    assert schema_line(ds) == "regression on 'y'; 1 feature (x); 4 rows in 2 blocks of 2 files"
    assert ds.to_dict()["classes"] == [] and ds.to_dict()["class_type"] is None


def test_dataspec_stays_keyword_and_position_compatible(tmp_path: Path) -> None:
    d = one_file(tmp_path, {"x": np.arange(4.0), "label": [0, 1, 2, 1]})
    spec = DataSpec(str(d), (), ("label",), None, classes=None, block_rows=2)
    assert spec.task == "auto" and not spec.probability_targets
    ds = plan(spec)
    assert len(ds.blocks) == 2 and ds.classes == (0, 1, 2)


# --- features that count the rows: an index saved as a column ------------------------------


def _counting(folder: Path, **spec) -> tuple[str, ...]:
    ds = plan(DataSpec(str(folder), **spec))
    assert ("counts the rows" in schema_line(ds)) == bool(ds.counting_columns)
    return ds.counting_columns


@pytest.mark.parametrize("start", [0, 1])
def test_a_column_of_row_numbers_is_named_on_the_schema_line(tmp_path: Path, start: int):
    rng = np.random.default_rng(0)
    for f, rows in enumerate((30, 25)):  # numbered through the dataset, row groups of 7
        first = start + (0 if f == 0 else 30)
        write_parquet(tmp_path / "d" / f"part-{f}.parquet",
                      {"row_id": np.arange(first, first + rows), "x": rng.normal(size=rows),
                       "n": rng.integers(0, 100, size=rows), "label": np.arange(rows) % 2},
                      row_group_size=7)
    assert _counting(tmp_path / "d") == ("row_id",)
    line = schema_line(plan(DataSpec(str(tmp_path / "d"))))
    assert "feature row_id counts the rows: a saved index? If so, --id-column row_id" in line
    # named as the id, it is no feature and nothing is said
    assert _counting(tmp_path / "d", id_column="row_id") == ()


def test_row_numbers_restarting_in_each_file_count_too(tmp_path: Path):
    for f in range(2):
        write_parquet(tmp_path / "d" / f"part-{f}.parquet",
                      {"i": np.arange(120), "x": np.arange(120.0) ** 2,
                       "label": np.arange(120) % 2}, row_group_size=50)
    assert _counting(tmp_path / "d") == ("i",)
    # a day's hours (0..23 in each daily file) count their file's rows, and are no index
    for f in range(3):
        write_parquet(tmp_path / "h" / f"day-{f}.parquet",
                      {"hour": np.arange(24), "x": np.arange(24.0) ** 2,
                       "label": np.arange(24) % 2})
    assert _counting(tmp_path / "h") == ()


def test_other_integer_columns_do_not_count(tmp_path: Path):
    rng = np.random.default_rng(1)
    gap = np.arange(40)
    gap[20:] += 1  # one number skipped
    write_parquet(tmp_path / "d" / "part-0.parquet",
                  {"gap": gap, "random": rng.integers(0, 40, size=40),
                   "shuffled": rng.permutation(40), "x": rng.normal(size=40),
                   "label": np.arange(40) % 2}, row_group_size=10)
    assert _counting(tmp_path / "d") == ()


def test_a_csv_with_a_named_index_imports_with_the_index_named(tmp_path: Path):
    pd = pytest.importorskip("pandas")
    from click.testing import CliRunner

    from gradpipe.cli import cli

    df = pd.DataFrame({"a": np.linspace(0, 1, 30), "label": np.arange(30) % 3})
    df.index.name = "row_id"
    df.to_csv(tmp_path / "x.csv")
    out = tmp_path / "x"
    result = CliRunner().invoke(cli, ["data", "import", str(tmp_path / "x.csv"), str(out)])
    assert result.exit_code == 0, result.output
    assert "feature row_id counts the rows" in result.output
    assert _counting(out) == ("row_id",)


def test_files_with_the_same_columns_in_another_order_are_one_dataset(tmp_path: Path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 2))
    label = np.arange(40) % 2
    write_parquet(tmp_path / "d" / "a.parquet", {"x0": x[:20, 0], "x1": x[:20, 1],
                                                  "label": label[:20]})
    write_parquet(tmp_path / "d" / "b.parquet", {"label": label[20:], "x1": x[20:, 1],
                                                  "x0": x[20:, 0]})
    ds = plan(DataSpec(str(tmp_path / "d")))
    _, got, y = read_rows(ds, list(range(40)), "float64")
    np.testing.assert_array_equal(got, x)
    # a different type is still refused, by name
    write_parquet(tmp_path / "e" / "a.parquet", {"x0": x[:20, 0], "label": label[:20]})
    write_parquet(tmp_path / "e" / "b.parquet", {"label": label[20:].astype(str),
                                                  "x0": x[20:, 0]})
    with pytest.raises(DataError, match="column 'label' is string here"):
        plan(DataSpec(str(tmp_path / "e")))


def test_a_null_in_a_whole_number_float_target_is_said_first(tmp_path: Path):
    y = np.arange(30.0) % 3
    y[17] = np.nan
    write_parquet(tmp_path / "d" / "a.parquet",
                  {"x": np.arange(30.0), "label": pa.array(y, from_pandas=True)})
    with pytest.raises(DataError, match=r"target column 'label' has 1 null value \(first at "
                                        r"row 17\)"):
        plan(DataSpec(str(tmp_path / "d")))


def test_an_integer_feature_named_like_an_id_is_said(tmp_path: Path) -> None:
    """A CSV export of a split keeps its named index (row_id: 124 of 0..177, so it counts no
    rows): it is a feature as asked, but the schema line names it."""
    rng = np.random.default_rng(0)
    cols = {"row_id": rng.permutation(178)[:124], "customer_idx": rng.permutation(300)[:124],
            "PassengerId": np.arange(124) + 5, "monkey": np.arange(124) % 4,
            "row_count": np.arange(124) % 5, "grid": np.arange(124) % 3,
            # named like ids, but 12 values over 124 rows: a pitch class, a UV index
            "key": np.arange(124) % 12, "uv_index": np.arange(124) % 11,
            "x": rng.normal(size=124), "label": np.arange(124) % 3}
    ds = plan(DataSpec(str(one_file(tmp_path, cols))))
    assert ds.id_named_columns == ("row_id", "customer_idx", "PassengerId")
    line = schema_line(ds)
    assert ("feature row_id is named like an id: if it is one, --id-column row_id makes it the "
            "sample id instead; feature customer_idx is named like an id") in line
    assert plan(DataSpec(str(one_file(tmp_path, cols)), id_column="row_id")).id_named_columns \
        == ("customer_idx", "PassengerId")


def _wine_like(tmp_path: Path, **extra) -> dict:
    rng = np.random.default_rng(0)
    return {"alcohol": rng.normal(size=12), "ash": rng.normal(size=12),
            "nonflav[a]": rng.normal(size=12), "label": np.arange(12) % 2, **extra}


def test_an_exact_column_name_wins_over_its_glob_reading(tmp_path: Path) -> None:
    # 'nonflav[a]' as a glob matches only 'nonflava'; the column is named exactly so
    write_parquet(tmp_path / "d" / "a.parquet", _wine_like(tmp_path))
    ds = plan(DataSpec(str(tmp_path / "d"), features=("nonflav[a]", "a*")))
    assert ds.features == ("nonflav[a]", "alcohol", "ash")


def test_features_can_leave_columns_out(tmp_path: Path) -> None:
    cols = _wine_like(tmp_path, region=np.array(["n", "s"] * 6),
                      when=pa.array(np.arange(12).astype("datetime64[s]")))
    write_parquet(tmp_path / "d" / "a.parquet", cols)
    path = str(tmp_path / "d")
    with pytest.raises(DataError, match=r"columns not numeric: 'region' is string, 'when' is "
                       r"timestamp\[ms\]\. Leave them out with --features '!region,!when'"):
        plan(DataSpec(path))  # both named at once, with the way out
    assert plan(DataSpec(path, features=("!region", "!when"))).features == (
        "alcohol", "ash", "nonflav[a]")
    assert plan(DataSpec(path, features=("a*", "!ash"))).features == ("alcohol",)
    with pytest.raises(DataError, match="no column of any file matches the left-out feature "
                       "'regoin'"):
        plan(DataSpec(path, features=("!region", "!when", "!regoin")))


def test_a_list_column_of_varying_length_is_said_to_need_a_fixed_size(tmp_path: Path) -> None:
    pq.write_table(pa.table({"pixels": pa.array([[0.0, 1.0], [2.0, 3.0]]),
                             "label": [0, 1]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"column 'pixels' is a list of varying length .*"
                       r"pa.list_\(pa.float64\(\), SIZE\)"):
        plan(DataSpec(str(tmp_path / "a.parquet"), features=("pixels",)))


def test_with_features_only_the_used_columns_must_agree_between_files(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "a.parquet", _wine_like(tmp_path))
    write_parquet(tmp_path / "d" / "b.parquet", _wine_like(tmp_path, new=np.ones(12)))
    path = str(tmp_path / "d")
    with pytest.raises(DataError, match="extra column 'new'.*with --features, only the "
                       "columns used"):
        plan(DataSpec(path))  # 'new' would be a feature of b.parquet alone
    assert plan(DataSpec(path, features=("alcohol", "ash"))).n_rows == 24
    assert plan(DataSpec(path, features=("!new",))).features == ("alcohol", "ash",
                                                                   "nonflav[a]")
    with pytest.raises(DataError, match=r"b.parquet: --features a\*,n\* matches other columns "
                       "here than in"):
        plan(DataSpec(path, features=("a*", "n*")))


def test_several_bool_targets_are_not_taken_as_regression_in_silence(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_parquet(tmp_path / "a.parquet", {"x": rng.normal(size=10), "malignant":
                                           np.arange(10) % 2 == 0, "big": np.arange(10) > 4,
                                           "size": rng.normal(size=10)})
    path = str(tmp_path / "a.parquet")
    with pytest.raises(DataError, match="target columns 'malignant', 'big' are bool: several "
                       "class targets at once"):
        plan(DataSpec(path, target=("malignant", "big", "size")))
    ds = plan(DataSpec(path, target=("malignant", "big"), task="regression"))
    assert ds.task == "regression" and ds.n_outputs == 2


def test_hive_partition_keys_are_named_not_missing(tmp_path: Path) -> None:
    # pandas' partition_cols: the key is in the folder names, not in the files
    for split in ("train", "test"):
        write_parquet(tmp_path / "d" / f"split={split}" / "part-0.parquet",
                      {"x": np.arange(4.0), "label": np.arange(4) % 2})
    path = str(tmp_path / "d")
    ds = plan(DataSpec(path))
    assert ds.partition_keys == (("split", ("test", "train")),)
    assert ("partition key split in the folder names not read (split=test, split=train): "
            "every folder's rows are used") in schema_line(ds)
    assert ds.to_dict()["partition_keys"] == {"split": ["test", "train"]}
    # a folder above DATA is no partition of it: all its rows have that value
    for leaf in (f"{path}/split=train", f"{path}/split=train/part-0.parquet"):
        assert plan(DataSpec(leaf)).partition_keys == ()
        assert "partition key" not in schema_line(plan(DataSpec(leaf)))
    with pytest.raises(DataError, match=r"'split' is a partition key in the folder names "
                       r"\(split=test/...\), not a column of the files"):
        plan(DataSpec(path, target=("split",)))
    with pytest.raises(DataError, match="'split' is a partition key"):
        plan(DataSpec(path, features=("x", "split")))


def test_a_partition_that_looks_like_a_split_is_warned_of_under_quiet(tmp_path: Path) -> None:
    """split=train/ and split=test/ read together trained on the test rows: a warning, which
    --quiet keeps, naming the folder to give; a key like store=a/ is only on the line."""
    from click.testing import CliRunner

    from gradpipe.cli import cli

    rng = np.random.default_rng(2)
    for key, values in (("split", ("test", "train")), ("store", ("a", "b")),
                        ("day", ("dev", "train")), ("fold", ("train",))):
        for v in values:
            x = rng.normal(size=20)
            write_parquet(tmp_path / key / f"{key}={v}" / "part-0.parquet",
                          {"x": x, "label": (x > 0).astype(int)})
        ds = plan(DataSpec(str(tmp_path / key)))
        quiet = key == "store" or len(values) == 1  # one value: nothing held out with it
        assert split_keys(ds) == ([] if quiet else [(key, values)])
        result = CliRunner().invoke(cli, ["train", str(tmp_path / key), "--steps", "20", "-q",
                                          "--out", str(tmp_path / f"run-{key}")])
        assert result.exit_code == 0, result.output
        warned = [line for line in result.stderr.splitlines() if "is partitioned by" in line]
        if quiet:
            assert warned == []
        else:
            assert warned == [
                f"gradpipe: warning: {tmp_path / key} is partitioned by {key!r} "
                f"({key}={values[0]}, {key}={values[1]}) and every folder's rows are trained on, "
                f"held-out ones included: give the training folder alone (such as "
                f"{tmp_path / key}/{key}=train)"]


def test_files_not_named_parquet_are_said_not_read(tmp_path: Path) -> None:
    """A renamed part (part-2, part-3.PARQUET) and a notes file were left out in silence:
    the schema line names them, and train warns of those that are Parquet by their bytes."""
    from click.testing import CliRunner

    from gradpipe.cli import cli

    d = tmp_path / "d"
    for i in range(3):
        x = np.arange(10.0) + i
        write_parquet(d / f"part-{i}.parquet", {"x": x, "label": (x > 5).astype(int)})
    (d / "part-2.parquet").rename(d / "part-2")
    (d / "sub").mkdir()
    (d / "sub" / "part-3.PARQUET").write_bytes((d / "part-1.parquet").read_bytes())
    (d / "notes.txt").write_text("PAR1 not really")
    (d / "_SUCCESS").write_text("")
    ds = plan(DataSpec(str(d)))
    assert ds.n_rows == 20
    assert ds.unread_files == (("notes.txt", False), ("part-2", True),
                               ("sub/part-3.PARQUET", True))
    assert ("; not read: 3 files not named *.parquet (notes.txt, part-2, sub/part-3.PARQUET)"
            in schema_line(ds))
    result = CliRunner().invoke(cli, ["train", str(d), "--steps", "2", "-q", "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (f"gradpipe: warning: 2 files in {d} are Parquet but not named *.parquet, so not "
            "read: 'part-2', 'sub/part-3.PARQUET'; rename them to read their rows"
            in result.stderr.splitlines())
    # a folder of *.parquet files alone says nothing
    assert "not read" not in schema_line(plan(DataSpec(str(tmp_path / "d" / "part-0.parquet"))))


def test_tiny_row_groups_are_said_on_the_schema_line(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", {"x": np.arange(200.0), "label": np.arange(200) % 2},
                  row_group_size=4)
    line = schema_line(plan(DataSpec(str(tmp_path / "a.parquet"))))
    assert ("200 rows in 50 blocks (about 4 rows a block: row groups this small slow every "
            "step; gradpipe data import DATA OUT rewrites them)") in line
    write_parquet(tmp_path / "b.parquet", {"x": np.arange(200.0), "label": np.arange(200) % 2},
                  row_group_size=100)
    assert "rows a block" not in schema_line(plan(DataSpec(str(tmp_path / "b.parquet"))))


def test_a_feature_named_like_a_target_is_said(tmp_path: Path) -> None:
    # scikit-learn's frame keeps 'target' when a user adds 'species' and trains on it
    write_parquet(tmp_path / "a.parquet", {"x": np.arange(30.0), "target": np.arange(30) % 3,
                                           "species": ["a", "b", "c"] * 10})
    path = str(tmp_path / "a.parquet")
    ds = plan(DataSpec(path, target=("species",)))
    assert ds.target_named_columns == ("target",)
    assert ("feature target is named like a target: if it is one, it gives the answer away "
            "(--features '!target' leaves it out)") in schema_line(ds)
    # named by the user: their choice, not said
    assert plan(DataSpec(path, target=("species",), features=("x", "target"))
                ).target_named_columns == ()
    assert plan(DataSpec(path, target=("species",), features=("!target",))).features == ("x",)


def test_integer_classes_with_gaps_are_pointed_out(tmp_path: Path) -> None:
    # a count taken as classes: 0..11 and 13, no 12; a split's 12 is then an unknown class
    labels = np.r_[np.arange(12), 13, np.arange(12), 13, np.arange(12)]
    write_parquet(tmp_path / "a.parquet", {"x": np.arange(38.0), "count": labels})
    line = schema_line(plan(DataSpec(str(tmp_path / "a.parquet"), target=("count",))))
    assert ("13 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, ..., 11, 13) with gaps (no 12): if 'count' "
            "counts or measures something, --task regression") in line
    write_parquet(tmp_path / "b.parquet", {"x": np.arange(26.0), "count": np.arange(26) % 13})
    assert "gaps" not in schema_line(plan(DataSpec(str(tmp_path / "b.parquet"),
                                                   target=("count",))))
    write_parquet(tmp_path / "c.parquet", {"x": np.arange(3.0), "count": [0, 12, 3]})
    with pytest.raises(DataError, match="has labels 12, not among the model's 13 classes .* If "
                       "'count' counts or measures rather than names a class, train with "
                       "--task regression"):
        plan(DataSpec(str(tmp_path / "c.parquet"), target=("count",),
                      task="classification", classes=tuple(range(12)) + (13,)))


def test_an_empty_file_of_null_columns_is_no_schema_to_differ_from(tmp_path: Path) -> None:
    # pandas writes an empty DataFrame's object columns as null-typed: no rows, nothing to read
    empty = pa.table({"x": pa.array([], pa.null()), "label": pa.array([], pa.null())})
    pq.write_table(empty, tmp_path / "a.parquet")
    write_parquet(tmp_path / "b.parquet", {"x": np.arange(4.0), "label": [0, 1, 0, 1]})
    pq.write_table(empty, tmp_path / "c.parquet")
    ds = plan(DataSpec(str(tmp_path)))
    assert ds.n_rows == 4 and ds.features == ("x",) and ds.classes == (0, 1)
    # a file with rows and another type is still refused, named against the reference
    write_parquet(tmp_path / "d.parquet", {"x": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DataError, match=r"d.parquet: schema differs from .*b.parquet: column "
                       "'x' is string here"):
        plan(DataSpec(str(tmp_path)))
