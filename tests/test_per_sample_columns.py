"""Per-sample rows say what the model did: prediction, correct, confidence (classification) and
el2n = |a[L] - y|_2, against a forward pass written here from the recorded weights (and
torch where installed), at 1e-9 in float64; rows stay aligned with their samples across
chunks, pieces of full gradients and mini-batches; the class values in the metadata; the
same bits for 0 and 2 workers; read by DuckDB."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_classification, write_parquet
from test_train import gradients, load_xy

import gradpipe.backprop as backprop
from gradpipe.outputs import META_KEY, params_from_flat
from gradpipe.train import TrainConfig, train

TOL = dict(rtol=1e-9, atol=1e-12)
G = {"sigmoid": lambda z: 1 / (1 + np.exp(-z)), "tanh": np.tanh,
     "relu": lambda z: np.maximum(z, 0.0), "identity": lambda z: z}


def output_layer(sizes, value, x, activation, output) -> np.ndarray:
    """a[L] for every row, float64, by a forward pass written here (softmax with the max
    subtracted), from the flat weights of gradients/."""
    p = params_from_flat(sizes, value, "float64")
    a = x
    for l in range(1, len(sizes)):
        z = a @ p.w[l].T + p.b[l]
        if l < len(sizes) - 1:
            a = G[activation](z)
        elif output == "softmax":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            a = e / e.sum(axis=1, keepdims=True)
        else:
            a = G[output](z)
    return a


def rows_of(out: Path, step: int = 0) -> dict[str, np.ndarray]:
    """The per-sample columns of one step, ordered by sample, read by DuckDB."""
    table = duckdb.sql(f"select * exclude (step) from '{out}/per_sample/step={step}/*.parquet' "
                       "order by sample").arrow()
    if hasattr(table, "read_all"):
        table = table.read_all()
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names
            if c != "grad"}


@pytest.mark.parametrize("activation,output,loss", [
    ("tanh", "softmax", "cross_entropy"),
    ("sigmoid", "sigmoid", "squared"),
    ("relu", "identity", "squared"),  # outputs of both signs: confidence clips at 0
])
def test_classification_columns_match_a_forward_pass(activation, output, loss, cls_data,
                                                     tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=1,
                      update=False, dtype="float64", per_sample="norms", seed=2,
                      activation=activation, output_activation=output, loss=loss,
                      standardize=False))
    x, y = load_xy(cls_data, 3)
    value, _ = gradients(out)[0]
    a = output_layer((5, 4, 3), value, x, activation, output)
    got = rows_of(out)
    label = y.argmax(axis=1)
    assert list(got["sample"]) == list(range(len(x)))
    np.testing.assert_array_equal(got["label"], label)
    np.testing.assert_array_equal(got["prediction"], a.argmax(axis=1))
    np.testing.assert_array_equal(got["correct"], a.argmax(axis=1) == label)
    if output == "softmax":
        confidence = a.max(axis=1)
    else:  # evaluate.class_probabilities: clipped at 0 over the row sum, uniform if none > 0
        clipped = np.maximum(a, 0)
        total = clipped.sum(axis=1)
        confidence = np.where(total > 0, clipped.max(axis=1) / np.where(total > 0, total, 1),
                              1 / 3)
    np.testing.assert_allclose(got["confidence"], confidence, **TOL)
    np.testing.assert_allclose(got["el2n"], np.linalg.norm(a - y, axis=1), **TOL)
    schema = pq.read_schema(next((out / "per_sample" / "step=0").iterdir()))
    assert schema.field("prediction").type == pa.int64()
    assert schema.field("correct").type == pa.bool_()
    assert schema.names[-4:] == ["prediction", "correct", "confidence", "el2n"]
    # The training accuracy counts the same predictions.
    accuracy = pq.read_table(out / "metrics").column("accuracy")[0].as_py()
    assert accuracy == got["correct"].mean()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_values_computed_in_the_compute_dtype_are_written_in_it(dtype, cls_data, tmp_path):
    """grad_norm*, confidence and el2n are float32 in a float32 run (their row sums and
    probabilities are float32: float64 would only pad them), loss is float64 either way;
    and the float32 values are the float64 run's to float32 precision."""
    outs = {}
    for dt in sorted({dtype, "float64"}):
        out = tmp_path / f"run-{dt}"
        train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=1,
                          update=False, dtype=dt, per_sample="norms", seed=2))
        outs[dt] = out
    schema = pq.read_schema(next((outs[dtype] / "per_sample" / "step=0").iterdir()))
    value = pa.float32() if dtype == "float32" else pa.float64()
    for name in ("grad_norm", "grad_norm_l1", "grad_norm_l2", "confidence", "el2n"):
        assert schema.field(name).type == value, name
    assert schema.field("loss").type == pa.float64()
    assert not any(f.nullable for f in schema)  # no nulls: no definition levels to encode
    got, want = rows_of(outs[dtype]), rows_of(outs["float64"])
    for name in ("loss", "grad_norm", "grad_norm_l1", "grad_norm_l2", "confidence", "el2n"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_el2n_of_regression_is_in_the_units_training_sees(reg_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(reg_data), out=str(out), target=("t0", "t1"), workers=0,
                      hidden=(4,), steps=1, update=False, dtype="float64", per_sample="norms",
                      activation="tanh"))
    x, y = load_xy(reg_data, None, ("t0", "t1"))
    info = json.loads((out / "run.json").read_text())
    assert info["standardize"] and info["target_scale"] is not None
    xs = (x - x.mean(axis=0)) / x.std(axis=0)  # standardized features
    ys = (y - y.mean(axis=0)) / y.std(axis=0)  # and targets, as training sees them
    value, _ = gradients(out)[0]
    a = output_layer((4, 4, 2), value, xs, "tanh", "identity")
    got = rows_of(out)
    assert not {"label", "prediction", "correct", "confidence"} & set(got)
    np.testing.assert_allclose(got["el2n"], np.linalg.norm(a - ys, axis=1), **TOL)
    # For identity + squared, C_i = |a - y|^2 = el2n^2.
    np.testing.assert_allclose(got["loss"], got["el2n"] ** 2, **TOL)
    # each target's residual, target - prediction, in the targets' own units
    prediction = a * y.std(axis=0) + y.mean(axis=0)
    for t, name in enumerate(("t0", "t1")):
        np.testing.assert_allclose(got[f"residual_{name}"], y[:, t] - prediction[:, t],
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["norms", "full"])
@pytest.mark.parametrize("standardize", [True, False])
def test_a_single_targets_residual_is_target_minus_prediction(reg_data, tmp_path, mode,
                                                               standardize):
    out = tmp_path / "run"
    train(TrainConfig(data=str(reg_data), out=str(out), target=("t1",), task="regression",
                      workers=0, hidden=(4,), steps=1, update=False, dtype="float64",
                      per_sample=mode, activation="tanh", standardize=standardize))
    x, y = load_xy(reg_data, None, ("t1",))
    xs = (x - x.mean(axis=0)) / x.std(axis=0) if standardize else x
    value, _ = gradients(out)[0]
    a = output_layer((5, 4, 1), value, xs, "tanh", "identity")  # t0 is a feature here
    prediction = a * y.std(axis=0) + y.mean(axis=0) if standardize else a
    got = rows_of(out)
    assert [c for c in got if c.startswith("residual")] == ["residual"]
    np.testing.assert_allclose(got["residual"], (y - prediction)[:, 0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["full", "norms"])
def test_columns_stay_with_their_rows_across_chunks_and_pieces(mode, tmp_path, monkeypatch):
    # 9,000 rows in one block: two chunks of backprop.CHUNK_ROWS (8,192) and 808 rows, and
    # full gradients in pieces of 100 rows, which do not divide the chunks. Norms rows are
    # kept chunk by chunk (the engine reuses its arrays) and written as one row group.
    data = make_classification(tmp_path / "data", rows=9000, features=3, classes=3, files=1,
                               row_group_size=9000)
    monkeypatch.setattr(backprop, "FULL_CHUNK_BYTES", 100 * 8 * (4 * 4 + 3 * 5))
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(out), workers=0, hidden=(4,), steps=1,
                      update=False, dtype="float64", per_sample=mode, standardize=False))
    part = pq.ParquetFile(out / "per_sample" / "step=0" / "part-00000.parquet")
    assert part.metadata.num_row_groups == (91 if mode == "full" else 1)  # full: 82 + 9
    x, y = load_xy(data, 3)
    value, _ = gradients(out)[0]
    a = output_layer((3, 4, 3), value, x, "sigmoid", "softmax")
    got = rows_of(out)
    assert list(got["sample"]) == list(range(9000))
    np.testing.assert_array_equal(got["label"], y.argmax(axis=1))
    np.testing.assert_array_equal(got["prediction"], a.argmax(axis=1))
    np.testing.assert_array_equal(got["correct"], a.argmax(axis=1) == y.argmax(axis=1))
    np.testing.assert_allclose(got["confidence"], a.max(axis=1), **TOL)
    np.testing.assert_allclose(got["el2n"], np.linalg.norm(a - y, axis=1), **TOL)
    np.testing.assert_allclose(got["loss"], -np.log((a * y).sum(axis=1)), **TOL)


