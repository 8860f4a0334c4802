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

from . import options, privacy, store
from .atomic import atomic_file
from .backprop import Partial
from .config import LR, MOMENTUM, TrainConfig
from .data import (
    Dataset,
    DataSpec,
    check_unique_ids,
    coarse_columns,
    column_names,
    describe_columns,
    plan,
    schema_line,
    shared_files,
    split_keys,
)
from .errors import WARNING, ConfigError, DataError, DivergenceError, RunInterrupted
from .evaluate import evaluate_with, exact_name
from .model import Architecture, Params, check_shapes, init_params
from .optim import draw_batch, lr_at, sgd_step, weight_mask, with_weight_decay
from .outputs import model_meta, params_from_flat, read_model, read_run_json, read_weights
from .recorder import (
    Recorder,
    check_apart,
    nearest_checkpoint,
    prepare_run_dir,
    read_checkpoint,
    read_metrics,
)
from .reduce import Gradient, reduce
from .worker import Pool, StepRequest, start_pool

F64 = NDArray[np.float64]
# Training r2 below this: the saved weights explain almost none of the target (a warning).
USELESS_R2 = 0.05
# A regression target value this many standard deviations from the mean is warned of.
FAR_STD = 10.0
# With --val: the saved weights' val_loss this many times the lowest recorded is warned of
# (1.1 fired on 14 of 65 small default runs, on noise and calibration).
OVERFIT = 1.25
# A private run (features as they are) warns of a feature whose values reach beyond this.
UNSCALED = 100.0
INIT_SCHEME = "glorot-uniform (he-uniform for relu layers), zero biases, numpy PCG64(seed)"
Progress = Callable[[int, dict], None]

__all__ = ["Run", "TrainConfig", "resumed_config", "train"]


def data_spec(config: TrainConfig) -> DataSpec:
    """The dataset options. With --weights the model says what the data means: its feature
    columns by name (in any order in the files), its target, task and class values."""
    if config.weights:
        model = read_model(config.weights)
        features = config.features or model.features
        return DataSpec(config.data, features, model.target or config.target,
                        config.id_column, classes=model.classes,
                        block_rows=config.block_rows, task=model.task or config.task,
                        probability_targets=model.arch.loss == "cross_entropy")
    # cross_entropy, given or chosen by auto for a softmax output, needs target rows that
    # are probabilities (regression on other targets would train on a meaningless loss)
    cross_entropy = config.loss == "cross_entropy" or (
        config.loss == "auto" and config.output_activation == "softmax")
    return DataSpec(config.data, config.features, config.target, config.id_column,
                    block_rows=config.block_rows, task=config.task,
                    probability_targets=cross_entropy)


def output_layer(config: TrainConfig, dataset: Dataset) -> tuple[str, str]:
    """(output activation, loss), auto resolved by the task: softmax and cross_entropy for
    classes, identity and squared for regression targets."""
    output = config.output_activation
    if output == "auto":
        output = "softmax" if dataset.classify and config.loss in ("auto", "cross_entropy") \
            else "identity" if not dataset.classify else "sigmoid"
    loss = config.loss
    if loss == "auto":
        loss = "cross_entropy" if output == "softmax" else "squared"
    return output, loss


# Model flags that --weights decides; a value other than the default that contradicts the
# weights is refused rather than ignored.
_MODEL_FLAGS = ("hidden", "activation", "output_activation", "loss")


