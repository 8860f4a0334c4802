"""gradpipe scores: every score against an explicit computation from materialised per-sample
gradients (the naive per-weight chain rule of reference.py, and torch.func where installed)
at 1e-9 in float64; forgetting and first_learned against a plain loop; the same bits for
0 and 2 workers; bad runs refused in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import REPO, make_classification, one_line_error, overriding
from reference import naive_full_batch
from test_train import load_xy

from gradpipe.cli import cli
from gradpipe.outputs import params_from_flat, read_model
from gradpipe.recorder import read_metrics
from gradpipe.scores import RANKABLE, StepRows, block_scores, merge_top, top_rows

TOL = dict(rtol=1e-9, atol=1e-12)
CLASSES = 3


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def train(data: Path, out: Path, *extra, workers: int = 0) -> Path:
    """A float64 run with per-sample rows and whole gradients (w_t) every 3 steps. lr 3 on
    random labels keeps some samples flipping between right and wrong."""
    result = run("train", data, *overriding([
                 "--workers", workers, "--dtype", "float64", "--hidden", "4",
                 "--activation", "tanh", "--steps", "14", "--lr", "3", "--seed", "3",
                 "--per-sample", "norms", "--per-sample-every", "3", "--record-every", "3",
                 "--checkpoint-every", "5", "--out", out, "--quiet"], extra))
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def scores(run_dir: Path, *extra) -> dict:
    result = run("scores", run_dir, "--workers", "0", "--json", *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def forward(sizes, w, b, x):
    """a[L] by a plain forward pass: tanh hidden, softmax output."""
    a = x
    for l in range(1, len(sizes)):
        z = a @ w[l].T + b[l]
        a = np.tanh(z) if l < len(sizes) - 1 else np.exp(z - z.max(1, keepdims=True))
    return a / a.sum(1, keepdims=True)


def weights_at(run_dir: Path, step: int, sizes):
    """w_t from gradients/step-t (`value`, in the flat parameter order)."""
    flat = pq.read_table(run_dir / "gradients" / f"step-{step:08d}.parquet").column("value")
    return params_from_flat(sizes, flat.to_numpy(), "float64")


def explicit_scores(run_dir: Path, data: Path, per_sample_grads) -> dict[str, np.ndarray]:
    """The scores by their definitions, from the materialised per-sample gradients at every
    step with per-sample rows (all rows: a full-batch run)."""
    model = read_model(run_dir)
    sizes = model.arch.sizes
    x, y = load_xy(data, classes=CLASSES)
    x = (x - model.standardize[0]) / model.standardize[1]
    labels = y.argmax(1)
    lr = dict(zip(*read_metrics(run_dir).select(["step", "lr"]).to_pydict().values(),
                  strict=True))
    steps = sorted(int(p.name.split("=")[1]) for p in (run_dir / "per_sample").iterdir())
    n = len(x)
    si, gn, el2n = np.zeros(n), np.zeros(n), np.zeros(n)
    correct = []
    for t in steps:
        params = weights_at(run_dir, t, sizes)
        losses, grads = per_sample_grads(sizes, params, x, y)  # (n,), (n, P)
        si += lr[t] * (grads ** 2).sum(axis=1)
        gn += np.sqrt((grads ** 2).sum(axis=1))
        p = forward(sizes, params.w, params.b, x)
        el2n += np.sqrt(((p - y) ** 2).sum(axis=1))
        correct.append(p.argmax(1) == labels)
        loss_last = losses
    forgetting = np.zeros(n, int)
    first = np.full(n, -1)
    for i in range(n):
        seq = [c[i] for c in correct]
        forgetting[i] = sum(1 for s in range(1, len(seq)) if seq[s - 1] and not seq[s])
        for s in range(len(seq)):
            if all(seq[s:]):
                first[i] = steps[s]
                break
    return {"self_influence": si, "grand_mean": gn / len(steps), "el2n_mean": el2n / len(steps),
            "loss_last": loss_last, "forgetting_events": forgetting, "first_learned": first,
            "label": labels, "steps": np.full(n, len(steps))}


def naive_grads(sizes, params, x, y):
    _, _, losses, grads = naive_full_batch(sizes, params.w, params.b, "tanh", "softmax",
                                           "cross_entropy", x, y)
    return losses, grads


def torch_grads(sizes, params, x, y):
    torch = pytest.importorskip("torch")
    func = pytest.importorskip("torch.func")
    theta = [torch.tensor(v) for l in range(1, len(sizes)) for v in (params.w[l], params.b[l])]

    def loss(theta, xi, yi):
        a = xi
        for l in range(len(theta) // 2):
            z = theta[2 * l] @ a + theta[2 * l + 1]
            a = torch.tanh(z) if l < len(theta) // 2 - 1 else torch.log_softmax(z, -1)
        return -(yi * a).sum()

    xt, yt = torch.tensor(x), torch.tensor(y)
    g = func.vmap(func.grad(loss), in_dims=(None, 0, 0))(theta, xt, yt)
    grads = torch.cat([gi.reshape(len(x), -1) for gi in g], dim=1).numpy()
    losses = func.vmap(loss, in_dims=(None, 0, 0))(theta, xt, yt).numpy()
    return losses, grads


def as_arrays(table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        col = table.column(name)
        out[name] = np.array([-1 if v is None else v for v in col.to_pylist()])
    return out


@pytest.mark.parametrize("reference", [naive_grads, torch_grads], ids=["naive", "torch.func"])
def test_every_score_matches_its_definition(tmp_path, reference):
    data = make_classification(tmp_path / "d", rows=45, features=4, classes=CLASSES)
    out = train(data, tmp_path / "run")
    summary = scores(out)
    assert summary["steps"] == [0, 3, 6, 9, 12, 13] and summary["lr"] == [3.0] * 6
    assert summary["el2n"] and summary["correct"]
    got = as_arrays(pq.read_table(out / "scores"))
    assert list(got) == ["sample", "label", "steps", *RANKABLE, "first_learned"]
    want = explicit_scores(out, data, reference)
    np.testing.assert_array_equal(got["sample"], np.arange(45))
    for name in ("self_influence", "grand_mean", "el2n_mean", "loss_last"):
        np.testing.assert_allclose(got[name], want[name], **TOL, err_msg=name)
    for name in ("label", "steps", "forgetting_events", "first_learned"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # The run exercises both: some samples forgot, some never stayed learned.
    assert got["forgetting_events"].max() >= 1 and (got["first_learned"] == -1).any()


def test_full_runs_score_from_the_recorded_gradients(tmp_path):
    """--per-sample full: self_influence from the run's own materialised gradients."""
    data = make_classification(tmp_path / "d", rows=30, features=3, classes=CLASSES)
    out = train(data, tmp_path / "run", "--per-sample", "full")
    scores(out)
    si = np.zeros(30)
    for step_dir in (out / "per_sample").iterdir():
        t = pq.read_table(step_dir)
        grads = np.array(t.column("grad").to_pylist())  # (n, P)
        si[t.column("sample").to_numpy()] += 3.0 * (grads ** 2).sum(axis=1)
    np.testing.assert_allclose(pq.read_table(out / "scores").column("self_influence"), si,
                               **TOL)