def test_mini_batch_rows_carry_their_own_outputs(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=1,
                      update=False, dtype="float64", per_sample="norms", batch=17,
                      standardize=False))
    x, y = load_xy(cls_data, 3)
    value, _ = gradients(out)[0]
    a = output_layer((5, 4, 3), value, x, "sigmoid", "softmax")
    got = rows_of(out)
    ids = got["sample"]
    assert len(ids) == 17
    np.testing.assert_array_equal(got["prediction"], a[ids].argmax(axis=1))
    np.testing.assert_allclose(got["el2n"], np.linalg.norm(a[ids] - y[ids], axis=1), **TOL)


def test_string_classes_are_indices_mapped_by_the_metadata(tmp_path):
    rng = np.random.default_rng(0)
    names = np.array(["cat", "ant", "bee"])
    labels = names[rng.integers(0, 3, size=40)]
    data = write_parquet(tmp_path / "data" / "part-0.parquet",
                         {"x0": rng.normal(size=40), "x1": rng.normal(size=40),
                          "label": labels}).parent
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(out), workers=0, hidden=(3,), steps=2,
                      per_sample="norms"))
    part = next((out / "per_sample" / "step=1").iterdir())
    meta = json.loads(pq.read_schema(part).metadata[META_KEY])
    assert meta == {"classes": ["ant", "bee", "cat"], "class_type": "string"}
    info = json.loads((out / "run.json").read_text())
    assert info["dataset"]["classes"] == meta["classes"]  # run.json says the same
    table = pq.read_table(part)
    classes = np.array(meta["classes"])
    assert list(classes[table.column("label").to_numpy()]) == list(labels)
    assert set(classes[table.column("prediction").to_numpy()]) <= set(names)