def build_model(
    config: TrainConfig, dataset: Dataset
) -> tuple[Architecture, Params, tuple[F64, F64] | None]:
    """The architecture and initial weights: --weights, or seeded init sized by the data."""
    if config.weights:
        arch, params, standardize, _ = read_weights(config.weights)
        have = {"hidden": tuple(arch.sizes[1:-1]), "activation": arch.activation,
                "output_activation": arch.output_activation, "loss": arch.loss}
        defaults = TrainConfig.__dataclass_fields__
        for name in _MODEL_FLAGS:
            value = getattr(config, name)
            if value != defaults[name].default and value != have[name]:
                shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
                raise ConfigError(
                    f"--{name.replace('_', '-')} {shown} contradicts --weights "
                    f"{config.weights}, whose model has {name.replace('_', ' ')} "
                    f"{','.join(map(str, have[name])) if name == 'hidden' else have[name]}. "
                    "Leave it out to use the model's.")
        if not config.standardize and standardize is not None:
            raise ConfigError(f"--no-standardize contradicts --weights {config.weights}, whose "
                              "model standardizes its features with stored statistics. Leave "
                              "it out to use the model's.")
        arch = dataclasses.replace(arch, dtype=config.dtype)
        params = params.astype(config.dtype)
    else:
        output, loss = output_layer(config, dataset)
        sizes = (dataset.n_features, *config.hidden, dataset.n_outputs)
        arch = Architecture(sizes, config.activation, output, loss, config.dtype)
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
    if given.get("overwrite"):
        raise ConfigError("--resume and --overwrite cannot be used together")
    try:
        info = read_run_json(out)
    except ConfigError as e:
        raise ConfigError(f"--resume {e}") from None
    if info.get("command") != "train":
        raise ConfigError(f"--resume {out}: this run folder was not made by gradpipe train")
    old = dict(info.get("config", {}))
    old["data"] = info.get("data_path", old.get("data"))  # absolute: resumable from anywhere
    keys = {n for n, o in options.options(TrainConfig).items() if o.in_job} - {"resume",
                                                                              "overwrite"}
    values = options.parse_values(TrainConfig, {k: v for k, v in old.items() if k in keys})
    again = {k: v for k, v in given.items() if k not in ("resume", "overwrite")}
    # Before the options are checked together: --dp-noise given to a run that chose its
    # noise from --dp-epsilon would otherwise read as both given at once.
    conflict = options.resume_conflict(TrainConfig, info.get("config", {}), again)
    if conflict:
        raise ConfigError(f"--resume {out}: {conflict}. Resume with the run's options (only "
                          f"{options.resume_rules(TrainConfig)}).")
    values.update(again)
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

    def __init__(self, config: TrainConfig, note: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.recorder = Recorder(config.out) if config.out else None
        self.note = note or (lambda line: None)
        self.warnings: list[str] = []
        self.val_pool: Pool | None = None
        # Targets this run standardized itself, none constant: the loss on them is the sum
        # over targets of SSE_j / SST_j, so r2 (uniform average) = 1 - loss / targets.
        self.r2_from_loss = False
        self.class_shares: F64 | None = None  # each class's share of the rows
        self.unscaled: str | None = None  # a private run's feature far from unit scale

    def prepare(self) -> None:
        """Check everything that can be checked before a file is written."""
        config = self.config
        if config.out is not None:
            check_apart(config.out, DATA=config.data, **{"--val": config.val})
            if not config.resume:
                prepare_run_dir(config.out, overwrite=config.overwrite)
            if self.recorder is not None and Recorder.writing(config.out):
                raise self.recorder.taken()  # said before any work (start() takes the lock)
        self.dataset = plan(data_spec(config))
        if config.private and not config.resume:
            check_unique_ids(self.dataset, "a private run needs one id a row, its guarantee "
                             "being per row")
        elif config.per_sample != "none" and not config.resume:
            check_unique_ids(self.dataset, "per-sample rows, scores and influence are keyed "
                             "by the id, one a row")
        if not self.dataset.classify and "sample" in self.dataset.target:
            raise ConfigError(f"{config.data}: a target named 'sample' would clash with the "
                              "sample id column of per-sample files and predictions; rename it")
        self.arch, self.params, self.standardize = build_model(config, self.dataset)
        self.target_scale = read_model(config.weights).target_scale if config.weights else None
        # run.json keeps the resolved configuration: what auto chose, not "auto".
        config = self.config = dataclasses.replace(
            config, lr=config.lr or LR[self.dataset.task], task=self.dataset.task,
            momentum=(MOMENTUM[self.dataset.task] if config.momentum is None
                      else config.momentum),
            output_activation=self.arch.output_activation, loss=self.arch.loss)
        self.step, self.velocity = 0, np.zeros(self.arch.n_params)
        self.old_steps = 0  # resuming: the run's --steps before
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
                                  f"options (only {options.resume_rules(TrainConfig)}).")
            if info.get("dataset", {}).get("fingerprint") != self.dataset.fingerprint:
                raise ConfigError(f"--resume {config.out}: the dataset {config.data} changed "
                                  "since the run began")
            self.step, params, velocity = read_checkpoint(config.out)
            self.old_steps = int(info.get("config", {}).get("steps") or 0)
            self.params = params.astype(self.arch.dtype)
            if velocity is not None:
                self.velocity = velocity
            self.done = info.get("status") == "completed" and (
                self.step >= config.steps or bool(info.get("converged")))
            if self.done:
                return
        self._prepare_privacy()
        steps = (config.steps - self.step) if config.update else 1
        rows = min(config.batch or self.dataset.n_rows, self.dataset.n_rows)
        if config.batch_rate is not None:
            rows = max(1, round(config.batch_rate * self.dataset.n_rows))
        self.pool = start_pool(self.dataset, config.workers, config.dtype,
                               address=config.address, memory_budget=config.memory_budget,
                               verbose=config.verbose,
                               flops=(6.0 * rows * self.arch.n_params, steps))
        self.n_workers = self.pool.workers
        self.data_bytes = self.pool.load()  # reads and checks every block
        if config.standardize and not config.weights:  # the weights bring their own
            self.standardize, (mean, std, constant) = self.pool.both_moments()
            if self.dataset.classify:
                self.class_shares = mean
            elif self.dataset.scales_targets:
                self.target_scale = mean, np.where(constant, 1.0, std)
                self._note_constant_targets(constant, mean)
                self._note_far_targets(mean, std)
        self._note_coarse_columns()
        self._note_unscaled_private()
        self._note_split_partitions()
        self._note_unread_parquet()
        if config.val:
            self.val_pool = self._val_pool()
        # Said once the data is read and checked, before the first step.
        model = self.describe_model() + (
            f", lr {config.lr:g}" + (f", momentum {config.momentum:g}" if config.momentum else "")
            if config.update else "")
        where = self.pool.where(config.address, config.workers)
        resumed = (f"; resuming at step {self.step} of {config.steps} (its last checkpoint)"
                   if config.resume else "")
        self.note(f"{schema_line(self.dataset)}; model {model}{self._describe_privacy()}"
                  f"{where}{resumed}")
        for warning in self.warnings:  # known before the first step: said before it
            self.note(f"{WARNING}{warning}")

    def _prepare_privacy(self) -> None:
        """The noise multiplier, the accountant and the secret key of a private run.

        sigma is --dp-noise, or the one that --dp-epsilon chose when the run began (kept in
        run.json, so a resumed run, even with more --steps, keeps its noise); the key is
        --dp-key, the run folder's privacy-key on --resume, else a fresh one.
        """
        config = self.config
        self.sigma: float | None = None
        self.key: str | None = None
        self.restore_key = False
        if not config.private:
            return
        assert config.batch_rate is not None and config.dp_delta is not None
        kept = (read_run_json(config.out or "").get("privacy") or {}) if config.resume else {}
        if config.dp_noise is not None:
            self.sigma = config.dp_noise
        elif kept.get("noise_multiplier") is not None:
            self.sigma = float(kept["noise_multiplier"])
        else:
            assert config.dp_epsilon is not None
            self.sigma = privacy.noise_multiplier(config.dp_epsilon, config.dp_delta,
                                                  config.batch_rate, config.steps)
        self.accountant = privacy.Accountant(config.batch_rate, self.sigma)
        stored = store.join(config.out or "", privacy.KEY_FILE)
        if config.resume:
            digest = kept.get("key_sha256")
            # run.json names the --dp-key file the run began with: it may be gone since
            given = (privacy.read_key(config.dp_key)
                     if config.dp_key and store.is_file(config.dp_key) else None)
            if not store.is_file(stored):
                if given is None or digest is None or privacy.key_digest(given) != digest:
                    way = ("" if digest is None else
                           f"; --dp-key {config.dp_key} is not it" if given is not None else
                           "; pass the key it began with as --dp-key FILE")
                    raise ConfigError(
                        f"--resume {config.out}: the run's {privacy.KEY_FILE} is missing, and "
                        f"without it the Poisson draws and the noise cannot be repeated{way}")
                self.restore_key = True  # written back into the run folder by _begin
            self.key = given if given is not None and not store.is_file(stored) else (
                privacy.read_key(stored))
            if given is not None and given != self.key:
                raise ConfigError(f"--dp-key {config.dp_key} is not the key the run in "
                                  f"{config.out} was started with")
        else:
            self.key = privacy.read_key(config.dp_key) if config.dp_key else privacy.new_key()
        spent = self.accountant.epsilon(config.steps, config.dp_delta)
        if config.dp_epsilon is not None and spent > config.dp_epsilon:
            self.warnings.append(
                f"epsilon will be {spent:.4g} after {config.steps} steps, above --dp-epsilon "
                f"{config.dp_epsilon:g}: the noise was chosen for the steps the run began with")
        if config.dp_delta >= 1 / self.dataset.n_rows:
            self.warnings.append(
                f"--dp-delta {config.dp_delta:g} is not below 1/N = "
                f"{1 / self.dataset.n_rows:.3g}: a mechanism that publishes a random sample "
                "outright meets such a delta")

    def _describe_privacy(self) -> str:
        if not self.config.private:
            return ""
        c = self.config
        assert self.sigma is not None and c.batch_rate is not None
        return (f"; DP-SGD: clip {c.dp_clip:g}, noise multiplier {self.sigma:.4g}, batch rate "
                f"{c.batch_rate:g} (expected batch {c.batch_rate * self.dataset.n_rows:.6g}), "
                f"epsilon {self.accountant.epsilon(c.steps, c.dp_delta or 0):.4g} at delta "
                f"{c.dp_delta:g} after {c.steps} steps")

    def privacy_info(self) -> dict | None:
        """run.json's `privacy`: the mechanism, its parameters, the epsilon spent so far, the
        accountant, and what the guarantee does not cover."""
        c = self.config
        if not c.private:
            return None
        assert self.sigma is not None and c.batch_rate is not None and c.dp_clip is not None
        done = getattr(self, "step", 0)
        return {
            "mechanism": "DP-SGD: Poisson sampling, per-sample clipping, Gaussian noise",
            "neighbouring": "add or remove one sample (one row; --id-column values must be "
                            "unique)",
            "clip": c.dp_clip,
            "noise_multiplier": self.sigma,
            "noise_std": self.sigma * c.dp_clip,
            "sampling_rate": c.batch_rate,
            "expected_batch": c.batch_rate * self.dataset.n_rows,
            "delta": c.dp_delta,
            "target_epsilon": c.dp_epsilon,
            "steps": done,
            "epsilon": self.accountant.epsilon(done, c.dp_delta or 0),
            "accountant": f"dp-accounting {privacy.accountant_version()}, {privacy.ACCOUNTANT}",
            "key": f"{privacy.KEY_FILE} in the run folder (secret: it regenerates the noise)",
            # Recognises the key given again with --dp-key if privacy-key was deleted.
            "key_sha256": privacy.key_digest(self.key) if self.key is not None else None,
            "per_sample_outputs_private": False,
            "not_protected": list(privacy.NOT_PROTECTED),
        }

    def _val_pool(self) -> Pool:
        """The --val data, read as the model reads its data: the same feature columns by
        name, target, task and classes; held without Ray (as --workers 0 holds data) and
        checked now."""
        d = self.dataset
        spec = DataSpec(self.config.val or "", tuple(exact_name(f) for f in d.features),
                        d.target, classes=d.classes if d.classify else None, task=d.task,
                        block_rows=self.config.block_rows)
        try:
            names = column_names(spec.path)
        except DataError as e:  # no such file, no Parquet in the folder, not Parquet
            raise DataError(f"--val: {e}") from None
        missing = [c for c in (*d.features, *d.target) if c not in names]
        if missing and not d.feature_list:
            raise DataError(f"--val {spec.path}: missing column{'s' * (len(missing) > 1)} "
                            f"{', '.join(map(repr, missing))} that the training data has "
                            f"(found: {describe_columns(names, missing[0])}); --val needs the "
                            "training data's feature and target columns, by name")
        try:
            val = plan(spec)
            files = len({b.file for b in val.blocks})
            if val.fingerprint == d.fingerprint:  # the same files
                self.warnings.append(f"--val {self.config.val} is the training data itself: "
                                     "its val_* metrics are not held out")
            elif shared := shared_files(val, d):  # copies, wherever they lie
                self.warnings.append(
                    f"--val {self.config.val}: "
                    + ("it is a copy of a training file" if shared == files == 1 else
                       f"all {files} of its files are copies of training files"
                       if shared == files else
                       f"{shared} of its {files} files "
                       f"{'is a copy' if shared == 1 else 'are copies'} of training files")
                    + " (the same bytes): its val_* metrics are not held out")
            pool = start_pool(val, 0, self.config.dtype,
                              flops=(2.0 * val.n_rows * self.arch.n_params, 1))  # forward
            pool.load()
        except DataError as e:
            raise DataError(f"--val: {e}") from None
        return pool

    def _note_constant_targets(self, constant: NDArray[np.bool_], mean: F64) -> None:
        """Warn of constant regression targets (nothing to learn, r2 undefined); otherwise
        the saved weights' r2 follows from their loss (standardized targets)."""
        values = [f"{t!r} is {mean[i]:.6g}" for i, t in enumerate(self.dataset.target)
                  if constant[i]]
        self.r2_from_loss = not values
        if values:
            self.warnings.append(f"the target is constant ({', '.join(values)} in every row): "
                                 "there is nothing to learn, and r2 is undefined; is --target "
                                 "the column you meant?")

    def _note_far_targets(self, mean: F64, std: F64) -> None:
        """Warn of regression targets with values more than FAR_STD standard deviations from
        their mean (by the files' statistics): a few such rows dominate the squared loss."""
        bounds = {name: (lo, hi) for name, lo, hi in self.dataset.ranges}
        for i, name in enumerate(self.dataset.target):
            if name not in bounds or not std[i] > 0:
                continue
            far = max(bounds[name], key=lambda v: abs(v - mean[i]))
            if abs(far - mean[i]) > FAR_STD * std[i]:
                self.warnings.append(
                    f"target {name!r} reaches {far:.6g}, {abs(far - mean[i]) / std[i]:.0f} std "
                    f"from its mean {mean[i]:.6g}: a few rows that far out dominate the squared "
                    "loss; check them (gradpipe scores ranks the rows by loss_last), or train "
                    "on log(target) if it is skewed (incomes, waiting times)")

    def _note_unread_parquet(self) -> None:
        """Warn of files in DATA that are Parquet by their contents but not named *.parquet
        (a renamed part, part-3.PARQUET): their rows are not trained on."""
        parquet = [name for name, is_parquet in self.dataset.unread_files if is_parquet]
        if parquet:
            n = len(parquet)
            self.warnings.append(
                f"{n} file{'s' * (n != 1)} in {self.config.data} "
                f"{'are' if n != 1 else 'is'} Parquet but not named *.parquet, so not read: "
                + ", ".join(map(repr, parquet[:4])) + (", ..." if n > 4 else "")
                + "; rename them to read their rows")

    def _note_split_partitions(self) -> None:
        """Warn of hive partitions that look like a train/test split (split=train/,
        split=test/): the schema line says every folder's rows are used, a warning says it
        under --quiet too, with the folder to give instead."""
        for key, values in split_keys(self.dataset):
            first = next((v for v in values if v.lower().startswith("train")), values[0])
            shown = ", ".join(f"{key}={v}" for v in values[:4]) + (
                ", ..." if len(values) > 4 else "")
            self.warnings.append(
                f"{self.config.data} is partitioned by {key!r} ({shown}) and every folder's "
                f"rows are trained on, held-out ones included: give the training folder "
                f"alone (such as {self.config.data.rstrip('/')}/{key}={first})")

    def _note_unscaled_private(self) -> None:
        """A private run trains on the features as they are (no --standardize): warn of a
        feature far from unit scale (by the files' statistics), whose rows' gradients the
        clipping then cuts to the noise's size."""
        if not self.config.private or self.config.standardize:
            return
        features = set(self.dataset.features)
        far = [(max(abs(lo), abs(hi)), name) for name, lo, hi in self.dataset.ranges
               if name in features and max(abs(lo), abs(hi)) > UNSCALED]
        if far:
            size, self.unscaled = max(far)
            self.warnings.append(
                f"feature {self.unscaled!r} reaches {size:.6g}"
                + (f" ({len(far) - 1} more beyond {UNSCALED:g})" if len(far) > 1 else "")
                + ": a private run does not standardize its features, and at this scale "
                "clipping leaves the gradients mostly noise; scale them first (to about mean 0, "
                "std 1, by public statistics or known ranges: statistics of the private rows "
                "are not covered by the privacy accounting)")

    def _note_coarse_columns(self) -> None:
        """Warn of features and targets that the compute dtype holds in too few steps over
        their range (data.coarse_columns): their digits are lost before any standardizing."""
        dtype = self.config.dtype
        coarse = coarse_columns(self.dataset, dtype)
        wider = (", or train with --dtype float64" if coarse and dtype == "float32"
                 and not coarse_columns(self.dataset, "float64") else "")
        for name, lo, hi, step in coarse:
            kind = "target" if name in self.dataset.target else "feature"
            values = int((hi - lo) / step) + 1
            self.warnings.append(
                f"{kind} {name!r} spans {lo:.10g} to {hi:.10g}, which {dtype} holds in steps of "
                f"{step:.3g}: {values} value{'s' * (values != 1)} over the range, the rest of "
                f"its digits lost; subtract an offset before saving it ({name} - "
                f"{name}.min(), say){wider}")

    def _val_metrics(self) -> dict:
        """val_loss and val_accuracy (classification) or val_mse and val_r2 (regression), in
        the model's training units for the loss and in the targets' units for the mse."""
        if self.val_pool is None:
            return {}
        m = evaluate_with(self.val_pool, self.arch, self.params, self.standardize,
                          self.target_scale)
        return {"val_loss": m["loss"],
                **({"val_accuracy": m["accuracy"]} if self.dataset.classify else
                   {"val_mse": m["mse"], "val_r2": m["r2"]})}

    def describe_model(self) -> str:
        a = self.arch
        standardized = self.standardize is not None or (
            self.config.standardize and not self.config.weights)
        scaled = ("raw features" if not standardized else
                  "features and targets standardized" if self.dataset.scales_targets else
                  "features standardized")
        hidden = f"{a.activation} hidden" if a.L > 1 else "no hidden layer"
        return (f"{'-'.join(map(str, a.sizes))}, {hidden}, {a.output_activation} "
                f"output, {a.loss} loss, {scaled}")

    def close(self) -> None:
        for pool in (getattr(self, "pool", None), self.val_pool):
            if pool is not None:
                pool.close()
        if self.recorder is not None:
            self.recorder.release()

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
            "schema": schema_line(self.dataset),
            "target_scale": None if self.target_scale is None else
            {"mean": self.target_scale[0].tolist(), "std": self.target_scale[1].tolist()},
            "workers": self.n_workers,  # Ray actors (0: without Ray)
            "processes": self.pool.processes,  # without Ray: worker processes (0: this one)
            "versions": versions(),
            "standardize": self.standardize is not None,
            "streaming": self.pool.stream,
            **({"privacy": p} if (p := self.privacy_info()) is not None else {}),
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
            started = (rec is not None and rec.owns
                       and store.is_file(store.join(rec.out, "run.json")))
            if started:
                assert rec is not None
                rec.status(self.info("interrupted", started=self.started, steps_done=self.step))
            raise RunInterrupted(
                f"interrupted after {self.step} step{'s' * (self.step != 1)}; continue with "
                f"gradpipe {_endpoint_flag(self.config.out)}train --resume --out "
                f"{self.config.out}"
                if started and self.config.update else
                f"interrupted after {self.step} step{'s' * (self.step != 1)}"
                if started or rec is None else
                "interrupted before the run folder was begun; nothing was written") from None
        except DivergenceError:
            raise  # run.json says diverged already
        except Exception as e:  # bad data met mid-run (streaming), a lost cluster, or a bug
            if rec is not None and rec.owns and store.is_file(store.join(rec.out, "run.json")):
                try:
                    rec.status(self.info("failed", started=self.started, steps_done=self.step,
                                         error=str(e) or type(e).__name__))
                except Exception as again:  # the first error is the one to show
                    if hasattr(e, "add_note"):  # Python 3.11+
                        e.add_note(f"(run.json could not be marked failed: {again})")
            raise

    def _loop(self, progress: Progress | None) -> dict:
        """Fan out, reduce, record, update: one SGD step a turn."""
        config, arch, rec = self.config, self.arch, self.recorder
        self._begin()
        last = config.steps - 1 if config.update else 0
        mask = weight_mask(arch.sizes)
        assert config.lr is not None  # resolved by prepare()
        metrics: dict = {}
        first: dict = {}
        converged = False
        while self.step <= last and not converged:
            t0 = time.perf_counter()
            step, flat = self.step, self.params.flat()
            # Second moments only where the gradient is recorded (any step may converge).
            recorded = self._due(config.record_every, last) or config.tol > 0
            grad = self._gradient(step, last, recorded)
            g = with_weight_decay(grad.flat(), flat, config.weight_decay, mask)
            lr = lr_at(config.schedule, config.lr, config.steps, step)
            metrics = self._metrics(step, grad, lr, time.perf_counter() - t0)
            if self.val_pool is not None:  # every row has the columns; null between records
                due = self._due(config.record_every, last)
                metrics.update(self._val_metrics() if due else dict.fromkeys(self._val_keys()))
            if not first:  # a resumed run is judged against its start, not the resume point
                first = {**metrics, **self._start_row(metrics)} if config.resume else metrics
            if rec is not None:
                rec.metrics(metrics)
            if not ((grad.n == 0 or math.isfinite(grad.loss)) and np.isfinite(g).all()):
                self._diverged(metrics)
            converged = config.tol > 0 and metrics["grad_norm"] < config.tol
            if rec is not None and (converged or self._due(config.record_every, last)):
                rec.gradients(step, arch.sizes, flat, g, self._grad_sq(grad, flat, mask)
                              if config.second_moment else None)
            if config.update and not converged:  # w_{s+1} = w_s - lr v_s
                self._update(flat, g, lr, metrics)
            self.step = step + 1
            if rec is not None and config.update and (
                    converged or self.step > last or self._due(config.checkpoint_every, -1)):
                self._checkpoint()
            if progress is not None:
                progress(self.step, metrics)
        saved = self._saved_metrics() if config.update else None
        self._warn(first, metrics, saved)
        self._warn_overfit(saved)
        self._finish(metrics, converged, saved)
        return {**metrics, "saved": saved} if saved is not None else metrics

    def _start_row(self, metrics: dict) -> dict:
        """The recorded metrics of step 0 of a resumed run, those of its keys that are in
        `metrics` and not null (empty if the files do not have step 0)."""
        if self.recorder is None:
            return {}
        table = read_metrics(self.recorder.out)
        if table is None or table.num_rows == 0 or table.column("step")[0].as_py() != 0:
            return {}
        row = table.slice(0, 1).to_pylist()[0]
        return {k: v for k, v in row.items() if k in metrics and v is not None}

    def _saved_metrics(self) -> dict:
        """loss, grad_norm (and accuracy) of the saved weights, after the last update, over
        every row; with --val their val_* too: what `evaluate` gives for weights.parquet.
        A step's own metrics are those of the weights it started from (and of its batch),
        so the last step's are not the saved model's. One more pass over the data.

        Several regression targets: each one's r2 too (`per_target`), 1 - SSE_t / SST_t
        from the pass's per-output sums, as the averaged r2 comes from the loss: an average
        hides a target the model learned nothing of."""
        config, dataset = self.config, self.dataset
        # Targets not standardized (--no-standardize): r2 from the per-output sums and the
        # targets' variance (one more pass), since the loss is no longer SSE / SST.
        raw = not dataset.classify and self.target_scale is None
        per_target = raw or (self.r2_from_loss and len(dataset.target) > 1)
        grad = self._reduce(self.pool.step(StepRequest(
            step=self.step, arch=self.arch, params=self.params,
            standardize=self.standardize, target_scale=self.target_scale,
            classes=dataset.classes if dataset.classify else None,
            class_type=dataset.class_type, output_sse=per_target)))
        row: dict = {"steps": self.step, "loss": grad.loss, "grad_norm": grad.norm(),
                     "samples": grad.n}
        if dataset.classify:
            row["accuracy"] = grad.correct / grad.n if grad.n else float("nan")
        elif self.r2_from_loss or raw:
            # Standardized targets: SST_t = n, so r2_t = 1 - SSE_t / n.
            sst = np.full(len(dataset.target), float(grad.n))
            if raw:
                _, (mean, std, constant) = self.pool.both_moments()
                sst = np.where(constant, 0.0, grad.n * std * std)
                self._note_constant_targets(constant, mean)
                self.r2_from_loss = False
            r2 = (None if grad.out_sse is None or not (sst > 0).all() else
                  1.0 - grad.out_sse / sst)
            if self.r2_from_loss:
                row["r2"] = 1.0 - grad.loss / len(dataset.target)
            elif r2 is not None:  # else a constant target: r2 is undefined
                row["r2"] = float(r2.mean())
            if r2 is not None and len(dataset.target) > 1:
                row["per_target"] = [{"target": name, "r2": float(v)}
                                     for name, v in zip(dataset.target, r2, strict=True)]
        row.update(self._val_metrics())
        if config.private:
            row["grad_norm"] = None  # exact, hence not private: kept out as in metrics/
        return row

    def _begin(self) -> None:
        """Start (or, resuming, trim) the run folder; a private run's key; checkpoint 0."""
        config, rec = self.config, self.recorder
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if rec is None:
            return
        rec.start(self.info("running", started=self.started), overwrite=config.overwrite,
                  resume_step=self.step if config.resume else None)
        if config.resume:
            self._forget_old_last_step()
        if self.key is not None and (not config.resume or self.restore_key):  # for --resume
            with atomic_file(store.join(rec.out, privacy.KEY_FILE)) as tmp:
                tmp.touch(mode=0o600)
                tmp.write_text(self.key + "\n")
        if config.update and not config.resume:
            self._checkpoint()  # step 0: a diverged or killed run still has w_0

    def _forget_old_last_step(self) -> None:
        """A run extended with more --steps recorded its old last step's gradient and
        per-sample rows because it was the last: a run of the new length would not have
        them there (off the --record-every and --per-sample-every grids), so they go, and
        the extended run's folder is the longer run's (its scores included)."""
        config, rec = self.config, self.recorder
        old_last = self.old_steps - 1
        if rec is None or not 0 <= old_last < self.step or old_last == config.steps - 1:
            return
        kinds = tuple(kind for kind, every in (("gradients", config.record_every),
                                               ("per_sample", config.per_sample_every))
                      if not (every and old_last % every == 0))
        rec.drop_step(old_last, kinds)
        if self.val_pool is not None and "gradients" in kinds:  # val_* go with the records
            rec.null_metrics(old_last, self._val_keys())

    def _gradient(self, step: int, last: int, recorded: bool) -> Gradient:
        """The step's gradient: fanned out to the workers, their tree nodes reduced in block
        order; a private run adds its noise here."""
        config, arch, rec = self.config, self.arch, self.recorder
        per_sample = self._due(config.per_sample_every, last) and config.per_sample
        grad = self._reduce(self.pool.step(StepRequest(
            step=step, arch=arch, params=self.params,
            per_sample=per_sample if per_sample and rec is not None else "none",
            out_dir=rec.per_sample_dir() if rec is not None else None,
            batch=draw_batch(config.batch, config.seed, self.dataset.n_rows, step),
            standardize=self.standardize, target_scale=self.target_scale,
            second_moment=config.second_moment and recorded and rec is not None,
            classes=self.dataset.classes if self.dataset.classify else None,
            class_type=self.dataset.class_type,
            batch_rate=config.batch_rate,
            targets=() if self.dataset.classify else self.dataset.target,
            sample_key=(privacy.sample_key(self.key, config.seed, step)
                        if config.batch_rate is not None else None),
            clip=config.dp_clip)))
        if config.private:
            # DP-SGD: noise once per step on the clipped sum, divided by q N, the expected
            # batch (the same divisor whatever the draw took)
            assert self.sigma is not None and config.batch_rate is not None
            z = privacy.standard_noise(self.key, config.seed, step, arch.n_params)
            grad = privacy.noisy_gradient(grad, z, self.sigma * (config.dp_clip or 0),
                                          config.batch_rate * self.dataset.n_rows)
        return grad

    def _update(self, flat: F64, g: F64, lr: float, metrics: dict) -> None:
        """The SGD (momentum) update; weights that overflow stop the run as diverged."""
        assert self.config.momentum is not None  # resolved by prepare()
        flat, self.velocity = sgd_step(flat, self.velocity, g, lr, self.config.momentum)
        with np.errstate(over="ignore"):  # overflow to inf is caught just below
            self.params = params_from_flat(self.arch.sizes, flat, self.arch.dtype)
        if not all(np.isfinite(w).all() for w in self.params.w + self.params.b):
            self._diverged(metrics)

    def _finish(self, metrics: dict, converged: bool, saved: dict | None) -> None:
        """The final weights, then run.json's status: completed."""
        rec = self.recorder
        if rec is not None:
            rec.weights(self.arch, self.params, self.standardize, self.meta())
            rec.status(self.info(
                "completed", started=self.started, steps_done=self.step, converged=converged,
                finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                final=metrics, **({"saved": saved} if saved is not None else {}),
                warnings=self.warnings))

    def meta(self) -> dict:
        """What the weights record of the data: features, target, task, classes, scales."""
        return model_meta(self.dataset, self.target_scale)

    def _warn(self, first: dict, last: dict, saved: dict | None = None) -> None:
        """One line for a run that did not learn: a loss that did not decrease, or a gradient
        that vanished (saturated outputs, dead units) while the loss is still high."""
        if not self.config.update or not first or first is last:
            return
        config = self.config
        sampled = config.sampled
        standardize = ("" if config.standardize else
                       ", or scale the features first (a private run does not standardize "
                       f"them; {self.unscaled!r} is one)" if config.private and self.unscaled
                       else "" if config.private else ", or --standardize if it is off")
        less_noise = (", or less noise (a larger --dp-epsilon, a smaller --dp-noise)"
                      if config.private else "")
        advice = ("the features may hold no more signal than that (a linear model would "
                  "tell), or training stopped short: more --steps or another --lr"
                  f"{less_noise}{standardize}")
        # The saved weights' loss over every row against the first step's (on its batch: at
        # the initial weights every batch's is near the data's); a last batch's loss would be
        # noise, and even a full batch's is that of the weights before the last update.
        judged = saved is not None and math.isfinite(first["loss"])
        trivial = self._no_better_than_trivial(saved) if saved is not None else None
        if saved is not None and judged and not saved["loss"] < first["loss"]:
            on = " on the batch of" if sampled else " at"
            self.warnings.append(
                f"the loss did not decrease ({first['loss']:.6g}{on} step {first['step']}, "
                f"{saved['loss']:.6g} over every row with the saved weights): "
                f"try a smaller --lr{less_noise}{standardize}")
            if trivial:  # the two say different things: both are said
                self.warnings.append(f"{trivial}: {advice}")
            return
        if not (math.isfinite(first["loss"]) and math.isfinite(last["loss"])):
            return  # a Poisson draw that took no sample
        if not judged and not sampled and not last["loss"] < first["loss"]:
            self.warnings.append(
                f"the loss did not decrease ({first['loss']:.6g} at step {first['step']}, "
                f"{last['loss']:.6g} at step {last['step']}): try a smaller --lr"
                f"{standardize}")
        elif last["grad_norm"] <= 1e-6 * first["grad_norm"] and last["loss"] > 1e-3 * first[
                "loss"]:
            if self.arch.L == 1:  # a linear model's loss is convex: this is its minimum
                why = "the best a model without a hidden layer does here; try --hidden"
            else:
                why = (f"saturated outputs or dead units; try "
                       f"{'' if config.standardize or config.private else '--standardize, '}"
                       "another --activation or a smaller --lr")
            self.warnings.append(
                f"the gradient vanished (norm {last['grad_norm']:.3g} at step {last['step']}, "
                f"{first['grad_norm']:.3g} at step {first['step']}) while the loss is "
                f"{last['loss']:.6g}: {why}")
        elif trivial:
            self.warnings.append(f"{trivial}: {advice}")

    def _warn_overfit(self, saved: dict | None) -> None:
        """One line when a full-batch run's saved weights' val_loss ended OVERFIT times the
        lowest recorded (and, for classes, their val_accuracy below that step's): the run
        went on fitting the training rows at the held-out rows' cost. It names the step, a
        checkpoint near it that did better than the saved weights, and with a constant
        schedule the --steps that stop there. (A sampled run's val_loss moves with its
        batches; a loss that rose while the accuracy did not is calibration, not this.)"""
        rec, config = self.recorder, self.config
        if rec is None or saved is None or saved.get("val_loss") is None or config.sampled:
            return
        rec.flush()
        table = read_metrics(rec.out)  # from the files: a resumed run's first rows are there
        if table is None or "val_loss" not in table.column_names:
            return
        keys = ["step", "val_loss"] + (["val_accuracy"] if self.dataset.classify else [])
        rows = {r["step"]: r for r in table.select(keys).to_pylist()
                if r["val_loss"] is not None and math.isfinite(r["val_loss"])}
        if not rows:
            return
        best = min(rows.values(), key=lambda r: (r["val_loss"], r["step"]))
        if not saved["val_loss"] > OVERFIT * best["val_loss"]:
            return
        if self.dataset.classify and not (saved["val_accuracy"] < best["val_accuracy"]):
            return
        near = nearest_checkpoint(rec.out, best["step"])
        kept = ""
        if near is not None and near[0] < self.step and near[0] in rows and (
                rows[near[0]]["val_loss"] < saved["val_loss"]):
            kept = (f"; {store.join(config.out or '', 'checkpoints', os.path.basename(near[1]))}"
                    f" (val_loss {rows[near[0]]['val_loss']:.6g}) is a model evaluate and "
                    "predict take as RUN")
        stop = (f"; --steps {best['step']} stops at the lowest" if config.schedule == "constant"
                else "")
        accuracy = (f", val_accuracy {best['val_accuracy']:.4f} to {saved['val_accuracy']:.4f}"
                    if self.dataset.classify else "")
        self.warnings.append(
            f"val_loss rose from {best['val_loss']:.6g} at step {best['step']} to "
            f"{saved['val_loss']:.6g} with the saved weights{accuracy}: they fit the training "
            f"rows at the held-out rows' cost{kept}{stop}")

    def _no_better_than_trivial(self, saved: dict) -> str | None:
        """What the saved weights fell short of, if they do no better than a model without
        inputs: always the most common class (training accuracy at most its share), or
        always the targets' mean (training r2 below USELESS_R2)."""
        if self.dataset.classify and saved.get("accuracy") is not None:
            shares = self.class_shares
            if shares is None:  # not standardized: one more pass, reading the labels
                shares = self.class_shares = self.pool.moments(targets=True)[0]
            top = int(np.argmax(shares))
            if saved["accuracy"] <= shares[top] + 1e-12:
                assert self.dataset.classes is not None
                return (f"the saved weights do no better than always answering the most "
                        f"common class (accuracy {saved['accuracy']:.4f} over every row; "
                        f"class {self.dataset.classes[top]!r} is {shares[top]:.2%} of them)")
        elif saved.get("r2") is not None and saved["r2"] < USELESS_R2:
            return (f"the saved weights explain almost none of the target's variance (r2 "
                    f"{saved['r2']:.3g} over every row, where always predicting the mean "
                    "gives 0)")
        elif weak := [t for t in saved.get("per_target") or [] if t["r2"] < USELESS_R2]:
            named = ", ".join(f"{t['target']!r} (r2 {t['r2']:.3g})" for t in weak)
            return (f"the saved weights explain almost none of the variance of target"
                    f"{'s' * (len(weak) > 1)} {named} over every row, where always predicting "
                    f"the mean gives 0; the r2 {saved['r2']:.3g} is the average over "
                    f"{len(saved['per_target'])} targets")
        return None

    def _val_keys(self) -> tuple[str, ...]:
        return ("val_loss", "val_accuracy") if self.dataset.classify else (
            "val_loss", "val_mse", "val_r2")

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
            # what reached the driver: tree nodes and their bytes (these vary with workers)
            "partials": grad.partials,
            "partial_bytes": grad.partial_bytes,
            # null where undefined (n < 2, or |G|^2 below its own noise): NaN would not compare.
            "noise_scale": None if math.isnan(noise := grad.noise_scale()) else noise,
        }
        if self.config.private:
            # B_simple needs the exact per-sample sums, which are not private
            row["noise_scale"] = None
            row["epsilon"] = self.accountant.epsilon(step + 1, self.config.dp_delta or 0)
        if self.dataset.classify:
            row["accuracy"] = grad.correct / grad.n if grad.n else float("nan")
        for l, norm in enumerate(grad.layer_norms()[1:], start=1):
            row[f"grad_norm_l{l}"] = float(norm)
        # B_simple of each layer alone: the same sums restricted to layer l, so every row has
        # these columns whether or not second moments are recorded.
        for l, noise in enumerate(grad.layer_noise_scales()[1:], start=1):
            row[f"noise_scale_l{l}"] = (None if math.isnan(noise) or self.config.private
                                        else float(noise))
        return row

    def _reduce(self, partials: list[Partial]) -> Gradient:
        """The reducer's gradient, or zero for a Poisson draw that took no sample."""
        if any(p.n for p in partials):
            return reduce(partials)
        return privacy.empty_gradient(self.arch.sizes)

    def _grad_sq(self, grad: Gradient, flat: F64, mask: F64) -> F64:
        """(1/N) sum_i g_i^2 for the per-sample gradients g_i whose mean is the recorded
        `grad`: with weight decay c = lambda w (weights only), g_i + c, so that
        grad_sq - grad^2 stays the per-sample variance: (1/N) sum_i (g_i + c)^2 =
        grad_sq_0 + c (2 G + c)."""
        sq = grad.flat_sq()
        assert sq is not None, "the step was computed without second moments"
        if not self.config.weight_decay:
            return sq
        c = self.config.weight_decay * flat * mask
        return sq + c * (2 * grad.flat() + c)

    def _checkpoint(self) -> None:
        assert self.recorder is not None
        self.recorder.checkpoint(self.step, self.arch, self.params, self.velocity,
                                 self.standardize, self.meta())

    def _diverged(self, metrics: dict) -> None:
        if self.recorder is not None:
            self.recorder.status(self.info("diverged", started=self.started,
                                           diverged_at=metrics["step"]))
        raise DivergenceError(
            f"step {metrics['step']}: the loss or gradient is not finite (loss "
            f"{metrics['loss']:.6g}, gradient norm {metrics['grad_norm']:.6g}). Lower --lr; "
            "the last finite checkpoint is kept."
        )


def _endpoint_flag(out: str | None) -> str:
    """'--s3-endpoint URL ' when the run folder is on an S3 server set by flag or
    environment: the resume command must reach the same store."""
    url = store.endpoint()
    return f"--s3-endpoint {url} " if out and store.is_remote(out) and url else ""


def train(config: TrainConfig, progress: Progress | None = None,
          note: Callable[[str], None] | None = None) -> dict:
    """Run `config` to the end: plan, load, steps, outputs. Returns the last step's metrics
    with the run's `warnings` (empty when a resumed run had nothing left to do). `note`
    receives the schema line before any work starts."""
    run = Run(config, note)
    try:
        run.prepare()
        metrics = run.execute(progress)
        if metrics and config.private:
            metrics = {**metrics, "delta": config.dp_delta}
        return {**metrics, "warnings": run.warnings} if metrics else metrics
    finally:
        run.close()
