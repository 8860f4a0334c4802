"""--second-moment: gradients/ gains grad_sq = (1/N) sum_i (dC_i/dtheta)^2, checked against
per-sample gradients materialized by the naive chain rule (tests/reference.py) and by
torch.func, at 1e-9 in float64; bit for bit the same for 0 and 2 workers; read by DuckDB.
Also the metrics' noise_scale_l1..lL against their definition, on every metrics row."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_classification
from reference import naive_full_batch
from test_train import SIGMOID_RAW, gradients, load_xy

from gradpipe.cli import cli
from gradpipe.errors import ConfigError
from gradpipe.optim import weight_mask
from gradpipe.outputs import params_from_flat
from gradpipe.train import TrainConfig, train

SIZES = (5, 4, 3)  # cls_data: 5 features, 3 classes; hidden (4,)


def recorded(out) -> dict[int, dict[str, np.ndarray]]:
    """Every recorded step's value, grad and grad_sq in the gradients row order, by DuckDB."""
    rows = duckdb.sql(
        f"select step, list(value order by layer, param desc, j, k nulls first), "
        f"list(grad order by layer, param desc, j, k nulls first), "
        f"list(grad_sq order by layer, param desc, j, k nulls first) "
        f"from '{out}/gradients/*.parquet' group by step order by step").fetchall()
    return {s: {"value": np.array(v), "grad": np.array(g), "grad_sq": np.array(q)}
            for s, v, g, q in rows}


def naive_per_sample(data, value, sizes=SIZES, act=("sigmoid", "sigmoid", "squared"),
                     classes=3, target=("label",)):
    """Per-sample gradients (n, P) by the naive chain rule at the weights `value`."""
    x, y = load_xy(data, classes, target)
    p = params_from_flat(sizes, value, "float64")
    _, _, _, grads = naive_full_batch(sizes, p.w, p.b, *act, x, y)
    return grads


def test_grad_sq_is_the_mean_squared_naive_per_sample_gradient(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=3,
                      dtype="float64", lr=0.5, record_every=1, second_moment=True,
                      **SIGMOID_RAW))
    steps = recorded(out)
    assert sorted(steps) == [0, 1, 2]
    for rec in steps.values():
        grads = naive_per_sample(cls_data, rec["value"])
        np.testing.assert_allclose(rec["grad"], grads.mean(axis=0), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(rec["grad_sq"], (grads ** 2).mean(axis=0), rtol=1e-9,
                                   atol=1e-300)


def test_grad_sq_with_weight_decay_keeps_the_per_sample_variance(cls_data, tmp_path):
    out = tmp_path / "run"
    decay = 0.3
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=2,
                      dtype="float64", lr=0.5, record_every=1, second_moment=True,
                      weight_decay=decay, **SIGMOID_RAW))
    mask = weight_mask(SIZES)
    for rec in recorded(out).values():
        grads = naive_per_sample(cls_data, rec["value"])
        shifted = grads + decay * rec["value"] * mask  # the per-sample gradients of `grad`
        np.testing.assert_allclose(rec["grad"], shifted.mean(axis=0), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(rec["grad_sq"], (shifted ** 2).mean(axis=0), rtol=1e-9,
                                   atol=1e-300)
        scale = float((shifted ** 2).max())
        np.testing.assert_allclose(rec["grad_sq"] - rec["grad"] ** 2, grads.var(axis=0),
                                   rtol=1e-7, atol=1e-12 * scale)


@pytest.mark.parametrize("case", [
    dict(hidden=(5, 4), activation="relu", output="softmax", loss="cross_entropy", target=None),
    dict(hidden=(4,), activation="tanh", output="identity", loss="squared", target=("t0", "t1")),
])
def test_grad_sq_matches_torch_func(case, cls_data, reg_data, tmp_path):
    torch = pytest.importorskip("torch")
    func = pytest.importorskip("torch.func")
    data = reg_data if case["target"] else cls_data
    out = tmp_path / "g"
    train(TrainConfig(data=str(data), out=str(out), workers=0, hidden=case["hidden"],
                      activation=case["activation"], output_activation=case["output"],
                      loss=case["loss"], target=case["target"] or ("label",), dtype="float64",
                      seed=4, standardize=False, second_moment=True, update=False, steps=1))
    x, y = load_xy(data, None if case["target"] else 3, case["target"] or ("label",))
    sizes = (x.shape[1], *case["hidden"], y.shape[1])
    rec = recorded(out)[0]
    p = params_from_flat(sizes, rec["value"], "float64")
    params = [torch.tensor(t) for l in range(1, len(sizes)) for t in (p.w[l], p.b[l])]
    g = {"relu": torch.relu, "tanh": torch.tanh}[case["activation"]]

    def one(ps, xi, yi):
        a = xi
        for l in range(len(ps) // 2):
            z = a @ ps[2 * l].T + ps[2 * l + 1]
            a = g(z) if l < len(ps) // 2 - 1 else z
        if case["loss"] == "cross_entropy":
            return -(yi * torch.log_softmax(a, dim=-1)).sum()
        return ((a - yi) ** 2).sum()

    per = func.vmap(func.grad(one), in_dims=(None, 0, 0))(params, torch.tensor(x),
                                                         torch.tensor(y))
    per_flat = torch.cat([t.reshape(len(x), -1) for t in per], dim=1).numpy()  # (n, P)
    np.testing.assert_allclose(rec["grad_sq"], (per_flat ** 2).mean(axis=0), rtol=1e-9,
                               atol=1e-300)


def test_without_the_flag_there_is_no_grad_sq_and_with_it_every_recorded_step_has_it(
        cls_data, tmp_path):
    plain, second = tmp_path / "plain", tmp_path / "second"
    common = dict(data=str(cls_data), workers=0, hidden=(4,), steps=5, record_every=2)
    train(TrainConfig(out=str(plain), **common))
    train(TrainConfig(out=str(second), second_moment=True, **common))
    assert "grad_sq" not in pq.read_schema(next((plain / "gradients").iterdir())).names
    table = pq.read_table(second / "gradients")
    assert sorted(set(table.column("step").to_pylist())) == [0, 2, 4]
    assert table.column("grad_sq").null_count == 0
    assert (table.column("grad_sq").to_numpy() >= 0).all()
    # The first moment, the metrics and the weights do not change with the flag.
    assert pq.read_table(plain / "gradients").equals(table.drop(["grad_sq"]))
    assert pq.read_table(plain / "weights.parquet").equals(
        pq.read_table(second / "weights.parquet"))
    info = json.loads((second / "run.json").read_text())
    assert info["config"]["second_moment"] is True


def test_noise_scale_per_layer_matches_its_definition_on_every_row(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=3,
                      dtype="float64", lr=0.5, record_every=1, **SIGMOID_RAW))
    metrics = pq.read_table(out / "metrics").to_pylist()
    assert all({"noise_scale_l1", "noise_scale_l2"} <= set(r) for r in metrics)
    n1 = SIZES[1] * (SIZES[0] + 1)
    for row, (value, _) in zip(metrics, gradients(out).values(), strict=True):
        grads = naive_per_sample(cls_data, value)
        n = len(grads)
        for l, cols in ((1, slice(0, n1)), (2, slice(n1, None))):
            g = grads[:, cols]
            G = g.mean(axis=0)
            trace = ((g - G) ** 2).sum() / (n - 1)  # tr(Sigma_l), unbiased
            expected = trace / (G @ G - trace / n)  # B_simple of layer l alone
            assert row[f"noise_scale_l{l}"] == pytest.approx(expected, rel=1e-9)


def test_noise_scale_per_layer_is_null_where_undefined(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=2,
                      batch=1, record_every=1))
    for row in pq.read_table(out / "metrics").to_pylist():
        assert row["noise_scale"] is None and row["noise_scale_l1"] is None  # n = 1


