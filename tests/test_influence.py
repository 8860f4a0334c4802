"""gradpipe influence: TracIn-CP by ghost dot products against the explicit computation from
materialised per-sample gradients (the naive per-weight chain rule of reference.py, and
torch.func where installed) at 1e-9 in float64; top K with ties by sample id from any split;
the same bits for 0 and 2 workers; bad input refused in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_classification, one_line_error, overriding, write_parquet
from reference import naive_full_batch
from test_train import load_xy

from gradpipe import influence as influence_module
from gradpipe.backprop import deltas, per_sample_grads
from gradpipe.cli import cli
from gradpipe.influence import Ranked, ghost_add, ghost_factors, merge, select, tile_candidates
from gradpipe.model import Architecture, forward, init_params
from gradpipe.outputs import read_model, read_weights
from gradpipe.recorder import read_metrics

TOL = dict(rtol=1e-9, atol=1e-12)
CLASSES = 3


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def train(data: Path, out: Path, *extra, workers: int = 0) -> Path:
    result = run("train", data, *overriding([
                 "--workers", workers, "--dtype", "float64", "--hidden", "4",
                 "--activation", "tanh", "--steps", "11", "--lr", "1.5", "--seed", "2",
                 "--checkpoint-every", "4", "--schedule", "cosine", "--out", out, "--quiet"],
                 extra))
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def influence(run_dir: Path, test: Path, out: Path, *extra) -> dict:
    result = run("influence", run_dir, "--test", test, "--out", out, "--workers", "0",
                 "--json", *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def naive(arch, params, x, y):
    return naive_full_batch(arch.sizes, params.w, params.b, arch.activation,
                            arch.output_activation, arch.loss, x, y)[3]


def torch_grads(arch, params, x, y):
    torch = pytest.importorskip("torch")
    func = pytest.importorskip("torch.func")
    assert arch.activation == "tanh"
    theta = [torch.tensor(v) for l in range(1, arch.L + 1) for v in (params.w[l], params.b[l])]

    def loss(theta, xi, yi):
        a = xi
        for l in range(arch.L):
            z = theta[2 * l] @ a + theta[2 * l + 1]
            if l < arch.L - 1:
                a = torch.tanh(z)
            elif arch.loss == "cross_entropy":
                return -(yi * torch.log_softmax(z, -1)).sum()
            else:
                return ((z - yi) ** 2).sum()

    g = func.vmap(func.grad(loss), in_dims=(None, 0, 0))(theta, torch.tensor(x),
                                                         torch.tensor(y))
    return torch.cat([gi.reshape(len(x), -1) for gi in g], dim=1).numpy()


def explicit(run_dir: Path, train_data: Path, test: Path, grads, target=None) -> np.ndarray:
    """sum over checkpoints S of eta_S G_train(w_S) G_test(w_S)^T from materialised per-sample
    gradients; eta_S the lr of step S (of step S-1 for the checkpoint after the last step)."""
    model = read_model(run_dir)
    classes = None if target else CLASSES
    target = target or ("label",)
    xs, ys = [], []
    for data in (train_data, test):
        x, y = load_xy(data, classes=classes, target=target)
        x = (x - model.standardize[0]) / model.standardize[1]
        if model.target_scale is not None:
            y = (y - model.target_scale[0]) / model.target_scale[1]
        xs.append(x)
        ys.append(y)
    lr = dict(zip(*read_metrics(run_dir).select(["step", "lr"]).to_pydict().values(),
                  strict=True))
    total = np.zeros((len(xs[0]), len(xs[1])))
    for folder in sorted((run_dir / "checkpoints").iterdir()):
        step = int(folder.name.split("-")[1])
        arch, params, _, _ = read_weights(folder / "weights.parquet")
        eta = lr.get(step, lr.get(step - 1))
        total += eta * grads(arch, params, xs[0], ys[0]) @ grads(arch, params, xs[1], ys[1]).T
    return total


def expected_rows(m: np.ndarray, k: int) -> list[tuple]:
    """(test, kind, rank, train) by sorting every column: the definition of the top K."""
    rows = []
    for j in range(m.shape[1]):
        pro = sorted((-m[i, j], i) for i in range(m.shape[0]) if m[i, j] > 0)[:k]
        con = sorted((m[i, j], i) for i in range(m.shape[0]) if m[i, j] < 0)[:k]
        rows += [(j, "proponent", r + 1, i) for r, (_, i) in enumerate(pro)]
        rows += [(j, "opponent", r + 1, i) for r, (_, i) in enumerate(con)]
    return rows


def check_against(table, m: np.ndarray, k: int) -> None:
    assert table.column_names == ["test_sample", "kind", "rank", "train_sample", "influence"]
    got = list(zip(*[table.column(c).to_pylist() for c in table.column_names[:4]],
                   strict=True))
    assert got == expected_rows(m, k)
    values = table.column("influence").to_numpy()
    want = m[table.column("train_sample").to_numpy(), table.column("test_sample").to_numpy()]
    np.testing.assert_allclose(values, want, **TOL)


@pytest.mark.parametrize("grads", [naive, torch_grads], ids=["naive", "torch.func"])
def test_influence_matches_materialised_gradients(tmp_path, grads):
    data = make_classification(tmp_path / "d", rows=40, features=4, classes=CLASSES)
    test = make_classification(tmp_path / "t", rows=9, features=4, classes=CLASSES, files=1,
                               seed=5)
    out = train(data, tmp_path / "run")
    summary = influence(out, test, tmp_path / "i.parquet", "--top", "4")
    assert summary["checkpoints"] == [0, 4, 8, 11]  # the last, after step 10, takes its lr
    lr = read_metrics(out).column("lr").to_pylist()
    assert summary["lr"] == [lr[0], lr[4], lr[8], lr[10]]
    m = explicit(out, data, test, grads)
    check_against(pq.read_table(tmp_path / "i.parquet"), m, 4)


def test_small_tiles_give_the_same_rows(tmp_path, monkeypatch):
    """Training rows in chunks of 3, test rows in blocks of 4: every merge path runs."""
    data = make_classification(tmp_path / "d", rows=40, features=4, classes=CLASSES)
    test = make_classification(tmp_path / "t", rows=11, features=4, classes=CLASSES, files=2,
                               seed=5)
    out = train(data, tmp_path / "run")
    monkeypatch.setattr(influence_module, "TRAIN_ROWS", 3)
    monkeypatch.setattr(influence_module, "TEST_ROWS", 4)
    influence(out, test, tmp_path / "i.parquet", "--top", "5")
    check_against(pq.read_table(tmp_path / "i.parquet"), explicit(out, data, test, naive), 5)


def test_regression_uses_the_targets_as_training_scaled_them(tmp_path, reg_data):
    test = tmp_path / "t"
    rng = np.random.default_rng(7)
    write_parquet(test / "part-0.parquet", {**{f"x{d}": rng.normal(size=6) for d in range(4)},
                         "t0": rng.normal(size=6), "t1": rng.normal(size=6)})
    out = train(reg_data, tmp_path / "run", "--target", "t0,t1")
    assert read_model(out).target_scale is not None
    influence(out, test, tmp_path / "i.parquet", "--top", "3")
    m = explicit(out, reg_data, test, naive, target=("t0", "t1"))
    check_against(pq.read_table(tmp_path / "i.parquet"), m, 3)
    m_torch = explicit(out, reg_data, test, torch_grads, target=("t0", "t1"))
    np.testing.assert_allclose(m, m_torch, **TOL)


@pytest.mark.parametrize("activation,output,loss", [
    ("sigmoid", "sigmoid", "squared"), ("relu", "softmax", "cross_entropy"),
    ("tanh", "identity", "squared")])
def test_ghost_dot_products_equal_the_product_of_per_sample_gradients(activation, output, loss):
    arch = Architecture((5, 7, 6, 3), activation, output, loss, "float64")
    params = init_params(arch, 1)
    rng = np.random.default_rng(0)
    x, x2 = rng.normal(size=(13, 5)), rng.normal(size=(8, 5))
    y = np.eye(3)[rng.integers(0, 3, 13)]
    y2 = np.eye(3)[rng.integers(0, 3, 8)]
    got = ghost_add(ghost_factors(arch, params, x, y), ghost_factors(arch, params, x2, y2, 0.7),
                    np.zeros((13, 8)))

    def grads(x, y):
        a, z = forward(arch, params, x)
        return per_sample_grads(deltas(arch, params, a, z, y), a)

    np.testing.assert_allclose(got, 0.7 * grads(x, y) @ grads(x2, y2).T, rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(got, 0.7 * naive(arch, params, x, y) @ naive(arch, params, x2,
                                                                             y2).T, **TOL)


def test_top_k_is_the_same_from_any_split_ties_by_training_id():
    rng = np.random.default_rng(3)
    values = rng.integers(-3, 4, size=(30, 6)).astype(float)  # many ties, some zeros
    train_ids = rng.permutation(100)[:30]
    test_ids = np.arange(6) * 10
    for kind, sign in (("proponent", 1), ("opponent", -1)):
        want = []
        for j in range(6):
            col = sorted((-sign * values[i, j], train_ids[i]) for i in range(30)
                         if sign * values[i, j] > 0)[:4]
            want += [(test_ids[j], t, -sign * v) for v, t in col]
        for cuts in ([30], [1, 29], [7, 7, 16], [3] * 10):
            parts, start = [], 0
            for c in cuts:
                rows = slice(start, start + c)
                parts.append(tile_candidates(values[rows], train_ids[rows], test_ids, 4)[
                    0 if kind == "proponent" else 1])
                start += c
            got = merge(parts[::-1], 4, kind)
            assert list(zip(got.test, got.train, got.value, strict=True)) == want, (kind, cuts)


def test_running_floors_keep_the_exact_top_k():
    """As a worker does: tile after tile, each against the k-th found so far."""
    from gradpipe.influence import floors

    rng = np.random.default_rng(4)
    values = rng.integers(-4, 5, size=(40, 7)).astype(float)
    train_ids, test_ids = np.arange(40) * 3 + 1, np.array([9, 3, 5, 0, 1, 2, 4])
    for cut in (1, 2, 5, 13):
        pro, opp = Ranked.empty(), Ranked.empty()
        for start in range(0, 40, cut):
            rows = slice(start, start + cut)
            floor = (floors(pro, test_ids, 3, "proponent"), floors(opp, test_ids, 3, "opponent"))
            p, o = tile_candidates(values[rows], train_ids[rows], test_ids, 3, floor)
            pro, opp = merge([pro, p], 3, "proponent"), merge([opp, o], 3, "opponent")
        want_pro = merge([tile_candidates(values, train_ids, test_ids, 3)[0]], 3, "proponent")
        want_opp = merge([tile_candidates(values, train_ids, test_ids, 3)[1]], 3, "opponent")
        for got, want in ((pro, want_pro), (opp, want_opp)):
            assert got.test.tolist() == want.test.tolist()
            assert got.train.tolist() == want.train.tolist()
            assert got.value.tolist() == want.value.tolist()


def test_select_leaves_out_zero_and_nan():
    r = select(np.array([0, 0, 0, 1]), np.array([1, 2, 3, 4]), np.array([0.0, np.nan, 1, -1]),
               5, "proponent")
    assert (r.test.tolist(), r.train.tolist()) == ([0], [3])
    assert len(merge([Ranked.empty()], 3, "opponent")) == 0


@pytest.mark.ray
def test_influence_is_bitwise_the_same_for_0_and_2_workers(ray_local, tmp_path):
    data = make_classification(tmp_path / "d", rows=40, features=4, classes=CLASSES)
    test = make_classification(tmp_path / "t", rows=9, features=4, classes=CLASSES, files=1,
                               seed=5)
    out = train(data, tmp_path / "run", "--dtype", "float32")
    a = run("influence", out, "--test", test, "--out", tmp_path / "a.parquet", "--workers",
            "0", "--top", "6", "--quiet")
    b = run("influence", out, "--test", test, "--out", tmp_path / "b.parquet", "--workers",
            "2", "--top", "6", "--quiet")
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    ta, tb = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert ta.num_rows > 9 * 6
    assert ta.equals(tb)


def test_output_text_and_ordering(tmp_path):
    data = make_classification(tmp_path / "d", rows=40, features=4, classes=CLASSES)
    test = make_classification(tmp_path / "t", rows=9, features=4, classes=CLASSES, files=1,
                               seed=5)
    out = train(data, tmp_path / "run")
    result = run("influence", out, "--test", test, "--out", tmp_path / "i.parquet",
                 "--workers", "0", "--top", "2", "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
    table = pq.read_table(tmp_path / "i.parquet")
    assert result.stdout == (f"wrote {table.num_rows} rows (top 2 proponents and opponents of "
                             f"9 test samples among 40 training samples, 4 checkpoints) to "
                             f"{tmp_path / 'i.parquet'}\n")
    keys = list(zip(table.column("test_sample").to_pylist(), table.column("kind").to_pylist(),
                    table.column("rank").to_pylist(), strict=True))
    assert keys == sorted(keys, key=lambda k: (k[0], k[1] != "proponent", k[2]))


def test_influence_of_a_private_run_warns_that_it_is_not_private(tmp_path):
    data = make_classification(tmp_path / "d", rows=40, features=4, classes=CLASSES)
    test = make_classification(tmp_path / "t", rows=9, features=4, classes=CLASSES, files=1,
                               seed=5)
    out = train(data, tmp_path / "run", "--no-standardize", "--dp-clip", "1", "--dp-noise",
                "1", "--batch-rate", "0.5", "--dp-delta", "1e-3")
    result = run("influence", out, "--test", test, "--out", tmp_path / "i.parquet",
                 "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr == (f"gradpipe: warning: {out} is a private run, but influence values "
                             "are exact functions of its training rows, not covered by its "
                             "epsilon: keep them as private as the data\n")
    assert influence(out, test, tmp_path / "j.parquet")["private_run"] is True
    assert influence(train(data, tmp_path / "plain"), test, tmp_path / "k.parquet")[
        "private_run"] is False


def test_bad_input_is_refused_in_one_line(tmp_path):
    data = make_classification(tmp_path / "d", rows=40, features=4, classes=CLASSES)
    test = make_classification(tmp_path / "t", rows=9, features=4, classes=CLASSES, files=1,
                               seed=5)
    out = train(data, tmp_path / "run")
    i = tmp_path / "i.parquet"

    def refused(*args, names=()):
        one_line_error(run("influence", *args, "--workers", "0", "--quiet"), *names)
        assert not i.exists()

    # a test set whose features do not match the model
    bad = tmp_path / "bad.parquet"
    t = pq.read_table(test / "part-0.parquet").rename_columns(["x0", "x1", "x2", "z", "label"])
    pq.write_table(t, bad)
    refused(out, "--test", bad, "--out", i, names=("'x3'", str(bad)))
    # labels outside the model's classes
    labels = tmp_path / "labels.parquet"
    write_parquet(labels, {**{f"x{d}": np.zeros(3) for d in range(4)}, "label": [0, 1, 7]})
    refused(out, "--test", labels, "--out", i, names=(str(labels), "7"))
    # test sample ids that repeat
    repeat = tmp_path / "repeat.parquet"
    write_parquet(repeat, {**{f"x{d}": np.zeros(3) for d in range(4)}, "label": [0, 1, 2],
                           "id": [5, 6, 5]})
    refused(out, "--test", repeat, "--out", i, "--id-column", "id",
            names=(str(repeat), "ids repeat"))
    # a run without checkpoints, and a gradient-only run
    g = tmp_path / "g"
    assert run("grad", data, "--workers", "0", "--out", g).exit_code == 0
    refused(g, "--test", test, "--out", i, names=("not a training run",))
    bare = train(data, tmp_path / "bare")
    for p in sorted((bare / "checkpoints").rglob("state.json")):
        p.unlink()
    refused(bare, "--test", test, "--out", i, names=("no complete checkpoints",))
    # the output inside the training data; an existing output
    refused(out, "--test", test, "--out", data / "i.parquet", names=("inside DATA",))
    i.write_bytes(b"x")
    one_line_error(run("influence", out, "--test", test, "--out", i, "--workers", "0"),
                   "--overwrite")
    i.unlink()
    # a folder as --out, existing or named with a slash: influence writes one file
    (tmp_path / "folder").mkdir()
    for folder in (tmp_path / "folder", f"{tmp_path / 'new'}/"):
        one_line_error(run("influence", out, "--test", test, "--out", folder, "--workers", "0",
                           "--overwrite"), "a folder; influence writes one Parquet file")
        assert not (tmp_path / "new").exists() and not list((tmp_path / "folder").iterdir())
    # --overwrite replaces an influence file only: never the run's own model or a checkpoint
    model = (out / "weights.parquet").read_bytes()
    for own in (out / "weights.parquet",
                next((out / "checkpoints").iterdir()) / "weights.parquet"):
        before = own.read_bytes()
        one_line_error(run("influence", out, "--test", test, "--out", own, "--workers", "0",
                           "--overwrite"), "is not an influence file", "refusing to replace it")
        assert own.read_bytes() == before
    assert (out / "weights.parquet").read_bytes() == model
    # a run without final weights: resume it (influence takes no checkpoint as RUN)
    stopped = train(data, tmp_path / "stopped")
    (stopped / "weights.parquet").unlink()
    info = json.loads((stopped / "run.json").read_text())
    (stopped / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    line = one_line_error(run("influence", stopped, "--test", test, "--out", i, "--workers", "0"),
                          "has no final weights; resume it")
    assert "checkpoint" not in line
    # the training data changed since the run
    part = data / "part-1.parquet"
    os.utime(part, (1, 1))
    refused(out, "--test", test, "--out", i, names=("changed since the run",))
