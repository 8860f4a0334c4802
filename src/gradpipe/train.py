"""The SGD loop: plan the data, start the workers, then per step fan out, reduce, record, update.

Step s computes the full-batch (or mini-batch) gradient at the weights w_s; optim.py gives
w_{s+1}. `gradpipe grad` is the same run with one step and no update. The run folder is
written (through recorder.py) only after the data and the model have been checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import signal
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import numpy as np
from numpy.typing import NDArray

from . import options
from .config import TrainConfig
from .data import Dataset, DataSpec, plan
from .errors import ConfigError, DataError, DivergenceError, RunInterrupted
from .model import Architecture, Params, check_shapes, init_params
from .optim import draw_batch, lr_at, sgd_step, weight_mask, with_weight_decay
from .outputs import params_from_flat, read_run_json, read_weights
from .recorder import Recorder, check_apart, prepare_run_dir, read_checkpoint
from .reduce import Gradient, reduce
from .worker import Pool, StepRequest, ray_init

F64 = NDArray[np.float64]
INIT_SCHEME = "glorot-uniform (he-uniform for relu layers), zero biases, numpy PCG64(seed)"
Progress = Callable[[int, dict], None]

__all__ = ["Run", "TrainConfig", "resumed_config", "train"]


def data_spec(config: TrainConfig) -> DataSpec:
    """The dataset options; with --weights the classes are the model's outputs, so labels
    beyond them are refused by name and a split holding fewer classes is accepted."""
    classes = None
    if config.weights:
        arch = read_weights(config.weights)[0]
        classes = arch.sizes[-1] if arch.sizes[-1] >= 2 else None
    return DataSpec(config.data, config.features, config.target, config.id_column,
                    classes=classes, block_rows=config.block_rows)


def build_model(
    config: TrainConfig, dataset: Dataset
) -> tuple[Architecture, Params, tuple[F64, F64] | None]:
    """The architecture and initial weights: --weights, or seeded init sized by the data."""
    if config.weights:
        arch, params, standardize, _ = read_weights(config.weights)
        arch = dataclasses.replace(arch, dtype=config.dtype)
        params = params.astype(config.dtype)
    else:
        sizes = (dataset.n_features, *config.hidden, dataset.n_outputs)
        arch = Architecture(sizes, config.activation, config.output_activation, config.loss,
                            config.dtype)
        params = init_params(arch, config.seed)
        standardize = None
    if arch.sizes[0] != dataset.n_features:
        raise DataError(
            f"model expects {arch.sizes[0]} features but {dataset.source} has "
            f"{dataset.n_features} feature columns. Check --features or --weights."
        )
    if arch.sizes[-1] != dataset.n_outputs:
        what = "classes" if dataset.classify else "target columns"
        raise DataError(
            f"model has {arch.sizes[-1]} outputs but {dataset.source} has "
            f"{dataset.n_outputs} {what}. Check --target or --weights."
        )
    check_shapes(arch, params)
    return arch, params, standardize


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("gradpipe", "numpy", "pyarrow", "ray", "click"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def resumed_config(out: str, given: dict[str, Any]) -> TrainConfig:
    """The config of the run in `out`, read from its run.json, with the options `given`
    again on the command line or in a job file (Run.prepare refuses those that differ from
    the run, except the ones declared free, such as --workers, and --steps, which may grow)."""
    info = read_run_json(out)
    if info.get("command") != "train":
        raise ConfigError(f"--resume {out}: this run folder was not made by gradpipe train")
    old = dict(info.get("config", {}))
    old["data"] = info.get("data_path", old.get("data"))  # absolute: resumable from anywhere
    keys = {n for n, o in options.options(TrainConfig).items() if o.in_job} - {"resume",
                                                                              "overwrite"}
    values = options.parse_values(TrainConfig, {k: v for k, v in old.items() if k in keys})
    values.update({k: v for k, v in given.items() if k not in ("resume", "overwrite")})
    return TrainConfig(**{**values, "out": out, "resume": True})


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (timeout, Slurm, Kubernetes) stops a run as Ctrl-C does."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Run:
    """One training or gradient run over a planned dataset and a started worker pool."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.recorder = Recorder(config.out) if config.out else None

    def prepare(self) -> None:
        """Check everything that can be checked before a file is written."""
        config = self.config
        if config.out is not None:
            check_apart(config.out, DATA=config.data)
            if not config.resume:
                prepare_run_dir(config.out, overwrite=config.overwrite)
        self.dataset = plan(data_spec(config))
        self.arch, self.params, self.standardize = build_model(config, self.dataset)
        self.step, self.velocity = 0, np.zeros(self.arch.n_params)
        if config.resume:
            assert config.out is not None
            info = read_run_json(config.out)
            if info.get("command") != "train":
                raise ConfigError(f"--resume {config.out}: this run folder was not made by "
                                  "gradpipe train")
            conflict = options.resume_conflict(TrainConfig, info.get("config", {}),
                                               config.to_dict())
            if conflict:
                raise ConfigError(f"--resume {config.out}: {conflict}. Resume with the run's "
                                  "options (only --steps may grow).")
            if info.get("dataset", {}).get("fingerprint") != self.dataset.fingerprint:
                raise ConfigError(f"--resume {config.out}: the dataset {config.data} changed "
                                  "since the run began")
            self.step, params, velocity = read_checkpoint(config.out)
            self.params = params.astype(self.arch.dtype)
            if velocity is not None:
                self.velocity = velocity
            self.done = info.get("status") == "completed" and (
                self.step >= config.steps or bool(info.get("converged")))
            if self.done:
                return
        if config.workers != 0:
            ray_init(config.address, verbose=config.verbose)
        workers = config.workers
        if workers is None:
            import ray

            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.n_workers = min(workers, len(self.dataset.blocks)) if workers else 0
        self.pool = Pool(self.dataset, self.n_workers, config.dtype, stream=self._stream())
        self.data_bytes = self.pool.load()  # reads and checks every block
        if config.standardize and self.standardize is None:
            self.standardize = self.pool.moments()

    def memory_budget(self) -> int:
        """Bytes of blocks one worker may hold: --memory-budget, or by default half of this
        machine's memory shared by the workers (on a cluster, set it for the nodes)."""
        if self.config.memory_budget is not None:
            return self.config.memory_budget
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return physical // 2 // max(1, self.n_workers)

    def _stream(self) -> bool:
        """Stream blocks from Parquet each step when a worker's share exceeds its budget."""
        per_value = 4 if self.config.dtype == "float32" else 8
        row_bytes = per_value * (self.dataset.n_features + self.dataset.n_outputs) + 8  # + id
        share = self.dataset.n_rows * row_bytes / max(1, self.n_workers)
        return share > self.memory_budget()

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()

    def info(self, status: str, **extra: Any) -> dict:
        """run.json: what ran, on what, with which result."""
        return {
            "command": "train" if self.config.update else "grad",
            "status": status,
            "config": self.config.to_dict(),
            "data_path": _absolute(self.config.data),
            "model": {**self.arch.to_dict(), "parameters": self.arch.n_params,
                      "init": INIT_SCHEME},
            "dataset": self.dataset.to_dict(),
            "workers": self.n_workers,
            "versions": versions(),
            "standardize": self.standardize is not None,
            "streaming": self.pool.local.stream if self.pool.local else self._stream(),
            **extra,
        }

    def execute(self, progress: Progress | None = None) -> dict:
        """Run every step; returns the summary of the last one.

        Ctrl-C or SIGTERM marks the run `interrupted` in run.json (its checkpoints stay, for
        --resume) and raises a RunInterrupted naming the step.
        """
        if getattr(self, "done", False):
            return {}
        rec = self.recorder
        try:
            with _sigterm_as_interrupt():
                return self._loop(progress)
        except KeyboardInterrupt:
            if rec is not None and (rec.out / "run.json").is_file():
                rec.status(self.info("interrupted", started=self.started, steps_done=self.step))
            raise RunInterrupted(
                f"interrupted after {self.step} steps; continue with "
                f"gradpipe train --resume --out {self.config.out}"
                if rec is not None and self.config.update else
                f"interrupted after {self.step} steps") from None

    def _loop(self, progress: Progress | None) -> dict:
        config, arch, rec = self.config, self.arch, self.recorder
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if rec is not None:
            rec.start(self.info("running", started=self.started), overwrite=config.overwrite,
                      resume_step=self.step if config.resume else None)
            if config.update and not config.resume:
                self._checkpoint()  # step 0: a diverged or killed run still has w_0
        last = config.steps - 1 if config.update else 0
        mask = weight_mask(arch.sizes)
        metrics: dict = {}
        converged = False
        while self.step <= last and not converged:
            t0 = time.perf_counter()
            step, flat = self.step, self.params.flat()
            # fan out to the workers, reduce their block partials in block order
            per_sample = self._due(config.per_sample_every, last) and config.per_sample
            grad = reduce(self.pool.step(StepRequest(
                step=step, arch=arch, params=self.params,
                per_sample=per_sample if per_sample and rec is not None else "none",
                out_dir=rec.per_sample_dir() if rec is not None else None,
                batch=draw_batch(config.batch, config.seed, self.dataset.n_rows, step),
                standardize=self.standardize)))
            g = with_weight_decay(grad.flat(), flat, config.weight_decay, mask)
            lr = lr_at(config.schedule, config.lr, config.steps, step)
            metrics = self._metrics(step, grad, lr, time.perf_counter() - t0)
            if not (math.isfinite(grad.loss) and np.isfinite(g).all()):
                self._diverged(metrics)
            # record: the metrics row always, the whole gradient every --record-every steps
            converged = config.tol > 0 and metrics["grad_norm"] < config.tol
            if rec is not None:
                rec.metrics(metrics)
                if converged or self._due(config.record_every, last):
                    rec.gradients(step, arch.sizes, flat, g)
            # update: w_{s+1} = w_s - lr v_s (--steps N makes N updates)
            if config.update and not converged:
                flat, self.velocity = sgd_step(flat, self.velocity, g, lr, config.momentum)
                with np.errstate(over="ignore"):  # overflow to inf is caught just below
                    self.params = params_from_flat(arch.sizes, flat, arch.dtype)
                if not all(np.isfinite(w).all() for w in self.params.w + self.params.b):
                    self._diverged(metrics)
            self.step = step + 1
            if rec is not None and config.update and (
                    converged or self.step > last or self._due(config.checkpoint_every, -1)):
                self._checkpoint()
            if progress is not None:
                progress(self.step, metrics)
        if rec is not None:
            rec.weights(arch, self.params, self.standardize)
            rec.status(self.info(
                "completed", started=self.started, steps_done=self.step, converged=converged,
                finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                final=metrics))
        return metrics

    def _due(self, every: int, last: int) -> bool:
        """Whether the current step is a multiple of `every`, or the last step."""
        return self.step == last or bool(every and self.step % every == 0)

    def _metrics(self, step: int, grad: Gradient, lr: float, seconds: float) -> dict:
        row = {
            "step": step,
            "loss": grad.loss,
            "grad_norm": grad.norm(),
            "lr": lr,
            "samples": grad.n,
            "seconds": seconds,
            # null where undefined (n < 2, or |G|^2 below its own noise): NaN would not compare.
            "noise_scale": None if math.isnan(noise := grad.noise_scale()) else noise,
        }
        if self.dataset.classify:
            row["accuracy"] = grad.correct / grad.n
        for l, norm in enumerate(grad.layer_norms()[1:], start=1):
            row[f"grad_norm_l{l}"] = float(norm)
        return row

    def _checkpoint(self) -> None:
        assert self.recorder is not None
        self.recorder.checkpoint(self.step, self.arch, self.params, self.velocity,
                                 self.standardize)

    def _diverged(self, metrics: dict) -> None:
        if self.recorder is not None:
            self.recorder.metrics(metrics)
            self.recorder.status(self.info("diverged", started=self.started,
                                           diverged_at=metrics["step"]))
        raise DivergenceError(
            f"step {metrics['step']}: the loss or gradient is not finite (loss "
            f"{metrics['loss']:.6g}, gradient norm {metrics['grad_norm']:.6g}). Lower --lr; "
            "the last finite checkpoint is kept."
        )


def train(config: TrainConfig, progress: Progress | None = None) -> dict:
    """Run `config` to the end: plan, load, steps, outputs. Returns the last step's metrics
    (empty when a resumed run had nothing left to do)."""
    run = Run(config)
    try:
        run.prepare()
        return run.execute(progress)
    finally:
        run.close()
