"""TrainConfig: every option of `train`, `grad`, `check` and `explain`, declared once.

Each field carries its help, type, choices, range, the commands that take it and how
--resume treats it (options.py derives the click options, the job-file keys and the checks
from these declarations). The config is saved in run.json; `gradpipe train --resume`
reads it back from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import options
from .activations import ACTIVATIONS, HIDDEN_ACTIVATIONS
from .data import BLOCK_ROWS, first_repeated
from .errors import ConfigError
from .losses import LOSSES
from .model import DTYPES
from .options import ALL, RUNS, TRAIN, opt

PER_SAMPLE = ("none", "norms", "full")
SCHEDULES = ("constant", "cosine", "linear")
TASKS = ("auto", "classification", "regression")
# The default learning rate and momentum by task: cross_entropy on standardized features
# takes a larger step than squared loss on standardized targets, which diverged at 2 on
# scikit-learn's diabetes. Plain SGD at 0.1 (the largest stable rate there: 0.5 diverged)
# left nonlinear targets underfit after 300 steps: test r2 0.05 on sin(x0) cos(x1), where
# momentum 0.9 at 0.05 reaches 0.91 (benches/RESULTS.md, "Defaults on real data").
LR = {"classification": 2.0, "regression": 0.05}
MOMENTUM = {"classification": 0.0, "regression": 0.9}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; flags, job files and run.json map onto these fields one to one."""

    # data
    data: str = opt("", "Parquet file, folder or URI.", as_flag=False, resume="free")
    features: tuple[str, ...] = opt(
        (), "Feature columns: comma-separated names or globs (x*), or one fixed-size list "
        "column; !NAME leaves columns out ('!region': all but region). Default: all but the "
        "target, the id and index columns.", kind="names",
        metavar="NAMES")
    target: tuple[str, ...] = opt(
        ("label",), "Target: one class column (integer, bool or string), or comma-separated "
        "float columns for regression (a name with a comma: a list in a job file).",
        kind="names", metavar="NAMES")
    id_column: str | None = opt(None, "Integer column to use as the sample id. Default: the "
                                "global row index.", optional=True, metavar="NAME")
    task: str = opt("auto", "What the target is: auto takes integer, bool and string columns "
                    "as classes and float columns as regression targets.", kind="choice",
                    choices=TASKS)
    standardize: bool = opt(True, "Scale features, and regression targets, to mean 0 and std "
                            "1 (statistics computed by the workers, stored with the weights; "
                            "predictions come back in the targets' units).", kind="bool")
    block_rows: int = opt(BLOCK_ROWS, "Largest block, in rows (row groups are split to this "
                          "size).", kind="int", low=1, commands=RUNS)
    # model
    hidden: tuple[int, ...] = opt((32,), "Hidden layer sizes, e.g. 64,32 (none: no hidden "
                                  "layer).", kind="sizes", low=1, metavar="N,N,..")
    activation: str = opt("sigmoid", "Activation of the hidden layers.", kind="choice",
                          choices=HIDDEN_ACTIVATIONS)
    output_activation: str = opt("auto", "Activation of the output layer; auto: softmax for "
                                 "classification, identity for regression.", kind="choice",
                                 choices=("auto", *sorted(ACTIVATIONS)))
    loss: str = opt("auto", "Per-sample loss; auto: cross_entropy for classification, squared "
                    "(C = sum_j (a_j - y_j)^2) for regression.", kind="choice",
                    choices=("auto", *sorted(LOSSES)))
    seed: int = opt(0, "Seed of the initial weights and of the mini-batch draws.", kind="int",
                    low=0)
    dtype: str = opt("float32", "Compute dtype (sums across samples are float64 either way).",
                     kind="choice", choices=DTYPES)
    weights: str | None = opt(None, "Start from these weights (a run folder or "
                              "weights.parquet) instead of the seeded initialisation.",
                              optional=True, metavar="RUN|FILE")
    # optimizer
    lr: float | None = opt(None, "Learning rate eta (per step, on the mean gradient). "
                           f"Default: {LR['classification']:g} for classification, "
                           f"{LR['regression']:g} for regression.", kind="float", low=0,
                           low_open=True, optional=True, commands=TRAIN)
    steps: int = opt(300, "SGD steps; on --resume it may grow to extend the run.", kind="int",
                     low=1, commands=TRAIN, resume="grow")
    momentum: float | None = opt(None, "Momentum (0: plain SGD). Default: "
                                 f"{MOMENTUM['classification']:g} for classification, "
                                 f"{MOMENTUM['regression']:g} for regression.", kind="float",
                                 low=0, high=1, high_open=True, optional=True,
                                 commands=TRAIN)
    weight_decay: float = opt(0.0, "L2 weight decay lambda, on the weights only.",
                              kind="float", low=0, commands=TRAIN)
    schedule: str = opt("constant", "Learning-rate schedule (cosine and linear decay to 0 at "
                        "the last step).", kind="choice", choices=SCHEDULES, commands=TRAIN)
    batch: int | None = opt(None, "full, or N rows per step drawn by a seeded generator.",
                            kind="batch", low=1, optional=True, metavar="full|N",
                            commands=TRAIN)
    batch_rate: float | None = opt(
        None, "Poisson sampling: each sample in a step's batch with probability Q, decided by "
        "a generator keyed by the seed, the step and the sample id (the same batch on any "
        "number of workers); the gradient is the mean over the rows drawn (with --dp-clip: "
        "the noisy sum over Q N).", kind="float", low=0, low_open=True, high=1,
        optional=True, metavar="Q", commands=TRAIN)
    tol: float = opt(0.0, "Stop when the gradient norm falls below this (0: never).",
                     kind="float", low=0, commands=TRAIN)
    val: str | None = opt(None, "Held-out data (same columns): its loss and accuracy (or mse) "
                          "at every recorded step and the last, as val_* in the metrics. "
                          "Evaluated in this process.", optional=True, commands=TRAIN,
                          metavar="DATA")
    # differential privacy (DP-SGD; privacy.py)
    dp_clip: float | None = opt(None, "Train with differential privacy: clip each sample's "
                                "gradient to norm C (needs --batch-rate, --dp-delta and "
                                "--dp-noise or --dp-epsilon).", kind="float", low=0,
                                low_open=True, optional=True, metavar="C", commands=TRAIN)
    dp_noise: float | None = opt(None, "Noise multiplier sigma: N(0, sigma^2 C^2) is added to "
                                 "each step's summed clipped gradient.", kind="float", low=0,
                                 low_open=True, optional=True, metavar="SIGMA",
                                 commands=TRAIN)
    dp_epsilon: float | None = opt(None, "Target epsilon instead of --dp-noise: sigma is "
                                   "chosen so that --steps steps at --batch-rate spend it.",
                                   kind="float", low=0, low_open=True, optional=True,
                                   metavar="EPS", commands=TRAIN)
    dp_delta: float | None = opt(None, "delta of the (epsilon, delta) guarantee, e.g. 1e-5 "
                                 "(below 1/N).", kind="float", low=0, low_open=True, high=1,
                                 high_open=True, optional=True, metavar="DELTA",
                                 commands=TRAIN)
    dp_key: str | None = opt(None, "File with the secret (hex digits, at least 32; a fresh "
                             "key has 64) that keys the Poisson draw and the noise. Default: "
                             "a fresh one, kept in the "
                             "run folder as privacy-key.", optional=True, metavar="FILE",
                             commands=TRAIN, resume="free")
    dp_allow_per_sample: bool = opt(False, "Write --per-sample rows in a private run: they are "
                                    "exact, hence not private.", kind="bool", commands=TRAIN)
    # execution
    workers: int | None = opt(None, "Ray workers (actors); 0 computes without Ray, on this "
                              "machine (long steps in one worker process per core). "
                              "Default: in this process for small work (the schema line says "
                              "so), else one per CPU Ray offers.", kind="int", low=0,
                              optional=True,
                              commands=RUNS, resume="free")
    address: str | None = opt(None, "Ray cluster: HOST:PORT, ray://HOST:PORT or auto "
                              "(default: the group's --address, RAY_ADDRESS, else a private "
                              "local instance).", optional=True, commands=RUNS,
                              resume="free", metavar="ADDR")
    s3_endpoint: str | None = opt(None, "S3-compatible endpoint for s3:// paths, e.g. "
                                  "http://127.0.0.1:9000, for this command and its Ray "
                                  "workers (default: the group's --s3-endpoint, "
                                  "AWS_ENDPOINT_URL, else AWS).", kind="url",
                                  optional=True, commands=ALL, resume="free", metavar="URL")
    memory_budget: int | None = opt(None, "Bytes of data per worker above which it reads "
                                    "its blocks from Parquet each time (each step) instead "
                                    "of holding them. Default: half the machine's memory "
                                    "over the workers.", kind="int", low=1,
                                    optional=True, commands=RUNS, resume="free",
                                    metavar="BYTES")
    # outputs
    out: str | None = opt(None, "Run folder. Default (train): runs/train-YYYYmmdd-HHMMSS.",
                          optional=True, commands=RUNS, resume="free", metavar="RUN")
    record_every: int = opt(10, "Record the whole gradient every K steps (and at the last).",
                            kind="int", low=0, commands=TRAIN)
    second_moment: bool = opt(False, "Also record grad_sq = (1/N) sum_i (dC_i/dtheta)^2 for "
                              "every parameter in gradients/ (the empirical Fisher's "
                              "diagonal; with grad, each parameter's variance): one more "
                              "matrix product per layer at the recorded steps.", kind="bool",
                              commands=RUNS)
    per_sample: str = opt("none", "Per-sample rows to write: norms (losses, gradient "
                          "norms, predictions and EL2N) or full (also each sample's whole "
                          "gradient).",
                          kind="choice", choices=PER_SAMPLE, commands=RUNS)
    per_sample_every: int = opt(0, "Per-sample rows every K steps (and at the last); 0: "
                                "only at the last.", kind="int", low=0, commands=TRAIN)
    checkpoint_every: int = opt(50, "Checkpoint every K steps (and at the last).", kind="int",
                                low=0, commands=TRAIN, resume="free")
    overwrite: bool = opt(False, "Replace an existing run folder.", kind="bool",
                          commands=RUNS, resume="free", in_job=True)
    resume: bool = opt(False, "Continue the run in --out from its last checkpoint, with the "
                       "options it was started with.", kind="bool", commands=TRAIN,
                       resume="free")
    # set by the command, never by a flag or a job file
    update: bool = opt(True, "False: compute gradients only (gradpipe grad).", kind="bool",
                       as_flag=False, in_job=False, resume="free")
    verbose: bool = opt(False, "Show Ray's own logs.", kind="bool", as_flag=False,
                        in_job=False, resume="free")

    def __post_init__(self) -> None:
        options.check(self)
        if not self.target:
            raise ConfigError("--target is empty: name the target column (default: label)")
        options.check_paths(out=self.out, val=self.val, weights=self.weights)
        for name in ("target", "features"):
            names = getattr(self, name)
            repeated = first_repeated(names)
            if repeated is not None:
                raise ConfigError(f"--{name} {','.join(names)}: {repeated!r} is named twice")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite cannot be used together")
        if self.batch is not None and self.batch_rate is not None:
            raise ConfigError("--batch N and --batch-rate Q cannot be used together: N rows, "
                              "or each row with probability Q")
        if self.per_sample_every and self.per_sample == "none":
            raise ConfigError(f"--per-sample-every {self.per_sample_every} writes per-sample "
                              "rows every K steps: add --per-sample norms (or full)")
        check_privacy(self)

    @property
    def private(self) -> bool:
        """True for a differentially private run (--dp-clip)."""
        return self.dp_clip is not None

    @property
    def sampled(self) -> bool:
        """True when each step sees a batch (--batch N or --batch-rate), not every row."""
        return self.batch is not None or self.batch_rate is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_privacy(config: TrainConfig) -> None:
    """Refuse, in one line, a private run that the accountant would not cover."""
    if config.dp_clip is None:
        given = [n for n in ("dp_noise", "dp_epsilon", "dp_delta", "dp_key")
                 if getattr(config, n) is not None] + (
            ["dp_allow_per_sample"] if config.dp_allow_per_sample else [])
        if given:
            raise ConfigError(f"{options.flag(given[0])} needs --dp-clip C: private training "
                              "clips each sample's gradient to norm C")
        return
    if (config.dp_noise is None) == (config.dp_epsilon is None):
        raise ConfigError("--dp-clip needs exactly one of --dp-noise SIGMA and --dp-epsilon "
                          "EPS")
    if config.dp_delta is None:
        raise ConfigError("--dp-clip needs --dp-delta DELTA, the delta of the (epsilon, delta) "
                          "guarantee (e.g. 1e-5, below 1 / the number of rows)")
    if config.batch is not None:
        raise ConfigError("--batch N with --dp-clip: a fixed number of rows per step is not "
                          "what the accountant analyses (Poisson sampling); use --batch-rate Q")
    if config.batch_rate is None:
        raise ConfigError("--dp-clip needs --batch-rate Q: each sample in a step's batch with "
                          "probability Q (1: every sample at every step)")
    if config.standardize and not config.weights:
        raise ConfigError("--standardize (on by default) computes the features' mean and std "
                          "from the private data, outside the privacy accounting: pass "
                          "--no-standardize (scale the features beforehand with public "
                          "statistics), or --weights of a model with public statistics")
    if config.per_sample != "none" and not config.dp_allow_per_sample:
        raise ConfigError(f"--per-sample {config.per_sample} with --dp-clip writes exact "
                          "per-sample rows, which are not private: add --dp-allow-per-sample "
                          "to write them anyway")
    if config.second_moment:
        raise ConfigError("--second-moment with --dp-clip: the exact second moments of the "
                          "private data are not private")


__all__ = ["ALL", "TrainConfig", "check_privacy"]
