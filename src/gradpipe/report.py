"""Summaries of gradpipe outputs: what `gradpipe inspect` finds in a run folder or one file.

Reads what `train` and `grad` wrote (DESIGN.md section 4) and writes nothing: run.json,
metrics/, gradients/, per_sample/step=S/ and weights.parquet, each told apart
by its columns. Per-sample files are scanned as one pyarrow dataset with an explicit column
list, so the `grad` list column is never read. `inspect_output` returns an `Inspection` (a
JSON-ready summary plus the series the plot needs); render.py prints it, plot.py draws it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from numpy.typing import NDArray

from . import store
from .data import describe_columns
from .errors import ConfigError, GradpipeError
from .outputs import read_run_json, read_weights
from .recorder import nearest_checkpoint

F64 = NDArray[np.float64]

# The columns that tell each output file apart, checked in this order (gradients before
# weights: it has their columns plus step and grad).
KINDS: dict[str, frozenset[str]] = {
    "per_sample": frozenset({"sample", "loss", "grad_norm"}),
    "gradients": frozenset({"step", "layer", "param", "j", "k", "value", "grad"}),
    "metrics": frozenset({"step", "loss", "grad_norm"}),
    "weights": frozenset({"layer", "param", "j", "k", "value"}),
    "influence": frozenset({"test_sample", "kind", "rank", "train_sample", "influence"}),
}
# The folders of parts that `predict` and `scores` write, known by their marker file.
MARKERS = {"_predictions.json": "predictions", "_scores.json": "scores"}
CURVE_POINTS = 8  # rows of the text tables: the first step, evenly spaced ones, the last
NOISE_WINDOW = 0.1  # the noise scale's median is taken over this last fraction of steps
NOISE_EXPLANATION = (
    "B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, 'An Empirical Model of "
    "Large-Batch Training'): the per-sample gradient variance over the squared mean "
    "gradient. It estimates the critical batch size: batches much smaller than B_simple "
    "are dominated by gradient noise, much larger ones cost samples without speeding up "
    "training per step."
)
SECOND_MOMENT_EXPLANATION = (
    "Per layer l, from gradients/ with --second-moment: signal = sum grad^2 = |dC/dtheta_l|^2; "
    "variance = sum (grad_sq - grad^2) over the layer's P_l parameters, the trace of the "
    "per-sample gradients' covariance (1/N); mean_variance = variance / P_l; "
    "snr = signal / variance (below 1: one sample's gradient is mostly noise)."
)
_STEP_DIR = re.compile(r"^step=(-?\d+)$")
_LAYER_COL = re.compile(r"^grad_norm_l(\d+)$")
_NOISE_COL = re.compile(r"^noise_scale_l(\d+)$")


@dataclass
class Output:
    """What was found at a path: its kind and the files of each part of a run."""

    path: str
    kind: str  # run | metrics | gradients | per_sample | weights
    run: dict | None = None  # run.json
    metrics: str | None = None
    gradients: str | None = None
    weights: str | None = None
    per_sample: dict[int | None, list[str]] = field(default_factory=dict)  # step -> part files


@dataclass
class Inspection:
    """A summary (JSON-ready, `summary`) and the full series that `plot` draws."""

    summary: dict
    metrics: pa.Table | None = None  # every step of metrics
    recorded_norms: list[dict] | None = None  # per-layer |grad| of every recorded step
    sample_norms: F64 | None = None  # per-sample grad_norm at the ranked step


# --------------------------------------------------------------------------- finding files


def _read_schema(path: str) -> pa.Schema:
    return _parquet_file(path).schema_arrow


def _parquet_file(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(store.open_input(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from None


def detect_kind(path: str | Path) -> str:
    """Which gradpipe output a Parquet file is, from its columns: metrics, gradients, ..."""
    path = str(path)
    names = _read_schema(path).names
    for kind, required in KINDS.items():
        if required <= set(names):
            return kind
    raise ConfigError(
        f"{path}: not a gradpipe output: its columns ({describe_columns(names)}) match none of "
        "metrics, gradients, weights.parquet or a per_sample part file"
    )


def _matching(folder: str, pattern: str) -> list[str]:
    """The files in `folder` whose names match the glob, sorted (temporaries start with a
    dot, so `part-*` and `step-*` never match them)."""
    return [store.join(folder, n) for n in store.files(folder) if fnmatch.fnmatchcase(n, pattern)]


def _part_files(folder: str) -> list[str]:
    return _matching(folder, "part-*.parquet")


def _step_folders(folder: str) -> dict[int | None, list[str]]:
    out: dict[int | None, list[str]] = {}
    for name in store.listdir(folder):
        match = _STEP_DIR.match(name)
        if match and (files := _part_files(store.join(folder, name))):
            out[int(match.group(1))] = files
    return dict(sorted(out.items(), key=lambda item: item[0] or 0))


def _step_of(folder: str) -> int | None:
    match = _STEP_DIR.match(store.name(folder))
    return int(match.group(1)) if match else None


def open_output(path: str | Path) -> Output:
    """Find what `path` holds: a run folder, per_sample/ or step=S/, or one output file."""
    path = store.resolve(str(path))
    if not store.exists(path):
        store.check_bucket(path)
        raise ConfigError(
            f"{path}: no such file or folder. Pass a run folder or one of its outputs "
            "(metrics/, gradients/, weights.parquet, per_sample/)."
        )
    if store.name(path) == "run.json" and store.is_file(path):
        path = store.parent(path)
    if store.is_dir(path):
        if store.is_file(store.join(path, "run.json")):
            return Output(
                path, "run", run=read_run_json(path),
                metrics=_records(path, "metrics"),
                gradients=_records(path, "gradients"),
                weights=_file_or_none(store.join(path, "weights.parquet")),
                per_sample=_step_folders(store.join(path, "per_sample")),
            )
        if steps := _step_folders(path):
            return Output(path, "per_sample", per_sample=steps)
        weights = store.join(path, "weights.parquet")
        if store.is_file(store.join(path, "state.json")) and store.is_file(weights):
            return Output(weights, "weights", weights=weights)  # a checkpoint, as evaluate takes

        records = _step_files(path)
        if records:  # a run's metrics/ or gradients/ folder
            out = Output(path, detect_kind(records[0]))
            setattr(out, out.kind, path)
            return out
        for marker, kind in MARKERS.items():
            if store.is_file(store.join(path, marker)):
                return Output(path, kind)
        files = _part_files(path)
        if files and KINDS["per_sample"] <= set(_read_schema(files[0]).names):
            return Output(path, "per_sample", per_sample={_step_of(path): files})
        raise ConfigError(
            f"{path}: not a gradpipe output folder (no run.json, no step=S/ folders, no "
            "per-sample part files, no _predictions.json or _scores.json). Pass a run folder "
            "or one of its Parquet files."
        )
    kind = detect_kind(path)
    out = Output(path, kind)
    if kind == "per_sample":
        out.per_sample = {_step_of(store.parent(path)): [path]}
    else:
        setattr(out, kind, path)
    return out


def _file_or_none(path: str) -> str | None:
    return path if store.is_file(path) else None


def _step_files(folder: str) -> list[str]:
    """A records folder's step-S.parquet files in step order (temporaries start with a dot)."""
    return _matching(folder, "step-*.parquet")


