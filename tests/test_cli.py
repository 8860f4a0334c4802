"""The CLI wiring: each command runs, prints what it says, and exits as documented."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import DIGITS, one_line_error

from gradpipe.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("command", [[], ["train"], ["grad"], ["check"], ["explain"],
                                     ["data"], ["data", "synth"]])
def test_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_check_passes_on_digits():
    result = run("check", DIGITS, "--hidden", "16,8")
    assert result.exit_code == 0, result.output
    assert "worst error" in result.output and result.output.strip().endswith("ok")


def test_check_json_and_failure_exit(cls_data):
    ok = run("check", cls_data, "--json", "--activation", "tanh")
    report = json.loads(ok.output)
    assert ok.exit_code == 0 and report["ok"] and report["worst"]["relative_error"] < 1e-6
    # An impossible tolerance makes the same comparison fail with exit 1.
    bad = run("check", cls_data, "--tol", "0", "--activation", "tanh")
    if json.loads(ok.output)["worst"]["abs_error"] > 1e-10:
        assert bad.exit_code == 1 and "FAILED" in bad.output


@pytest.mark.parametrize("layer,j,k", [(1, 3, 10), (2, 5, 7), (2, 4, None)])
def test_explain_factors_multiply_to_the_per_sample_gradient(tmp_path, layer, j, k):
    args = ["--hidden", "12", "--seed", "2"]
    out = tmp_path / "g"
    assert run("grad", DIGITS, *args, "--workers", "0", "--dtype", "float64",
               "--per-sample", "full", "--out", out).exit_code == 0
    extra = ["--k", str(k)] if k is not None else []
    result = run("explain", DIGITS, *args, "--layer", layer, "--j", j, *extra,
                 "--sample", 7, "--json")
    assert result.exit_code == 0, result.output
    e = json.loads(result.output)
    assert e["dC_da"] * e["da_dz"] * e["dz_dw"] == pytest.approx(e["grad"], rel=1e-15)
    assert e["grad"] == pytest.approx(e["finite_difference"], rel=1e-6)
    if layer == 1:
        assert sum(t["product"] for t in e["dC_da_terms"]) == pytest.approx(e["dC_da"], rel=1e-12)
    rows = pq.read_table(out / "gradients").to_pylist()
    index = next(i for i, r in enumerate(rows) if r["layer"] == layer and r["j"] == j
                 and r["k"] == k and r["param"] == ("w" if k is not None else "b"))
    per_sample = pq.read_table(out / "per_sample").sort_by("sample")
    grad_7 = per_sample.column("grad")[7].as_py()
    assert e["grad"] == pytest.approx(grad_7[index], rel=1e-9)


def test_explain_text_names_the_factors():
    result = run("explain", DIGITS, "--layer", "1", "--j", "1", "--k", "3")
    assert result.exit_code == 0, result.output
    for part in ("dC_0/da_j", "g'(z_j)", "a_k^(l-1)", "finite difference"):
        assert part in result.output


@pytest.mark.parametrize("standardize", ["--standardize", "--no-standardize"])
def test_explain_and_check_see_the_features_train_would(standardize):
    # a_k of layer 1 is feature k of the sample, standardized or as stored, as train uses it.
    from gradpipe.data import plan, read_rows
    from gradpipe.train import TrainConfig, data_spec

    dataset = plan(data_spec(TrainConfig(data=str(DIGITS))))
    _, x, _ = read_rows(dataset, [7], "float64")
    _, everything, _ = read_rows(dataset, list(range(dataset.n_rows)), "float64")
    std = everything.std(axis=0)
    expected = x[0, 10] if standardize == "--no-standardize" else (
        (x[0, 10] - everything[:, 10].mean()) / std[10])
    result = run("explain", DIGITS, "--layer", "1", "--j", "3", "--k", "10", "--sample", "7",
                 standardize, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["dz_dw"] == pytest.approx(expected, rel=1e-12)
    check = run("check", DIGITS, standardize)
    assert check.exit_code == 0 and check.output.strip().endswith("ok"), check.output


def test_explain_refuses_a_weight_outside_the_model():
    result = run("explain", DIGITS, "--layer", "3", "--j", "0", "--k", "0")
    assert result.exit_code == 2 and "--layer 3" in result.stderr


def test_grad_writes_a_run_folder_with_step_0(tmp_path):
    out = tmp_path / "g"
    result = run("grad", DIGITS, "--workers", "0", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["step"] == 0 and summary["samples"] == 1797
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "gradients", "metrics", "run.json", "weights.parquet"]
    info = json.loads((out / "run.json").read_text())
    assert info["command"] == "grad" and info["status"] == "completed"
    grads = pq.read_table(out / "gradients")
    assert set(grads.column("step").to_pylist()) == {0}


def test_same_flags_give_the_same_initial_weights_in_every_command(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run("grad", DIGITS, "--workers", "0", "--seed", "5", "--hidden", "7", "--out", a)
    run("train", DIGITS, "--workers", "0", "--seed", "5", "--hidden", "7", "--steps", "1",
        "--record-every", "1", "--out", b, "--quiet")
    va = pq.read_table(a / "gradients").column("value").to_numpy()
    vb = pq.read_table(b / "gradients").filter(
        pq.read_table(b / "gradients").column("step").to_numpy() == 0
    ).column("value").to_numpy()
    np.testing.assert_array_equal(va, vb)


def test_grad_at_weights_of_a_run(tmp_path):
    run_dir, g = tmp_path / "r", tmp_path / "g"
    assert run("train", DIGITS, "--workers", "0", "--steps", "3", "--out", run_dir,
               "--quiet").exit_code == 0
    assert run("grad", DIGITS, "--workers", "0", "--weights", run_dir, "--out", g).exit_code == 0
    np.testing.assert_array_equal(
        pq.read_table(run_dir / "weights.parquet").column("value").to_numpy(),
        pq.read_table(g / "gradients").column("value").to_numpy())


def test_train_json_summary_and_job_file_with_flag_override(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'data = "{DIGITS}"\nhidden = [8]\nsteps = 4\nlr = 1.0\nworkers = 0\n')
    out = tmp_path / "r"
    result = run("train", "--job", job, "--steps", "2", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["step"] == 1  # --steps 2 overrode the file's 4
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["hidden"] == [8] and info["config"]["lr"] == 1.0


def test_diverging_run_exits_1_with_the_step(tmp_path):
    result = run("train", DIGITS, "--workers", "0", "--lr", "1e300", "--activation",
                 "identity", "--output-activation", "identity", "--steps", "5",
                 "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 1
    assert "step " in result.stderr and "not finite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_diverging_gradpipe_prints_one_line_and_no_numpy_warning(tmp_path):
    """The installed command, as users run it: numpy's overflow warnings from the step that
    diverged are not shown, only the line that says what happened."""
    import os
    import shutil
    import subprocess
    import sys

    gradpipe = shutil.which("gradpipe", path=os.path.dirname(sys.executable)) or "gradpipe"
    done = subprocess.run([gradpipe, "train", str(DIGITS), "--workers", "0", "--lr", "1e300",
                           "--activation", "identity", "--output-activation", "identity",
                           "--steps", "5", "--out", str(tmp_path / "r"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "RuntimeWarning" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("gradpipe: error: step ") and "not finite" in lines[-1]


def test_per_sample_every_without_per_sample_is_refused(tmp_path):
    result = run("train", DIGITS, "--workers", "0", "--per-sample-every", "10",
                 "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "--per-sample-every 10 writes per-sample rows every K steps: add --per-sample " \
           "norms" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,said", [
    (["scores", "RUN", "--top", "-1"], "Invalid value for '--top'"),
    (["train", "--nope"], "No such option '--nope'"),
    (["trian"], "No such command 'trian'. Did you mean 'train'?"),
    (["--nope"], "No such option '--nope'"),
    (["predict", "RUN"], "Missing argument 'DATA'"),
])
def test_a_usage_error_is_one_line_as_every_refusal(args, said):
    """click's usage errors (usage, a hint, a blank line, the error) read as one line."""
    from conftest import one_line_error

    line = one_line_error(run(*args), said)
    assert line.endswith("--help)")


