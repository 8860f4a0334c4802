"""gradpipe evaluate: held-out metrics against a forward pass and the textbook formulas
written here, in float64; columns selected by name; labels kept in their own type."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_classification, make_regression, one_line_error, write_parquet

from gradpipe.cli import cli
from gradpipe.data import DataSpec, plan
from gradpipe.evaluate import block_sums, class_probabilities, metrics_from_sums
from gradpipe.model import Architecture, Params
from gradpipe.outputs import model_meta, weights_table, write_table

TOL = dict(rtol=1e-12, atol=1e-12)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --- helpers shared with test_predict.py -----------------------------------------------------


class Ref:
    """A model written to weights.parquet, and the same model for the reference below."""

    def __init__(self, path: Path, arch: Architecture, params: Params, standardize,
                 target_scale, classes, features, target) -> None:
        self.path, self.arch, self.params = path, arch, params
        self.standardize, self.target_scale = standardize, target_scale
        self.classes, self.features, self.target = classes, features, target


def write_model(folder: Path, data: Path, *, hidden=(4,), activation="tanh",
                output="softmax", loss="cross_entropy", target=("label",), task="auto",
                standardize=True, target_scale=False, seed=0) -> Ref:
    """Random float64 weights (large enough for varied predictions) sized by the data, with
    the metadata training writes: features, target, task, classes, scales."""
    dataset = plan(DataSpec(str(data), target=target, task=task))
    sizes = (dataset.n_features, *hidden, dataset.n_outputs)
    arch = Architecture(sizes, activation, output, loss, "float64")
    rng = np.random.default_rng(seed)
    w = [np.empty((0, 0))] + [rng.normal(size=(sizes[l], sizes[l - 1])) for l in
                              range(1, len(sizes))]
    b = [np.empty(0)] + [rng.normal(size=sizes[l]) for l in range(1, len(sizes))]
    params = Params(w, b)
    n0 = sizes[0]
    std = (rng.normal(size=n0), rng.uniform(0.5, 2.0, size=n0)) if standardize else None
    scale = None
    if target_scale:
        scale = (rng.normal(size=sizes[-1]) * 10, rng.uniform(2.0, 5.0, size=sizes[-1]))
    path = folder / "weights.parquet"
    write_table(weights_table(arch, params, standardize=std,
                              meta=model_meta(dataset, scale)), path)
    return Ref(path, arch, params, std, scale, dataset.classes, dataset.features, target)


def read_columns(data: Path) -> pa.Table:
    """Every row of a dataset, files in path order (as gradpipe numbers them)."""
    files = sorted(data.glob("*.parquet")) if data.is_dir() else [data]
    return pa.concat_tables([pq.read_table(f) for f in files])


def features_of(table: pa.Table, ref: Ref) -> np.ndarray:
    x = np.column_stack([table.column(f).to_numpy().astype(np.float64) for f in ref.features])
    if ref.standardize is not None:
        x = (x - ref.standardize[0]) / ref.standardize[1]
    return x


def reference_outputs(ref: Ref, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a[L], z[L]) by a plain forward pass, float64."""
    g = {"tanh": np.tanh, "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
         "relu": lambda z: np.maximum(z, 0), "identity": lambda z: z}
    a, z = x, None
    for l in range(1, ref.arch.L + 1):
        z = a @ ref.params.w[l].T + ref.params.b[l]
        name = ref.arch.output_activation if l == ref.arch.L else ref.arch.activation
        if name == "softmax":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            a = e / e.sum(axis=1, keepdims=True)
        else:
            a = g[name](z)
    return a, z


def ref_labels(table: pa.Table, ref: Ref) -> np.ndarray:
    values = table.column(ref.target[0]).to_pylist()
    return np.array([ref.classes.index(v) for v in values])


def write_table_file(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=8)
    return path


def string_labelled(folder: Path, values=("cat", "dog", "emu"), rows: int = 50,
                    seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    labels = [values[i % len(values)] for i in rng.permutation(rows)]
    return write_parquet(folder / "part-0.parquet", {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2],
                                                     "label": labels}, row_group_size=8)


