"""Crashes: a driver killed at a random moment resumes to the same bits; a worker killed while
writing per-sample rows for a million samples loses none and duplicates none."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import make_classification

from gradpipe.train import Run, TrainConfig
from gradpipe.worker import assign_blocks

GRADPIPE = shutil.which("gradpipe", path=os.path.dirname(sys.executable)) or "gradpipe"


def _all_parquet_readable(run: Path) -> None:
    for path in run.rglob("*.parquet"):
        pq.read_table(path)  # raises on a half-written file
    for ckpt in (run / "checkpoints").iterdir():
        if (ckpt / "state.json").exists():
            pq.read_table(ckpt / "weights.parquet")


@pytest.mark.parametrize("seed", [1, 2])
def test_a_driver_killed_at_a_random_moment_resumes_bitwise(tmp_path, seed):
    data = make_classification(tmp_path / "data", rows=6000, features=16, classes=4, files=2,
                               row_group_size=1000)
    args = [str(data), "--workers", "0", "--hidden", "64", "--steps", "250", "--momentum", "0.9",
            "--checkpoint-every", "7", "--record-every", "5", "--per-sample", "norms",
            "--per-sample-every", "10", "--quiet"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([GRADPIPE, "train", *args, "--out", str(full)], check=True, timeout=120)

    proc = subprocess.Popen([GRADPIPE, "train", *args, "--out", str(cut)])
    while not (cut / "metrics").exists():  # training has begun
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    time.sleep(random.Random(seed).uniform(0.0, 0.8))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((cut / "run.json").read_text())["status"] == "running", "killed too late"
    _all_parquet_readable(cut)

    # The hint printed on Ctrl-C, followed literally: no other flag is needed.
    resumed = subprocess.run([GRADPIPE, "train", "--resume", "--out", str(cut), "--quiet"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("weights.parquet", "gradients"):
        assert pq.read_table(full / name).equals(pq.read_table(cut / name)), name
    assert pq.read_table(full / "metrics").drop(["seconds"]).equals(
        pq.read_table(cut / "metrics").drop(["seconds"]))
    assert not list(cut.rglob(".*.tmp-*"))


def test_a_run_folder_being_written_is_not_taken_by_a_second_process(tmp_path):
    """Two writers of one folder both said `wrote`: a --resume or an --overwrite while the run
    goes is refused in one line (RUN/.lock, held by the writing process), run.json untouched.
    Once the writer is killed, inspect says no process writes it, and --resume continues."""
    from click.testing import CliRunner

    from gradpipe.cli import cli

    data = make_classification(tmp_path / "data", rows=2000, features=16, classes=4, files=2,
                               row_group_size=500)
    run = tmp_path / "run"
    proc = subprocess.Popen([GRADPIPE, "train", str(data), "--workers", "0", "--hidden", "64",
                             "--steps", "100000", "--checkpoint-every", "20", "--out", str(run),
                             "--quiet"], stderr=subprocess.DEVNULL)
    try:
        while not (run / "checkpoints" / "step-000020" / "state.json").exists():
            assert proc.poll() is None, "the run ended before the test could begin"
            time.sleep(0.01)
        before = (run / "run.json").read_bytes()
        for args in (["train", "--resume", "--out", str(run)],
                     ["train", str(data), "--steps", "3", "--overwrite", "--out", str(run)]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 2, result.output
            assert result.stderr == (f"gradpipe: error: --out {run}: another gradpipe process "
                                     "is writing this run folder now; wait for it to end or "
                                     "stop it (then --resume continues it)\n")
            assert json.loads((run / "run.json").read_bytes())["status"] == "running"
        assert json.loads(before)["config"] == json.loads((run / "run.json").read_bytes())[
            "config"]
        inspect = CliRunner().invoke(cli, ["inspect", str(run), "--json"])
        assert json.loads(inspect.stdout)["run"]["writing"] is True
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(run), "--json"]).stdout)["run"]
    assert info["writing"] is False and info["last_checkpoint"] >= 20
    said = CliRunner().invoke(cli, ["inspect", str(run)]).stdout
    assert "no process writes it now (killed?); gradpipe train --resume --out" in said
    assert f"(last checkpoint: step {info['last_checkpoint']:,})" in said
    import fcntl  # the killed writer's lock went with it: a new writer may take it

    with open(run / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# Runs the CLI with the recorder's writes wrapped: the KILL_AT-th write leaves a half-written
# temporary file and the driver SIGKILLs itself in the middle of it.
DIE_WHILE_WRITING = """
import os, signal, sys
import gradpipe.recorder as recorder
from gradpipe.atomic import atomic_file
real, count = recorder.write_table, 0
def dying(table, path):
    global count
    count += 1
    if count == int(os.environ["KILL_AT"]):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"PAR1 half a record")
            os.kill(os.getpid(), signal.SIGKILL)
    real(table, path)
