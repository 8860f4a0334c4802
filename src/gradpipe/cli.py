"""The `gradpipe` command line: parse options, build a config, call one library function, print.

Any GradpipeError becomes one line on stderr and exit status 2 (1 for a diverged run);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
import time
from datetime import datetime
from typing import Any, Callable

import click

from .errors import WARNING, ConfigError, DivergenceError, GradpipeError, RunInterrupted


class UserError(click.ClickException):
    """A GradpipeError shown as one line: 'gradpipe: error: ...', exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"gradpipe: error: {self.format_message()}", err=True)


class RunFailed(UserError):
    exit_code = 1


class Interrupted(UserError):
    exit_code = 130  # the shell's status for a command stopped by SIGINT


def refuse_repeated(command: click.Command, ctx: click.Context, args: list[str]) -> None:
    """A usage error for an option given twice with different values (`--target a --target
    b`, `--standardize --no-standardize`): click keeps the last in silence, and a dropped
    --target becomes a feature. The same flag or value again (`-q -q`) changes nothing and
    passes; options that take several values by design are left alone."""
    names: dict[str, click.Option] = {}
    for p in command.params:
        if isinstance(p, click.Option) and not (p.multiple or p.count):
            names.update(dict.fromkeys([*p.opts, *p.secondary_opts], p))
    seen: dict[str, tuple[str, tuple[bool, str | None]]] = {}  # option -> (as written, meaning)
    tokens = iter(args)
    for token in tokens:
        if token == "--":
            break
        name, _, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        param = names.get(name)
        if param is None:
            continue
        value = None if param.is_flag else (inline if "=" in token else next(tokens, None))
        meaning = (name in param.secondary_opts, value)  # -q and --quiet mean the same
        if param.name in seen and seen[str(param.name)][1] != meaning:
            first = seen[str(param.name)][0]
            said = f"{first} and {name} both given" if first != name else f"{name} given twice"
            several = (", several names in one, comma-separated" if param.metavar == "NAMES"
                       else "")
            raise click.UsageError(f"{said}: give each option once{several}", ctx=ctx)
        seen[str(param.name)] = (name, meaning)


class Group(click.Group):
    """A click group that turns GradpipeError into UserError, in one place, and refuses
    an option given twice, in every command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated(self, ctx, args)
        return super().parse_args(ctx, args)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:  # reading the group's flags (click would say "Aborted!")
            raise Interrupted("interrupted before any work began; nothing was written") \
                from None
        except click.UsageError as e:
            raise UserError(_usage_line(e)) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DivergenceError as e:
            raise RunFailed(str(e)) from None
        except RunInterrupted as e:
            raise Interrupted(str(e)) from None
        except KeyboardInterrupt:  # before a run began (or outside one): nothing was written
            raise Interrupted("interrupted before any work began; nothing was written") \
                from None
        except GradpipeError as e:
            raise UserError(str(e)) from None
        except click.UsageError as e:  # a subcommand's flags: one line, as every refusal
            raise UserError(_usage_line(e)) from None
        except OSError as e:
            # A file the system refused (an --out that cannot be created, a full disk): the
            # path and the reason, in one line. Without a path it is not the user's to fix.
            if not e.filename:
                raise
            # a temporary beside an output (.NAME.tmp-XXXXXXXX) is named as the output
            path = re.sub(r"/\.([^/]+)\.tmp-[0-9a-f]{8}(?=/|$)", r"/\1", str(e.filename))
            raise UserError(f"{path}: {e.strerror or e}") from None


class Command(click.Command):
    """A command that refuses an option given twice."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated(self, ctx, args)
        return super().parse_args(ctx, args)


Group.command_class = Command
Group.group_class = type  # subgroups are Groups


def _usage_line(e: click.UsageError) -> str:
    """click's usage error (four lines: usage, a hint, a blank, the error) as one."""
    where = e.ctx.command_path if e.ctx is not None else "gradpipe"
    return f"{e.format_message()} (see {where} --help)"


@click.group(cls=Group)
@click.option("--address", envvar="RAY_ADDRESS", default=None, metavar="ADDR",
              help="Ray cluster to use: HOST:PORT, ray://HOST:PORT or auto (env RAY_ADDRESS). "
                   "Default: a private local instance on 127.0.0.1.")
@click.option("--s3-endpoint", default=None, metavar="URL",
              help="S3-compatible endpoint for s3:// paths, e.g. http://127.0.0.1:9000, for "
                   "this command and its Ray workers. Default: AWS_ENDPOINT_URL, else AWS.")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own logs.")
@click.version_option(package_name="gradpipe")
@click.pass_context
def cli(ctx: click.Context, address: str | None, s3_endpoint: str | None,
        verbose: bool) -> None:
    """Exact per-sample backpropagation over Parquet, on Ray.

    \b
    Example:
      gradpipe train data/digits --out runs/digits
    """
    ctx.obj = {"address": address, "verbose": verbose}
    if s3_endpoint:
        from .store import configure

        configure(s3_endpoint)


