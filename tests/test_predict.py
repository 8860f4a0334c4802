"""gradpipe predict: parts written by the workers, predictions against a forward pass written
here, labels in their own type, no target needed, and nothing left by a refused run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_classification, make_regression, one_line_error, write_parquet
from test_evaluate import (
    TOL,
    features_of,
    read_columns,
    reference_outputs,
    string_labelled,
    write_model,
    write_table_file,
)

from gradpipe.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def predict(model, data, out, *extra):
    result = run("predict", model, data, "--out", out, "--workers", "0", "--quiet", *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def read_predictions(out: Path) -> pa.Table:
    """All parts, in block order (their names), as a reader of the folder gets them."""
    return pq.read_table(out)


def test_classes_probabilities_and_confidence_match_a_reference(tmp_path):
    data = make_classification(tmp_path / "d", rows=61, features=5, classes=3)
    ref = write_model(tmp_path / "m", data)
    out = tmp_path / "p"
    result = predict(ref.path, data, out)
    assert result.stdout == "wrote 61 predictions in 9 parts to " + str(out) + "\n"
    assert sorted(p.name for p in out.iterdir()) == (
        ["_predictions.json"] + [f"part-{b:05d}.parquet" for b in range(9)])
    got = read_predictions(out)
    assert got.column_names == ["sample", "prediction", "confidence", "probabilities"]
    assert got.schema.field("prediction").type == pa.int64()

    a, _ = reference_outputs(ref, features_of(read_columns(data), ref))
    assert got.column("sample").to_pylist() == list(range(61))
    np.testing.assert_array_equal(got.column("prediction").to_numpy(), a.argmax(axis=1))
    probabilities = np.array(got.column("probabilities").to_pylist())
    np.testing.assert_allclose(probabilities, a, **TOL)
    np.testing.assert_allclose(got.column("confidence").to_numpy(), a.max(axis=1), **TOL)
    marker = json.loads((out / "_predictions.json").read_text())
    assert marker["rows"] == 61 and marker["classes"] == [0, 1, 2]


def test_predict_needs_no_target_column(tmp_path):
    data = make_classification(tmp_path / "d", files=1, rows=30)
    ref = write_model(tmp_path / "m", data)
    bare = write_table_file(tmp_path / "bare" / "p.parquet",
                            read_columns(data).drop_columns(["label"]))
    with_target = predict(ref.path, data, tmp_path / "a")
    result = run("predict", ref.path, bare, "--out", tmp_path / "b", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "'label' (not read)" in result.stderr  # the schema line says so
    assert with_target.exit_code == 0
    a, b = read_predictions(tmp_path / "a"), read_predictions(tmp_path / "b")
    assert a.drop_columns(["sample"]).equals(b.drop_columns(["sample"]))


def test_string_labels_come_back_as_strings_and_bool_as_bool(tmp_path):
    data = string_labelled(tmp_path / "s")
    ref = write_model(tmp_path / "ms", data)
    predict(ref.path, data, tmp_path / "ps")
    got = read_predictions(tmp_path / "ps")
    assert got.schema.field("prediction").type == pa.string()
    a, _ = reference_outputs(ref, features_of(read_columns(data), ref))
    assert got.column("prediction").to_pylist() == [["cat", "dog", "emu"][i]
                                                    for i in a.argmax(axis=1)]

    rng = np.random.default_rng(1)
    x = rng.normal(size=(25, 2))
    flag = write_parquet(tmp_path / "b" / "p.parquet",
                         {"u": x[:, 0], "v": x[:, 1], "label": x[:, 1] > 0})
    ref = write_model(tmp_path / "mb", flag)
    predict(ref.path, flag, tmp_path / "pb")
    got = read_predictions(tmp_path / "pb")
    assert got.schema.field("prediction").type == pa.bool_()
    a, _ = reference_outputs(ref, features_of(read_columns(flag), ref))
    assert got.column("prediction").to_pylist() == (a.argmax(axis=1) == 1).tolist()
    assert isinstance(got.to_pandas()["prediction"].iloc[0], (bool, np.bool_))


def test_a_regression_model_on_standardized_targets_predicts_in_original_units(tmp_path):
    data = make_regression(tmp_path / "d", rows=31, targets=2)
    ref = write_model(tmp_path / "m", data, output="identity", loss="squared",
                      target=("t0", "t1"), target_scale=True)
    bare = write_table_file(tmp_path / "bare" / "p.parquet",
                            read_columns(data).drop_columns(["t0", "t1"]))
    predict(ref.path, bare, tmp_path / "p")
    got = read_predictions(tmp_path / "p")
    assert got.column_names == ["sample", "t0", "t1"]
    a, _ = reference_outputs(ref, features_of(read_columns(data), ref))
    mean, std = ref.target_scale
    np.testing.assert_allclose(np.column_stack([got.column("t0"), got.column("t1")]),
                               a * std + mean, **TOL)


def test_train_standardized_regression_predicts_near_the_targets(tmp_path):
    """gradpipe train --standardize on targets far from 0: predictions in their units."""
    from gradpipe.train import TrainConfig, train

    rng = np.random.default_rng(4)
    x = rng.normal(size=(80, 3))
    y = 1000.0 + 50.0 * (x @ np.array([1.0, -2.0, 0.5]))
    data = write_parquet(tmp_path / "d" / "p.parquet",
                         {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y})
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), target=("y",), out=str(out), workers=0, steps=200,
                      dtype="float64", hidden=(), standardize=True, lr=0.1))
    predict(out, data, tmp_path / "p")
    pred = read_predictions(tmp_path / "p").column("y").to_numpy()
    assert np.abs(pred - y).max() < 0.01 * y.std()  # a linear model fits a linear target


def test_columns_in_another_order_give_the_same_predictions(tmp_path):
    data = make_classification(tmp_path / "d", files=1, rows=40)
    ref = write_model(tmp_path / "m", data)
    table = read_columns(data)
    reversed_ = table.select(table.column_names[::-1])
    other = write_table_file(tmp_path / "o" / "p.parquet", reversed_)
    pq.write_table(table, data / "part-0.parquet", row_group_size=8)
    predict(ref.path, data, tmp_path / "a")
    predict(ref.path, other, tmp_path / "b")
    assert read_predictions(tmp_path / "a").equals(read_predictions(tmp_path / "b"))


def test_a_missing_feature_is_refused_by_name_and_nothing_is_written(tmp_path):
    data = make_classification(tmp_path / "d", files=1)
    ref = write_model(tmp_path / "m", data)
    less = write_table_file(tmp_path / "o" / "p.parquet",
                            read_columns(data).drop_columns(["x2"]))
    out = tmp_path / "out" / "p"
    one_line_error(run("predict", ref.path, less, "--out", out, "--workers", "0"), "'x2'")
    assert not out.exists()


def test_a_refused_block_leaves_nothing_that_looks_complete(tmp_path):
    data = make_classification(tmp_path / "d", files=1, rows=40)
    ref = write_model(tmp_path / "m", data)
    table = read_columns(data)
    x4 = table.column("x4").to_numpy().copy()
    x4[35] = np.nan  # in the last block: the earlier parts are written first
    bad = write_table_file(tmp_path / "bad" / "p.parquet",
                           table.set_column(4, "x4", pa.array(x4)))
    out = tmp_path / "out" / "p"
    # --memory-budget 1 streams the blocks, so parts 0..3 are written before block 4 fails
    one_line_error(run("predict", ref.path, bad, "--out", out, "--workers", "0", "--quiet",
                       "--memory-budget", "1"), "'x4'")
    assert list((tmp_path / "out").iterdir()) == []  # neither --out nor a temporary


def test_an_existing_out_is_refused_unless_overwrite(tmp_path):
    data = make_classification(tmp_path / "d", files=1, rows=20)
    ref = write_model(tmp_path / "m", data)
    out = tmp_path / "p"
    predict(ref.path, data, out)
    one_line_error(run("predict", ref.path, data, "--out", out, "--workers", "0"),
                   "--overwrite")
    predict(ref.path, data, out, "--overwrite")
    assert read_predictions(out).num_rows == 20
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    one_line_error(run("predict", ref.path, data, "--out", other, "--workers", "0",
                       "--overwrite"), "not a gradpipe predictions folder")
    assert (other / "notes.txt").read_text() == "keep"


def test_out_inside_data_is_refused(tmp_path):
    data = make_classification(tmp_path / "d")
    ref = write_model(tmp_path / "m", data)
    one_line_error(run("predict", ref.path, data, "--out", data / "p", "--workers", "0"),
                   "inside DATA")
    assert not (data / "p").exists()


def test_sample_is_the_models_id_column(tmp_path):
    from gradpipe.train import TrainConfig, train

    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 2))
    ids = np.arange(1000, 1020)[::-1].copy()
    data = write_parquet(tmp_path / "d" / "p.parquet", {"row": ids, "a": x[:, 0], "b": x[:, 1],
                                                        "label": (x[:, 0] > 0).astype(int)})
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(out), workers=0, steps=2, id_column="row",
                      hidden=(3,)))
    predict(out, data, tmp_path / "p")
    assert read_predictions(tmp_path / "p").column("sample").to_pylist() == ids.tolist()
    predict(out, data, tmp_path / "q", "--id-column", "row")
    bare = write_table_file(tmp_path / "bare" / "p.parquet",
                            read_columns(data).drop_columns(["row"]))
    predict(out, bare, tmp_path / "r")  # without the id column: the global row index
    assert read_predictions(tmp_path / "r").column("sample").to_pylist() == list(range(20))


def test_json_summary(tmp_path):
    data = string_labelled(tmp_path / "d")
    ref = write_model(tmp_path / "m", data)
    result = run("predict", ref.path, data, "--out", tmp_path / "p", "--workers", "0",
                 "--json")
    assert result.exit_code == 0 and result.stderr == ""
    summary = json.loads(result.stdout)
    assert summary["rows"] == 50 and summary["classes"] == ["cat", "dog", "emu"]
    assert summary["columns"] == ["sample", "prediction", "confidence", "probabilities"]


@pytest.mark.ray
def test_predictions_are_bitwise_the_same_for_0_and_2_workers(ray_local, tmp_path):
    data = make_classification(tmp_path / "d", rows=90, files=3)
    ref = write_model(tmp_path / "m", data, activation="sigmoid")
    predict(ref.path, data, tmp_path / "local")
    result = run("predict", ref.path, data, "--out", tmp_path / "ray", "--workers", "2",
                 "--quiet")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "local").glob("part-*"))
    assert names == sorted(p.name for p in (tmp_path / "ray").glob("part-*"))
    for name in names:
        a = pq.read_table(tmp_path / "local" / name)
        b = pq.read_table(tmp_path / "ray" / name)
        assert a.equals(b)
        pa_probs = np.array(a.column("probabilities").to_pylist())
        pb_probs = np.array(b.column("probabilities").to_pylist())
        assert pa_probs.tobytes() == pb_probs.tobytes()