def test_per_sample_columns_match_torch(cls_data, tmp_path):
    torch = pytest.importorskip("torch")
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(5, 4), steps=1,
                      update=False, dtype="float64", per_sample="norms", activation="relu",
                      seed=3, standardize=False))
    x, y = load_xy(cls_data, 3)
    value, _ = gradients(out)[0]
    p = params_from_flat((5, 5, 4, 3), value, "float64")
    a = torch.tensor(x)
    for l in (1, 2, 3):
        z = a @ torch.tensor(p.w[l]).T + torch.tensor(p.b[l])
        a = torch.relu(z) if l < 3 else torch.softmax(z, dim=-1)
    probabilities = a.numpy()
    got = rows_of(out)
    np.testing.assert_array_equal(got["prediction"], probabilities.argmax(axis=1))
    np.testing.assert_allclose(got["confidence"], probabilities.max(axis=1), **TOL)
    np.testing.assert_allclose(got["el2n"], np.linalg.norm(probabilities - y, axis=1), **TOL)


@pytest.mark.ray
def test_per_sample_columns_are_bitwise_identical_for_0_and_2_workers(ray_local, tmp_path):
    data = make_classification(tmp_path / "data", rows=200, features=6, classes=4, files=3,
                               row_group_size=25)
    tables = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train(TrainConfig(data=str(data), out=str(out), workers=workers, hidden=(8,), steps=2,
                          per_sample="norms", per_sample_every=1))
        tables[workers] = [pq.read_table(out / "per_sample" / f"step={s}") for s in (0, 1)]
    assert [t.num_rows for t in tables[0]] == [200, 200]
    for got, want in zip(tables[2], tables[0], strict=True):
        assert got.equals(want)  # parts in block order: same rows, same bits
