"""--resume as users expect: no flag needed, a finished run left alone, --steps may grow,
other flags refused, relative DATA resumable from anywhere, SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_classification

from gradpipe.cli import cli
from gradpipe.recorder import read_metrics

GRADPIPE = shutil.which("gradpipe", path=os.path.dirname(sys.executable)) or "gradpipe"


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_finished_run_has_nothing_to_do(cls_data, tmp_path):
    out = tmp_path / "run"
    assert invoke("train", cls_data, "--workers", "0", "--hidden", "4", "--steps", "3",
                  "--out", out, "--quiet").exit_code == 0
    before = snapshot(out)
    r = invoke("train", "--resume", "--out", out)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("\n") == 1 and "nothing to do" in r.stdout
    assert snapshot(out) == before


def test_steps_may_grow_and_the_steps_done_keep_their_learning_rates(cls_data, tmp_path):
    out, longer = tmp_path / "run", tmp_path / "longer"
    common = ["--workers", "0", "--hidden", "4", "--schedule", "cosine", "--quiet"]
    assert invoke("train", cls_data, *common, "--steps", "6", "--out", out).exit_code == 0
    first = read_metrics(out).drop(["seconds"])
    r = invoke("train", "--resume", "--out", out, "--steps", "10", "--quiet")
    assert r.exit_code == 0, r.output
    extended = read_metrics(out).drop(["seconds"])
    assert extended["step"].to_pylist() == list(range(10))
    assert extended.slice(0, 6).equals(first)
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["steps"] == 10 and info["steps_done"] == 10
    # From step 6 on, the schedule is that of a 10-step run.
    assert invoke("train", cls_data, *common, "--steps", "10", "--out", longer).exit_code == 0
    lr_10 = read_metrics(longer)["lr"].to_pylist()
    assert extended["lr"].to_pylist()[6:] == lr_10[6:]


def test_an_extended_run_has_the_records_and_scores_of_the_longer_run(cls_data, tmp_path):
    """The old last step was recorded because it was the last (gradients, per-sample rows,
    off their grids): extending the run drops them, so that its folder, and the scores made
    from it, are those of a run of the new length from the start."""
    out, longer = tmp_path / "run", tmp_path / "longer"
    common = ["--workers", "0", "--hidden", "4", "--quiet", "--per-sample", "norms",
              "--per-sample-every", "4", "--record-every", "4", "--val", str(cls_data)]
    assert invoke("train", cls_data, *common, "--steps", "7", "--out", out).exit_code == 0
    assert sorted(p.name for p in (out / "per_sample").iterdir())[-1] == "step=6"
    r = invoke("train", "--resume", "--out", out, "--steps", "12", "--quiet")
    assert r.exit_code == 0, r.output
    assert invoke("train", cls_data, *common, "--steps", "12", "--out", longer).exit_code == 0
    for kind in ("per_sample", "gradients"):
        names = sorted(p.name for p in (out / kind).iterdir())
        assert names == sorted(p.name for p in (longer / kind).iterdir()), kind
    assert sorted(p.name for p in (out / "per_sample").iterdir()) == [
        "step=0", "step=11", "step=4", "step=8"]
    for run in (out, longer):
        assert invoke("scores", run, "--out", tmp_path / f"scores-{run.name}").exit_code == 0
    a = pq.read_table(tmp_path / "scores-run")
    b = pq.read_table(tmp_path / "scores-longer")
    assert a.equals(b)
    # the metrics too: the val_* measured at the old last step are null, as in the longer run
    assert read_metrics(out).drop(["seconds"]).equals(read_metrics(longer).drop(["seconds"]))
    # a step on both grids stays: 7 -> 9 steps with every 3 keeps step 6
    keep = tmp_path / "keep"
    grid = ["--workers", "0", "--hidden", "4", "--quiet", "--per-sample", "norms",
            "--per-sample-every", "3"]
    assert invoke("train", cls_data, *grid, "--steps", "7", "--out", keep).exit_code == 0
    assert invoke("train", "--resume", "--out", keep, "--steps", "9", "--quiet").exit_code == 0
    assert "step=6" in {p.name for p in (keep / "per_sample").iterdir()}


def test_a_resumed_run_is_judged_against_its_start_not_the_resume_point(cls_data, tmp_path):
    # lr 300 makes the loss rise from step 0; the resumed run's warning compares with step 0
    out = tmp_path / "run"
    common = ["--workers", "0", "--hidden", "4", "--lr", "300", "--quiet"]
    assert invoke("train", cls_data, *common, "--steps", "4", "--out", out).exit_code == 0
    start = read_metrics(out)["loss"][0].as_py()
    r = invoke("train", "--resume", "--out", out, "--steps", "6", "--quiet")
    assert r.exit_code == 0, r.output
    warnings = json.loads((out / "run.json").read_text())["warnings"]
    assert any(w.startswith(f"the loss did not decrease ({start:.6g} at step 0, ")
               for w in warnings), warnings


def test_a_flag_that_differs_from_the_run_is_refused(cls_data, tmp_path):
    out = tmp_path / "run"
    assert invoke("train", cls_data, "--workers", "0", "--hidden", "4", "--steps", "3",
                  "--out", out, "--quiet").exit_code == 0
    before = snapshot(out)
    for args in (["--lr", "0.5"], ["--hidden", "5"], ["--steps", "2"]):
        r = invoke("train", "--resume", "--out", out, *args)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1
        assert f"{args[0]} is {args[1]} but the run was started with" in r.stderr
    # a flag the run was started without (no None in the message); --val is checked by name
    r = invoke("train", "--resume", "--out", out, "--schedule", "cosine")
    assert r.exit_code == 2 and "--schedule is cosine but the run was started with" in r.stderr
    r = invoke("train", "--resume", "--out", out, "--val", cls_data)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "but the run was started without it" in r.stderr and "None" not in r.stderr
    # The same flags as the run, or a free one (--workers), are fine.
    r = invoke("train", "--resume", "--out", out, "--lr", "2", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert snapshot(out) == before


def test_relative_data_resumes_from_another_folder_after_sigterm(tmp_path):
    make_classification(tmp_path / "here" / "data", rows=3000, features=8, classes=3,
                        row_group_size=500)
    args = [GRADPIPE, "train", "data", "--workers", "0", "--hidden", "64", "--steps", "400",
            "--checkpoint-every", "5", "--out", "run", "--quiet"]
    proc = subprocess.Popen(args, cwd=tmp_path / "here", stderr=subprocess.PIPE, text=True)
    run = tmp_path / "here" / "run"
    while len(list((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir()
              else []) < 3:
        assert proc.poll() is None, "the run ended before SIGTERM"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert info["config"]["data"] == "data" and info["data_path"] == str(tmp_path / "here" /
                                                                         "data")
    hint = err.strip().splitlines()[-1]
    assert hint.endswith("continue with gradpipe train --resume --out run"), hint
    # Follow the hint from another folder, with the run's path as seen from there.
    done = subprocess.run([GRADPIPE, "train", "--resume", "--out", "here/run", "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = read_metrics(run)["step"].to_pylist()
    assert steps == list(range(400))
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert pq.read_table(run / "weights.parquet").num_rows > 0


def test_a_run_folder_and_its_data_cannot_hold_each_other(cls_data, tmp_path):
    inside = cls_data / "run"
    r = invoke("train", cls_data, "--workers", "0", "--out", inside)
    assert r.exit_code == 2 and "is inside DATA" in r.stderr and not inside.exists()
    r = invoke("train", cls_data, "--workers", "0", "--out", cls_data)
    assert r.exit_code == 2 and "--out " + str(cls_data) + " is DATA" in r.stderr
    r = invoke("grad", cls_data, "--workers", "0", "--out", tmp_path)
    assert r.exit_code == 2 and "is inside --out" in r.stderr
    assert sorted(p.name for p in cls_data.iterdir()) == sorted(
        p.name for p in cls_data.iterdir() if p.suffix == ".parquet")


def test_a_failure_mid_run_marks_it_failed_and_resume_completes_it(cls_data, tmp_path,
                                                                   monkeypatch):
    """An error that is neither Ctrl-C nor divergence (a file spoiled while streaming, a lost
    cluster, a bug) leaves run.json `failed` with its error, not `running`; the checkpoints
    stay and --resume gives the bits of an uninterrupted run."""
    from gradpipe import train as train_module

    out, whole = tmp_path / "run", tmp_path / "whole"
    common = ["--workers", "0", "--hidden", "4", "--steps", "6", "--record-every", "2",
              "--quiet"]
    real = train_module.Run._metrics

    def fail_at_step_3(self, step, *args, **kwargs):
        if step == 3:
            raise OSError("the disk went away")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(train_module.Run, "_metrics", fail_at_step_3)
    r = invoke("train", cls_data, *common, "--out", out)
    assert r.exit_code != 0 and isinstance(r.exception, OSError)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == "the disk went away"
    r = invoke("evaluate", out, cls_data, "--workers", "0")
    assert r.exit_code == 2 and "failed after 3 steps (the disk went away)" in r.stderr
    monkeypatch.setattr(train_module.Run, "_metrics", real)
    assert invoke("train", "--resume", "--out", out, "--quiet").exit_code == 0
    assert invoke("train", cls_data, *common, "--out", whole).exit_code == 0
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert pq.read_table(out / "weights.parquet").equals(pq.read_table(whole / "weights.parquet"))


@pytest.mark.parametrize("after", [0.05, 0.3, 0.6, 0.9, 1.5])
def test_ctrl_c_at_any_moment_of_the_start_is_one_line_and_status_130(tmp_path, after):
    """While Python imports the command line, click reads the flags, pyarrow looks for
    pandas (which swallowed a Ctrl-C: the run went on to its end) or the run begins: never
    a traceback, never ignored, and a resume hint only where there is a run to resume."""
    out = tmp_path / "run"
    p = subprocess.Popen([GRADPIPE, "train", "data/digits", "--steps", "3000", "--out",
                          str(out), "-q"], cwd=Path(__file__).resolve().parents[1],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, stdout, stderr)
    assert stderr.count("\n") == 1 and stderr.startswith("gradpipe: error: interrupted"), stderr
    if "--resume" in stderr:
        assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    else:
        assert "nothing was written" in stderr and not (out / "run.json").exists()
