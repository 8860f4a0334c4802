"""`gradpipe inspect`: summaries of runs and single outputs, checked against the Parquet files.

Runs are made in-process (`workers=0`, float64) once per module. Numbers in the summary are
compared with the files read directly (pyarrow, numpy) and the top-K list with a DuckDB
query over per_sample/; the PNG is decoded and its size checked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from conftest import make_classification, make_regression, ok, one_line_error, write_parquet

from gradpipe import report
from gradpipe.cli import cli
from gradpipe.errors import ConfigError
from gradpipe.synth import synth
from gradpipe.train import TrainConfig, train

STEPS = 30
ROWS = 120


def inspect(*args: str) -> Result:
    return CliRunner().invoke(cli, ["inspect", *map(str, args)])




def strict_json(text: str) -> dict:
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in JSON output")
    return json.loads(text, parse_constant=refuse)


def nan_to_none(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}


def duckdb_top(run: Path, step: int, k: int) -> list[tuple]:
    return duckdb.sql(
        "select sample, loss, grad_norm from "
        f"read_parquet('{run}/per_sample/step={step}/*.parquet') "
        f"order by grad_norm desc limit {k}").fetchall()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30-step run on 120 learnable rows, per-sample norms at steps 0, 10, 20 and 29."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    synth(data, rows=ROWS, features=5, classes=3, files=3, row_group_size=16, seed=1)
    out = root / "run"
    # A slowly learning model (raw features, sigmoid output, squared loss): its noise scale
    # stays defined at every step, which the noise summary's checks below rely on.
    train(TrainConfig(data=str(data), out=str(out), hidden=(8,), steps=STEPS, lr=1.0,
                      dtype="float64", workers=0, per_sample="norms", per_sample_every=10,
                      standardize=False, output_activation="sigmoid", loss="squared"))
    return out


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Regression (no label, no accuracy), per-sample rows with the full gradient."""
    root = tmp_path_factory.mktemp("report-reg")
    data = make_regression(root / "data")
    out = root / "run"
    train(TrainConfig(data=str(data), out=str(out), target=("t0", "t1"), hidden=(4, 3),
                      output_activation="identity", lr=0.05, steps=12, dtype="float64",
                      workers=0, per_sample="full"))
    return out


# --------------------------------------------------------------------------- a run