def test_empty_paths_are_refused_not_read_as_the_current_folder(tmp_path):
    from conftest import one_line_error

    assert run("train", DIGITS, "--steps", "1", "--hidden", "4", "--out", tmp_path / "run",
               "-q").exit_code == 0
    one_line_error(run("evaluate", tmp_path / "run", ""), "an empty path was given for data")
    for args in (["predict", tmp_path, DIGITS, "--out", ""], ["scores", tmp_path, "--out", ""],
                 ["influence", tmp_path, "--test", DIGITS, "--out", ""]):
        one_line_error(run(*args), "--out is an empty path")


@pytest.mark.parametrize("args,said", [
    (["train", DIGITS, "--target", "label", "--target", "x0"], "--target given twice: give "
     "each option once, several names in one, comma-separated (see cli train --help)"),
    (["train", DIGITS, "--standardize", "--no-standardize"], "--standardize and "
     "--no-standardize both given"),
    (["train", DIGITS, "--lr=1", "--lr", "2"], "--lr given twice"),
    (["evaluate", "RUN", DIGITS, "--workers", "0", "--workers", "1"], "--workers given twice"),
    (["--address", "a", "--address", "b", "train", DIGITS], "--address given twice"),
])
def test_an_option_given_twice_is_refused_not_dropped(args, said):
    # click keeps the last value in silence: a dropped --target became a feature
    result = run(*args)
    assert result.exit_code == 2 and said in result.output, result.output