def test_forgetting_and_first_learned_follow_the_sequence_of_correct_steps():
    seqs = {0: "TTTTTT", 1: "FFFFFF", 2: "FTFTTT", 3: "TFTFTF", 4: "FFFFFT", 5: "TTTTTF"}
    steps = [0, 5, 10, 15, 20, 25]
    rows = [StepRows(s, 0.5, np.array(list(seqs)), np.ones(6), np.full(6, 2.0),
                     correct=np.array([seqs[i][t] == "T" for i in seqs]))
            for t, s in enumerate(steps)]
    got = block_scores(rows[::-1])  # any order in, step order used
    np.testing.assert_array_equal(got["forgetting_events"], [0, 0, 1, 3, 0, 1])
    np.testing.assert_array_equal(got["first_learned"], [0, -1, 15, -1, 25, -1])
    np.testing.assert_array_equal(got["self_influence"], np.full(6, 6 * 0.5 * 4.0))
    assert np.isnan(got["el2n_mean"]).all()  # not recorded


def test_samples_missing_from_a_step_are_scored_over_their_own_steps():
    """A mini-batch step records only the rows it drew."""
    rows = [
        StepRows(0, 1.0, np.array([3, 1, 2]), np.array([1.0, 2, 3]), np.array([1.0, 2, 3]),
                 correct=np.array([True, False, True])),
        StepRows(1, 0.5, np.array([2, 7]), np.array([4.0, 5]), np.array([2.0, 4]),
                 correct=np.array([False, True])),
        StepRows(2, 0.25, np.array([1, 2]), np.array([6.0, 7]), np.array([4.0, 2]),
                 correct=np.array([True, True])),
    ]
    got = block_scores(rows)
    np.testing.assert_array_equal(got["sample"], [1, 2, 3, 7])
    np.testing.assert_array_equal(got["steps"], [2, 3, 1, 1])
    np.testing.assert_allclose(got["self_influence"],
                               [4 + 0.25 * 16, 9 + 0.5 * 4 + 0.25 * 4, 1, 0.5 * 16])
    np.testing.assert_allclose(got["grand_mean"], [3, 7 / 3, 1, 4])
    np.testing.assert_array_equal(got["loss_last"], [6, 7, 1, 5])
    np.testing.assert_array_equal(got["forgetting_events"], [0, 1, 0, 0])
    np.testing.assert_array_equal(got["first_learned"], [2, 2, 0, 1])


