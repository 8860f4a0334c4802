"""The SGD loop, run in-process (--workers 0): files, the update rule, resume, divergence."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import DIGITS, make_classification, write_parquet
from reference import naive_full_batch

from gradpipe.errors import DivergenceError
from gradpipe.outputs import params_from_flat
from gradpipe.train import TrainConfig, train


def load_xy(folder: Path, classes: int | None = None, target=("label",)):
    """All rows in gradpipe's order (files sorted by path), read independently with duckdb."""
    files = sorted(str(p) for p in folder.rglob("*.parquet"))
    table = duckdb.sql(f"select * from read_parquet({files!r})").arrow()
    if hasattr(table, "read_all"):
        table = table.read_all()
    names = [c for c in table.column_names if c not in target]
    x = np.column_stack([table.column(c).to_numpy() for c in names]).astype(np.float64)
    if classes:
        labels = table.column(target[0]).to_numpy()
        y = np.eye(classes)[labels]
    else:
        y = np.column_stack([table.column(c).to_numpy() for c in target]).astype(np.float64)
    return x, y


# The model the naive reference computes here: raw features, sigmoid output, squared loss.
SIGMOID_RAW = dict(standardize=False, output_activation="sigmoid", loss="squared")


def gradients(out: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rows = duckdb.sql(
        f"select step, list(value order by layer, param desc, j, k nulls first) v, "
        f"list(grad order by layer, param desc, j, k nulls first) g "
        f"from '{out}/gradients/*.parquet' group by step order by step").fetchall()
    return {s: (np.array(v), np.array(g)) for s, v, g in rows}


def test_gradients_file_is_in_documented_order(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=2,
                      record_every=1))
    table = pq.read_table(out / "gradients").to_pylist()
    step0 = [r for r in table if r["step"] == 0]
    keys = [(r["layer"], r["param"] == "b", r["j"], -1 if r["k"] is None else r["k"])
            for r in step0]
    assert keys == sorted(keys)
    assert all((r["k"] is None) == (r["param"] == "b") for r in step0)
    assert len(step0) == 4 * (5 + 1) + 3 * (4 + 1)


@pytest.mark.parametrize("activation,output,loss,target,classes", [
    ("sigmoid", "sigmoid", "squared", ("label",), 3),
    ("relu", "softmax", "cross_entropy", ("label",), 3),
    ("tanh", "identity", "squared", ("t0", "t1"), None),
])
def test_every_recorded_step_matches_the_naive_chain_rule(
        activation, output, loss, target, classes, cls_data, reg_data, tmp_path):
    data = cls_data if classes else reg_data
    hidden = (4, 3) if activation == "relu" else (4,)
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(out), workers=0, hidden=hidden, steps=4,
                      activation=activation, output_activation=output, loss=loss,
                      target=target, dtype="float64", lr=0.1, record_every=1, seed=3,
                      standardize=False))
    x, y = load_xy(data, classes, target)
    sizes = (x.shape[1], *hidden, y.shape[1])
    metrics = pq.read_table(out / "metrics").to_pylist()
    recorded = gradients(out)
    assert sorted(recorded) == [0, 1, 2, 3]
    for step, (value, grad) in recorded.items():
        p = params_from_flat(sizes, value, "float64")
        C, ref, _, _ = naive_full_batch(sizes, p.w, p.b, activation, output, loss, x, y)
        np.testing.assert_allclose(grad, ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(metrics[step]["loss"], C, rtol=1e-12)
        np.testing.assert_allclose(metrics[step]["grad_norm"], np.linalg.norm(ref), rtol=1e-9)


def test_weights_follow_the_sgd_rule(cls_data, tmp_path):
    out = tmp_path / "run"
    lr = 0.3
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=5,
                      dtype="float64", lr=lr, record_every=1))
    rec = gradients(out)
    for s in range(4):
        np.testing.assert_allclose(rec[s + 1][0], rec[s][0] - lr * rec[s][1], rtol=0, atol=1e-12)
    final = pq.read_table(out / "weights.parquet").column("value").to_numpy()
    np.testing.assert_allclose(final, rec[4][0] - lr * rec[4][1], rtol=0, atol=1e-12)