def test_json_summary_matches_the_files(run: Path) -> None:
    summary = strict_json(ok(inspect(run, "--json", "--top", "5")).stdout)
    info = json.loads((run / "run.json").read_text())
    metrics = pq.read_table(run / "metrics").to_pylist()
    assert summary["kind"] == "run" and summary["path"] == str(run)

    assert summary["run"]["command"] == "train" and summary["run"]["status"] == "completed"
    assert summary["run"]["model"]["sizes"] == [5, 8, 3]
    assert summary["run"]["model"]["loss"] == info["model"]["loss"]
    assert summary["run"]["dataset"]["rows"] == ROWS
    assert summary["run"]["dataset"]["fingerprint"] == info["dataset"]["fingerprint"]
    assert summary["run"]["steps"] == STEPS and summary["run"]["steps_done"] == STEPS

    m = summary["metrics"]
    assert m["steps"] == len(metrics) == STEPS
    assert (m["first_step"], m["last_step"]) == (0, STEPS - 1)
    assert m["layers"] == [1, 2]
    curve_steps = [r["step"] for r in m["curve"]]
    assert curve_steps[0] == 0 and curve_steps[-1] == STEPS - 1
    assert len(curve_steps) == report.CURVE_POINTS and curve_steps == sorted(set(curve_steps))
    for row in m["curve"]:
        assert row == nan_to_none(metrics[row["step"]])  # every column, exactly
    assert m["final"] == nan_to_none(metrics[-1])
    losses = np.array([r["loss"] for r in metrics])
    assert m["best"] == {"step": int(np.argmin(losses)), "loss": float(losses.min())}

    noise = summary["noise_scale"]
    values = np.array([np.nan if r["noise_scale"] is None else r["noise_scale"] for r in metrics])
    finite = np.flatnonzero(np.isfinite(values))
    assert noise["latest_step"] == metrics[finite[-1]]["step"]
    assert noise["latest"] == values[finite[-1]]
    window = values[-math.ceil(0.1 * STEPS):]  # the last 10% of steps: 3
    assert noise["window_steps"] == [STEPS - 3, STEPS - 1]
    np.testing.assert_allclose(noise["median_last"], np.median(window[np.isfinite(window)]),
                               rtol=0, atol=0)
    assert noise["window_finite"] == 3 and noise["finite_steps"] == STEPS
    assert noise["suggested_batch"] == min(ROWS, max(1, round(noise["median_last"])))
    assert noise["samples_per_step"] == ROWS
    assert "McCandlish" in noise["explanation"] and "tr(Sigma)" in noise["explanation"]

    per_sample = summary["per_sample"]
    assert per_sample["steps"] == [0, 10, 20, STEPS - 1]
    assert per_sample["step"] == STEPS - 1 and per_sample["samples"] == ROWS
    table = pq.read_table(run / "per_sample" / f"step={STEPS - 1}")
    norms = table.column("grad_norm").to_numpy()
    assert per_sample["grad_norm"]["max"] == norms.max()
    np.testing.assert_allclose(per_sample["grad_norm"]["mean"], norms.mean(), rtol=1e-12)
    np.testing.assert_allclose(per_sample["grad_norm"]["median"], np.median(norms), rtol=1e-12)
    # Full batch: the mean per-sample loss is the step's loss C = (1/N) sum_i C_i.
    np.testing.assert_allclose(per_sample["loss"]["mean"], metrics[-1]["loss"], rtol=1e-12)

    gradients = pq.read_table(run / "gradients")
    assert summary["gradients"]["recorded_steps"] == sorted(set(gradients["step"].to_pylist()))
    assert summary["gradients"]["rows"] == gradients.num_rows
    assert summary["weights"]["parameters"] == info["model"]["parameters"] == 5 * 8 + 8 + 8 * 3 + 3


@pytest.mark.parametrize(("step", "k"), [(None, 5), (None, 1), (10, 7), (0, ROWS), (20, 1000)])
def test_top_k_agrees_with_duckdb(run: Path, step: int | None, k: int) -> None:
    args = ["--json", "--top", str(k)] + (["--step", str(step)] if step is not None else [])
    per_sample = strict_json(ok(inspect(run, *args)).stdout)["per_sample"]
    expected_step = STEPS - 1 if step is None else step
    assert per_sample["step"] == expected_step
    top = per_sample["top"]
    assert [(r["sample"], r["loss"], r["grad_norm"]) for r in top] == \
        duckdb_top(run, expected_step, k)
    assert len(top) == min(k, ROWS)
    # Labels are those of the samples' rows.
    labels = dict(duckdb.sql(f"select sample, label from read_parquet("
                             f"'{run}/per_sample/step={expected_step}/*.parquet')").fetchall())
    assert all(r["label"] == labels[r["sample"]] for r in top)


def test_text_summary(run: Path) -> None:
    out = ok(inspect(run, "--top", "4")).stdout
    info = json.loads((run / "run.json").read_text())
    metrics = pq.read_table(run / "metrics").to_pylist()
    for text in ("train", "completed", "5-8-3", info["dataset"]["fingerprint"], "120 rows",
                 "Loss over 30 steps", "Gradient norm", "layer 1", "layer 2",
                 "B_simple", "McCandlish", "suggested batch", "Top 4 samples by gradient norm",
                 "per-sample files: 0, 10, 20, 29", "gradients: 4 recorded steps"):
        assert text in out, text
    # The first and last steps' numbers, as printed (6 significant digits).
    for row in (metrics[0], metrics[-1]):
        assert f"{row['loss']:.6g}" in out
        assert f"{row['grad_norm_l1']:.5g}" in out and f"{row['grad_norm_l2']:.5g}" in out
    for sample, loss, grad_norm in duckdb_top(run, STEPS - 1, 4):
        assert f"{loss:.6g}" in out and f"{grad_norm:.6g}" in out
        line = next(l for l in out.splitlines() if f"{grad_norm:.6g}" in l)
        assert f" {sample} " in line