# --- classification ---------------------------------------------------------------------------


def test_classification_loss_accuracy_confusion_match_a_reference(tmp_path):
    data = make_classification(tmp_path / "d", rows=61, features=5, classes=3)
    ref = write_model(tmp_path / "m", data)
    result = run("evaluate", ref.path, data, "--workers", "0", "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)

    table = read_columns(data)
    a, z = reference_outputs(ref, features_of(table, ref))
    true = ref_labels(table, ref)
    lse = z.max(axis=1) + np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))
    loss = np.mean(lse - z[np.arange(len(z)), true])  # C_i = -log softmax(z)_label
    pred = a.argmax(axis=1)
    confusion = np.zeros((3, 3), dtype=int)
    for t, p in zip(true, pred, strict=True):
        confusion[t, p] += 1
    assert m["samples"] == 61
    np.testing.assert_allclose(m["loss"], loss, **TOL)
    assert m["accuracy"] == pytest.approx(np.mean(pred == true), abs=1e-15)
    assert m["confusion"] == confusion.tolist()
    assert m["classes"] == [0, 1, 2]
    assert m["mse"] is None and m["mae"] is None and m["r2"] is None and m["targets"] is None


def test_squared_loss_on_a_sigmoid_output(tmp_path):
    data = make_classification(tmp_path / "d", rows=40, classes=4)
    ref = write_model(tmp_path / "m", data, output="sigmoid", loss="squared",
                      standardize=False)
    m = json.loads(run("evaluate", ref.path, data, "--workers", "0", "--json").stdout)
    table = read_columns(data)
    a, _ = reference_outputs(ref, features_of(table, ref))
    true = ref_labels(table, ref)
    y = np.eye(4)[true]
    np.testing.assert_allclose(m["loss"], np.mean(((a - y) ** 2).sum(axis=1)), **TOL)
    assert m["accuracy"] == pytest.approx(np.mean(a.argmax(axis=1) == true), abs=1e-15)


def test_the_text_report_labels_the_confusion_matrix_with_the_class_values(tmp_path):
    data = string_labelled(tmp_path / "d")
    ref = write_model(tmp_path / "m", data)
    result = run("evaluate", ref.path, data, "--workers", "0")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["samples", "50"]
    assert lines[2].startswith("accuracy") and lines[2].endswith(
        "(always answering the most common class, 'cat': 0.3400)")
    assert lines[3].startswith("balanced accuracy")
    assert lines[4].split() == ["class", "support", "precision", "recall", "f1"]
    assert [line.split()[:2] for line in lines[5:8]] == [["cat", "17"], ["dog", "17"],
                                                         ["emu", "16"]]
    assert "rows: true class, columns: predicted" in lines[8]
    assert lines[9].split() == ["cat", "dog", "emu"]
    assert [line.split()[0] for line in lines[10:13]] == ["cat", "dog", "emu"]
    counts = np.array([[int(v) for v in line.split()[1:]] for line in lines[10:13]])
    assert counts.sum() == 50 and counts.sum(axis=1).tolist() == [17, 17, 16]
    # the schema line, on stderr, before the work
    assert result.stderr.startswith("classification on 'label': 3 classes ('cat', 'dog', 'emu')")


def test_string_and_bool_classes_come_back_in_their_own_type(tmp_path):
    data = string_labelled(tmp_path / "s")
    ref = write_model(tmp_path / "ms", data)
    m = json.loads(run("evaluate", ref.path, data, "--workers", "0", "--json").stdout)
    assert m["classes"] == ["cat", "dog", "emu"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2))
    flag = write_parquet(tmp_path / "b" / "p.parquet",
                         {"u": x[:, 0], "v": x[:, 1], "label": x[:, 0] > 0})
    ref = write_model(tmp_path / "mb", flag)
    m = json.loads(run("evaluate", ref.path, flag, "--workers", "0", "--json").stdout)
    assert m["classes"] == [False, True]
    table = read_columns(flag)
    a, _ = reference_outputs(ref, features_of(table, ref))
    assert m["accuracy"] == pytest.approx(np.mean(a.argmax(axis=1) == ref_labels(table, ref)))


