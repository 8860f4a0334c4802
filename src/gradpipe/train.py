"""The SGD loop: plan the data, start the workers, and per step fan out, reduce, record, update.

Step s computes the full-batch (or mini-batch) gradient at the weights w_s and then sets
w_{s+1} = w_s - lr_s * v_s with v_s = momentum * v_{s-1} + grad_s (+ weight_decay * w_s on
weights, never biases). `gradpipe grad` is the same run with one step and no update. The
run folder is written only after the data and the model have been checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from .data import BLOCK_ROWS, Dataset, DataSpec, plan
from .errors import ConfigError, DataError, DivergenceError, RunInterrupted
from .model import Architecture, Params, check_shapes, init_params
from .outputs import (
    gradient_table,
    params_from_flat,
    prepare_run_dir,
    read_run_json,
    read_weights,
    weights_table,
    write_json,
    write_table,
)
from .reduce import Gradient, reduce
from .worker import Pool, StepRequest, ray_init

F64 = NDArray[np.float64]
PER_SAMPLE = ("none", "norms", "full")
SCHEDULES = ("constant", "cosine", "linear")
INIT_SCHEME = "glorot-uniform (he-uniform for relu layers), zero biases, numpy PCG64(seed)"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; the CLI and job files map onto these fields one to one."""

    data: str  # Parquet file, folder or URI
    out: str | None = None  # run folder; None: write nothing (check, explain)
    # data
    features: tuple[str, ...] = ()  # names or globs; empty: all but target and id
    target: tuple[str, ...] = ("label",)  # one integer column (classes) or float columns
    id_column: str | None = None  # None: the global row index is the sample id
    standardize: bool = False  # scale features to mean 0, std 1 (statistics from the workers)
    block_rows: int = BLOCK_ROWS  # largest block, in rows
    # model
    hidden: tuple[int, ...] = (32,)  # hidden layer sizes; input and output sizes come from data
    activation: str = "sigmoid"  # hidden layers
    output_activation: str = "sigmoid"  # output layer
    loss: str = "squared"  # per-sample loss: squared | cross_entropy
    seed: int = 0  # initial weights and mini-batch draws
    dtype: str = "float32"  # compute dtype; all sums across samples are float64
    weights: str | None = None  # start from a run folder or weights.parquet instead of init
    # optimizer
    lr: float = 2.0  # learning rate eta (per step, on the mean gradient)
    steps: int = 300  # SGD steps
    momentum: float = 0.0  # 0: plain SGD
    weight_decay: float = 0.0  # L2: lambda * w added to the weight gradients
    schedule: str = "constant"  # constant | cosine | linear (decay to 0 at the last step)
    batch: int | None = None  # None: full batch; N: N rows drawn per step (seeded)
    tol: float = 0.0  # stop when the gradient norm falls below tol
    # execution
    workers: int | None = None  # Ray actors; None: the CPUs Ray offers; 0: in-process
    address: str | None = None  # None: a private local Ray; else a cluster address
    memory_budget: int | None = None  # bytes of blocks per worker before it streams
    # outputs
    record_every: int = 10  # gradients.parquet every K steps (and at the last)
    per_sample: str = "none"  # none | norms | full
    per_sample_every: int = 0  # per_sample/ every K steps; 0: only at the last step
    checkpoint_every: int = 50  # checkpoints/ every K steps (and at the last)
    overwrite: bool = False  # replace an existing run folder
    resume: bool = False  # continue the run in `out` from its last checkpoint
    update: bool = True  # False: compute gradients only (gradpipe grad)
    verbose: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value: object, allowed: str) -> ConfigError:
            return ConfigError(f"--{name.replace('_', '-')} {value}: must be {allowed}")

        if any(h < 1 for h in self.hidden):
            raise bad("hidden", ",".join(map(str, self.hidden)), "positive layer sizes")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", self.lr, "a positive number")
        if self.steps < 1:
            raise bad("steps", self.steps, ">= 1")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", self.momentum, "in [0, 1)")
        if self.weight_decay < 0:
            raise bad("weight_decay", self.weight_decay, ">= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        if self.batch is not None and self.batch < 1:
            raise bad("batch", self.batch, "'full' or a positive number of rows")
        if self.tol < 0:
            raise bad("tol", self.tol, ">= 0")
        if self.workers is not None and self.workers < 0:
            raise bad("workers", self.workers, ">= 0")
        if self.per_sample not in PER_SAMPLE:
            raise bad("per_sample", self.per_sample, f"one of {', '.join(PER_SAMPLE)}")
        for name in ("record_every", "checkpoint_every", "per_sample_every"):
            if getattr(self, name) < 0:
                raise bad(name, getattr(self, name), ">= 0")
        if self.block_rows < 1:
            raise bad("block_rows", self.block_rows, ">= 1")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite cannot be used together")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_at(config: TrainConfig, step: int) -> float:
    """The learning rate of step `step` under the schedule."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
    if config.schedule == "linear":
        return config.lr * (1 - step / config.steps)
    return config.lr


def draw_batch(config: TrainConfig, n_rows: int, step: int) -> NDArray[np.int64] | None:
    """Sorted global row indexes of step's mini-batch; the same for any number of workers."""
    if config.batch is None or config.batch >= n_rows:
        return None
    rng = np.random.default_rng([config.seed, step])
    return np.sort(rng.choice(n_rows, size=config.batch, replace=False)).astype(np.int64)


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


@dataclass
class State:
    """What a checkpoint restores: the next step, the weights and the momentum buffer."""

    step: int
    params: Params
    velocity: F64
    metrics: list[dict] = field(default_factory=list)
    gradients: list[pa.Table] = field(default_factory=list)


def _checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (state.json is written last)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if (p / "state.json").is_file())
    return done[-1] if done else None