def test_step_option_and_missing_step(run: Path) -> None:
    top = strict_json(ok(inspect(run, "--json", "--step", "10", "--top", "3")).stdout)
    assert top["per_sample"]["step"] == 10
    one_line_error(inspect(run, "--step", "7"), "--step 7", str(run), "0, 10, 20, 29")


def test_top_zero_lists_nothing(run: Path) -> None:
    summary = strict_json(ok(inspect(run, "--json", "--top", "0")).stdout)
    assert summary["per_sample"]["top"] == [] and summary["per_sample"]["samples"] == ROWS
    assert "Top" not in ok(inspect(run, "--top", "0")).stdout


def test_regression_run_with_full_gradients(regression_run: Path) -> None:
    summary = strict_json(ok(inspect(regression_run, "--json", "--top", "3")).stdout)
    assert summary["run"]["dataset"]["task"] == "regression"
    assert "accuracy" not in summary["metrics"]["final"]
    top = summary["per_sample"]["top"]
    assert all("label" not in r and "grad" not in r for r in top)
    assert [(r["sample"], r["loss"], r["grad_norm"]) for r in top] == \
        duckdb_top(regression_run, 11, 3)
    text = ok(inspect(regression_run)).stdout
    assert "accuracy" not in text and "label ┃" not in text and "layer 3" in text
    assert "┃ sample ┃" in text and "mislabeled" not in text