def _records(run: str, kind: str) -> str | None:
    """A run's metrics/ or gradients/ folder (or the single file of runs made before it)."""
    if _step_files(store.join(run, kind)):
        return store.join(run, kind)
    return _file_or_none(store.join(run, f"{kind}.parquet"))


def _files(path: str) -> list[str]:
    return _step_files(path) if store.is_dir(path) else [path]


# --------------------------------------------------------------------------- summaries


def _finite(value: Any) -> float | None:
    """A float, or None for null, NaN and infinities (JSON has none of them)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def run_info(run: dict) -> dict:
    """The parts of run.json a reader wants first: command, status, model, dataset, steps."""
    config = run.get("config", {})
    model = run.get("model", {})
    dataset = run.get("dataset", {})
    return {
        "command": run.get("command"),
        "status": run.get("status"),
        "started": run.get("started"),
        "finished": run.get("finished"),
        "steps": config.get("steps"),
        "steps_done": run.get("steps_done"),
        "diverged_at": run.get("diverged_at"),
        "workers": run.get("workers"),
        "model": {key: model.get(key) for key in (
            "sizes", "activation", "output_activation", "loss", "dtype", "parameters")},
        "dataset": {key: dataset.get(key) for key in (
            "source", "rows", "task", "n_outputs", "files", "blocks", "fingerprint")},
        "optimizer": {key: config.get(key) for key in (
            "lr", "momentum", "weight_decay", "schedule", "batch", "batch_rate", "dp_clip")},
        "per_sample": config.get("per_sample"),
        "saved": run.get("saved"),
        "privacy": {key: (run.get("privacy") or {}).get(key) for key in (
            "epsilon", "delta", "steps", "noise_multiplier", "clip", "sampling_rate",
            "accountant")} if run.get("privacy") else None,
    }


def layer_columns(names: list[str]) -> list[str]:
    """The per-layer norm columns grad_norm_l1, grad_norm_l2, ... in layer order."""
    layers = sorted((int(m.group(1)), n) for n in names if (m := _LAYER_COL.match(n)))
    return [n for _, n in layers]


def _spaced(n: int, points: int = CURVE_POINTS) -> list[int]:
    """Row indexes 0, evenly spaced ones and n-1 (at most `points`)."""
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, min(n, points))})


def read_metrics(path: str) -> pa.Table:
    """A run's metrics (its folder, or one file), checked to be metrics."""
    try:
        table = pa.concat_tables([_parquet_file(p).read() for p in _files(path)],
                                 promote_options="default")  # rows of older versions
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from None
    missing = KINDS["metrics"] - set(table.column_names)
    if missing:
        raise ConfigError(f"{path}: not a gradpipe metrics file (no column {sorted(missing)[0]!r})")
    return table