def _resume_state(config: TrainConfig, out: Path, arch: Architecture, dataset: Dataset) -> State:
    info = read_run_json(out)
    if info.get("command") != "train":
        raise ConfigError(f"--resume {out}: this run folder was not made by gradpipe train")
    old = info.get("config", {})
    for key in ("data", "hidden", "activation", "output_activation", "loss", "seed", "dtype",
                "lr", "steps", "momentum", "weight_decay", "schedule", "batch", "standardize"):
        new_value = getattr(config, key)
        new_value = list(new_value) if isinstance(new_value, tuple) else new_value
        if old.get(key) != new_value:
            raise ConfigError(
                f"--resume {out}: option --{key.replace('_', '-')} is {new_value!r} but the "
                f"run was started with {old.get(key)!r}. Resume with the same options."
            )
    if info.get("dataset", {}).get("fingerprint") != dataset.fingerprint:
        raise ConfigError(f"--resume {out}: the dataset {config.data} changed since the run began")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise ConfigError(f"--resume {out}: the run has no complete checkpoint to resume from")
    step = int(json.loads((ckpt / "state.json").read_text())["step"])
    _, params, _, velocity = read_weights(ckpt / "weights.parquet")
    state = State(step, params.astype(arch.dtype), velocity if velocity is not None else
                  np.zeros(arch.n_params))
    if (out / "metrics.parquet").is_file():
        state.metrics = [r for r in pq.read_table(out / "metrics.parquet").to_pylist()
                         if r["step"] < step]
    if (out / "gradients.parquet").is_file():
        table = pq.read_table(out / "gradients.parquet")
        state.gradients = [table.filter(pa.compute.less(table["step"], step))]
    return state


Progress = Callable[[int, dict], None]