def test_momentum_weight_decay_and_schedule(cls_data, tmp_path):
    out = tmp_path / "run"
    lr, mu, lam, steps = 0.5, 0.9, 0.01, 6
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=steps,
                      dtype="float64", lr=lr, momentum=mu, weight_decay=lam,
                      schedule="cosine", record_every=1))
    rec = gradients(out)
    metrics = pq.read_table(out / "metrics").to_pylist()
    is_weight = duckdb.sql(f"select param = 'w' from '{out}/gradients/*.parquet' where step = 0 "
                           "order by layer, param desc, j, k nulls first").fetchnumpy()
    mask = list(is_weight.values())[0].astype(float)
    v = np.zeros_like(rec[0][0])
    for s in range(steps - 1):
        w, g = rec[s]
        # gradients.parquet's grad already includes the decay term on weights only
        lr_s = lr * 0.5 * (1 + np.cos(np.pi * s / steps))
        assert metrics[s]["lr"] == pytest.approx(lr_s, rel=1e-15)
        v = mu * v + g
        np.testing.assert_allclose(rec[s + 1][0], w - lr_s * v, atol=1e-12)
    # the decay term: grad - data gradient = lam * w on weights, 0 on biases
    plain = tmp_path / "plain"
    train(TrainConfig(data=str(cls_data), out=str(plain), workers=0, hidden=(4,), steps=1,
                      dtype="float64", update=False))
    w0, g0 = gradients(plain)[0]
    np.testing.assert_allclose(rec[0][1] - g0, lam * w0 * mask, atol=1e-15)


def test_loss_falls_and_accuracy_is_high_on_digits(tmp_path):
    out = tmp_path / "run"
    summary = train(TrainConfig(data=str(DIGITS), out=str(out), workers=0, steps=120))
    metrics = pq.read_table(out / "metrics").to_pylist()
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < 0.5 * losses[0]
    assert summary["accuracy"] > 0.85
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["dataset"]["rows"] == 1797


def test_per_sample_rows_match_the_naive_reference(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=1,
                      dtype="float64", per_sample="full", update=False, **SIGMOID_RAW))
    x, y = load_xy(cls_data, 3)
    value, _ = gradients(out)[0]
    sizes = (5, 4, 3)
    p = params_from_flat(sizes, value, "float64")
    _, _, losses, grads = naive_full_batch(sizes, p.w, p.b, "sigmoid", "sigmoid", "squared", x, y)
    rows = duckdb.sql(f"select sample, label, loss, grad_norm, grad_norm_l1, grad_norm_l2, grad "
                      f"from '{out}/per_sample/*/*.parquet' order by sample").fetchall()
    assert [r[0] for r in rows] == list(range(len(x)))
    assert [r[1] for r in rows] == list(y.argmax(axis=1))
    np.testing.assert_allclose([r[2] for r in rows], losses, rtol=1e-12)
    np.testing.assert_allclose(np.array([r[6] for r in rows]), grads, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose([r[3] for r in rows], np.linalg.norm(grads, axis=1), rtol=1e-9)
    n1 = 4 * 6
    np.testing.assert_allclose([r[4] for r in rows], np.linalg.norm(grads[:, :n1], axis=1),
                               rtol=1e-9)
    np.testing.assert_allclose([r[5] for r in rows], np.linalg.norm(grads[:, n1:], axis=1),
                               rtol=1e-9)


def test_noise_scale_matches_its_definition(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=1,
                      dtype="float64", update=False, **SIGMOID_RAW))
    x, y = load_xy(cls_data, 3)
    value, _ = gradients(out)[0]
    p = params_from_flat((5, 4, 3), value, "float64")
    _, G, _, g = naive_full_batch((5, 4, 3), p.w, p.b, "sigmoid", "sigmoid", "squared", x, y)
    n = len(g)
    trace = ((g - G) ** 2).sum() / (n - 1)
    expected = trace / ((G ** 2).sum() - trace / n)
    got = pq.read_table(out / "metrics").column("noise_scale")[0].as_py()
    assert got == pytest.approx(expected, rel=1e-9)


class Stop(Exception):
    pass


def _interrupt_at(step: int):
    def progress(done: int, metrics: dict) -> None:
        if done == step:
            raise Stop

    return progress


@pytest.mark.parametrize("batch", [None, 17])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(cls_data, tmp_path, batch):
    common = dict(data=str(cls_data), workers=0, hidden=(4,), steps=9, momentum=0.5,
                  checkpoint_every=3, record_every=2, batch=batch, per_sample="norms",
                  per_sample_every=4)
    full = tmp_path / "full"
    train(TrainConfig(out=str(full), **common))
    cut = tmp_path / "cut"
    with pytest.raises(Stop):
        train(TrainConfig(out=str(cut), **common), _interrupt_at(7))
    train(TrainConfig(out=str(cut), resume=True, **common))
    for name in ("weights.parquet", "gradients"):
        assert pq.read_table(full / name).equals(pq.read_table(cut / name)), name
    m_full = pq.read_table(full / "metrics").drop(["seconds"])
    m_cut = pq.read_table(cut / "metrics").drop(["seconds"])
    assert m_full.equals(m_cut)
    for step_dir in (full / "per_sample").iterdir():
        for part in step_dir.iterdir():
            assert pq.read_table(part).equals(pq.read_table(cut / "per_sample" / step_dir.name
                                                            / part.name))