# The held-out metrics of --val: val_accuracy for classes, val_mse and val_r2 for regression.
VAL_COLUMNS = ("val_loss", "val_accuracy", "val_mse", "val_r2")


def metrics_summary(table: pa.Table) -> dict:
    """Steps recorded, the curve at evenly spaced steps, the last row, the lowest loss and
    (with --val) the lowest val_loss."""
    if table.num_rows == 0:
        return {"steps": 0, "first_step": None, "last_step": None, "layers": [],
                "curve": [], "final": None, "best": None, "val": [], "best_val": None}
    rows = table.to_pylist()
    loss = _floats(table.column("loss"))  # null: NaN
    best = int(np.nanargmin(loss)) if np.isfinite(loss).any() else None
    return {
        "steps": table.num_rows,
        "first_step": rows[0]["step"],
        "last_step": rows[-1]["step"],
        "layers": [int(c.removeprefix("grad_norm_l")) for c in layer_columns(table.column_names)],
        "curve": [rows[i] for i in _spaced(len(rows))],
        "final": rows[-1],
        "best": None if best is None else {"step": rows[best]["step"], "loss": rows[best]["loss"]},
        # --val: the held-out metrics at every step that has them, and the lowest val_loss
        "val": (val := [{k: r[k] for k in ("step", *VAL_COLUMNS) if k in r} for r in rows
                        if r.get("val_loss") is not None]),
        "best_val": min(val, key=lambda r: (r["val_loss"], r["step"])) if val else None,
    }


def _latest_and_median(table: pa.Table, column: str) -> dict:
    """The latest finite value of a metrics column, and its median over the last 10% of steps."""
    steps = table.column("step").to_numpy()
    values = _floats(table.column(column))  # null: NaN
    finite = np.isfinite(values)
    window = max(1, math.ceil(NOISE_WINDOW * len(values)))
    tail, tail_ok = values[-window:], finite[-window:]
    latest = int(np.flatnonzero(finite)[-1]) if finite.any() else None
    return {
        "latest": None if latest is None else float(values[latest]),
        "latest_step": None if latest is None else int(steps[latest]),
        "median_last": float(np.median(tail[tail_ok])) if tail_ok.any() else None,
        "window_steps": [int(steps[-window]), int(steps[-1])],
        "window_finite": int(tail_ok.sum()),
        "finite_steps": int(finite.sum()),
    }