def config_options(command: str) -> Callable[[Callable], Callable]:
    """The TrainConfig options `command` takes (declared once, in config.py), and --job."""
    from .config import TrainConfig
    from .options import click_options

    def decorate(f: Callable) -> Callable:
        f = click.option("--job", type=click.Path(dir_okay=False), metavar="FILE.toml",
                         help="Read options from a job file; flags given here override it.")(f)
        return click_options(TrainConfig, command)(f)

    return decorate


def output_options(f: Callable) -> Callable:
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON summary line.")(f)
    return click.option("--quiet", "-q", is_flag=True,
                        help="No progress bar and no schema line (stderr); the summary and "
                             "warnings stay.")(f)


def build_config(ctx: click.Context, data: str | None, params: dict, **fixed: Any):
    """TrainConfig from the flags given, over a job file (if any), over the defaults; with
    --resume, over the options the run was started with (run.json)."""
    from .config import TrainConfig
    from .jobs import COMMANDS, read_job_file
    from .options import build, options, parse_values
    from .train import resumed_config

    declared = options(TrainConfig)
    flags = parse_values(TrainConfig, {k: v for k, v in params.items()
                                       if k in declared and v is not None})
    values: dict = {}
    sources: dict = {}
    if params.get("job"):
        job = read_job_file(params["job"])
        name = ctx.command.name
        if job.command_given and name in COMMANDS and job.command != name:
            raise ConfigError(f"--job {job.path}: the file says command = {job.command!r}, and "
                              f"this is gradpipe {name}: run gradpipe {job.command} --job "
                              f"{job.path}, or change the file")
        values.update(job.values)
        sources = {name: str(job.path) for name in job.values}
    values.update(flags)
    for name in flags:
        sources.pop(name, None)
    if data is not None:
        values["data"] = data
    # --address: this command's flag, then the group's flag, then the job file, then
    # RAY_ADDRESS (the group option's environment variable).
    root = ctx.find_root()
    group_given = root.get_parameter_source("address") is click.core.ParameterSource.COMMANDLINE
    if ctx.obj["address"] is not None and "address" not in flags and (
            group_given or "address" not in values):
        values["address"] = ctx.obj["address"]
    values.update(fixed)
    if values.get("s3_endpoint"):  # before anything reads DATA or the run folder
        from .store import configure

        configure(values["s3_endpoint"])
    if values.get("resume"):
        if not values.get("out"):
            raise click.UsageError("--resume needs --out RUN, the run folder to continue")
        given = {k: v for k, v in values.items() if k not in ("out", "resume")}
        return resumed_config(values["out"], {**given, "verbose": ctx.obj["verbose"]})
    if not values.get("data"):
        raise click.UsageError("missing DATA (give it as an argument or as `data` in the job file)")
    values["verbose"] = ctx.obj["verbose"]
    return build(TrainConfig, values, sources)


class Progress:
    """A rich progress bar on stderr (steps with the loss, or rows) when stderr is a terminal;
    otherwise (a log file, `gradpipe jobs logs`) a plain line every `line_seconds`, so that a
    long run shows it is alive. The rate counts from the end of the first step, after the
    workers started."""

    LINE_SECONDS = 30.0

    def __init__(self, total: int, enabled: bool, unit: str = "step",
                 line_seconds: float | None = None) -> None:
        tty = sys.stderr.isatty()
        self.enabled = enabled and tty
        self.lines = enabled and not tty  # plain lines instead of the bar
        self.line_seconds = self.LINE_SECONDS if line_seconds is None else line_seconds
        self.total = total
        self.unit = unit
        self.bar: Any = None
        self.samples = 0
        self.t0 = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, samples) at the first step's end
        self.last_line = self.t0

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn(self.unit), MofNCompleteColumn(), BarColumn(),
                           TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                           console=Console(stderr=True), transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total,
                                          info="reading the data, starting the workers")
        return self

    def __call__(self, step: int, metrics: dict) -> None:
        self.samples += metrics["samples"]
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, self.samples)
        if self.bar is None and not self.lines:
            return
        info = f"loss {metrics['loss']:.4g}  |grad| {metrics['grad_norm']:.3g}"
        if "accuracy" in metrics:
            info += f"  acc {metrics['accuracy']:.3f}"
        t1, s1 = self.first
        if now > t1:
            info += f"  {(self.samples - s1) / (now - t1):,.0f} samples/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif now - self.last_line >= self.line_seconds and step < self.total:
            self.last_line = now
            click.echo(f"{self.unit} {step} of {self.total}  {info}  ({now - self.t0:.0f} s)",
                       err=True)

    def rows(self, done: int) -> None:
        """Rows written so far (data synth)."""
        if self.bar is not None:
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=done, info=f"{rate:,.0f} rows/s")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


