"""Shared fixtures: tiny networks and datasets in tmp_path, and one Ray instance per session."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "data" / "digits"


def overriding(base: list, extra: tuple | list) -> list:
    """base's (--flag, value) pairs, but those whose --flag is in extra, then extra: an
    option given twice is refused."""
    given = {str(a) for a in extra if str(a).startswith("--")}
    out, items = [], iter(base)
    for a in items:
        if str(a) in given:
            next(items, None)  # its value
            continue
        out.append(a)
    return out + list(extra)


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    """Write a dict of columns as one Parquet file (creating folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def make_classification(folder: Path, *, rows: int = 60, features: int = 5, classes: int = 3,
                        files: int = 3, row_group_size: int = 7, seed: int = 0) -> Path:
    """A small dataset of several files and row groups (short last groups included)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    labels = rng.integers(0, classes, size=rows)
    labels[:classes] = np.arange(classes)  # every class present
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for f in range(files):
        part = slice(bounds[f], bounds[f + 1])
        cols = {f"x{d}": x[part, d] for d in range(features)}
        cols["label"] = labels[part]
        write_parquet(folder / f"part-{f}.parquet", cols, row_group_size)
    return folder


def make_regression(folder: Path, *, rows: int = 40, features: int = 4, targets: int = 2,
                    seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    cols = {f"x{d}": x[:, d] for d in range(features)}
    for t in range(targets):
        cols[f"t{t}"] = np.tanh(x @ rng.normal(size=features))
    write_parquet(folder / "part-0.parquet", cols, row_group_size=9)
    return folder


def stop_head(proc: subprocess.Popen, temp: str) -> None:
    """Stop a `ray start --head --block` started in its own process group, and its folder.

    SIGTERM leaves gcs_server and raylet running (RAY-NOTES); SIGKILL the group after a grace.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    shutil.rmtree(temp, ignore_errors=True)


def ok(result):
    """A CliRunner result that succeeded and printed nothing on stderr."""
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stderr == ""
    return result


def one_line_error(result, *names: str) -> str:
    """A refused command: exit 2, no traceback, one 'gradpipe: error:' line naming `names`."""
    assert "Traceback" not in result.output
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradpipe: error: "), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def cls_data(tmp_path: Path) -> Path:
    return make_classification(tmp_path / "cls")


@pytest.fixture
def reg_data(tmp_path: Path) -> Path:
    return make_regression(tmp_path / "reg")


@pytest.fixture(autouse=True)
def _aws_environment():
    """A test that sets an S3 endpoint (--s3-endpoint sets AWS_ENDPOINT_URL in the process)
    leaves the environment as it found it."""
    from gradpipe.store import WORKER_VARS

    saved = {k: os.environ.get(k) for k in WORKER_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting one costs 5-10 s)."""
    from gradpipe.worker import ray_init

    ray_init("local", num_cpus=2)
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """Use in @pytest.mark.ray tests."""
    return ray_session


def kill_one_worker_during(run, step_to_hit: int, kills: list[int]):
    """Progress hook: after step `step_to_hit` - 1 ends, SIGKILL a worker shortly after."""
    import threading
    import time

    def progress(done: int, metrics: dict) -> None:
        if done == step_to_hit:
            pid = run.pool.pids()[0]

            def kill() -> None:
                time.sleep(0.02)  # inside the next step's compute
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)

            threading.Thread(target=kill).start()

    return progress


def clean_and_killed(tmp_path: Path, common: dict, kill_at: tuple[int, ...]):
    """The same run twice: untouched (tmp_path/clean), and with a worker SIGKILLed during
    each step of `kill_at` (tmp_path/crashed). Returns (clean, crashed, the pids killed,
    the workers' pids after the run)."""
    from gradpipe.train import Run, TrainConfig, train

    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    train(TrainConfig(out=str(clean), **common))
    run = Run(TrainConfig(out=str(crashed), **common))
    kills: list[int] = []
    hooks = [kill_one_worker_during(run, step, kills) for step in kill_at]
    run.prepare()
    try:
        run.execute(lambda done, metrics: [hook(done, metrics) for hook in hooks])
        after = run.pool.pids()
    finally:
        run.close()
    return clean, crashed, kills, after