recorder.write_table = dying
from gradpipe.cli import main
sys.argv[0] = "gradpipe"
main()
"""


@pytest.mark.parametrize("kill_at", [5, 14])
def test_a_driver_killed_while_writing_a_record_resumes_bitwise(tmp_path, kill_at):
    data = make_classification(tmp_path / "data", rows=300, features=5, classes=3,
                               row_group_size=100)
    args = [str(data), "--workers", "0", "--hidden", "6", "--steps", "20", "--momentum", "0.9",
            "--checkpoint-every", "4", "--record-every", "3", "--quiet"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([GRADPIPE, "train", *args, "--out", str(full)], check=True, timeout=120)
    killed = subprocess.run([sys.executable, "-c", DIE_WHILE_WRITING, "train", *args, "--out",
                             str(cut)], env={**os.environ, "KILL_AT": str(kill_at)}, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert list(cut.rglob(".*.tmp-*")), "the kill left its half-written temporary"
    resumed = subprocess.run([GRADPIPE, "train", "--resume", "--out", str(cut), "--quiet"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(cut.rglob(".*.tmp-*"))
    for name in ("weights.parquet", "gradients"):
        assert pq.read_table(full / name).equals(pq.read_table(cut / name)), name
    m_full = pq.read_table(full / "metrics").drop(["seconds"])
    m_cut = pq.read_table(cut / "metrics").drop(["seconds"])
    assert m_cut["step"].to_pylist() == list(range(20))  # nothing duplicated, nothing lost
    assert m_full.equals(m_cut)


@pytest.mark.ray
def test_a_million_per_sample_rows_survive_a_worker_crash(ray_local, tmp_path):
    from gradpipe.synth import synth

    data = tmp_path / "big"
    synth(data, rows=1_000_000, features=4, classes=3, files=4, row_group_size=50_000)
    out = tmp_path / "run"
    run = Run(TrainConfig(data=str(data), out=str(out), workers=4, hidden=(8,), steps=1,
                          per_sample="norms", update=False))
    run.prepare()
    killed: list[int] = []
    try:
        victim = run.pool.pids()[1]
        its_blocks = assign_blocks(run.dataset.blocks, 4)[1]
        step_dir = out / "per_sample" / "step=0"

        def kill() -> None:
            # Wait until the victim is writing one of its blocks, then kill it mid-write.
            deadline = time.time() + 60
            while time.time() < deadline:
                if any(step_dir.glob(f".part-{b.index:05d}.parquet.tmp-*") for b in its_blocks):
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
                    return
                time.sleep(0.001)

        killer = threading.Thread(target=kill)
        killer.start()
        run.execute()
        killer.join()
        after = run.pool.pids()
    finally:
        run.close()
    assert killed and victim not in after
    parts = f"{out}/per_sample/step=0/*.parquet"
    rows, distinct, lo, hi = duckdb.sql(
        f"select count(*), count(distinct sample), min(sample), max(sample) "
        f"from read_parquet('{parts}')").fetchall()[0]
    assert (rows, distinct, lo, hi) == (1_000_000, 1_000_000, 0, 999_999)
    assert not list(out.rglob(".*.tmp-*"))