class Note:
    """The schema line: on stderr (above the progress bar, if one is drawn) unless --quiet or
    --json; kept in `line` for the --json summary."""

    def __init__(self, params: dict, progress: "Progress | None" = None) -> None:
        self.quiet = bool(params.get("quiet") or params.get("as_json"))
        self.progress = progress
        self.line: str | None = None
        self.said: set[str] = set()  # warnings already printed, before the first step

    def __call__(self, line: str) -> None:
        if line.startswith(WARNING):
            if self.quiet:
                return
            self.said.add(line[len(WARNING):])
        else:
            self.line = line
        if self.quiet:
            return
        if self.progress is not None and self.progress.bar is not None:
            self.progress.bar.console.print(line, markup=False, highlight=False,
                                            soft_wrap=True)
        else:
            click.echo(line, err=True)


def _report(summary: dict, as_json: bool, *lines: str) -> None:
    """A command's result: one JSON object with --json, else the lines for people."""
    if as_json:
        click.echo(json.dumps(summary))
        return
    for line in lines:
        click.echo(line)


def _summary(out: str | None, metrics: dict, as_json: bool, extra: dict | None = None,
             said: frozenset[str] | set[str] = frozenset()) -> None:
    from .render import metric_parts

    summary = {"out": out, **metrics, **(extra or {})}
    if as_json:
        # JSON has no NaN: an undefined statistic (noise scale at n = 1, say) is null.
        click.echo(json.dumps(_no_nan(summary)))
        return
    parts = [f"step {metrics['step']}", *metric_parts(metrics)]
    if metrics.get("epsilon") is not None:  # a private run: the privacy spent
        parts.append(f"epsilon {metrics['epsilon']:.4g} at delta {metrics['delta']:g}")
    click.echo("  ".join(parts))
    if metrics.get("saved") is not None:  # the step's metrics are those before its update
        steps = metrics["saved"]["steps"]
        click.echo(f"saved weights (after {steps} step{'s' * (steps != 1)}, all "
                   f"{metrics['saved']['samples']} rows): "
                   + "  ".join(metric_parts(metrics["saved"])))
    for warning in metrics.get("warnings", []):
        if warning not in said:
            click.echo(f"{WARNING}{warning}", err=True)
    if out:
        click.echo(f"wrote {out}")