def test_resume_refuses_changed_options(cls_data, tmp_path):
    from gradpipe.errors import ConfigError

    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=3))
    with pytest.raises(ConfigError, match="--lr"):
        train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=3,
                          lr=0.1, resume=True))


def test_minibatch_draws_the_asked_rows(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=3,
                      batch=11, per_sample="norms", per_sample_every=1))
    samples = pq.read_table(out / "metrics").column("samples").to_pylist()
    assert samples == [11, 11, 11]
    ids = [duckdb.sql(f"select list(sample order by sample) from "
                      f"'{out}/per_sample/step={s}/*.parquet'").fetchall()[0][0] for s in range(3)]
    assert all(len(set(i)) == 11 for i in ids) and ids[0] != ids[1]


def test_standardize_uses_dataset_moments(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=1,
                      standardize=True, dtype="float64", update=False))
    meta = json.loads(pq.read_schema(out / "weights.parquet").metadata[b"gradpipe"])
    x, _ = load_xy(cls_data, 3)
    np.testing.assert_allclose(meta["standardize"]["mean"], x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(meta["standardize"]["std"], x.std(axis=0), rtol=1e-12)


def test_divergence_stops_with_the_step_and_keeps_earlier_outputs(cls_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"step \d+"):
        train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=50,
                          lr=1e300, activation="identity", output_activation="identity",
                          checkpoint_every=1))
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "diverged"
    ckpts = sorted((out / "checkpoints").iterdir())
    assert ckpts, "the finite checkpoints stay"
    last = pq.read_table(ckpts[-1] / "weights.parquet").column("value").to_numpy()
    assert np.isfinite(last).all()


def test_ctrl_c_marks_the_run_interrupted_and_resume_finishes_it(cls_data, tmp_path):
    from gradpipe.errors import RunInterrupted

    common = dict(data=str(cls_data), workers=0, hidden=(4,), steps=8, checkpoint_every=2)
    out = tmp_path / "run"

    def ctrl_c(done: int, metrics: dict) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted, match="--resume"):
        train(TrainConfig(out=str(out), **common), ctrl_c)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    train(TrainConfig(out=str(out), resume=True, **common))
    full = tmp_path / "full"
    train(TrainConfig(out=str(full), **common))
    assert pq.read_table(out / "weights.parquet").equals(pq.read_table(full / "weights.parquet"))


@pytest.mark.ray
def test_the_schema_line_says_where_the_work_runs(ray_local, tmp_path: Path) -> None:
    said: dict[int, list[str]] = {0: [], 2: []}
    for workers in (0, 2):
        train(TrainConfig(data=str(DIGITS), out=str(tmp_path / f"w{workers}"), hidden=(4,),
                          steps=1, workers=workers), note=said[workers].append)
    assert said[0][0].endswith("; in-process (--workers 0)")
    assert said[2][0].endswith("; 2 Ray workers on a local instance")
    one: list[str] = []  # a dataset of one block: one worker, whatever --workers says
    data = make_classification(tmp_path / "one", rows=30, files=1, row_group_size=30)
    train(TrainConfig(data=str(data), out=str(tmp_path / "w1"), hidden=(4,), steps=1,
                      workers=2), note=one.append)
    assert one[0].endswith("; 1 Ray worker on a local instance (--workers 2, but 1 block: a "
                           "smaller --block-rows splits them)"), one[0]
    # evaluate (as predict, scores and influence) says it too: it said nothing of Ray
    from gradpipe.evaluate import EvalConfig, evaluate

    said_eval: list[str] = []
    evaluate(EvalConfig(model=str(tmp_path / "w2"), data=str(DIGITS), workers=2),
             note=said_eval.append)
    assert said_eval[0].endswith("; 2 Ray workers on a local instance; the run's own "
                                 "training data, not held out"), said_eval[0]


@pytest.mark.parametrize("flags,said", [
    # full batch: the last step's loss against the first's
    (dict(lr=300.0), "the loss did not decrease ("),
    # sampled: the first batch's loss (at the initial weights, near the data's) against the
    # saved weights' over every row; a last batch's loss alone would be noise
    (dict(lr=300.0, batch_rate=0.3), "on the batch of step 0, "),
    (dict(lr=300.0, batch=10), "over every row with the saved weights): try a smaller --lr"),
    (dict(lr=0.5, batch=10), None),
    (dict(lr=0.5), None),
])
def test_a_run_that_did_not_learn_says_so(tmp_path, flags, said):
    from gradpipe.train import TrainConfig, train

    # learnable classes (cls_data's are random: no better than the commonest is a warning)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    write_parquet(tmp_path / "d" / "a.parquet", {**{f"x{i}": x[:, i] for i in range(5)},
                                                 "label": np.argmax(x[:, :3], axis=1)})
    out = tmp_path / "run"
    summary = train(TrainConfig(data=str(tmp_path / "d"), out=str(out), workers=0, steps=30,
                                hidden=(8,), **flags))
    warnings = json.loads((out / "run.json").read_text())["warnings"]
    assert summary.get("warnings", warnings) == warnings
    if said is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and said in warnings[0], warnings