def test_a_split_lacking_some_classes_is_evaluated_with_all_of_the_models(tmp_path):
    data = string_labelled(tmp_path / "d")
    ref = write_model(tmp_path / "m", data)
    table = read_columns(data)
    some = table.filter(pa.compute.not_equal(table.column("label"), "dog"))
    part = write_table_file(tmp_path / "part" / "p.parquet", some)
    m = json.loads(run("evaluate", ref.path, part, "--workers", "0", "--json").stdout)
    assert m["classes"] == ["cat", "dog", "emu"] and m["samples"] == some.num_rows
    assert m["confusion"][1] == [0, 0, 0]


def test_labels_outside_the_models_classes_are_refused(tmp_path):
    data = string_labelled(tmp_path / "d")
    ref = write_model(tmp_path / "m", data)
    other = string_labelled(tmp_path / "o", values=("cat", "dog", "fox"))
    one_line_error(run("evaluate", ref.path, other, "--workers", "0"), "'fox'", "label")


# --- regression -------------------------------------------------------------------------------


def test_regression_metrics_in_original_units_match_the_textbook(tmp_path):
    data = make_regression(tmp_path / "d", rows=43, targets=2)
    ref = write_model(tmp_path / "m", data, output="identity", loss="squared",
                      target=("t0", "t1"), target_scale=True)
    m = json.loads(run("evaluate", ref.path, data, "--workers", "0", "--json").stdout)

    table = read_columns(data)
    a, _ = reference_outputs(ref, features_of(table, ref))
    y = np.column_stack([table.column(t).to_numpy() for t in ("t0", "t1")])
    mean, std = ref.target_scale
    loss = np.mean((((y - mean) / std - a) ** 2).sum(axis=1))  # in the training units
    pred = a * std + mean
    err = pred - y
    mse, mae = (err ** 2).mean(axis=0), np.abs(err).mean(axis=0)
    r2 = 1 - (err ** 2).sum(axis=0) / ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    np.testing.assert_allclose(m["loss"], loss, **TOL)
    assert m["targets"] == ["t0", "t1"]
    for t, row in enumerate(m["per_target"]):
        assert row["target"] == f"t{t}"
        np.testing.assert_allclose([row["mse"], row["mae"], row["r2"]], [mse[t], mae[t], r2[t]],
                                   **TOL)
    np.testing.assert_allclose([m["mse"], m["mae"], m["r2"]],
                               [(err ** 2).mean(), np.abs(err).mean(), r2.mean()], **TOL)
    assert m["accuracy"] is None and m["confusion"] is None and m["classes"] is None


def test_regression_text_report(tmp_path):
    data = make_regression(tmp_path / "d")
    ref = write_model(tmp_path / "m", data, output="identity", loss="squared",
                      target=("t0", "t1"))
    lines = run("evaluate", ref.path, data, "--workers", "0", "-q").stdout.splitlines()
    assert lines[2].split() == ["target", "mse", "mae", "r2"]
    assert [line.split()[0] for line in lines[3:]] == ["t0", "t1", "(all)"]