def _no_nan(value: Any) -> Any:
    """NaN as None, in nested dicts and lists too (JSON has no NaN)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def run_command(name: str) -> Callable[[Callable], Callable]:
    """`gradpipe NAME [DATA]` with the options NAME takes, --job, --quiet and --json."""
    def decorate(f: Callable) -> Callable:
        f = output_options(click.pass_context(f))
        f = click.argument("data", required=False)(config_options(name)(f))
        return cli.command(name)(f)

    return decorate


@run_command("train")
def train(ctx: click.Context, data: str | None, **params: Any) -> None:
    """Train a network with full-batch (or mini-batch) SGD; every step's gradient is exact.

    DATA is a Parquet file, a folder of them, or a URI (s3://, gs://, hdfs://, file://);
    on a cluster it is a path the cluster's nodes can read.

    \b
    Example:
      gradpipe train data/digits --hidden 32 --lr 2 --steps 300 --out runs/digits
    """
    from .train import train as run_train

    config = build_config(ctx, data, params)
    if config.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        config = dataclasses.replace(config, out=f"runs/train-{stamp}")
    with Progress(config.steps, not (params["quiet"] or params["as_json"])) as progress:
        note = Note(params, progress)
        metrics = run_train(config, progress, note=note)
    if not metrics:  # a resumed run that had already finished
        click.echo(f"{config.out}: the run is complete ({config.steps} steps); nothing to do. "
                   "Pass a larger --steps to extend it.")
        return
    _summary(config.out, metrics, params["as_json"], {"schema": note.line}, note.said)


@run_command("grad")
def grad(ctx: click.Context, data: str | None, **params: Any) -> None:
    """Compute one full-batch gradient, at the seeded initial weights or at --weights.

    Writes a run folder with step 0: gradients/, metrics/, weights.parquet, run.json
    and, with --per-sample, per_sample/step=0/.

    \b
    Example:
      gradpipe grad data/digits --hidden 16 --dtype float64 --per-sample norms --out runs/g0
    """
    from .train import train as run_train

    if params.get("out") is None and not params.get("job"):
        raise click.UsageError("missing --out DIR")
    config = build_config(ctx, data, params, update=False, steps=1)
    note = Note(params)
    metrics = run_train(config, note=note)
    _summary(config.out, metrics, params["as_json"], {"schema": note.line})


def _train_option(name: str) -> Callable[[Callable], Callable]:
    """A TrainConfig option (--workers, --address, --block-rows, --memory-budget) for the
    commands outside TrainConfig, declared there once: its text, default and checks."""
    from .config import TrainConfig
    from .options import click_option

    return click_option(TrainConfig, name)


def _model_data_options(f: Callable) -> Callable:
    """RUN, DATA and the execution options of evaluate and predict."""
    options: list[Callable[[Callable], Callable]] = [
        click.argument("run", metavar="RUN"),
        click.argument("data"),
        _train_option("workers"),
        _train_option("address"),
        _train_option("block_rows"),
        _train_option("memory_budget"),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
        click.option("--quiet", "-q", is_flag=True, help="Leave out the data's schema line "
                     "(stderr)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _eval_config(ctx: click.Context, run: str, data: str, params: dict, **extra: Any):
    from .evaluate import EvalConfig

    return EvalConfig(model=run, data=data, workers=params["workers"],
                      address=params["address"] or ctx.obj["address"],
                      block_rows=params["block_rows"], memory_budget=params["memory_budget"],
                      verbose=ctx.obj["verbose"], **extra)


def _finite(obj: dict) -> dict:
    """JSON has no NaN or infinity: such values become null."""
    return {k: (None if isinstance(v, float) and (v != v or abs(v) == float("inf")) else v)
            for k, v in obj.items()}


@cli.command()
@_model_data_options
@click.pass_context
def evaluate(ctx: click.Context, run: str, data: str, **params: Any) -> None:
    """Held-out metrics of a trained model on DATA: loss, then accuracy and the confusion
    matrix (classes), or mse, mae and r2 per target in the targets' own units.

    RUN is a run folder or a weights.parquet. DATA must hold the model's feature columns,
    by name and in any order, and its target column; labels outside the model's classes
    are refused. The loss is the model's training loss (on standardized targets if it was
    trained on them).

    \b
    Example:
      gradpipe evaluate runs/digits data/digits-test --workers 0
    """
    from .evaluate import evaluate as run_evaluate
    from .evaluate import render_metrics

    metrics = run_evaluate(_eval_config(ctx, run, data, params), note=Note(params))
    if params["as_json"]:
        click.echo(json.dumps(_finite(metrics)))
        return
    for line in render_metrics(metrics):
        click.echo(line)


@cli.command()
@_model_data_options
@click.option("--out", required=True, metavar="PREDICTIONS",
              help="Folder to write: part-BLOCK.parquet files with sample, prediction, "
                   "confidence and probabilities (one column per target for regression).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier predictions folder.")
@click.option("--id-column", metavar="NAME",
              help="Integer column of DATA to use as the sample id. Default: the model's id "
                   "column if DATA has it, else the global row index.")
@click.pass_context
def predict(ctx: click.Context, run: str, data: str, **params: Any) -> None:
    """Predict DATA with a trained model; the workers write the parts themselves.

    RUN is a run folder or a weights.parquet. DATA must hold the model's feature columns,
    by name and in any order; it needs no target. `prediction` holds the class in the
    label's own values (int, bool or string), `probabilities` the classes in the order of
    the model's classes; a regression model predicts each target, named after it, in the
    targets' own units. --out appears only once complete.

    \b
    Example:
      gradpipe predict runs/digits data/digits-test --out predictions/digits
    """
    from .evaluate import predict as run_predict

    config = _eval_config(ctx, run, data, params, out=params["out"],
                          overwrite=params["overwrite"], id_column=params["id_column"])
    summary = run_predict(config, note=Note(params))
    if params["as_json"]:
        click.echo(json.dumps(summary))
        return
    click.echo(f"wrote {summary['rows']} predictions in {summary['parts']} "
               f"part{'s' * (summary['parts'] != 1)} to {summary['out']}")


def _pool_options(f: Callable) -> Callable:
    """--workers and --address, as evaluate and predict take them."""
    return _train_option("workers")(_train_option("address")(f))


@cli.command()
@click.argument("run", metavar="RUN")
@click.option("--out", metavar="FOLDER",
              help="Folder of part-BLOCK.parquet files to write (an earlier scores folder is "
                   "replaced). Default: RUN/scores.")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Samples to print, the most suspicious first (0: none).")
@click.option("--by", default="self_influence", show_default=True,
              type=click.Choice(["self_influence", "el2n_mean", "grand_mean", "loss_last",
                                 "forgetting_events"]),
              help="Score that ranks the --top samples, largest first (ties: smaller id).")
@_pool_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="Leave out the line on what is scored.")
@click.pass_context
def scores(ctx: click.Context, run: str, **params: Any) -> None:
    """Score every sample of a run from its recorded per-sample rows, one row per sample:
    self_influence (TracIn-CP, sum_t lr_t |grad C_i(w_t)|^2), el2n_mean, grand_mean,
    loss_last, forgetting_events and first_learned, over the steps with per-sample rows
    (train --per-sample norms --per-sample-every K).

    The workers read their blocks' per-sample files and write the parts themselves; the
    output appears only once complete.

    \b
    Example:
      gradpipe scores runs/digits --top 20
    """
    from .scores import ScoresConfig, render_top
    from .scores import scores as run_scores

    config = ScoresConfig(run=run, out=params["out"], top=params["top"], by=params["by"],
                          workers=params["workers"],
                          address=params["address"] or ctx.obj["address"],
                          verbose=ctx.obj["verbose"])
    summary = run_scores(config, note=Note(params))
    unscored = ("" if summary["rows"] == summary["rows_in_data"] else
                f" (of {summary['rows_in_data']} rows: the others were not drawn at a "
                "recorded step)")
    _report(summary, params["as_json"],
            f"wrote scores of {summary['rows']} samples{unscored} over {len(summary['steps'])} "
            f"recorded step{'s' * (len(summary['steps']) != 1)} in {summary['parts']} "
            f"part{'s' * (summary['parts'] != 1)} to "
            f"{summary['out']}", *render_top(summary))
    if summary["run_status"] not in (None, "completed"):
        click.echo(f"{WARNING}the run is {summary['run_status']} (its last recorded step is "
                   f"{summary['steps'][-1]}, of {summary['run_steps']} steps): these scores "
                   f"cover its steps so far; after gradpipe train --resume --out {run}, run "
                   "gradpipe scores again", err=True)


@cli.command()
@click.argument("run", metavar="RUN")
@click.option("--test", required=True, metavar="DATA",
              help="Test data (Parquet file, folder or URI) with the model's feature columns "
                   "and target.")
@click.option("--out", required=True, metavar="FILE.parquet",
              help="Parquet file to write: test_sample, kind, rank, train_sample, influence.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Proponents and opponents to keep per test sample.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="Compute dtype. Default: the model's.")
@_pool_options
@_train_option("memory_budget")
@click.option("--id-column", metavar="NAME",
              help="Integer column of the test data to use as its sample id. Default: the "
                   "run's id column if the test data has it, else the global row index.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="Leave out the data's schema lines.")
@click.pass_context
def influence(ctx: click.Context, run: str, **params: Any) -> None:
    """TracIn-CP influence of every training sample of RUN on every test sample:
    sum over the run's checkpoints S of lr_S grad C_i(w_S) . grad C_j(w_S), by ghost dot
    products (no per-sample gradient is formed). Keeps the --top most positive
    (proponents) and most negative (opponents) training samples per test sample.

    The training data is the run's DATA (run.json), read as training read it.

    \b
    Example:
      gradpipe influence runs/digits --test data/digits-test --top 5 --out influence.parquet
    """
    from .influence import InfluenceConfig
    from .influence import influence as run_influence

    config = InfluenceConfig(run=run, test=params["test"], out=params["out"],
                             top=params["top"], dtype=params["dtype"],
                             workers=params["workers"],
                             address=params["address"] or ctx.obj["address"],
                             memory_budget=params["memory_budget"],
                             id_column=params["id_column"], overwrite=params["overwrite"],
                             verbose=ctx.obj["verbose"])
    summary = run_influence(config, note=Note(params))
    _report(summary, params["as_json"],
            f"wrote {summary['rows']} rows (top {summary['top']} proponents and opponents of "
            f"{summary['test_samples']} test samples among {summary['training_samples']} "
            f"training samples, {len(summary['checkpoints'])} checkpoints) to "
            f"{summary['out']}")
    if summary["private_run"]:
        click.echo(f"{WARNING}{run} is a private run, but influence values are exact "
                   "functions of its training rows, not covered by its epsilon: keep them as "
                   "private as the data", err=True)


@cli.command()
@click.argument("data", required=False)
@config_options("check")
@click.option("--samples", type=int, default=4, show_default=True, help="Samples to check.")
@click.option("--per-layer", type=int, default=8, show_default=True,
              help="Parameters to check in every layer.")
@click.option("--tol", "tol_check", type=float, default=1e-8, show_default=True,
              help="Largest error that passes: |backprop - finite difference| beyond the "
                   "finite difference's rounding bound, over the sample's gradient norm.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def check(ctx: click.Context, data: str | None, **params: Any) -> None:
    """Check backprop against central finite differences, in float64.

    Exits 0 when the worst relative error is within --tol, 1 otherwise.

    \b
    Example:
      gradpipe check data/digits --hidden 16,8 --activation tanh
    """
    from .check import finite_difference_check
    from .render import render_check

    config = build_config(ctx, data, params, workers=0)
    report = finite_difference_check(config, samples=params["samples"],
                                     per_layer=params["per_layer"], tol=params["tol_check"])
    ok = bool(report["ok"])
    if params["as_json"]:
        click.echo(json.dumps({"ok": ok, "worst": report["worst"], "tol": report["tol"],
                               "error_measure": report["error_measure"],
                               "detectable_error": report["detectable_error"],
                               "compared": len(report["checks"])}))
    else:
        render_check(report, ok, params["tol_check"])
    ctx.exit(0 if ok else 1)


@cli.command()
@click.argument("data", required=False)
@config_options("explain")
@click.option("--layer", type=int, required=True, help="Layer l (1..L) of the weight.")
@click.option("--j", type=int, required=True, help="Unit j in layer l.")
@click.option("--k", type=int, default=None, help="Unit k in layer l-1; omit for the bias b_j.")
@click.option("--sample", type=int, default=0, show_default=True,
              help="Sample: its global row index.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line.")
@click.pass_context
def explain(ctx: click.Context, data: str | None, **params: Any) -> None:
    """Show the chain rule for one weight and one sample, beside a finite difference.

    dC_0/dw_jk = dC_0/da_j * g'(z_j) * a_k, in float64.

    \b
    Example:
      gradpipe explain data/digits --layer 1 --j 3 --k 10 --sample 7
    """
    from .check import explain as run_explain
    from .render import render_explain

    config = build_config(ctx, data, params, workers=0)
    out = run_explain(config, layer=params["layer"], j=params["j"], k=params["k"],
                      sample=params["sample"])
    if params["as_json"]:
        click.echo(json.dumps(out))
        return
    render_explain(out)


@cli.group()
def data() -> None:
    """Make or convert datasets to Parquet."""


@data.command("synth")
@click.argument("out")
@click.option("--rows", type=int, default=10000, show_default=True, help="Rows in all.")
@click.option("--features", type=int, default=16, show_default=True, help="Feature columns.")
@click.option("--classes", type=int, default=10, show_default=True,
              help="Classes of the label column; 0 for regression (float targets t0..).")
@click.option("--targets", type=int, default=1, show_default=True,
              help="Float target columns, with --classes 0.")
@click.option("--files", type=int, default=1, show_default=True, help="Parquet files.")
@click.option("--row-group-size", type=int, default=65536, show_default=True,
              help="Rows per row group (one block each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--overwrite", is_flag=True, help="Replace part files in an existing OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def data_synth(out: str, as_json: bool, **params: Any) -> None:
    """Write a deterministic, learnable synthetic dataset, one row group at a time.

    \b
    Example:
      gradpipe data synth /tmp/synth --rows 1000000 --features 128 --classes 10 --files 8
    """
    from .synth import synth

    with Progress(params["rows"], True, unit="rows") as bar:
        summary = synth(out, **params, progress=bar.rows)
    click.echo(json.dumps(summary) if as_json else
               f"wrote {summary['rows']} rows in {summary['files']} "
               f"file{'s' * (summary['files'] != 1)} "
               f"({summary['row_groups']} row group{'s' * (summary['row_groups'] != 1)}) to "
               f"{summary['out']}")


def _jobs_client(ctx: click.Context, address: str | None):
    """The cluster's Jobs API: --address here, else the group's --address / RAY_ADDRESS."""
    from .jobs import Jobs

    return Jobs(address or ctx.obj["address"], verbose=ctx.obj["verbose"])


def _job_exit(ctx: click.Context, record: dict) -> None:
    message = f": {record['message']}" if record["message"] else ""
    click.echo(f"job {record['id']} {record['status']}{message}", err=True)
    ctx.exit(0 if record["status"] == "SUCCEEDED" else 1)


def _address_option(f: Callable) -> Callable:
    return click.option("--address", metavar="URL",
                        help="The cluster's Jobs API, its dashboard: http://HEAD:8265. "
                             "Default: the group's --address / RAY_ADDRESS.")(f)


@cli.command(context_settings={"show_default": True})
@click.argument("job_file", metavar="JOBFILE", type=click.Path(exists=True, dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[-- FLAGS...]")
@_address_option
@click.option("--working-dir", default=".", type=click.Path(exists=True, file_okay=False),
              help="Folder uploaded as the job's working directory; the job file and the "
                   "relative paths in it must lie inside. runs/, build/, dist/, .git, caches, "
                   "virtual environments, files over --max-file-mb and what .gitignore or "
                   ".rayignore name stay behind.")
@click.option("--max-file-mb", type=float, default=50.0,
              help="Files larger than this (MiB) are not uploaded.")
@click.option("--use-installed", is_flag=True,
              help="Run the gradpipe installed on the cluster instead of uploading this "
                   "machine's gradpipe source (py_modules).")
@click.option("--submission-id", help="Job id to use instead of Ray's raysubmit_... one.")
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit 0 if it SUCCEEDED, "
              "1 if it FAILED or was STOPPED.")
@click.option("--follow", is_flag=True, help="Stream the job's logs until it ends; exit as "
              "with --wait.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line (logs of --follow "
              "go to stderr).")
@click.pass_context
def submit(ctx: click.Context, job_file: str, args: tuple[str, ...], address: str | None,
           working_dir: str, max_file_mb: float, use_installed: bool,
           submission_id: str | None, wait: bool, follow: bool, as_json: bool) -> None:
    """Run a job file on a Ray cluster as a Ray Job: `gradpipe train --job JOBFILE` (or grad).

    The working dir (default: here) is uploaded and becomes the job's current directory,
    so relative paths in the job file are relative to it; a relative `out` is written in
    that copy, on the cluster. This machine's gradpipe source goes with the job
    (py_modules), so the cluster runs the same code. Flags after -- are passed to
    gradpipe train|grad and override the job file. Prints the job id.

    \b
    Example:
      gradpipe submit jobs/digits.toml --address http://HEAD:8265 --follow
      gradpipe submit jobs/digits.toml --address http://HEAD:8265 --wait -- --steps 50
    """
    from .jobs import JobConfig, plan_submission

    config = JobConfig(job_file=job_file, address=address or ctx.obj["address"],
                       working_dir=working_dir, args=args, use_installed=use_installed,
                       max_file_mb=max_file_mb, submission_id=submission_id)
    plan = plan_submission(config)
    for note in plan.notes:
        click.echo(f"gradpipe: note: {note}", err=True)
    jobs = _jobs_client(ctx, config.address)
    job_id = jobs.submit(config, plan)
    if not as_json:
        click.echo(job_id)
        click.echo(f"submitted to {jobs.url}: {plan.entrypoint}", err=True)
    if not (wait or follow):
        if as_json:
            click.echo(json.dumps({**jobs.info(job_id), "address": jobs.url,
                                   "left_out": list(plan.skipped)}))
        else:
            click.echo(f"follow it with: gradpipe jobs logs {job_id} --follow --address "
                       f"{jobs.url}", err=True)
        return
    try:
        if follow:
            record = jobs.follow(job_id, lambda text: click.echo(text, nl=False, err=as_json))
        else:
            record = jobs.wait(job_id)
    except KeyboardInterrupt:
        click.echo(f"\ngradpipe: stopped waiting; job {job_id} goes on (gradpipe jobs stop "
                   f"{job_id})", err=True)
        ctx.exit(130)
    if as_json:
        click.echo(json.dumps({**record, "address": jobs.url, "left_out": list(plan.skipped)}))
    _job_exit(ctx, record)


@cli.group()
def jobs() -> None:
    """The Ray Jobs on a cluster: list, status, logs, stop (Jobs API, http://HEAD:8265).

    \b
    Example:
      gradpipe jobs list --address http://127.0.0.1:8265
    """


@jobs.command("list")
@_address_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_context
def jobs_list(ctx: click.Context, address: str | None, as_json: bool) -> None:
    """List the cluster's jobs, oldest first: id, status, start time, entrypoint.

    \b
    Example:
      gradpipe jobs list --address http://127.0.0.1:8265
    """
    from .render import render_jobs

    records = _jobs_client(ctx, address).list()
    if as_json:
        click.echo(json.dumps(records))
        return
    render_jobs(records)


def _job_command(name: str) -> Callable[[Callable], Callable]:
    """A `gradpipe jobs NAME ID` command with --address."""
    def decorate(f: Callable) -> Callable:
        f = click.pass_context(f)
        f = _address_option(f)
        f = click.argument("job_id", metavar="ID")(f)
        return jobs.command(name)(f)

    return decorate


@_job_command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line.")
def jobs_status(ctx: click.Context, job_id: str, address: str | None, as_json: bool) -> None:
    """Show a job's status, message, times and entrypoint.

    \b
    Example:
      gradpipe jobs status raysubmit_XYZ --address http://127.0.0.1:8265
    """
    r = _jobs_client(ctx, address).info(job_id)
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(f"{r['id']}  {r['status']}  {r['message'] or ''}".rstrip())
    took = f" ({r['seconds']:.1f} s)" if r["seconds"] is not None else ""
    click.echo(f"started {r['start_time'] or '-'}  ended {r['end_time'] or '-'}{took}")
    click.echo(f"entrypoint: {r['entrypoint']}")


@_job_command("logs")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
def jobs_logs(ctx: click.Context, job_id: str, address: str | None, follow: bool) -> None:
    """Print a job's logs (its stdout and stderr).

    \b
    Example:
      gradpipe jobs logs raysubmit_XYZ --follow --address http://127.0.0.1:8265
    """
    client = _jobs_client(ctx, address)
    if follow:
        client.follow(job_id, lambda text: click.echo(text, nl=False))
    else:
        click.echo(client.logs(job_id), nl=False)


@_job_command("stop")
def jobs_stop(ctx: click.Context, job_id: str, address: str | None) -> None:
    """Stop a running job (SIGTERM to its driver, then SIGKILL); its actors go with it.

    \b
    Example:
      gradpipe jobs stop raysubmit_XYZ --address http://127.0.0.1:8265
    """
    client = _jobs_client(ctx, address)
    if client.stop(job_id):
        click.echo(f"stopping {job_id}")
    else:
        click.echo(f"{job_id} was not running ({client.info(job_id)['status']})")


def _plot_size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    from .plot import parse_size

    try:
        return parse_size(value)
    except GradpipeError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None  # click names the option


@cli.command("inspect")
@click.argument("path")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Samples to list, by per-sample gradient norm (0: none).")
@click.option("--step", type=int, default=None,
              help="Per-sample step to rank. Default: the latest step with per_sample/ files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--plot", "plot_file", metavar="FILE.png",
              help="Also draw loss, per-layer gradient norms, noise scale and the per-sample "
                   "histogram to this PNG.")
@click.option("--plot-size", callback=_plot_size, default="1200x900", show_default=True,
              metavar="WxH", help="Size of the --plot PNG, in pixels.")
def inspect_(path: str, top: int, step: int | None, as_json: bool, plot_file: str | None,
             plot_size: tuple[int, int]) -> None:
    """Summarize a run folder or one of its Parquet outputs: loss, gradient norms, noise scale,
    and the samples with the largest gradients.

    PATH is a run folder, or metrics/, gradients/, weights.parquet, per_sample/,
    one per-sample file, a scores folder, a predictions folder or an influence file
    (told apart by their columns).

    \b
    Example:
      gradpipe inspect runs/digits --top 20 --plot runs/digits/summary.png
    """
    from .plot import plot
    from .render import render
    from .report import inspect_output, to_json

    result = inspect_output(path, top=top, step=step)
    if plot_file:
        result.summary["plot"] = str(plot(result, plot_file, size=plot_size))
    if as_json:
        click.echo(to_json(result.summary))
        return
    render(result.summary)
    if plot_file:
        click.echo(f"wrote {plot_file}")


@data.command("import")
@click.argument("src")
@click.argument("out")
@click.option("--row-group-size", type=int, default=65536, show_default=True,
              help="Rows per row group (one block each).")
@click.option("--files", type=int, default=1, show_default=True,
              help="Parquet files to write; the rows are split evenly over them, in order.")
@_train_option("target")
@_train_option("task")
@_train_option("features")
@_train_option("id_column")
@click.option("--no-target", is_flag=True,
              help="Rows without a target, to predict: every column but the id (and index "
                   "columns) is a feature. train and evaluate refuse such files.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds only Parquet files.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def data_import(src: str, out: str, as_json: bool, **params: Any) -> None:
    """Convert a CSV or Parquet dataset into checked Parquet files for training.

    SRC is a CSV file (.csv or .tsv, optionally .gz/.bz2/.zst) or a Parquet file, folder
    or URI; it is streamed, never read whole. OUT gets part-00000.parquet.. only after
    every row passed the checks `gradpipe train` makes; on an error nothing is written.

    \b
    Example:
      gradpipe data import digits.csv data/digits-csv --files 3 --row-group-size 256
    """
    from .convert import import_dataset

    summary = import_dataset(src, out, **params)
    if skipped := summary["unread_files"]:  # said on stderr, even with --json
        parquet = summary["unread_parquet"]
        click.echo(f"{WARNING}{len(skipped)} file{'s' * (len(skipped) != 1)} in {src} not "
                   "named *.parquet were not imported: " + ", ".join(map(repr, skipped[:4]))
                   + (", ..." if len(skipped) > 4 else "")
                   + (f"; {len(parquet)} of them {'are' if len(parquet) != 1 else 'is'} "
                      "Parquet: rename them to *.parquet and import again" if parquet else ""),
                   err=True)
    if as_json:
        click.echo(json.dumps(summary))
        return
    files, groups = summary["files"], summary["row_groups"]
    click.echo(f"wrote {summary['rows']} rows of {summary['format']} {src} in {files} "
               f"file{'s' * (files != 1)} ({groups} row group{'s' * (groups != 1)}) to {out}")
    if summary.get("schema"):
        click.echo(f"  {summary['schema']}")  # what `train OUT` will take it to mean
    declared = summary["declared"]
    if not declared["target"]:
        return  # rows for predict: nothing for train to take
    taken = ([f"--target {shlex.quote(','.join(declared['target']))}"]
             if declared["target"] != ["label"] else []) + (
        [f"--task {declared['task']}"] if declared["task"] != "auto" else []) + (
        [f"--id-column {shlex.quote(declared['id_column'])}"]
        if declared["id_column"] is not None else [])
    if taken:
        click.echo(f"  gradpipe train takes {' '.join(taken)} from these files unless "
                   "told otherwise")


def main() -> None:
    import warnings

    # numpy's overflow and invalid-value warnings from gradpipe's own arithmetic: a step
    # that diverges is stopped after it with one line that says so (train: DivergenceError),
    # and a warning naming a source line tells a user nothing more.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"gradpipe\.")
    cli(prog_name="gradpipe")