@pytest.mark.parametrize("args", [
    ["-q", "-q"], ["-q", "--quiet"], ["--target", "label", "--target", "label"],
    ["--steps=1", "--steps", "1"],
])
def test_the_same_option_again_changes_nothing_and_passes(args, tmp_path):
    extra = [] if "--steps=1" in args else ["--steps", "1"]
    result = run("train", DIGITS, "--workers", "0", "--out", tmp_path / "r", *extra, *args)
    assert result.exit_code == 0, result.output


def test_the_dashboard_url_as_address_is_named_as_such(tmp_path):
    # the Jobs API's URL where train needs the GCS address: said at once, nothing written
    line = one_line_error(run("--address", "http://127.0.0.1:8265", "train", DIGITS, "--out",
                              tmp_path / "r"), "--address http://127.0.0.1:8265: a URL")
    assert "HEAD:6379" in line and "gradpipe submit" in line
    assert not (tmp_path / "r").exists()


def test_an_option_value_that_looks_like_an_option_is_a_value():
    result = run("train", DIGITS, "--features", "--target", "--target", "label", "--help")
    assert result.exit_code == 0


def test_progress_without_a_terminal_is_a_plain_line_now_and_then(capsys, monkeypatch):
    """In a log file (stderr not a terminal) there is no bar: a plain line every
    line_seconds shows a long run is alive; its rate counts from the end of the first step,
    not from the start of the workers."""
    from gradpipe.cli import Progress

    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    clock = iter([0.0, 10.0, 11.0, 11.5, 13.0, 20.0, 21.0])
    monkeypatch.setattr("gradpipe.cli.time.perf_counter", lambda: next(clock))
    with Progress(5, True, line_seconds=2.0) as progress:
        for step in range(1, 5):  # the first step ends at t = 10 (workers started slowly)
            progress(step, {"samples": 100, "loss": 0.5, "grad_norm": 0.25, "accuracy": 0.75})
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "step 1 of 5  loss 0.5  |grad| 0.25  acc 0.750  (10 s)",
        "step 4 of 5  loss 0.5  |grad| 0.25  acc 0.750  100 samples/s  (13 s)"]
    with Progress(5, False, line_seconds=0.0) as quiet:
        quiet(1, {"samples": 1, "loss": 0.5, "grad_norm": 0.25})
    assert capsys.readouterr().err == ""