def noise_summary(table: pa.Table, dataset_rows: int | None = None) -> dict | None:
    """B_simple from metrics: the latest finite value, and the median over the last 10% of
    steps; the same for each layer's B_simple (noise_scale_l1..) where the metrics have it."""
    if "noise_scale" not in table.column_names or table.num_rows == 0:
        return None
    found = _latest_and_median(table, "noise_scale")
    median, latest = found["median_last"], found["latest"]
    basis = median if median is not None else latest
    samples = table.column("samples")[-1].as_py() if "samples" in table.column_names else None
    suggested = None if basis is None else max(1, int(round(basis)))
    if suggested is not None and dataset_rows:
        suggested = min(suggested, int(dataset_rows))
    layers = sorted((int(m.group(1)), n) for n in table.column_names
                    if (m := _NOISE_COL.match(n)))
    return {
        **found,
        "suggested_batch": suggested,
        "samples_per_step": samples,
        "layers": [{"layer": l, **{k: v for k, v in _latest_and_median(table, name).items()
                                   if k in ("latest", "latest_step", "median_last")}}
                   for l, name in layers],
        "explanation": NOISE_EXPLANATION,
    }


def per_sample_columns(schema: pa.Schema) -> list[str]:
    """The per-sample columns inspect reads: sample, [label], loss, grad_norm, and what the
    model did where written (prediction, correct, confidence, el2n); never `grad`."""
    return [c for c in ("sample", "label", "prediction", "correct", "confidence", "loss",
                        "grad_norm", "el2n") if c in schema.names]


def per_sample_summary(
    steps: dict[int | None, list[str]], top: int, step: int | None, where: str
) -> tuple[dict, F64]:
    """Top-`top` samples by gradient norm at one step, and statistics over all samples."""
    if step is not None and step not in steps:
        have = ", ".join(str(s) for s in steps if s is not None) or "none"
        raise ConfigError(
            f"--step {step}: {where} has no per-sample files for step {step} "
            f"(steps with per-sample files: {have})"
        )
    chosen = step if step is not None else list(steps)[-1]
    files = steps[chosen]
    try:
        fs, _ = store.filesystem(files[0])
        dataset = ds.dataset([store.filesystem(f)[1] for f in files], format="parquet",
                             filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{store.parent(files[0])}: per-sample files are not readable ({e})"
                          ) from None
    columns = per_sample_columns(dataset.schema)
    missing = KINDS["per_sample"] - set(columns)
    if missing:
        raise ConfigError(
            f"{files[0]}: not a gradpipe per-sample file (no column {sorted(missing)[0]!r})")
    best: pa.Table | None = None
    norms: list[F64] = []
    losses: list[F64] = []
    el2n: list[F64] = []
    correct = 0
    try:
        # Stream the files batch by batch: only the norms and the current top K stay in memory.
        for batch in dataset.to_batches(columns=columns):
            if batch.num_rows == 0:
                continue
            # float64 for the statistics: norms and el2n are float32 in float32 runs.
            norms.append(_floats(batch.column("grad_norm")))
            losses.append(_floats(batch.column("loss")))
            if "el2n" in columns:
                el2n.append(_floats(batch.column("el2n")))
            if "correct" in columns:
                correct += int(pc.sum(batch.column("correct")).as_py() or 0)
            if top:
                table = pa.Table.from_batches([batch])
                if best is not None:
                    table = pa.concat_tables([best, table])
                keep = pc.select_k_unstable(table, k=min(top, table.num_rows),
                                            sort_keys=[("grad_norm", "descending")])
                best = table.take(keep)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{store.parent(files[0])}: per-sample files are not readable ({e})"
                          ) from None
    grad_norm = np.concatenate(norms) if norms else np.empty(0)
    loss = np.concatenate(losses) if losses else np.empty(0)
    rows: list[dict] = []
    if best is not None:
        order = pc.sort_indices(best, sort_keys=[("grad_norm", "descending"),
                                                 ("sample", "ascending")])
        rows = best.take(order).to_pylist()

    def stats(values: F64) -> dict:
        if values.size == 0:
            return {}
        q = np.quantile(values, [0.5, 0.9, 0.99])
        return {"mean": float(values.mean()), "median": float(q[0]), "p90": float(q[1]),
                "p99": float(q[2]), "max": float(values.max())}

    summary = {
        "steps": [s for s in steps if s is not None],
        "step": chosen,
        "files": len(files),
        "samples": int(grad_norm.size),
        "grad_norm": stats(grad_norm),
        "loss": stats(loss),
        "el2n": stats(np.concatenate(el2n)) if el2n else None,
        "accuracy": correct / grad_norm.size if "correct" in columns and grad_norm.size
        else None,
        "top": with_class_values(rows, _schema_classes(dataset.schema)),
    }
    return summary, grad_norm