def test_r2_of_a_far_off_mean_keeps_its_digits_and_a_constant_target_has_none():
    """SST from block-wise deviations, not sum(y^2) - sum(y)^2 / n, which loses them all."""
    arch = Architecture((1, 1), "tanh", "identity", "squared", "float64")
    params = Params([np.empty((0, 0)), np.array([[1.0]])], [np.empty(0), np.array([0.0])])
    rng = np.random.default_rng(0)
    x = 1e8 + rng.normal(size=(30, 1))
    y = x + rng.normal(size=(30, 1)) * 0.1
    parts = [block_sums(arch, params, x[i:i + 7], y[i:i + 7], classify=False, block=i // 7)
             for i in range(0, 30, 7)]
    m = metrics_from_sums(parts[::-1], targets=("y",))  # any order in: block order used
    err = x - y
    r2 = 1 - (err ** 2).sum() / ((y - y.mean()) ** 2).sum()
    np.testing.assert_allclose(m["r2"], r2, rtol=1e-9)
    const = np.full((30, 1), 5.0)
    m = metrics_from_sums([block_sums(arch, params, x, const, classify=False)])
    assert m["r2"] is None and m["per_target"][0]["r2"] is None


# --- columns, refusals ------------------------------------------------------------------------


def test_columns_in_another_order_give_the_same_result(tmp_path):
    data = make_classification(tmp_path / "d", files=1, rows=40)
    ref = write_model(tmp_path / "m", data)
    table = read_columns(data)
    shuffled = table.select(["label", "x3", "x0", "x4", "x2", "x1"])
    other = write_table_file(tmp_path / "o" / "p.parquet", shuffled)
    pq.write_table(table, data / "part-0.parquet", row_group_size=8)  # the same blocks
    a = run("evaluate", ref.path, data, "--workers", "0", "--json")
    b = run("evaluate", ref.path, other, "--workers", "0", "--json")
    assert json.loads(a.stdout) | {"data": None} == json.loads(b.stdout) | {"data": None}


def test_a_missing_feature_is_refused_by_name(tmp_path):
    data = make_classification(tmp_path / "d", files=1)
    ref = write_model(tmp_path / "m", data)
    table = read_columns(data)
    less = write_table_file(tmp_path / "o" / "p.parquet", table.drop_columns(["x1", "x3"]))
    line = one_line_error(run("evaluate", ref.path, less, "--workers", "0"), "'x1'", "'x3'")
    assert "missing feature columns" in line


def test_evaluate_needs_the_target(tmp_path):
    data = make_classification(tmp_path / "d", files=1)
    ref = write_model(tmp_path / "m", data)
    bare = write_table_file(tmp_path / "o" / "p.parquet",
                            read_columns(data).drop_columns(["label"]))
    line = one_line_error(run("evaluate", ref.path, bare, "--workers", "0"), "'label'")
    assert "gradpipe predict" in line


def test_a_missing_model_is_one_line(tmp_path):
    data = make_classification(tmp_path / "d", files=1)
    one_line_error(run("evaluate", tmp_path / "nothing", data, "--workers", "0"), "nothing")


# --- the math on its own ----------------------------------------------------------------------


def test_sigmoid_outputs_are_normalised_into_probabilities():
    arch = Architecture((2, 3), "tanh", "sigmoid", "squared", "float64")
    a = np.array([[0.2, 0.6, 0.2], [0.0, 0.0, 0.0], [0.9, 0.3, 0.3]])
    p = class_probabilities(arch, a)
    np.testing.assert_allclose(p, [[0.2, 0.6, 0.2], [1 / 3] * 3, [0.6, 0.2, 0.2]], **TOL)
    arch = Architecture((2, 3), "tanh", "identity", "squared", "float64")
    np.testing.assert_allclose(class_probabilities(arch, np.array([[-1.0, 3.0, 1.0]])),
                               [[0, 0.75, 0.25]], **TOL)


def test_train_then_evaluate_on_the_training_data(tmp_path):
    """A run of gradpipe train, evaluated on its own data, by the model's names."""
    from gradpipe.train import TrainConfig, train

    data = string_labelled(tmp_path / "d", rows=64)
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(out), workers=0, steps=30, dtype="float64",
                      hidden=(5,), standardize=True, lr=0.5))
    m = json.loads(run("evaluate", out, data, "--workers", "0", "--json").stdout)
    assert m["classes"] == ["cat", "dog", "emu"] and m["samples"] == 64
    assert sum(map(sum, m["confusion"])) == 64
    assert m["accuracy"] == pytest.approx(np.trace(np.array(m["confusion"])) / 64)


@pytest.mark.ray
def test_the_same_metrics_for_any_number_of_workers(ray_local, tmp_path):
    data = make_regression(tmp_path / "d", rows=90, targets=2)
    ref = write_model(tmp_path / "m", data, output="identity", loss="squared",
                      target=("t0", "t1"), target_scale=True)
    local = run("evaluate", ref.path, data, "--workers", "0", "--json")
    two = run("evaluate", ref.path, data, "--workers", "2", "--json")
    assert two.exit_code == 0, two.output
    assert local.stdout == two.stdout  # bitwise: the same digits printed


