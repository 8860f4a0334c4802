"""train --val: the held-out metrics at every recorded step are those `gradpipe evaluate`
gives for the weights of that step, and every metrics row carries the columns."""

from __future__ import annotations

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
    assert not (tmp_path / "run").exists()
