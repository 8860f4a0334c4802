"""The run folder's one owner: writes every record append-only, and reads them back.

    RUN/run.json                        configuration, dataset, model, status (rewritten)
    RUN/metrics/step-SSSSSSSS.parquet   one row per step, a file per checkpoint interval
    RUN/gradients/step-SSSSSSSS.parquet the recorded steps: step, layer, param, j, k, value, grad,
                                        [grad_sq]
    RUN/per_sample/step=S/part-BLOCK.parquet   written by the workers
    RUN/checkpoints/step-SSSSSS/        weights.parquet (+ velocity), state.json written last
    RUN/weights.parquet                 the final weights

Records are new files, written once through atomic.py and never rewritten: a recorded
gradient at its step, the metrics rows of the steps since the last checkpoint at the next
(at most METRICS_ROWS wait in memory), so the driver's memory and the cost of a record do
not grow with the step number. Only run.json (the status) and weights.parquet are
replaced. A resumed run starts from its last complete checkpoint and first removes the
records of the steps after it, so that nothing is duplicated; everything that reads a run
(inspect, resume, tests) goes through here.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.typing import NDArray

from . import store
from .atomic import check_replaceable, sweep
from .errors import ConfigError
from .model import Architecture, Params
from .outputs import (
    gradient_table,
    read_run_json,
    read_weights,
    weights_table,
    write_json,
    write_table,
)

F64 = NDArray[np.float64]
# Steps whose metrics rows may wait in memory before they are written (besides every
# checkpoint): bounds the driver's memory when checkpoints are rare.
METRICS_ROWS = 1000
_STEP_FILE = re.compile(r"^step-(\d+)\.parquet$")
_STEP_DIR = re.compile(r"^step[-=](\d+)$")


def metrics_table(rows: list[dict]) -> pa.Table:
    """Metrics rows: every column float64 but step and samples, even when all null."""
    types = {"step": pa.int64(), "samples": pa.int64()}
    schema = pa.schema([(k, types.get(k, pa.float64())) for k in rows[0]])
    return pa.Table.from_pylist(rows, schema=schema)


def _steps(folder: str, pattern: re.Pattern[str]) -> dict[int, str]:
    found = {}
    for name in store.listdir(folder):
        m = pattern.match(name)
        if m:
            found[int(m.group(1))] = store.join(folder, name)
    return dict(sorted(found.items()))


def prepare_run_dir(out: str | Path, *, overwrite: bool) -> str:
    """Check that `out` may be written: new, empty, or an old run with `overwrite`."""
    check_replaceable(out, overwrite, name=f"--out {out}", also=", --resume to continue it",
                      foreign=lambda folder: None if store.is_file(store.join(folder, "run.json"))
                      else "is not a gradpipe run folder (no run.json)")
    return store.resolve(str(out))


def check_apart(out: str | Path, **inputs: str | None) -> None:
    """Refuse a run folder inside an input (the next run would read it as data) or an input
    inside the run folder (--overwrite would delete it). Inputs are named by their flag."""
    here = store.resolve(str(out))
    for name, path in inputs.items():
        if not path or store.is_remote(path) != store.is_remote(here):
            continue
        there = store.resolve(path)
        if store.inside(here, there):
            where = "is" if store.resolve(here) == store.resolve(there) else "is inside"
            raise ConfigError(f"--out {out} {where} {name} {path}: the run's files would "
                              f"become part of the data. Choose a folder outside it.")
        if store.inside(there, here):
            raise ConfigError(f"{name} {path} is inside --out {out}: choose a run folder that "
                              "does not hold the data.")


# In a local run folder: held locked (flock) by the process writing the run, as long as it
# runs; the system lets go of it when the process ends, however it ends.
LOCK_FILE = ".lock"


class Recorder:
    """Writes one run folder. `start` creates it (or, resuming, trims it to a checkpoint)."""

    def __init__(self, out: str | Path) -> None:
        self.out = store.resolve(str(out))
        self._pending: list[dict] = []  # metrics rows not yet written (< METRICS_ROWS)
        self._locks: list[int] = []  # descriptors of the lock files this process holds
        # Whether this process writes the folder (holds its lock; a store has none): a run
        # refused because another one writes it must not mark that run's run.json failed.
        self.owns = False

    # --- the folder ----------------------------------------------------------------------
    def start(self, info: dict, *, overwrite: bool = False, resume_step: int | None = None) -> None:
        """Create the folder (replacing an old run with `overwrite`), or resume it at
        `resume_step`: temporaries and the records of steps >= resume_step are removed.
        Refused when another process writes the folder now (its lock is held)."""
        if resume_step is None:
            prepare_run_dir(self.out, overwrite=overwrite)
            if overwrite:
                if store.is_file(store.join(self.out, "run.json")):
                    self._lock()  # not while another process writes that run
                store.remove(self.out)
            store.makedirs(self.out)
            self._lock()
        else:
            self._lock()
            sweep(self.out)
            self.drop_records_from(resume_step)
        self.owns = True
        self.status(info)

    def _lock(self) -> None:
        """Hold RUN/.lock (local folders; object stores have no locks)."""
        if store.is_remote(self.out):
            return
        fd = os.open(os.path.join(self.out, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self.taken() from None
        self._locks.append(fd)

    def taken(self) -> ConfigError:
        """The refusal when another process writes the folder."""
        return ConfigError(f"--out {self.out}: another gradpipe process is writing this run "
                           "folder now; wait for it to end or stop it (then --resume "
                           "continues it)")

    @staticmethod
    def writing(out: str) -> bool | None:
        """Whether a process holds the run folder's lock now (None: a store, or a folder
        written before locks): run.json's "running" of a killed run is not."""
        out = store.resolve(str(out))
        path = os.path.join(out, LOCK_FILE)
        if store.is_remote(out) or not os.path.isfile(path):
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        """Let go of the run folder's lock (the process's end does it too)."""
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    def status(self, info: dict) -> None:
        """Replace run.json (configuration, status, summary), the waiting metrics first."""
        self.flush()
        write_json(info, store.join(self.out, "run.json"))

    def drop_records_from(self, step: int) -> None:
        """Remove the records of steps >= step (written after the checkpoint resumed from)."""
        # Every checkpoint flushes the metrics, so no metrics file spans a checkpoint.
        for kind in ("metrics", "gradients"):
            for s, path in _steps(store.join(self.out, kind), _STEP_FILE).items():
                if s >= step:
                    store.remove(path)
        for s, path in _steps(store.join(self.out, "per_sample"), _STEP_DIR).items():
            if s >= step:
                store.remove(path)
        for s, path in _steps(store.join(self.out, "checkpoints"), _STEP_DIR).items():
            if s > step:
                store.remove(path)

    def drop_step(self, step: int, kinds: tuple[str, ...]) -> None:
        """Remove the records of one step in `kinds` (gradients, per_sample): those an
        extended run wrote at its old last step, which the longer run would not have."""
        for kind in kinds:
            pattern = _STEP_FILE if kind == "gradients" else _STEP_DIR
            path = _steps(store.join(self.out, kind), pattern).get(step)
            if path is not None:
                store.remove(path)

    def null_metrics(self, step: int, columns: tuple[str, ...]) -> None:
        """Set `columns` of step's metrics row to null (the val_* an extended run measured
        at its old last step, which a longer run leaves null there)."""
        files = _steps(store.join(self.out, "metrics"), _STEP_FILE)
        first = max((s for s in files if s <= step), default=None)
        if first is None:
            return
        table = pq.read_table(store.open_input(files[first]))
        at = pc.equal(table.column("step"), step)
        if not pc.any(at).as_py():
            return
        for name in columns:
            if name in table.column_names:
                i = table.column_names.index(name)
                column = table.column(name)
                table = table.set_column(i, name, pc.if_else(
                    at, pa.scalar(None, column.type), column))
        write_table(table, files[first])

    # --- records, one file per step --------------------------------------------------------
    def metrics(self, row: dict) -> None:
        """Add a step's metrics row; rows are written as one file per checkpoint interval
        (metrics/step-FIRST.parquet), so a long run does not leave a file per step."""
        self._pending.append(row)
        if len(self._pending) >= METRICS_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the waiting metrics rows (at every checkpoint and status change)."""
        if self._pending:
            first = self._pending[0]["step"]
            write_table(metrics_table(self._pending),
                        store.join(self.out, "metrics", f"step-{first:08d}.parquet"))
            self._pending = []

    def gradients(self, step: int, sizes: tuple[int, ...], value: F64, grad: F64,
                  grad_sq: F64 | None = None) -> None:
        write_table(gradient_table(step, sizes, value, grad, grad_sq),
                    store.join(self.out, "gradients", f"step-{step:08d}.parquet"))

    def per_sample_dir(self) -> str:
        """Where the workers write per_sample/step=S/ (an absolute path or a URI: they may
        run elsewhere; on a store they write their parts straight to it)."""
        return self.out

    def checkpoint(self, step: int, arch: Architecture, params: Params, velocity: F64,
                   standardize: Any = None, meta: dict | None = None) -> None:
        """checkpoints/step-S/: the weights w_S and the momentum buffer before step S."""
        self.flush()  # the metrics of the steps before S are on disk before S is complete
        d = store.join(self.out, "checkpoints", f"step-{step:06d}")
        write_table(weights_table(arch, params, standardize=standardize, velocity=velocity,
                                  meta=meta), store.join(d, "weights.parquet"))
        write_json({"step": step}, store.join(d, "state.json"))  # last: marks it complete

    def weights(self, arch: Architecture, params: Params, standardize: Any = None,
                meta: dict | None = None) -> None:
        write_table(weights_table(arch, params, standardize=standardize, meta=meta),
                    store.join(self.out, "weights.parquet"))


# --- reading a run ---------------------------------------------------------------------------


def latest_checkpoint(out: str | Path) -> tuple[int, str] | None:
    """The newest complete checkpoint (its state.json is written last): (step, folder)."""
    done = complete_checkpoints(out)
    return done[-1] if done else None


def complete_checkpoints(out: str | Path) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint (state.json is written last), in order."""
    return [(s, p) for s, p in _steps(store.join(str(out), "checkpoints"), _STEP_DIR).items()
            if store.is_file(store.join(p, "state.json"))]