def test_a_softmax_output_on_numeric_targets_is_refused(reg_data, tmp_path):
    """--output-activation softmax makes auto's loss cross_entropy, which needs targets that
    are probability rows: other numbers trained on a meaningless loss (-36235) and said
    nothing, while --loss cross_entropy given was refused."""
    from click.testing import CliRunner
    from conftest import one_line_error

    from gradpipe.cli import cli

    for flags in (["--output-activation", "softmax"],
                  ["--output-activation", "softmax", "--loss", "cross_entropy"]):
        r = CliRunner().invoke(cli, ["train", str(reg_data), "--target", "t0,t1", *flags,
                                     "--no-standardize", "--workers", "0", "--out",
                                     str(tmp_path / "run")])
        one_line_error(r, "'t0', 't1'", "are not probabilities",
                       "leave --output-activation and --loss to auto")
        assert not (tmp_path / "run").exists()


def test_per_sample_rows_refuse_repeated_ids(tmp_path):
    """Per-sample rows, scores and influence are keyed by --id-column: repeated ids were
    accepted by train and refused only later by scores."""
    from click.testing import CliRunner
    from conftest import one_line_error, write_parquet

    from gradpipe.cli import cli

    write_parquet(tmp_path / "d" / "a.parquet",
                  {"uid": np.arange(20) // 2, "x0": np.linspace(0, 1, 20),
                   "label": np.arange(20) % 2})
    common = ["train", str(tmp_path / "d"), "--id-column", "uid", "--workers", "0",
              "--steps", "2", "-q"]
    r = CliRunner().invoke(cli, [*common, "--per-sample", "norms", "--out", str(tmp_path / "a")])
    one_line_error(r, "--id-column 'uid': id 0 is on row 0", "row 1 of",
                   "per-sample rows, scores and influence are keyed by the id")
    assert not (tmp_path / "a").exists()
    # Without per-sample rows the id is not used: the run goes on.
    assert CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "b")]).exit_code == 0


def test_a_flag_that_contradicts_the_weights_is_refused_not_ignored(cls_data, tmp_path):
    """--weights decides the model: --hidden or --no-standardize saying otherwise is refused
    (--no-standardize was ignored: the run standardized, and run.json said it did not)."""
    from click.testing import CliRunner
    from conftest import one_line_error

    from gradpipe.cli import cli

    runner = CliRunner()
    base = tmp_path / "base"
    assert runner.invoke(cli, ["train", str(cls_data), "--out", str(base), "--workers", "0",
                               "--hidden", "4", "--steps", "2", "-q"]).exit_code == 0
    common = ["train", str(cls_data), "--weights", str(base), "--workers", "0", "--steps",
              "2", "--out", str(tmp_path / "run"), "-q"]
    one_line_error(runner.invoke(cli, [*common, "--hidden", "5"]),
                   "--hidden 5 contradicts --weights", "hidden 4")
    one_line_error(runner.invoke(cli, [*common, "--no-standardize"]),
                   "--no-standardize contradicts --weights", "standardizes its features")
    assert not (tmp_path / "run").exists()
    assert runner.invoke(cli, [*common, "--hidden", "4"]).exit_code == 0  # agrees: fine


def test_probability_targets_are_not_standardized(tmp_path):
    """Soft labels (rows of probabilities) trained with softmax + cross_entropy keep their
    values: standardized, they gave a loss of -343 and predictions summing to 1.4."""
    import pandas as pd
    from click.testing import CliRunner
    from conftest import write_parquet

    from gradpipe.cli import cli
    from gradpipe.outputs import read_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    logits = x @ rng.normal(size=(3, 3))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    write_parquet(tmp_path / "d" / "a.parquet", {"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2],
                                                 "p0": p[:, 0], "p1": p[:, 1], "p2": p[:, 2]})
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(cli, ["train", str(tmp_path / "d"), "--target", "p0,p1,p2", "--loss",
                            "cross_entropy", "--output-activation", "softmax", "--workers",
                            "0", "--steps", "20", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert "cross_entropy loss, features standardized, lr" in summary["schema"]  # no targets
    assert read_model(str(out)).target_scale is None
    assert 0 < summary["saved"]["loss"] < summary["loss"] + 1  # a cross-entropy: positive
    assert runner.invoke(cli, ["predict", str(out), str(tmp_path / "d"), "--out",
                               str(tmp_path / "pred")]).exit_code == 0
    rows = pd.read_parquet(tmp_path / "pred")[["p0", "p1", "p2"]].sum(axis=1)
    np.testing.assert_allclose(rows, 1, atol=1e-6)