def _schema_classes(schema: pa.Schema) -> list | None:
    """The class values that a per-sample file's label and prediction indices stand for."""
    meta = (schema.metadata or {}).get(b"gradpipe")
    return json.loads(meta).get("classes") if meta else None


def with_class_values(rows: list[dict], classes: list | None) -> list[dict]:
    """Rows with `label` and `prediction` as the class values (the files keep the indices
    0..K-1 and the values in their metadata or run.json)."""
    if not classes:
        return rows
    return [{k: classes[v] if k in ("label", "prediction") and isinstance(v, int)
             and 0 <= v < len(classes) else v for k, v in r.items()} for r in rows]


def gradient_norms(path: str) -> tuple[dict, list[dict]]:
    """Per-layer |dC/dtheta| at every recorded step of a run's gradients, read file by file and
    column by column; with grad_sq (--second-moment), each layer's variance and SNR too."""
    sq: dict[tuple[int, int], float] = defaultdict(float)  # sum of grad^2
    var: dict[tuple[int, int], float] = defaultdict(float)  # sum of grad_sq - grad^2
    count: dict[tuple[int, int], int] = defaultdict(int)  # parameters with a grad_sq
    n_rows = 0
    for file in _files(path):
        pf = _parquet_file(file)
        n_rows += pf.metadata.num_rows
        second = "grad_sq" in pf.schema_arrow.names
        try:
            for batch in pf.iter_batches(columns=["step", "layer", "grad"] + (
                    ["grad_sq"] if second else []), batch_size=1 << 20):
                grad = batch.column("grad")
                g2 = pc.multiply(grad, grad)
                cols = {"step": batch.column("step"), "layer": batch.column("layer"), "sq": g2}
                if second:
                    cols["var"] = pc.subtract(batch.column("grad_sq"), g2)
                aggs = [("sq", "sum")] + ([("var", "sum"), ("var", "count")] if second else [])
                for agg in pa.table(cols).group_by(["step", "layer"]).aggregate(aggs).to_pylist():
                    key = (agg["step"], agg["layer"])
                    sq[key] += agg["sq_sum"] or 0.0
                    if second:
                        var[key] += agg["var_sum"] or 0.0
                        count[key] += agg["var_count"]
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise ConfigError(f"{file}: not a readable gradients file ({e})") from None
    steps = sorted({s for s, _ in sq})
    layers = sorted({l for _, l in sq})
    rows = []
    for s in steps:
        row: dict = {"step": s, "grad_norm": math.sqrt(sum(sq[(s, l)] for l in layers))}
        row.update({f"grad_norm_l{l}": math.sqrt(sq[(s, l)]) for l in layers})
        rows.append(row)
    summary = {
        "rows": n_rows,
        "recorded_steps": steps,
        "parameters": n_rows // len(steps) if steps else 0,
        "layers": layers,
        "curve": [rows[i] for i in _spaced(len(rows))] if rows else [],
        "second_moment": _second_moment(steps, layers, sq, var, count),
    }
    return summary, rows


def _second_moment(steps: list[int], layers: list[int], sq: dict, var: dict,
                   count: dict) -> dict | None:
    """Each layer's mean per-parameter variance and SNR (SECOND_MOMENT_EXPLANATION) at the
    last recorded step with grad_sq, and the SNR at evenly spaced such steps."""
    have = [s for s in steps if all(count[(s, l)] for l in layers)]
    if not have:
        return None

    def layer(s: int, l: int) -> dict:
        v = var[(s, l)]
        return {"layer": l, "parameters": count[(s, l)], "signal": sq[(s, l)],
                "variance": v, "mean_variance": v / count[(s, l)],
                "snr": sq[(s, l)] / v if v > 0 else None}

    last = have[-1]
    return {
        "step": last,
        "steps": len(have),
        "layers": [layer(last, l) for l in layers],
        "curve": [{"step": have[i], **{f"snr_l{l}": layer(have[i], l)["snr"] for l in layers}}
                  for i in _spaced(len(have))],
        "explanation": SECOND_MOMENT_EXPLANATION,
    }