def nearest_checkpoint(out: str | Path, step: int) -> tuple[int, str] | None:
    """The complete checkpoint whose step is closest to `step` (the earlier on a tie)."""
    done = complete_checkpoints(out)
    return min(done, key=lambda c: (abs(c[0] - step), c[0])) if done else None


def read_checkpoint(out: str | Path) -> tuple[int, Params, F64 | None]:
    """(step, weights, velocity) of the last complete checkpoint."""
    found = latest_checkpoint(out)
    if found is None:
        raise ConfigError(f"--resume {out}: the run has no complete checkpoint to resume from")
    step, folder = found
    assert int(json.loads(store.read_text(store.join(folder, "state.json")))["step"]) == step
    _, params, _, velocity = read_weights(store.join(folder, "weights.parquet"))
    return step, params, velocity


def _concat(files: list[str]) -> pa.Table | None:
    # promote: a run resumed by a newer gradpipe has rows with columns its first ones lack
    # (null there), such as noise_scale_l1.. in the metrics.
    return pa.concat_tables([pq.read_table(store.open_input(p)) for p in files],
                            promote_options="default") if files else None


def read_metrics(run: str | Path) -> pa.Table | None:
    """Every step's metrics row, in step order (None if none was written)."""
    return _concat(list(_steps(store.join(str(run), "metrics"), _STEP_FILE).values()))


def read_gradients(run: str | Path) -> pa.Table | None:
    """The recorded gradients, in step order (None if none was recorded)."""
    return _concat(list(_steps(store.join(str(run), "gradients"), _STEP_FILE).values()))


def recorded_steps(run: str | Path, kind: str) -> list[int]:
    """The steps of `kind` (metrics | gradients | per_sample | checkpoints) in a run."""
    pattern = _STEP_FILE if kind in ("metrics", "gradients") else _STEP_DIR
    return list(_steps(store.join(str(run), kind), pattern))


__all__ = ["Recorder", "latest_checkpoint", "metrics_table", "prepare_run_dir",
           "read_checkpoint", "read_gradients", "read_metrics", "read_run_json",
           "recorded_steps", "write_table"]