def test_mini_batch_runs_are_scored_over_the_rows_each_step_drew(tmp_path):
    data = make_classification(tmp_path / "d", rows=45, features=4, classes=CLASSES)
    out = train(data, tmp_path / "run", "--batch", "20")
    scores(out)
    got = as_arrays(pq.read_table(out / "scores"))
    drawn: dict[int, list] = {}
    si = np.zeros(45)
    for step_dir in sorted((out / "per_sample").iterdir()):
        t = pq.read_table(step_dir)
        for s in t.column("sample").to_pylist():
            drawn.setdefault(s, []).append(step_dir.name)
        si[t.column("sample").to_numpy()] += 3.0 * t.column("grad_norm").to_numpy() ** 2
    np.testing.assert_array_equal(got["sample"], sorted(drawn))
    np.testing.assert_array_equal(got["steps"], [len(drawn[s]) for s in sorted(drawn)])
    np.testing.assert_allclose(got["self_influence"], si[sorted(drawn)], **TOL)


@pytest.mark.ray
def test_scores_are_bitwise_the_same_for_0_and_2_workers(ray_local, tmp_path):
    data = make_classification(tmp_path / "d", rows=45, features=4, classes=CLASSES)
    out = train(data, tmp_path / "run")
    a = run("scores", out, "--workers", "0", "--out", tmp_path / "s0", "--json", "--top", "7")
    b = run("scores", out, "--workers", "2", "--out", tmp_path / "s2", "--json", "--top", "7")
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert pq.read_table(tmp_path / "s0").equals(pq.read_table(tmp_path / "s2"))
    top_a, top_b = json.loads(a.stdout)["top"], json.loads(b.stdout)["top"]
    assert top_a == top_b and len(top_a) == 7


def test_top_is_the_largest_by_the_chosen_score_ties_by_sample(tmp_path):
    data = make_classification(tmp_path / "d", rows=45, features=4, classes=CLASSES)
    out = train(data, tmp_path / "run")
    assert not (out / "scores").exists()  # written only by gradpipe scores
    for by in RANKABLE:
        summary = scores(out, "--top", "5", "--by", by)
        all_rows = pq.read_table(out / "scores").to_pylist()
        want = sorted((r for r in all_rows if r[by] is not None),
                      key=lambda r: (-r[by], r["sample"]))[:5]
        assert summary["top"] == want and summary["by"] == by
    result = run("scores", out, "--workers", "0", "--top", "3", "--quiet")
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and result.stderr == ""
    assert lines[0] == ("wrote scores of 45 samples over 6 recorded steps in 9 parts to "
                        f"{out}/scores")
    assert lines[1] == "top 3 by self_influence (largest first)"
    assert lines[2].split() == ["sample", "label", "steps", *RANKABLE, "first_learned"]
    assert len(lines) == 6


def test_merge_top_takes_ties_by_sample_id_and_skips_nulls():
    rows = [{"sample": s, "x": v} for s, v in [(5, 1.0), (2, 1.0), (9, None), (1, 0.5),
                                              (3, float("nan")), (4, 2.0)]]
    assert [r["sample"] for r in merge_top(rows, "x", 3)] == [4, 2, 5]
    cols = {"sample": np.array([5, 2, 9, 1]), "x": np.array([1.0, 1.0, np.nan, 0.5])}
    assert top_rows(cols, "x", 3) == [1, 0, 3]