def test_weights_without_data_metadata_take_all_columns_but_the_target(tmp_path):
    """Older weights record no features or classes: all columns but `label`, classes 0..K-1."""
    data = make_classification(tmp_path / "d", rows=30)
    ref = write_model(tmp_path / "m", data)
    bare = tmp_path / "old" / "weights.parquet"
    write_table(weights_table(ref.arch, ref.params, standardize=ref.standardize), bare)
    new = json.loads(run("evaluate", ref.path, data, "--workers", "0", "--json").stdout)
    old = json.loads(run("evaluate", bare, data, "--workers", "0", "--json").stdout)
    assert old | {"model": None} == new | {"model": None}


def test_an_interrupted_run_has_no_final_weights_and_says_what_to_use(tmp_path):
    from gradpipe.config import TrainConfig
    from gradpipe.errors import RunInterrupted
    from gradpipe.train import train

    data = make_classification(tmp_path / "data")
    out = tmp_path / "run"

    def stop(done: int, metrics: dict) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted):
        train(TrainConfig(data=str(data), out=str(out), workers=0, hidden=(3,), steps=9,
                          checkpoint_every=2), progress=stop)
    line = one_line_error(run("evaluate", out, data, "--workers", "0"))
    assert "the run was interrupted after 3 steps and has no final weights" in line
    assert f"gradpipe train --resume --out {out}" in line
    assert line.endswith(str(out / "checkpoints" / "step-000002"))
    # which evaluates as the hint says
    result = run("evaluate", out / "checkpoints" / "step-000002", data, "--workers", "0")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_trains_saved_line_is_what_evaluate_gives_for_the_saved_weights(tmp_path, task):
    """The last step's metrics are those of the weights it started from, on its batch; the
    summary's `saved weights` line, run.json's `saved` and the --json summary's `saved` are
    those of weights.parquet over every row, and of the --val data: evaluate's numbers."""
    if task == "classification":
        data = make_classification(tmp_path / "d", rows=80, classes=3)
        val = make_classification(tmp_path / "v", rows=30, classes=3, seed=5)
    else:
        data, val = (make_regression(tmp_path / "d", rows=80, targets=2),
                     make_regression(tmp_path / "v", rows=30, targets=2, seed=5))
    out = tmp_path / "run"
    target = ["--target", "t0,t1"] if task == "regression" else []
    r = run("train", data, *target, "--val", val, "--out", out, "--workers", "0", "--steps",
            "7", "--batch", "16", "--hidden", "6", "--json", "--quiet")
    saved = json.loads(r.stdout)["saved"]
    assert json.loads((out / "run.json").read_text())["saved"] == saved
    on_train = json.loads(run("evaluate", out, data, "--workers", "0", "--json", "-q").stdout)
    on_val = json.loads(run("evaluate", out, val, "--workers", "0", "--json", "-q").stdout)
    assert saved["steps"] == 7 and saved["samples"] == on_train["samples"] == 80
    assert saved["loss"] == pytest.approx(on_train["loss"], rel=1e-12)
    assert saved["val_loss"] == pytest.approx(on_val["loss"], rel=1e-12)
    if task == "classification":
        assert saved["accuracy"] == on_train["accuracy"]
        assert saved["val_accuracy"] == on_val["accuracy"]
    else:
        assert saved["val_mse"] == pytest.approx(on_val["mse"], rel=1e-12)
    last = json.loads((out / "run.json").read_text())["final"]
    assert last["step"] == 6 and last["loss"] != saved["loss"]  # before the last update
    text = run("train", data, *target, "--out", tmp_path / "again", "--workers", "0",
               "--steps", "7", "--batch", "16", "--hidden", "6", "--quiet").stdout.splitlines()
    assert text[1].startswith("saved weights (after 7 steps, all 80 rows): loss ")