def test_flag_on_train_and_grad_and_resume_keeps_it(cls_data, tmp_path):
    out = tmp_path / "g"
    result = CliRunner().invoke(cli, ["grad", str(cls_data), "--workers", "0", "--hidden", "3",
                                      "--second-moment", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "grad_sq" in pq.read_table(out / "gradients").column_names
    run = tmp_path / "run"
    common = dict(data=str(cls_data), workers=0, hidden=(3,), steps=2, out=str(run))
    train(TrainConfig(second_moment=True, **common))
    with pytest.raises(ConfigError, match="--second-moment"):
        train(TrainConfig(resume=True, second_moment=False, **{**common, "steps": 3}))


def test_duckdb_reads_grad_sq_and_the_variance_per_layer(reg_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(reg_data), out=str(out), target=("t0", "t1"), workers=0,
                      hidden=(4,), steps=1, update=False, dtype="float64",
                      second_moment=True, standardize=False))
    rows = duckdb.sql(
        f"select layer, sum(grad * grad) signal, sum(grad_sq - grad * grad) variance "
        f"from '{out}/gradients/*.parquet' group by layer order by layer").fetchall()
    value = recorded(out)[0]["value"]
    grads = naive_per_sample(reg_data, value, sizes=(4, 4, 2),
                             act=("sigmoid", "identity", "squared"), classes=None,
                             target=("t0", "t1"))
    n1 = 4 * 5
    for (layer, signal, variance), cols in zip(rows, (slice(0, n1), slice(n1, None)),
                                               strict=True):
        g = grads[:, cols]
        assert layer in (1, 2)
        assert signal == pytest.approx(float((g.mean(axis=0) ** 2).sum()), rel=1e-9)
        assert variance == pytest.approx(float(g.var(axis=0).sum()), rel=1e-7)


@pytest.mark.ray
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grad_sq_is_bitwise_identical_for_0_and_2_workers(ray_local, tmp_path, dtype):
    data = make_classification(tmp_path / "data", rows=300, features=6, classes=4, files=3,
                               row_group_size=25)
    tables = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train(TrainConfig(data=str(data), out=str(out), workers=workers, dtype=dtype,
                          hidden=(8, 5), steps=3, record_every=1, momentum=0.5,
                          weight_decay=0.01, second_moment=True, per_sample="norms"))
        tables[workers] = pq.read_table(out / "gradients")
    assert tables[0].column("grad_sq").null_count == 0
    assert tables[2].equals(tables[0])


def test_regression_runs_record_grad_sq_too(reg_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(reg_data), out=str(out), target=("t0", "t1"), workers=0,
                      hidden=(3,), steps=2, record_every=1, second_moment=True))
    table = pq.read_table(out / "gradients")
    sq, grad = table.column("grad_sq").to_numpy(), table.column("grad").to_numpy()
    assert np.isfinite(sq).all() and (sq >= 0).all()
    # Jensen: the mean of squares is at least the square of the mean (float32 rounding aside).
    assert (sq >= grad ** 2 * (1 - 1e-5)).all()