def test_regression_runs_have_no_label_and_no_forgetting(reg_data, tmp_path):
    out = tmp_path / "run"
    result = run("train", reg_data, "--target", "t0,t1", "--workers", "0", "--steps", "6",
                 "--per-sample", "norms", "--per-sample-every", "2", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    scores(out)
    table = pq.read_table(out / "scores")
    assert "label" not in table.column_names
    assert table.column("forgetting_events").null_count == table.num_rows
    assert table.column("el2n_mean").null_count == 0
    # ranking by a column that is null for every sample would print nothing, and say nothing
    one_line_error(run("scores", out, "--workers", "0", "--by", "forgetting_events"),
                   "--by forgetting_events:", "regression run", "rank by self_influence")


def test_rerun_replaces_the_scores_and_refuses_a_foreign_folder(tmp_path):
    data = make_classification(tmp_path / "d", rows=30, features=3, classes=CLASSES)
    out = train(data, tmp_path / "run")
    scores(out)
    first = pq.read_table(out / "scores")
    scores(out)
    assert pq.read_table(out / "scores").equals(first)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    one_line_error(run("scores", out, "--workers", "0", "--out", other), str(other),
                   "not a gradpipe scores folder")
    assert (other / "notes.txt").read_text() == "keep me"
    # another run's scores folder: its scores would be read as that run's own
    second = train(data, tmp_path / "second")
    scores(second)
    theirs = pq.read_table(second / "scores")
    one_line_error(run("scores", out, "--workers", "0", "--out", second / "scores"),
                   f"is in the folder of another run, {second}, which would read {out}'s "
                   "scores as its own")
    assert pq.read_table(second / "scores").equals(theirs)
    assert run("scores", out, "--workers", "0", "--out", out / "scores").exit_code == 0  # its own


def test_a_run_without_per_sample_rows_is_refused_in_one_line(tmp_path):
    data = make_classification(tmp_path / "d", rows=30, features=3, classes=CLASSES)
    out = tmp_path / "run"
    assert run("train", data, "--workers", "0", "--steps", "3", "--out", out).exit_code == 0
    line = one_line_error(run("scores", out, "--workers", "0"), str(out), "--per-sample")
    assert "no per-sample rows" in line
    assert not (out / "scores").exists()
    one_line_error(run("scores", tmp_path / "d", "--workers", "0"), "not a gradpipe run")
    one_line_error(run("scores", tmp_path / "nowhere", "--workers", "0"), "nowhere")


def test_scores_of_an_unfinished_run_say_so(tmp_path):
    """An interrupted run scores over the steps it recorded, and says that resuming it and
    scoring again covers the rest; a finished run's scores say nothing of the kind."""
    data = make_classification(tmp_path / "d", rows=30, features=3, classes=CLASSES)
    out = train(data, tmp_path / "run")
    result = run("scores", out, "--workers", "0")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    result = run("scores", out, "--workers", "0", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == (
        "gradpipe: warning: the run is interrupted (its last recorded step is 13, of 14 "
        f"steps): these scores cover its steps so far; after gradpipe train --resume --out "
        f"{out}, run gradpipe scores again")


def test_readme_query_runs_on_the_scores(tmp_path):
    """The DuckDB queries of the README's "Finding bad data" section, on a fresh run."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Finding bad data", 1)[1].split("\n## ", 1)[0]
    queries = [q for q in re.findall(r"```sql\n(.*?)```", section, re.S)]
    assert queries
    data = make_classification(tmp_path / "d", rows=30, features=3, classes=CLASSES)
    out = train(data, tmp_path / "run")
    scores(out)
    result = run("influence", out, "--test", data / "part-2.parquet", "--out",
                 out / "influence.parquet", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    for q in queries:
        for statement in [s for s in q.split(";") if s.strip()]:
            rows = duckdb.sql(statement.replace("RUN", str(out))).fetchall()
            assert rows


def test_inspect_shows_the_scores_of_a_run_that_has_them(tmp_path):
    data = make_classification(tmp_path / "d", rows=45, features=4, classes=CLASSES)
    out = train(data, tmp_path / "run")
    assert json.loads(run("inspect", out, "--json").stdout)["scores"] is None
    scores(out, "--top", "0")
    summary = json.loads(run("inspect", out, "--json", "--top", "4").stdout)["scores"]
    table = pq.read_table(out / "scores").to_pylist()
    want = sorted(table, key=lambda r: (-r["self_influence"], r["sample"]))[:4]
    assert summary["samples"] == 45 and summary["top"] == want
    assert summary["never_learned"] == sum(r["first_learned"] is None for r in table)
    assert sum(summary["forgetting_events"].values()) == 45
    text = run("inspect", out, "--top", "4").stdout
    assert "Scores of 45 samples (gradpipe scores): top 4 by self_influence" in text


def test_a_sampled_run_says_how_many_rows_have_no_score(cls_data, tmp_path):
    """With --batch, only the samples drawn at a recorded step are scored: the schema line
    and the summary say so, with the dataset's row count, instead of two unrelated counts."""
    from click.testing import CliRunner

    from gradpipe.cli import cli

    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(cli, ["train", str(cls_data), "--out", str(out), "--workers", "0",
                               "--batch", "5", "--steps", "3", "--per-sample", "norms",
                               "--per-sample-every", "1", "-q"]).exit_code == 0
    r = runner.invoke(cli, ["scores", str(out), "--workers", "0", "--top", "0"])
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("scoring the samples drawn at 3 recorded steps of a sampled run")
    assert "of the 60 rows, those never drawn at these steps have no score" in r.stderr
    summary = json.loads(runner.invoke(cli, ["scores", str(out), "--workers", "0", "--json"])
                         .stdout)
    assert summary["rows_in_data"] == 60 and 5 <= summary["rows"] <= 15
    assert f"wrote scores of {summary['rows']} samples (of 60 rows: the others were not " \
           "drawn at a recorded step)" in r.stdout