def weights_summary(path: str) -> dict:
    """The model stored with the weights, and |w[l]|, |b[l]| and max |w[l]_jk| per layer."""
    arch, params, standardize, velocity = read_weights(path)
    layers = []
    for l in range(1, arch.L + 1):
        w = params.w[l].astype(np.float64)
        b = params.b[l].astype(np.float64)
        layers.append({"layer": l, "shape": list(w.shape), "g": arch.g(l),
                       "w_norm": float(np.linalg.norm(w)), "b_norm": float(np.linalg.norm(b)),
                       "w_abs_max": float(np.abs(w).max())})
    return {**arch.to_dict(), "parameters": arch.n_params, "standardize": standardize is not None,
            "checkpoint": velocity is not None, "layers": layers}


def inspect_output(path: str | Path, *, top: int = 10, step: int | None = None) -> Inspection:
    """Summarize a run folder or one gradpipe Parquet output; `step` picks the per-sample step."""
    if top < 0:
        raise ConfigError(f"--top {top}: must be >= 0")
    output = open_output(path)
    if step is not None and not output.per_sample:
        raise ConfigError(
            f"--step {step}: {output.path} has no per-sample files. Train with "
            "--per-sample norms (or full) to write them."
        )
    summary: dict = {"path": str(output.path), "kind": output.kind, "run": None,
                     "metrics": None, "noise_scale": None, "per_sample": None,
                     "gradients": None, "weights": None, "scores": None,
                     "predictions": None, "influence": None}
    result = Inspection(summary)
    if output.run is not None:
        summary["run"] = run_info(output.run)
        if summary["run"]["status"] in ("running", "interrupted", "failed"):
            from .recorder import Recorder, latest_checkpoint

            if summary["run"]["status"] == "running":  # or killed: its lock says which
                summary["run"]["writing"] = Recorder.writing(output.path)
            last = latest_checkpoint(output.path)  # where --resume would begin
            summary["run"]["last_checkpoint"] = None if last is None else last[0]
    if output.metrics is not None:
        result.metrics = read_metrics(output.metrics)
        summary["metrics"] = metrics_summary(result.metrics)
        if (best_val := summary["metrics"]["best_val"]) and output.run is not None:
            # its weights (those a metrics row is of), or the nearest whole checkpoint's
            near = nearest_checkpoint(str(output.path), best_val["step"])
            best_val["checkpoint"] = near[1] if near and near[0] == best_val["step"] else None
            best_val["nearest_checkpoint"] = near[1] if near else None
        rows = (summary["run"] or {}).get("dataset", {}).get("rows")
        # A private run keeps no noise scale (exact per-sample norms are not private): its
        # metrics' column is null, and a table of dashes would say nothing.
        if not (summary["run"] or {}).get("privacy"):
            summary["noise_scale"] = noise_summary(result.metrics, rows)
    if output.per_sample:
        summary["per_sample"], result.sample_norms = per_sample_summary(
            output.per_sample, top, step, output.path)
    if output.gradients is not None:
        summary["gradients"], result.recorded_norms = gradient_norms(output.gradients)
    if output.weights is not None:
        summary["weights"] = weights_summary(output.weights)
    if output.kind in ("run", "scores"):
        from .scores import read_scores

        table = read_scores(output.path)
        classes = ((output.run or {}).get("dataset", {}).get("classes") if output.run else
                   json.loads(store.read_text(store.join(output.path, "_scores.json")))
                   .get("classes"))
        summary["scores"] = None if table is None else scores_summary(table, top, classes)
        if summary["scores"] is not None and output.kind == "run":
            summary["scores"]["newer_steps"] = _unscored_steps(output.path)
    if output.kind == "predictions":
        summary["predictions"] = predictions_summary(output.path, top)
    if output.kind == "influence":
        summary["influence"] = influence_summary(output.path, top)
    return result


def _floats(column: pa.Array | pa.ChunkedArray) -> F64:
    """A float column as float64 values (null: NaN), whatever its width."""
    return column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _stats(values: F64) -> dict:
    if values.size == 0:
        return {}
    q = np.quantile(values, [0.0, 0.5, 1.0])
    return {"mean": float(values.mean()), "min": float(q[0]), "median": float(q[1]),
            "max": float(q[2])}