def test_class_metrics_from_the_confusion_matrix():
    from gradpipe.evaluate import class_metrics

    # rows: true 'a' (8), 'b' (2), 'c' (0 rows); columns: predicted. 'b' is never predicted.
    confusion = np.array([[7, 0, 1], [2, 0, 0], [0, 0, 0]])
    m = class_metrics(confusion, ["a", "b", "c"])
    a, b, c = m["per_class"]
    assert a == {"class": "a", "support": 8, "precision": 7 / 9, "recall": 7 / 8,
                 "f1": pytest.approx(2 * (7 / 9) * (7 / 8) / (7 / 9 + 7 / 8))}
    assert b == {"class": "b", "support": 2, "precision": None, "recall": 0.0, "f1": None}
    assert c == {"class": "c", "support": 0, "precision": 0.0, "recall": None, "f1": None}
    assert m["balanced_accuracy"] == pytest.approx((7 / 8 + 0.0) / 2)  # classes present
    assert m["majority"] == {"class": "a", "accuracy": 0.8}


def test_evaluate_json_has_the_per_class_metrics(tmp_path):
    data = make_classification(tmp_path / "d", rows=40, classes=3)
    run = CliRunner().invoke(cli, ["train", str(data), "--workers", "0", "--steps", "30",
                                   "--out", str(tmp_path / "r"), "--quiet"])
    assert run.exit_code == 0, run.output
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "r"), str(data), "--workers",
                                      "0", "--json"])
    m = json.loads(result.stdout)
    confusion = np.array(m["confusion"])
    assert [r["support"] for r in m["per_class"]] == confusion.sum(axis=1).tolist()
    recalls = np.diag(confusion) / confusion.sum(axis=1)
    assert m["balanced_accuracy"] == pytest.approx(recalls.mean())
    assert m["majority"]["accuracy"] == pytest.approx(confusion.sum(axis=1).max() / 40)


def test_evaluate_says_when_the_data_is_the_runs_own_training_data(tmp_path):
    data = make_classification(tmp_path / "d", rows=40, classes=3)
    other = make_classification(tmp_path / "o", rows=40, classes=3, seed=4)
    assert CliRunner().invoke(cli, ["train", str(data), "--workers", "0", "--steps", "3",
                                    "--out", str(tmp_path / "r"), "--quiet"]).exit_code == 0
    for path, own in ((data, True), (other, False)):
        args = ["evaluate", str(tmp_path / "r"), str(path), "--workers", "0"]
        assert json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)[
            "training_data"] is own
        said = CliRunner().invoke(cli, args).stderr.rstrip()
        assert said.endswith("; the run's own training data, not held out") is own, said
    # copies, wherever they lie: all of the files, one file, or some of them
    shutil.copytree(data, tmp_path / "copy")
    shutil.copy(data / "part-1.parquet", tmp_path / "one.parquet")
    shutil.copytree(other, tmp_path / "mixed")
    shutil.copy(data / "part-0.parquet", tmp_path / "mixed" / "part-9.parquet")
    for path, own, end in (
            ("copy", True, "; copies of the run's training files (the same bytes), not held out"),
            ("one.parquet", True, "; a copy of a training file of the run (the same bytes), not "
                                  "held out"),
            ("mixed", False, "; 1 of its 4 files is a copy of the run's training files (the same "
                             "bytes): not held out")):
        args = ["evaluate", str(tmp_path / "r"), str(tmp_path / path), "--workers", "0"]
        assert json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)[
            "training_data"] is own
        said = CliRunner().invoke(cli, args).stderr.rstrip()
        assert said.endswith(end), said


def test_copies_of_training_data_given_relative_are_found_from_another_folder(
        tmp_path, monkeypatch):
    """A run trained on DATA given relative to its folder: evaluate run elsewhere still finds
    a copy of its files, through run.json's absolute data_path."""
    monkeypatch.chdir(tmp_path)
    make_classification(tmp_path / "d", rows=40, classes=3)
    assert CliRunner().invoke(cli, ["train", "d", "--workers", "0", "--steps", "3",
                                    "--out", "r", "--quiet"]).exit_code == 0
    shutil.copytree(tmp_path / "d", tmp_path / "copy")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "r"), str(tmp_path / "copy"),
                                      "--workers", "0", "--json"])
    assert json.loads(result.stdout)["training_data"] is True