def test_per_sample_grad_column_is_never_read(regression_run: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-sample files hold `grad`; inspect projects it away when scanning them."""
    schema = pq.read_schema(next((regression_run / "per_sample" / "step=11").iterdir()))
    assert "grad" in schema.names
    assert report.per_sample_columns(schema) == ["sample", "loss", "grad_norm", "el2n"]
    scanned: list[list[str] | None] = []
    real = report.ds.dataset

    class Recording:
        def __init__(self, *args, **kwargs) -> None:
            self.inner = real(*args, **kwargs)
            self.schema = self.inner.schema

        def to_batches(self, columns: list[str] | None = None, **kwargs):
            scanned.append(columns)
            return self.inner.to_batches(columns=columns, **kwargs)

    monkeypatch.setattr(report.ds, "dataset", Recording)
    result = report.inspect_output(regression_run, top=2)
    assert scanned == [["sample", "loss", "grad_norm", "el2n"]]
    assert result.summary["per_sample"]["samples"] == 40


def test_run_without_per_sample(tmp_path: Path) -> None:
    data = make_classification(tmp_path / "data", rows=30)
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(out), hidden=(4,), steps=3, workers=0))
    summary = strict_json(ok(inspect(out, "--json")).stdout)
    assert summary["per_sample"] is None and summary["metrics"]["steps"] == 3
    assert "no per-sample files" in ok(inspect(out)).stdout
    one_line_error(inspect(out, "--step", "2"), "--step 2", str(out), "--per-sample")


def test_grad_run_of_one_step(tmp_path: Path) -> None:
    data = make_classification(tmp_path / "data", rows=30)
    out = tmp_path / "g"
    result = CliRunner().invoke(cli, ["grad", str(data), "--workers", "0", "--hidden", "4",
                                      "--per-sample", "norms", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = strict_json(ok(inspect(out, "--json")).stdout)
    assert summary["run"]["command"] == "grad"
    assert summary["metrics"]["steps"] == 1 and summary["noise_scale"]["window_steps"] == [0, 0]
    assert summary["per_sample"]["step"] == 0 and len(summary["per_sample"]["top"]) == 10


# --------------------------------------------------------------------------- single files


def test_metrics_file(run: Path) -> None:
    summary = strict_json(ok(inspect(run / "metrics", "--json")).stdout)
    assert summary["kind"] == "metrics"
    assert summary["run"] is None and summary["per_sample"] is None
    assert summary["weights"] is None and summary["gradients"] is None
    whole = strict_json(ok(inspect(run, "--json")).stdout)
    assert summary["metrics"] == whole["metrics"]
    assert summary["noise_scale"]["median_last"] == whole["noise_scale"]["median_last"]
    assert "Loss over 30 steps" in ok(inspect(run / "metrics")).stdout


def test_gradients_file(run: Path) -> None:
    summary = strict_json(ok(inspect(run / "gradients", "--json")).stdout)
    assert summary["kind"] == "gradients" and summary["metrics"] is None
    g = summary["gradients"]
    table = pq.read_table(run / "gradients")
    steps = table["step"].to_numpy()
    assert g["recorded_steps"] == [0, 10, 20, STEPS - 1]
    assert g["parameters"] == 75 and g["layers"] == [1, 2]
    metrics = pq.read_table(run / "metrics").to_pylist()
    for row in g["curve"]:
        grad = table["grad"].to_numpy()[steps == row["step"]]
        np.testing.assert_allclose(row["grad_norm"], np.linalg.norm(grad), rtol=1e-12)
        # No weight decay: the same norms as metrics.parquet's, per layer.
        for key in ("grad_norm", "grad_norm_l1", "grad_norm_l2"):
            np.testing.assert_allclose(row[key], metrics[row["step"]][key], rtol=1e-12)
    assert "Gradient norm" in ok(inspect(run / "gradients")).stdout


@pytest.mark.parametrize("name", ["weights.parquet", "checkpoints/step-000000/weights.parquet"])
def test_weights_file(run: Path, name: str) -> None:
    summary = strict_json(ok(inspect(run / name, "--json")).stdout)
    assert summary["kind"] == "weights"
    w = summary["weights"]
    assert w["sizes"] == [5, 8, 3] and w["parameters"] == 75
    assert w["checkpoint"] == name.startswith("checkpoints")
    table = pq.read_table(run / name)
    layer, param = table["layer"].to_numpy(), np.array(table["param"].to_pylist())
    value = table["value"].to_numpy()
    for row in w["layers"]:
        l = row["layer"]
        w, b = value[(layer == l) & (param == "w")], value[(layer == l) & (param == "b")]
        np.testing.assert_allclose(row["w_norm"], np.linalg.norm(w), rtol=1e-12)
        np.testing.assert_allclose(row["b_norm"], np.linalg.norm(b), rtol=1e-12)
    assert "8x5" in ok(inspect(run / name)).stdout


@pytest.mark.parametrize(("where", "step", "samples"), [
    ("per_sample", STEPS - 1, ROWS),
    ("per_sample/step=10", 10, ROWS),
    ("per_sample/step=10/part-00002.parquet", 10, None),
])
def test_per_sample_paths(run: Path, where: str, step: int, samples: int | None) -> None:
    summary = strict_json(ok(inspect(run / where, "--json", "--top", "3")).stdout)
    assert summary["kind"] == "per_sample" and summary["metrics"] is None
    per_sample = summary["per_sample"]
    assert per_sample["step"] == step
    path = run / where
    if samples is None:  # one part file: one block's rows
        samples = pq.ParquetFile(path).metadata.num_rows
        expected = duckdb.sql(f"select sample, loss, grad_norm from read_parquet('{path}') "
                              "order by grad_norm desc limit 3").fetchall()
    else:
        expected = duckdb_top(run, step, 3)
    assert per_sample["samples"] == samples
    assert [(r["sample"], r["loss"], r["grad_norm"]) for r in per_sample["top"]] == expected


def test_run_json_path_means_the_run(run: Path) -> None:
    assert strict_json(ok(inspect(run / "run.json", "--json")).stdout)["kind"] == "run"


def test_nan_and_null_become_null(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "metrics.parquet", {
        "step": np.arange(3), "loss": [1.0, float("nan"), 0.5],
        "grad_norm": [1.0, float("inf"), 0.1], "samples": [4, 4, 4],
        "noise_scale": pa.array([None, None, None], pa.float64()),
    })
    summary = strict_json(ok(inspect(path, "--json")).stdout)
    assert summary["metrics"]["curve"][1]["loss"] is None
    assert summary["metrics"]["curve"][1]["grad_norm"] is None
    assert summary["metrics"]["best"] == {"step": 2, "loss": 0.5}
    noise = summary["noise_scale"]
    assert noise["latest"] is None and noise["median_last"] is None
    assert noise["suggested_batch"] is None
    assert "no finite value" in ok(inspect(path)).stdout


# --------------------------------------------------------------------------- plot


@pytest.mark.parametrize(("size", "shape"), [(None, (900, 1200)), ("640x480", (480, 640)),
                                             ("1001x777", (777, 1001))])
def test_plot_png_has_the_asked_size(run: Path, tmp_path: Path, size: str | None,
                                     shape: tuple[int, int]) -> None:
    png = tmp_path / "figures" / "run.png"  # the folder is created
    args = ["--plot", str(png)] + (["--plot-size", size] if size else [])
    result = ok(inspect(run, *args))
    assert f"wrote {png}" in result.stdout
    image = mpimg.imread(png)
    assert image.shape[:2] == shape
    assert image[..., :3].std() > 0.05  # something was drawn
    assert [p.name for p in png.parent.iterdir()] == ["run.png"]  # no temporary file left


@pytest.mark.parametrize("where", ["per_sample/step=0", "gradients", "weights.parquet",
                                   "metrics"])
def test_plot_of_single_outputs(run: Path, tmp_path: Path, where: str) -> None:
    png = tmp_path / "one.png"
    summary = strict_json(ok(inspect(run / where, "--json", "--plot", png,
                                     "--plot-size", "400x300")).stdout)
    assert summary["plot"] == str(png)
    assert mpimg.imread(png).shape[:2] == (300, 400)


@pytest.mark.parametrize("size", ["1200", "12x", "0x100", "99x100", "100x20000", "axb"])
def test_bad_plot_size(run: Path, tmp_path: Path, size: str) -> None:
    result = inspect(run, "--plot", tmp_path / "x.png", "--plot-size", size)
    assert result.exit_code == 2 and "--plot-size" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_plot_refuses_other_formats(run: Path, tmp_path: Path) -> None:
    one_line_error(inspect(run, "--plot", tmp_path / "x.jpg"), "x.jpg", ".png")


# --------------------------------------------------------------------------- bad paths


def test_bad_paths(tmp_path: Path, cls_data: Path) -> None:
    one_line_error(inspect(tmp_path / "nope"), str(tmp_path / "nope"))
    one_line_error(inspect(cls_data), str(cls_data))  # a dataset, not an output
    one_line_error(inspect(cls_data / "part-0.parquet"), "part-0.parquet", "x0")
    (tmp_path / "empty").mkdir()
    one_line_error(inspect(tmp_path / "empty"), str(tmp_path / "empty"))
    text = tmp_path / "notes.parquet"
    text.write_text("not parquet")
    one_line_error(inspect(text), str(text))
    truncated = tmp_path / "metrics.parquet"
    truncated.write_bytes((cls_data / "part-0.parquet").read_bytes()[:300])
    one_line_error(inspect(truncated), str(truncated))
    bad_run = tmp_path / "bad-run"
    bad_run.mkdir()
    (bad_run / "run.json").write_text("{not json")
    one_line_error(inspect(bad_run), "run.json")


def test_library_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        report.inspect_output(tmp_path / "nope")
    with pytest.raises(ConfigError, match="--top"):
        report.inspect_output(tmp_path, top=-1)


# --------------------------------------------------------------------------- second moments,
# per-layer noise scale, what the model did per sample


@pytest.fixture(scope="module")
def second_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 steps with --second-moment, gradients recorded at 0, 5, 10 and 11."""
    root = tmp_path_factory.mktemp("report-second")
    data = root / "data"
    synth(data, rows=ROWS, features=5, classes=3, files=3, row_group_size=16, seed=1)
    out = root / "run"
    # Learnable and slow, as `run`: the noise scales stay defined at every step.
    train(TrainConfig(data=str(data), out=str(out), hidden=(8, 4), steps=12, lr=1.0,
                      dtype="float64", workers=0, record_every=5, second_moment=True,
                      per_sample="norms", weight_decay=0.01, standardize=False,
                      output_activation="sigmoid", loss="squared"))
    return out


def _layer_moments(table: pa.Table, step: int) -> dict[int, dict]:
    """signal, variance and parameters per layer at one step, from the file with numpy."""
    rows = table.filter(pc.equal(table["step"], step))
    layer = rows["layer"].to_numpy()
    grad, grad_sq = rows["grad"].to_numpy(), rows["grad_sq"].to_numpy()
    out = {}
    for l in np.unique(layer):
        g, q = grad[layer == l], grad_sq[layer == l]
        out[int(l)] = {"parameters": len(g), "signal": float((g * g).sum()),
                       "variance": float((q - g * g).sum())}
    return out


def test_second_moment_summary_matches_the_files(second_run: Path) -> None:
    summary = strict_json(ok(inspect(second_run, "--json")).stdout)
    second = summary["gradients"]["second_moment"]
    table = pq.read_table(second_run / "gradients")
    assert second["step"] == 11 and second["steps"] == 4
    want = _layer_moments(table, 11)
    assert [r["layer"] for r in second["layers"]] == [1, 2, 3]
    for r in second["layers"]:
        w = want[r["layer"]]
        assert r["parameters"] == w["parameters"]
        np.testing.assert_allclose(r["signal"], w["signal"], rtol=1e-12)
        np.testing.assert_allclose(r["variance"], w["variance"], rtol=1e-9)
        np.testing.assert_allclose(r["mean_variance"], w["variance"] / w["parameters"],
                                   rtol=1e-9)
        np.testing.assert_allclose(r["snr"], w["signal"] / w["variance"], rtol=1e-9)
        assert r["variance"] > 0
    assert [c["step"] for c in second["curve"]] == [0, 5, 10, 11]
    for c in second["curve"]:
        w = _layer_moments(table, c["step"])
        for l in (1, 2, 3):
            np.testing.assert_allclose(c[f"snr_l{l}"], w[l]["signal"] / w[l]["variance"],
                                       rtol=1e-9)
    assert "grad_sq - grad^2" in second["explanation"]
    # The gradients folder alone says the same.
    alone = strict_json(ok(inspect(second_run / "gradients", "--json")).stdout)
    assert alone["gradients"]["second_moment"] == second
    text = ok(inspect(second_run)).stdout
    assert "Per-sample gradient variance per layer (grad_sq, step 11)" in text
    assert f"{second['layers'][0]['snr']:.4g}" in text


def test_no_second_moment_summary_without_grad_sq(run: Path) -> None:
    summary = strict_json(ok(inspect(run, "--json")).stdout)
    assert summary["gradients"]["second_moment"] is None
    assert "grad_sq" not in ok(inspect(run)).stdout


def test_noise_scale_per_layer_in_the_summary(second_run: Path) -> None:
    noise = strict_json(ok(inspect(second_run, "--json")).stdout)["noise_scale"]
    metrics = pq.read_table(second_run / "metrics").to_pylist()
    assert [r["layer"] for r in noise["layers"]] == [1, 2, 3]
    for r in noise["layers"]:
        values = [(m["step"], m[f"noise_scale_l{r['layer']}"]) for m in metrics
                  if m[f"noise_scale_l{r['layer']}"] is not None]
        assert (r["latest_step"], r["latest"]) == values[-1]
        window = [v for s, v in values if s >= noise["window_steps"][0]]
        if window:
            assert r["median_last"] == pytest.approx(float(np.median(window)), rel=1e-12)
        else:
            assert r["median_last"] is None
    assert any(r["median_last"] is not None for r in noise["layers"])
    text = ok(inspect(second_run)).stdout
    assert "layer 3" in text and f"{noise['layers'][2]['latest']:.4g}" in text


def test_per_sample_summary_shows_el2n_accuracy_and_predictions(second_run: Path) -> None:
    per_sample = strict_json(ok(inspect(second_run, "--json", "--top", "3")).stdout)["per_sample"]
    table = pq.read_table(second_run / "per_sample" / "step=11")
    el2n = table.column("el2n").to_numpy()
    np.testing.assert_allclose(per_sample["el2n"]["mean"], el2n.mean(), rtol=1e-12)
    assert per_sample["el2n"]["max"] == el2n.max()
    assert per_sample["accuracy"] == table.column("correct").to_numpy().mean()
    rows = {r["sample"]: r for r in table.to_pylist()}
    for r in per_sample["top"]:
        for column in ("prediction", "correct", "confidence", "el2n"):
            assert r[column] == rows[r["sample"]][column]
    text = " ".join(ok(inspect(second_run, "--top", "3")).stdout.split())  # lines may wrap
    assert "prediction" in text and "el2n" in text
    assert f"accuracy {per_sample['accuracy']:.4f}" in text


# --------------------------------------------------------------------------- other outputs


def succeeds(result: Result) -> Result:
    """A command that worked (it may say what it read on stderr)."""
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_predictions_folder_summary_matches_the_parts(run: Path, tmp_path: Path) -> None:
    data = run.parent / "data"
    pred = tmp_path / "pred"
    succeeds(CliRunner().invoke(cli, ["predict", str(run), str(data), "--out", str(pred),
                                "--workers", "0"]))
    summary = strict_json(ok(inspect(pred, "--json", "--top", "4")).stdout)
    assert summary["kind"] == "predictions"
    p = summary["predictions"]
    table = pq.read_table(pred)
    assert p["rows"] == table.num_rows == ROWS
    counts = {r["prediction"]: r["rows"] for r in p["classes_predicted"]}
    assert counts == dict(zip(*np.unique(table.column("prediction").to_numpy(),
                                         return_counts=True), strict=True))
    confidence = table.column("confidence").to_numpy()
    assert p["confidence"]["min"] == confidence.min()
    assert p["confidence"]["mean"] == pytest.approx(confidence.mean(), rel=1e-12)
    lowest = np.sort(confidence)[:4]
    assert [r["confidence"] for r in p["least_confident"]] == list(lowest)
    text = ok(inspect(pred, "--top", "2")).stdout
    assert "Rows per predicted class" in text and "2 least confident" in text
    assert f"{ROWS} rows in 9 parts" in " ".join(text.split())  # a part per block


def test_regression_predictions_show_each_targets_spread(regression_run: Path,
                                                         tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    succeeds(CliRunner().invoke(cli, ["predict", str(regression_run), str(regression_run.parent /
                                                                    "data"),
                                "--out", str(pred), "--workers", "0"]))
    p = strict_json(ok(inspect(pred, "--json")).stdout)["predictions"]
    t0 = pq.read_table(pred).column("t0").to_numpy()
    assert p["target_spread"]["t0"]["max"] == t0.max()
    assert p["target_spread"]["t0"]["median"] == pytest.approx(np.median(t0), rel=1e-12)


def test_scores_folder_and_influence_file(run: Path, tmp_path: Path) -> None:
    scores = tmp_path / "scores"
    succeeds(CliRunner().invoke(cli, ["scores", str(run), "--out", str(scores), "--workers", "0"]))
    s = strict_json(ok(inspect(scores, "--json", "--top", "3")).stdout)
    assert s["kind"] == "scores" and s["scores"]["samples"] == ROWS
    assert len(s["scores"]["top"]) == 3

    out = tmp_path / "influence.parquet"
    succeeds(CliRunner().invoke(cli, ["influence", str(run), "--test", str(run.parent / "data"),
                                "--top", "2", "--out", str(out), "--workers", "0"]))
    inf = strict_json(ok(inspect(out, "--json", "--top", "3")).stdout)
    assert inf["kind"] == "influence"
    table = pq.read_table(out)
    assert inf["influence"]["test_samples"] == ROWS and inf["influence"]["top"] == 2
    expected = duckdb.sql(
        f"select train_sample, count(*) as n from read_parquet('{out}') where kind = "
        "'proponent' group by train_sample order by n desc, train_sample limit 3").fetchall()
    assert [(r["train_sample"], r["test_samples"]) for r in inf["influence"]["proponent"]] \
        == expected
    assert table.num_rows == inf["influence"]["rows"]
    assert "most often a top opponent" in ok(inspect(out)).stdout


def test_string_classes_show_as_their_values(tmp_path: Path) -> None:
    """Files keep class indices (and the values in their metadata); summaries show values."""
    data = tmp_path / "data"
    write_parquet(data / "part-0.parquet",
                  {"x0": np.arange(12.0), "x1": np.arange(12.0) % 3,
                   "label": ["cat", "dog", "eel"] * 4})
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(run), hidden=(3,), steps=3, workers=0,
                      per_sample="norms", per_sample_every=1))
    succeeds(CliRunner().invoke(cli, ["scores", str(run), "--workers", "0"]))
    summary = strict_json(ok(inspect(run, "--json", "--top", "12")).stdout)
    labels = pq.read_table(data / "part-0.parquet").column("label").to_pylist()
    for r in summary["per_sample"]["top"]:
        assert r["label"] == labels[r["sample"]]
        assert r["prediction"] in ("cat", "dog", "eel")
    for r in summary["scores"]["top"]:
        assert r["label"] == labels[r["sample"]]


