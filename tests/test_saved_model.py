"""What train says of the model it saved: the defaults it resolved for the task, the saved
weights' r2 (equal to evaluate's), and the warnings for a model no better than one that
ignores its inputs, or a target with nothing to learn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_classification, make_regression, write_parquet

from gradpipe.evaluate import EvalConfig, evaluate
from gradpipe.train import TrainConfig, train


def _train(data: Path, out: Path, **flags) -> tuple[dict, dict]:
    summary = train(TrainConfig(data=str(data), out=str(out), **{"workers": 0, **flags}))
    return summary, json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("make,target,lr,momentum", [
    (make_classification, ("label",), 2.0, 0.0),
    (make_regression, ("t0", "t1"), 0.05, 0.9),
])
def test_lr_and_momentum_default_by_task(tmp_path, make, target, lr, momentum):
    notes: list[str] = []
    train(TrainConfig(data=str(make(tmp_path / "d")), target=target, out=str(tmp_path / "r"),
                      workers=0, steps=2), note=notes.append)
    config = json.loads((tmp_path / "r" / "run.json").read_text())["config"]
    assert (config["lr"], config["momentum"]) == (lr, momentum)
    assert notes[0].count(f"lr {lr:g}") == 1
    assert ("momentum 0.9" in notes[0]) == bool(momentum)
    # a given momentum wins over the task's default, 0 included
    train(TrainConfig(data=str(tmp_path / "d"), target=target, out=str(tmp_path / "m"),
                      workers=0, steps=2, momentum=0.0 if momentum else 0.5))
    given = json.loads((tmp_path / "m" / "run.json").read_text())["config"]["momentum"]
    assert given == (0.0 if momentum else 0.5)


def test_saved_r2_is_evaluates_on_the_training_and_val_data(tmp_path):
    data = make_regression(tmp_path / "d", rows=80)
    val = make_regression(tmp_path / "v", rows=30, seed=5)
    summary, info = _train(data, tmp_path / "r", target=("t0", "t1"), val=str(val), steps=60)
    saved = summary["saved"]
    assert info["saved"] == saved
    on_train = evaluate(EvalConfig(model=str(tmp_path / "r"), data=str(data), workers=0))
    on_val = evaluate(EvalConfig(model=str(tmp_path / "r"), data=str(val), workers=0))
    assert saved["r2"] == pytest.approx(on_train["r2"], rel=1e-6)  # float32 sums
    assert saved["val_r2"] == pytest.approx(on_val["r2"], rel=1e-12)
    assert 0.2 < saved["r2"] < 1  # it learned something, not everything
    assert summary["val_r2"] == pytest.approx(saved["val_r2"], abs=0.05)  # the last step's


def test_each_targets_r2_is_evaluates_and_a_target_learned_nothing_of_is_said(tmp_path):
    # two targets the features explain, one pure noise: the average r2 looks fair
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1000, 3))
    write_parquet(tmp_path / "d" / "a.parquet",
                  {"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "a": x[:, 0] + 0.5 * x[:, 1],
                   "noise": rng.normal(size=1000), "b": x[:, 2] - x[:, 1]})
    summary, info = _train(tmp_path / "d", tmp_path / "r", target=("a", "noise", "b"))
    saved = summary["saved"]
    assert info["saved"] == saved
    on_train = evaluate(EvalConfig(model=str(tmp_path / "r"), data=str(tmp_path / "d"),
                                   workers=0))
    assert [t["target"] for t in saved["per_target"]] == ["a", "noise", "b"]
    for mine, theirs in zip(saved["per_target"], on_train["per_target"], strict=True):
        assert mine["r2"] == pytest.approx(theirs["r2"], rel=1e-5, abs=1e-6)  # float32 sums
    assert saved["r2"] == pytest.approx(np.mean([t["r2"] for t in saved["per_target"]]))
    by_name = {t["target"]: t["r2"] for t in saved["per_target"]}
    assert by_name["a"] > 0.9 and by_name["b"] > 0.9 and by_name["noise"] < 0.05
    assert saved["r2"] > 0.6  # the average alone would pass
    assert len(info["warnings"]) == 1, info["warnings"]
    assert (f"explain almost none of the variance of target 'noise' (r2 "
            f"{by_name['noise']:.3g}) over every row") in info["warnings"][0]
    assert f"the r2 {saved['r2']:.3g} is the average over 3 targets" in info["warnings"][0]
    # one target: no per-target list
    single, _ = _train(tmp_path / "d", tmp_path / "one", target=("a",), task="regression")
    assert "per_target" not in single["saved"] and single["saved"]["r2"] > 0.9


@pytest.mark.parametrize("target", [("t0",), ("t0", "t1")])
def test_r2_without_standardized_targets_is_evaluates(tmp_path, target):
    # --no-standardize: the loss is no longer SSE / SST; r2 comes from the output sums
    data = make_regression(tmp_path / "d", rows=80)
    summary, info = _train(data, tmp_path / "r", target=target, task="regression",
                           standardize=False, steps=40)
    saved = summary["saved"]
    on_train = evaluate(EvalConfig(model=str(tmp_path / "r"), data=str(data), workers=0))
    assert saved["r2"] == pytest.approx(on_train["r2"], rel=1e-5)
    assert ("per_target" in saved) == (len(target) > 1)
    for mine, theirs in zip(saved.get("per_target", on_train["per_target"]),
                            on_train["per_target"], strict=True):
        assert mine["r2"] == pytest.approx(theirs["r2"], rel=1e-5)
    # a step far too small: no better than the mean, said as with standardized targets
    summary, info = _train(data, tmp_path / "tiny", target=target, task="regression",
                           standardize=False, steps=5, lr=1e-6)
    assert summary["saved"]["r2"] < 0.05
    assert any("explain almost none" in w for w in info["warnings"]), info["warnings"]


def test_a_constant_target_is_named_and_has_no_r2(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    write_parquet(tmp_path / "d" / "a.parquet",
                  {"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "y": np.full(30, 0.1),
                   "z": x[:, 0] ** 2})
    for flags in ({}, {"standardize": False}):
        summary, info = _train(tmp_path / "d", tmp_path / "r", target=("z", "y"), steps=5,
                               overwrite=True, **flags)
        assert "r2" not in summary["saved"] and "per_target" not in summary["saved"]
        assert len(info["warnings"]) == 1, info["warnings"]
        assert "the target is constant ('y' is 0.1 in every row)" in info["warnings"][0]


@pytest.mark.parametrize("classify", [True, False])
def test_a_model_no_better_than_ignoring_its_inputs_is_said(tmp_path, classify):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 4))
    if classify:  # 90% one class: a model that answers it always is 90% right
        y = (x[:, 0] > 1.28).astype(np.int64)
        target, share = ("label",), f"class 0 is {np.mean(y == 0):.2%} of them"
    else:
        y = np.sin(3 * x[:, 0]) + x[:, 1]
        target, share = ("y",), "where always predicting the mean gives 0"
    write_parquet(tmp_path / "d" / "a.parquet", {**{f"x{i}": x[:, i] for i in range(4)},
                                                 target[0]: y})
    # a step far too small to move the weights
    summary, info = _train(tmp_path / "d", tmp_path / "tiny", target=target, steps=20,
                           lr=1e-6, momentum=0.0, task="auto" if classify else "regression")
    assert len(info["warnings"]) == 1 and share in info["warnings"][0], info["warnings"]
    assert "or training stopped short: more --steps or another --lr" in info["warnings"][0]
    # the defaults learn it, and say nothing
    summary, info = _train(tmp_path / "d", tmp_path / "ok", target=target,
                           task="auto" if classify else "regression")
    assert info["warnings"] == []
    assert summary["saved"]["accuracy" if classify else "r2"] > (0.95 if classify else 0.7)


def test_a_model_without_hidden_layer_is_not_described_as_one(tmp_path):
    # circles: no linear model separates them, and its convex loss stops at ln 2
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, 400)
    radius = np.where(np.arange(400) % 2 == 0, 1.0, 0.5)
    write_parquet(tmp_path / "d" / "a.parquet", {"x0": radius * np.cos(angle),
                                                 "x1": radius * np.sin(angle),
                                                 "label": np.arange(400) % 2})
    notes: list[str] = []
    train(TrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "r"), workers=0,
                      hidden=(), steps=2000), note=notes.append)
    assert "model 2-2, no hidden layer, softmax output" in notes[0]
    warnings = json.loads((tmp_path / "r" / "run.json").read_text())["warnings"]
    assert len(warnings) == 1, warnings
    assert "the best a model without a hidden layer does here; try --hidden" in warnings[0]


def test_a_column_whose_digits_the_compute_dtype_loses_is_said(tmp_path):
    # 1e8 + N(0, 1): float32 holds numbers near 1e8 in steps of 8, so the column becomes
    # one or two values (a constant, once standardized); float64 keeps it
    from gradpipe.data import DataSpec, coarse_columns, plan

    rng = np.random.default_rng(0)
    u, a = rng.normal(size=200), rng.normal(size=200)
    # not said: whole numbers below 2^24 (exact in float32), and 2,600 values over a range
    zip_code = 90001 + np.arange(200) % 29
    lon = -73.99 + np.linspace(0, 0.02, 200)
    write_parquet(tmp_path / "d" / "a.parquet", {"pos": 1e8 + u, "a": a, "y": a + 2 * u,
                                                 "t": 1.7e9 + 1e6 * u, "zip": zip_code,
                                                 "zip_float": zip_code.astype(float),
                                                 "lon": lon})
    dataset = plan(DataSpec(str(tmp_path / "d"), target=("y",)))
    assert [c[0] for c in coarse_columns(dataset, "float32")] == ["pos"]
    assert coarse_columns(dataset, "float64") == []
    assert dict((n, (lo, hi)) for n, lo, hi in dataset.ranges)["pos"] == (
        1e8 + u.min(), 1e8 + u.max())
    _, info = _train(tmp_path / "d", tmp_path / "r", target=("y",), steps=2)
    said = [w for w in info["warnings"] if "'pos'" in w]
    assert len(said) == 1 and said[0].startswith(
        f"feature 'pos' spans {1e8 + u.min():.10g} to {1e8 + u.max():.10g}, which float32 "
        "holds in steps of 8:") and said[0].endswith("or train with --dtype float64"), said
    _, info = _train(tmp_path / "d", tmp_path / "r64", target=("y",), steps=2, dtype="float64")
    assert not [w for w in info["warnings"] if "'pos'" in w]


def test_a_target_far_from_the_rest_is_said(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3))
    y = x @ np.array([1.0, -2.0, 0.5])
    y[0] += 1e4  # one row far out (more would widen the std they are measured in)
    write_parquet(tmp_path / "d" / "a.parquet", {"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2],
                                                 "y": y})
    _, info = _train(tmp_path / "d", tmp_path / "r", target=("y",), steps=5)
    far = [w for w in info["warnings"] if w.startswith("target 'y' reaches")]
    assert len(far) == 1 and "std from its mean" in far[0] and "loss_last" in far[0], far
    write_parquet(tmp_path / "e" / "a.parquet", {"x0": x[:, 0], "y": x[:, 1]})
    _, info = _train(tmp_path / "e", tmp_path / "s", target=("y",), steps=5)
    assert not [w for w in info["warnings"] if "reaches" in w]


def test_a_run_that_overfits_its_val_data_says_where_val_loss_was_lowest(tmp_path):
    # 40 noisy rows, a wide layer and many steps: the held-out loss falls, then rises
    rng = np.random.default_rng(2)
    x = rng.normal(size=(70, 6))
    y = x[:, 0] + rng.normal(size=70)
    cols = {f"x{i}": x[:, i] for i in range(6)}
    write_parquet(tmp_path / "d" / "a.parquet", {k: v[:40] for k, v in cols.items()} | {
        "y": y[:40]})
    write_parquet(tmp_path / "v" / "a.parquet", {k: v[40:] for k, v in cols.items()} | {
        "y": y[40:]})
    out = tmp_path / "r"
    summary, info = _train(tmp_path / "d", out, target=("y",), val=str(tmp_path / "v"),
                           hidden=(64,), steps=1500, checkpoint_every=20)
    import pyarrow.parquet as pq

    val = {r["step"]: r["val_loss"] for r in
           pq.read_table(out / "metrics").select(["step", "val_loss"]).to_pylist()
           if r["val_loss"] is not None}
    best = min(val, key=lambda step: (val[step], step))
    saved = summary["saved"]["val_loss"]
    assert saved > 1.25 * val[best]  # the case this is about
    near = min(range(0, 1501, 20), key=lambda s: (abs(s - best), s))
    assert val[near] < saved
    said = [w for w in info["warnings"] if w.startswith("val_loss rose")]
    assert said == [
        f"val_loss rose from {val[best]:.6g} at step {best} to {saved:.6g} with the saved "
        f"weights: they fit the training rows at the held-out rows' cost; "
        f"{out}/checkpoints/step-{near:06d} (val_loss {val[near]:.6g}) is a model evaluate "
        f"and predict take as RUN; --steps {best} stops at the lowest"], info["warnings"]
    # a checkpoint no better than the saved weights (the untrained step 0) is not offered
    _, info = _train(tmp_path / "d", tmp_path / "c", target=("y",), val=str(tmp_path / "v"),
                     hidden=(64,), steps=1500, checkpoint_every=1000)
    said = [w for w in info["warnings"] if w.startswith("val_loss rose")]
    assert len(said) == 1 and "checkpoints/" not in said[0], said
    # a sampled run's val_loss moves with its batches: not said
    _, info = _train(tmp_path / "d", tmp_path / "b", target=("y",), val=str(tmp_path / "v"),
                     hidden=(64,), steps=1500, batch=20)
    assert not [w for w in info["warnings"] if w.startswith("val_loss rose")]


def test_val_data_that_is_the_training_data_is_said(tmp_path):
    data = make_regression(tmp_path / "d", rows=30)
    _, info = _train(data, tmp_path / "r", target=("t0", "t1"), val=str(data), steps=3)
    assert f"--val {data} is the training data itself: its val_* metrics are not held out" in (
        info["warnings"])
    # copies elsewhere, of the folder or of one of its files: the same bytes, other paths
    data = make_classification(tmp_path / "c", rows=60, files=3)
    shutil.copytree(data, tmp_path / "copy")
    (tmp_path / "some").mkdir()
    shutil.copy(data / "part-1.parquet", tmp_path / "some" / "a.parquet")
    other = make_classification(tmp_path / "o", rows=30, files=1, seed=9)
    shutil.copy(other / "part-0.parquet", tmp_path / "some" / "b.parquet")
    for val, said in ((tmp_path / "copy", "all 3 of its files are copies of training files"),
                      (tmp_path / "copy" / "part-2.parquet", "it is a copy of a training file"),
                      (tmp_path / "some", "1 of its 2 files is a copy of training files"),
                      (other, None)):
        _, info = _train(data, tmp_path / "v", val=str(val), steps=2, overwrite=True)
        shown = [w for w in info["warnings"] if w.startswith(f"--val {val}")]
        assert shown == ([] if said is None else [
            f"--val {val}: {said} (the same bytes): its val_* metrics are not held out"]), shown


@pytest.mark.ray
def test_each_targets_r2_has_the_same_bits_on_2_ray_workers(ray_local, tmp_path):
    data = make_regression(tmp_path / "d", rows=90, targets=3)  # row groups of 9: 10 blocks
    runs = [_train(data, tmp_path / f"w{w}", target=("t0", "t1", "t2"), steps=20, workers=w,
                   block_rows=9)[0]["saved"] for w in (0, 2)]
    assert len(runs[0]["per_target"]) == 3
    assert runs[0]["per_target"] == runs[1]["per_target"]
