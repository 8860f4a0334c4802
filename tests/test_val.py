"""train --val: the held-out metrics at every recorded step are those `gradpipe evaluate`
gives for the weights of that step, and every metrics row carries the columns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_classification, make_regression

from gradpipe.cli import cli
from gradpipe.evaluate import EvalConfig, evaluate
from gradpipe.recorder import read_metrics
from gradpipe.train import TrainConfig, train


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_val_metrics_are_evaluate_of_the_step_weights(tmp_path, task):
    if task == "classification":
        data = make_classification(tmp_path / "train", rows=80, seed=0)
        val = make_classification(tmp_path / "val", rows=30, seed=5)
        target, key, metric = ("label",), "val_accuracy", "accuracy"
    else:
        data = make_regression(tmp_path / "train", rows=60, seed=1)
        val = make_regression(tmp_path / "val", rows=25, seed=7)
        target, key, metric = ("t0", "t1"), "val_mse", "mse"
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), val=str(val), out=str(out), workers=0, hidden=(4,),
                      steps=6, record_every=2, checkpoint_every=2, dtype="float64",
                      target=target))
    rows = read_metrics(out).to_pylist()
    assert all("val_loss" in r and key in r for r in rows)
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [0, 2, 4, 5]
    for step in (2, 4):  # checkpoints/step-S holds w_S, the weights step S was computed at
        m = evaluate(EvalConfig(model=str(out / "checkpoints" / f"step-{step:06d}"),
                                data=str(val), workers=0))
        assert rows[step]["val_loss"] == pytest.approx(m["loss"], rel=1e-12)
        assert rows[step][key] == pytest.approx(m[metric], rel=1e-12)


def test_val_is_refused_when_its_columns_do_not_match(tmp_path):
    data = make_classification(tmp_path / "train", rows=40, features=5)
    val = make_classification(tmp_path / "val", rows=20, features=4)
    r = CliRunner().invoke(cli, ["train", str(data), "--val", str(val), "--workers", "0",
                                 "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 2 and "'x4'" in r.stderr and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"gradpipe: error: --val {val}: missing column 'x4' that the "
                               "training data has")
    assert "--features" not in r.stderr  # the training data is fine: no flag of it to check
    assert not (tmp_path / "run").exists()


def test_every_refusal_of_the_val_data_says_it_is_the_val_data(tmp_path):
    data = make_classification(tmp_path / "train", rows=40)
    no_target = make_classification(tmp_path / "v1", rows=20)
    for part in no_target.glob("*.parquet"):
        pq.write_table(pq.read_table(part).drop(["label"]), part)
    spoiled = make_classification(tmp_path / "v2", rows=20)
    table = pq.read_table(spoiled / "part-1.parquet")
    pq.write_table(table.set_column(0, "x0", pa.array([float("nan")] * table.num_rows)),
                   spoiled / "part-1.parquet")
    for val, said in ((no_target, "missing column 'label' that the training data has"),
                      (spoiled, "column 'x0' has")):
        r = CliRunner().invoke(cli, ["train", str(data), "--val", str(val), "--workers", "0",
                                     "--out", str(tmp_path / "run"), "--quiet"])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
        assert r.stderr.startswith("gradpipe: error: --val") and said in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()