def test_inspect_says_when_a_runs_scores_are_out_of_date(cls_data, tmp_path):
    """gradpipe scores, then train --resume with more steps: the scores no longer cover the
    run's per-sample rows, and inspect says so (it showed them as if current)."""
    out = tmp_path / "run"
    runner = CliRunner()
    common = ["--workers", "0", "--per-sample", "norms", "--per-sample-every", "2", "-q"]
    assert runner.invoke(cli, ["train", str(cls_data), "--out", str(out), "--steps", "4",
                               *common]).exit_code == 0
    assert runner.invoke(cli, ["scores", str(out), "--workers", "0", "-q"]).exit_code == 0
    assert json.loads(inspect(out, "--json").stdout)["scores"]["newer_steps"] == []
    r = runner.invoke(cli, ["train", "--resume", "--out", str(out), "--steps", "8", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(inspect(out, "--json").stdout)["scores"]["newer_steps"] == [4, 6, 7]
    assert ("out of date: the run recorded 3 steps of per-sample rows after these scores (up "
            "to step 7); run gradpipe scores again") in " ".join(inspect(out).stdout.split())


def test_inspect_of_regression_scores_says_nothing_of_learning_events(reg_data, tmp_path):
    """first_learned and forgetting_events are null for regression: inspect said 'never
    learned: 331' of every sample, and an empty 'forgetting events:'."""
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(cli, ["train", str(reg_data), "--target", "t0,t1", "--out", str(out),
                               "--workers", "0", "--steps", "4", "--per-sample", "norms",
                               "--per-sample-every", "2", "-q"]).exit_code == 0
    assert runner.invoke(cli, ["scores", str(out), "--workers", "0", "-q"]).exit_code == 0
    summary = json.loads(inspect(out / "scores", "--json").stdout)["scores"]
    assert "never_learned" not in summary and "forgetting_events" not in summary
    assert "never learned" not in inspect(out / "scores").stdout


def test_inspect_takes_a_checkpoint_folder_as_evaluate_does(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=4, hidden=(4,),
                      checkpoint_every=2))
    folder = out / "checkpoints" / "step-000002"
    by_folder = json.loads(inspect(folder, "--json").stdout)
    by_file = json.loads(inspect(folder / "weights.parquet", "--json").stdout)
    assert by_folder["kind"] == "weights" and by_folder["weights"] == by_file["weights"]
    assert by_folder["weights"] is not None