def predictions_summary(folder: str, top: int) -> dict:
    """A predictions folder: what made it (its marker), rows per predicted class with the
    confidence, and the `top` least confident rows (classes); each target's spread
    (regression)."""
    info = json.loads(store.read_text(store.join(folder, "_predictions.json")))
    fs, root = store.filesystem(folder)
    classify = info.get("task") == "classification"
    columns = ["sample", "prediction", "confidence"] if classify else info.get("columns")
    try:
        table = ds.dataset(root, format="parquet", filesystem=fs).to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{folder}: prediction parts are not readable ({e})") from None
    out = {key: info.get(key) for key in ("model", "data", "rows", "parts", "task", "classes",
                                          "targets", "sample")}
    if classify:
        counts = table.group_by("prediction").aggregate([("confidence", "count"),
                                                        ("confidence", "mean")])
        out["classes_predicted"] = sorted(
            ({"prediction": r["prediction"], "rows": r["confidence_count"],
              "mean_confidence": r["confidence_mean"]} for r in counts.to_pylist()),
            key=lambda r: -r["rows"])
        out["confidence"] = _stats(_floats(table.column("confidence")))
        keep = pc.sort_indices(table, sort_keys=[("confidence", "ascending"),
                                                 ("sample", "ascending")])[:top]
        out["least_confident"] = table.take(keep).to_pylist()
    else:
        out["target_spread"] = {name: _stats(table.column(name).to_numpy(zero_copy_only=False))
                                for name in info.get("targets") or []}
    return out


def influence_summary(path: str, top: int) -> dict:
    """An influence file: test samples, candidates each, and the training samples that are
    most often among a test sample's top proponents (and opponents)."""
    table = _parquet_file(path).read()
    test = table.column("test_sample")
    out: dict = {"rows": table.num_rows, "test_samples": len(pc.unique(test)),
                 "top": int(pc.max(table.column("rank")).as_py() or 0)}
    counts = table.group_by(["kind", "train_sample"]).aggregate(
        [("test_sample", "count"), ("influence", "sum")])
    for kind in ("proponent", "opponent"):
        rows = [r for r in counts.to_pylist() if r["kind"] == kind]
        rows.sort(key=lambda r: (-r["test_sample_count"], r["train_sample"]))
        out[kind] = [{"train_sample": r["train_sample"], "test_samples": r["test_sample_count"],
                      "influence_sum": r["influence_sum"]} for r in rows[:top]]
    return out


def _unscored_steps(run: str) -> list[int]:
    """The run's completed per-sample steps that RUN/scores does not cover: recorded after
    `gradpipe scores` ran (a resumed run), so that the scores are out of date."""
    from .scores import MARKER, scored_steps

    try:
        covered = set(json.loads(store.read_text(store.join(run, "scores", MARKER)))["steps"])
        return [s for s in scored_steps(run)[0] if s not in covered]
    except (GradpipeError, OSError, KeyError, ValueError):
        return []


def scores_summary(table: pa.Table, top: int, classes: list | None = None) -> dict:
    """`gradpipe scores` of a run: the `top` samples by self-influence, how many were never
    learned, and how forgetting events spread."""
    rows = table.to_pylist()
    ranked = sorted(rows, key=lambda r: (-(r["self_influence"] or 0.0), r["sample"]))
    out: dict = {"samples": len(rows), "top": with_class_values(ranked[:top], classes),
                 "columns": table.column_names}
    # (classes only: a regression run's first_learned and forgetting_events are null)
    if "first_learned" in table.column_names and table.num_rows and (
            table.column("forgetting_events").null_count < table.num_rows):
        out["never_learned"] = sum(r["first_learned"] is None for r in rows)
        counts: dict[int, int] = defaultdict(int)
        for r in rows:
            if r["forgetting_events"] is not None:
                counts[int(r["forgetting_events"])] += 1
        out["forgetting_events"] = dict(sorted(counts.items()))
    return out


def jsonable(obj: Any) -> Any:
    """`obj` with NaN and infinities as None and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _finite(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj


def to_json(summary: dict) -> str:
    """The summary as one line of JSON (NaN -> null)."""
    return json.dumps(jsonable(summary), allow_nan=False)