class Run:
    """One training or gradient run over a planned dataset and a started worker pool."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.out) if config.out else None

    def prepare(self) -> None:
        """Check everything that can be checked before a file is written."""
        config = self.config
        if self.out is not None:
            if config.resume:
                if not (self.out / "run.json").is_file():
                    raise ConfigError(
                        f"--resume {self.out}: not a gradpipe run folder (no run.json)")
            else:
                prepare_run_dir(self.out, overwrite=config.overwrite)
        self.dataset = plan(data_spec(config))
        self.arch, self.params, self.standardize = build_model(config, self.dataset)
        if config.workers != 0:
            ray_init(config.address, verbose=config.verbose)
        workers = config.workers
        if workers is None:
            import ray

            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.n_workers = min(workers, len(self.dataset.blocks)) if workers else 0
        self.pool = Pool(self.dataset, self.n_workers, config.dtype,
                         stream=self._stream())
        self.data_bytes = self.pool.load()  # reads and checks every block
        if config.standardize and self.standardize is None:
            self.standardize = self.pool.moments()
        self.state = State(0, self.params, np.zeros(self.arch.n_params))
        if config.resume and self.out is not None:
            self.state = _resume_state(config, self.out, self.arch, self.dataset)
            # A killed run can leave temporary files (never the real names): drop them.
            for tmp in self.out.rglob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)

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

    def run_json(self, status: str, **extra) -> dict:
        return {
            "command": "train" if self.config.update else "grad",
            "status": status,
            "config": self.config.to_dict(),
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

        Ctrl-C marks the run `interrupted` in run.json (its checkpoints stay, for --resume)
        and raises a RunInterrupted naming the step.
        """
        try:
            return self._execute(progress)
        except KeyboardInterrupt:
            step = self.state.step
            if self.out is not None and (self.out / "run.json").is_file():
                write_json(self.run_json("interrupted", steps_done=step), self.out / "run.json")
            raise RunInterrupted(
                f"interrupted after {step} steps; continue with --resume --out {self.out}"
                if self.out is not None and self.config.update else
                f"interrupted after {step} steps") from None

    def _execute(self, progress: Progress | None = None) -> dict:
        config, arch, out = self.config, self.arch, self.out
        state = self.state
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if out is not None:
            if not config.resume:
                prepare_run_dir(out, overwrite=config.overwrite, remove=True)
            out.mkdir(parents=True, exist_ok=True)
            write_json(self.run_json("running", started=started), out / "run.json")
            if config.update and not config.resume:
                self._checkpoint(state)  # step 0: a diverged or killed run still has w_0
        last = config.steps - 1 if config.update else 0
        summary: dict = {}
        params, velocity = state.params, state.velocity
        step = state.step
        while step <= last:
            t0 = time.perf_counter()
            per_sample_now = config.per_sample != "none" and (
                step == last or (config.per_sample_every and step % config.per_sample_every == 0)
            )
            req = StepRequest(
                step=step, arch=arch, params=params,
                per_sample=config.per_sample if per_sample_now and out is not None else "none",
                out_dir=str(out.resolve()) if out is not None else None,
                batch=draw_batch(config, self.dataset.n_rows, step),
                standardize=self.standardize,
            )
            grad = reduce(self.pool.step(req))
            if req.per_sample != "none" and out is not None:
                # A worker killed mid-write leaves its temporary file; the retry wrote the part.
                for tmp in (out / "per_sample" / f"step={step}").glob(".*.tmp-*"):
                    tmp.unlink(missing_ok=True)
            lr = lr_at(config, step)
            metrics = self._metrics(step, grad, lr, time.perf_counter() - t0)
            converged = config.tol > 0 and metrics["grad_norm"] < config.tol
            stop = converged or step == last
            if not (math.isfinite(grad.loss) and np.isfinite(grad.flat()).all()):
                self._diverged(step, state, metrics)
            state.metrics.append(metrics)
            full = self._with_decay(grad, params)
            if out is not None and (step == last or stop or (
                    config.record_every and step % config.record_every == 0)):
                state.gradients.append(gradient_table(step, arch.sizes, params.flat(), full))
            if config.update and not converged:  # --steps N makes N updates
                velocity = config.momentum * velocity + full
                flat = params.flat() - lr * velocity
                with np.errstate(over="ignore"):  # overflow to inf is caught just below
                    params = _unflatten(arch, flat)
                if not all(np.isfinite(w).all() for w in params.w + params.b):  # in dtype
                    self._diverged(step, state, metrics)
            step += 1
            state.step, state.params, state.velocity = step, params, velocity
            if out is not None:
                write_table(metrics_table(state.metrics), out / "metrics.parquet")
                if config.update and (stop or (
                        config.checkpoint_every and step % config.checkpoint_every == 0)):
                    self._checkpoint(state)
            summary = metrics
            if progress is not None:
                progress(step, metrics)
            if stop:
                break
        if out is not None:
            self._write_gradients(state)
            write_table(weights_table(arch, params, standardize=self.standardize),
                        out / "weights.parquet")
            write_json(self.run_json(
                "completed", started=started, steps_done=step,
                finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                final=summary), out / "run.json")
        self.final_params = params
        self.final_gradient = grad
        return summary

    def _with_decay(self, grad: Gradient, params: Params) -> F64:
        """dC/dtheta as one vector, plus weight_decay * w on the weights (never biases)."""
        flat = grad.flat()
        lam = self.config.weight_decay
        if lam:
            mask = np.concatenate([np.r_[np.ones(w.size), np.zeros(b.size)]
                                   for w, b in zip(params.w[1:], params.b[1:], strict=True)])
            flat = flat + lam * params.flat() * mask
        return flat

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

    def _checkpoint(self, state: State) -> None:
        assert self.out is not None
        d = _checkpoint_dir(self.out, state.step)
        self._write_gradients(state)
        write_table(weights_table(self.arch, state.params, standardize=self.standardize,
                                  velocity=state.velocity), d / "weights.parquet")
        write_json({"step": state.step}, d / "state.json")  # last: marks it complete

    def _write_gradients(self, state: State) -> None:
        assert self.out is not None
        if state.gradients:
            table = pa.concat_tables(state.gradients)
            state.gradients = [table]  # keep one table, not one per record
            write_table(table, self.out / "gradients.parquet")

    def _diverged(self, step: int, state: State, metrics: dict) -> None:
        assert self.out is None or self.out.is_dir()
        if self.out is not None:
            state.metrics.append(metrics)
            write_table(metrics_table(state.metrics), self.out / "metrics.parquet")
            write_json(self.run_json("diverged", diverged_at=step), self.out / "run.json")
        raise DivergenceError(
            f"step {step}: the loss or gradient is not finite (loss {metrics['loss']:.6g}, "
            f"gradient norm {metrics['grad_norm']:.6g}). Lower --lr; the last finite "
            "checkpoint is kept."
        )


def metrics_table(rows: list[dict]) -> pa.Table:
    """metrics.parquet: every column float64 but step and samples, even when all null."""
    types = {"step": pa.int64(), "samples": pa.int64()}
    schema = pa.schema([(k, types.get(k, pa.float64())) for k in rows[0]])
    return pa.Table.from_pylist(rows, schema=schema)


def _unflatten(arch: Architecture, flat: F64) -> Params:
    return params_from_flat(arch.sizes, flat, arch.dtype)


def train(config: TrainConfig, progress: Progress | None = None) -> dict:
    """Run `config` to the end: plan, load, steps, outputs. Returns the last step's metrics."""
    run = Run(config)
    try:
        run.prepare()
        return run.execute(progress)
    finally:
        run.close()
