"""Worker processes without Ray (local.py): the bits of the in-process threads, errors that
reach the caller as the same one line, and no process left behind."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_classification

from gradpipe import worker
from gradpipe.data import DataSpec, plan
from gradpipe.errors import DataError, JobError, RunInterrupted
from gradpipe.reduce import reduce
from gradpipe.train import Run, TrainConfig, train
from gradpipe.worker import Pool, StepRequest


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_classification(tmp_path / "data", rows=300, features=6, classes=4, files=3,
                               row_group_size=25)


@pytest.fixture
def processes_for_any_step(monkeypatch):
    """Every --workers 0 run with more than one block computes in child processes."""
    monkeypatch.setattr(worker, "PROCESS_STEP_FLOPS", 0.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_processes_give_the_bits_of_threads(data, tmp_path, dtype, monkeypatch):
    tables = {}
    for mode, threshold in (("threads", float("inf")), ("processes", 0.0)):
        monkeypatch.setattr(worker, "PROCESS_STEP_FLOPS", threshold)
        out = tmp_path / mode
        said: list[str] = []
        train(TrainConfig(data=str(data), out=str(out), workers=0, dtype=dtype, hidden=(8, 5),
                          steps=4, record_every=1, momentum=0.5, per_sample="norms",
                          per_sample_every=1),
              note=said.append)
        where = said[0].rsplit("; ", 1)[1]
        assert where == ("in-process (--workers 0)" if mode == "threads" else
                         "without Ray: 2 worker processes on this machine"), said[0]
        info = json.loads((out / "run.json").read_text())
        assert (info["workers"], info["processes"]) == (0, 0 if mode == "threads" else 2)
        tables[mode] = [pq.read_table(out / n) for n in ("gradients", "weights.parquet")]
        tables[mode] += [pq.read_table(out / "per_sample" / f"step={k}").sort_by("sample")
                         for k in range(4)]
        tables[mode].append(pq.read_table(out / "metrics").drop(
            ["seconds", "partials", "partial_bytes"]))
    for a, b in zip(tables["threads"], tables["processes"], strict=True):
        assert a.equals(b)


def test_the_rule_chooses_processes_for_long_steps_and_threads_for_large_blocks(tmp_path):
    data = make_classification(tmp_path / "d", rows=300, files=3, row_group_size=100)
    dataset = plan(DataSpec(str(data)))  # a block a file
    blocks = len(dataset.blocks)
    assert blocks > 1
    cores = min(worker.cores(), blocks)
    large = worker.THREAD_BLOCK_FLOPS * blocks  # a step whose blocks take threads
    assert large < worker.PROCESS_STEP_FLOPS
    cases = [  # (workers, flops per step, steps) -> (child processes, block threads)
        ((0, worker.PROCESS_STEP_FLOPS, 1), (cores, 0) if cores > 1 else (0, 1)),
        ((0, large, 1000), (0, worker.cores())),  # shorter steps, large blocks: threads
        ((0, large / 2, 1000), (0, 1)),  # small blocks: one thread
        ((None, 1e6, 1), (0, 1)),  # small work, in-process by default
        ((0, None, None), (0, worker.cores())),  # no estimate: a thread per core
    ]
    for (workers, step, steps), (processes, threads) in cases:
        flops = None if step is None else (step, steps)
        pool = worker.start_pool(dataset, workers, "float64", flops=flops)
        try:
            assert pool.processes == processes, (workers, step, steps)
            assert (pool.children is not None) == (processes > 1)
            assert (pool.local.threads if pool.local else 0) == threads, (workers, step)
        finally:
            pool.close()


def test_a_bad_block_is_reported_as_in_process(data, tmp_path):
    dataset = plan(DataSpec(str(data)))
    victim = sorted(data.glob("*.parquet"))[-1]
    victim.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")  # planned, then spoiled
    errors = []
    for processes in (0, 2):
        pool = Pool(dataset, 0, "float64", processes=processes)
        try:
            with pytest.raises(DataError) as e:
                pool.load()
            errors.append(str(e.value))
        finally:
            pool.close()
    assert errors[0] == errors[1] and victim.name in errors[0]


def test_a_killed_process_is_one_clear_error_and_nothing_is_left(data):
    dataset = plan(DataSpec(str(data)))
    pool = Pool(dataset, 0, "float64", processes=2)
    pids = pool.pids()
    try:
        pool.load()
        from gradpipe.model import Architecture, init_params

        arch = Architecture((6, 4, 4), "sigmoid", "softmax", "cross_entropy", "float64")
        req = StepRequest(step=0, arch=arch, params=init_params(arch, 0))
        assert reduce(pool.step(req)).n == 300
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(JobError, match=rf"local worker process {pids[1]} was killed by "
                                           rf"signal {int(signal.SIGKILL)}"):
            pool.step(req)
    finally:
        pool.close()
    assert all(gone(p) for p in pids)


def test_ctrl_c_stops_the_processes_and_resume_gives_the_same_bits(
        data, tmp_path, processes_for_any_step):
    common = dict(data=str(data), workers=0, hidden=(4,), steps=8, checkpoint_every=2,
                  per_sample="norms")
    pids: list[int] = []
    out = tmp_path / "run"

    run = Run(TrainConfig(out=str(out), **common))

    def ctrl_c(done: int, metrics: dict) -> None:
        pids.extend(run.pool.pids())
        if done == 5:
            raise KeyboardInterrupt

    run.prepare()
    try:
        with pytest.raises(RunInterrupted):
            run.execute(ctrl_c)
    finally:
        run.close()
    assert pids and all(gone(p) for p in pids)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    train(TrainConfig(out=str(out), resume=True, **common))
    full = tmp_path / "full"
    train(TrainConfig(out=str(full), **common))
    for name in ("weights.parquet", "gradients"):
        assert pq.read_table(out / name).equals(pq.read_table(full / name))
    np.testing.assert_array_equal(
        pq.read_table(out / "per_sample" / "step=7").sort_by("sample").column("loss"),
        pq.read_table(full / "per_sample" / "step=7").sort_by("sample").column("loss"))


def test_evaluate_predict_scores_and_influence_give_the_bits_of_threads(
        tmp_path, monkeypatch):
    from test_scores import run
    from test_scores import train as train_run

    data = make_classification(tmp_path / "d", rows=60, features=4, classes=3, files=3,
                               row_group_size=10)
    test = make_classification(tmp_path / "t", rows=9, features=4, classes=3, files=1, seed=5)
    out = train_run(data, tmp_path / "run")
    from gradpipe import local

    started: list[int] = []

    class Counted(local.LocalWorkers):
        def __init__(self, groups: list[tuple]) -> None:
            started.append(len(groups))
            super().__init__(groups)

    monkeypatch.setattr(local, "LocalWorkers", Counted)
    got: dict[str, list] = {}
    for mode, threshold in (("threads", float("inf")), ("processes", 0.0)):
        monkeypatch.setattr(worker, "PROCESS_STEP_FLOPS", threshold)
        here = tmp_path / mode
        results = [
            run("evaluate", out, data, "--workers", "0", "--json"),
            run("predict", out, data, "--workers", "0", "--out", here / "pred", "--quiet"),
            run("scores", out, "--workers", "0", "--out", here / "scores", "--json", "--top",
                "7"),
            run("influence", out, "--test", test, "--workers", "0", "--out",
                here / "influence.parquet", "--top", "4", "--quiet"),
            run("evaluate", out, data, "--workers", "0"),  # its schema line on stderr
        ]
        for r in results:
            assert r.exit_code == 0, (mode, r.output, r.exception)
        said = "without Ray: 2 worker processes on this machine"
        assert (said in results[4].stderr) == (mode == "processes"), results[4].stderr
        got[mode] = [results[0].stdout, json.loads(results[2].stdout)["top"]]
        got[mode] += [pq.read_table(here / name) for name in
                      ("pred", "scores", "influence.parquet")]
    assert started == [2] * 5  # the five commands, each in 2 processes (none in threads)
    threads, processes = got["threads"], got["processes"]
    assert threads[:2] == processes[:2]
    for a, b in zip(threads[2:], processes[2:], strict=True):
        assert a.num_rows > 0 and a.equals(b)


def test_a_bug_in_a_child_keeps_its_traceback(data):
    from gradpipe.local import LocalWorkers

    dataset = plan(DataSpec(str(data)))
    children = LocalWorkers([(dataset, list(dataset.blocks), "float64", False, 1)])
    try:
        with pytest.raises(AttributeError) as e:
            children.call("no_such_method")
        assert "raised in a local worker process" in "\n".join(
            getattr(e.value, "__notes__", ["raised in a local worker process"]))
        assert children.call("pid") != [os.getpid()]  # answers again after the error
    finally:
        children.close()


def test_one_block_runs_in_process_by_default_however_large(tmp_path):
    # a block is one worker's: starting Ray would only add its start to the wait
    data = make_classification(tmp_path / "d", rows=50, files=1, row_group_size=50)
    dataset = plan(DataSpec(str(data)))
    assert len(dataset.blocks) == 1
    pool = worker.start_pool(dataset, None, "float64", flops=(1e12, 1000))
    try:
        assert pool.workers == 0 and pool.processes == 0
        assert pool.where() == ("; in-process: one block (a smaller --block-rows splits it), "
                                "--workers N to use Ray")
    finally:
        pool.close()
