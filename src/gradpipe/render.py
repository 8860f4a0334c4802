"""Rich rendering of gradpipe's results for people: `inspect` summaries, `check` and
`explain` reports, and the `jobs list` table.

Each function prints one result, already computed elsewhere (report.py, check.py, jobs.py),
to a rich Console (stdout unless one is given) and returns nothing; `--json` output is not
made here. Lines of plain text go out verbatim: no markup, highlighting or wrapping.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np

from .report import VAL_COLUMNS


def metric_parts(metrics: dict) -> list[str]:
    """'loss X', 'grad_norm Y', 'accuracy Z' or 'r2 Z', 'val_loss ..' of a metrics row,
    those it has."""
    parts = []
    for key, form in (("loss", ".6g"), ("grad_norm", ".6g"), ("accuracy", ".4f"),
                      ("r2", ".4f"), ("val_loss", ".6g"), ("val_accuracy", ".4f"),
                      ("val_mse", ".6g"), ("val_r2", ".4f")):
        if metrics.get(key) is not None:
            parts.append(f"{key} {metrics[key]:{form}}")
        if key == "r2" and metrics.get("per_target") and parts:  # the saved weights'
            parts[-1] += " (" + ", ".join(
                f"{t['target']} {t['r2']:.4f}" for t in metrics["per_target"]) + ")"
    return parts


def _num(value: Any, digits: int = 6) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    return f"{float(value):.{digits}g}"


def _count(n: int, noun: str) -> str:
    """'1 step', '300 steps'."""
    return f"{_num(n)} {noun}{'' if n == 1 else 's'}"


def _batch(opt: dict) -> str:
    """How a step drew its rows: full, N rows, or Poisson with rate Q (and DP clipping)."""
    if opt.get("batch_rate") is not None:
        text = f"Poisson, rate {_num(opt['batch_rate'])}"
        if opt.get("dp_clip") is not None:
            text += f", private (clip {_num(opt['dp_clip'])})"
        return text
    return f"{_num(opt['batch'])} rows" if opt.get("batch") else "full"


def _console(piped_width: int = 120) -> Any:
    from rich.console import Console

    # Piped output gets 120 columns rather than rich's 80, so deep networks' tables fit.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else piped_width
    return Console(width=width, highlight=False)


def _line(console: Any, text: str) -> None:
    """One line exactly as given: brackets are not markup, and it is never wrapped."""
    console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)


def render(summary: dict, console: Any = None) -> None:
    """Print the summary as rich tables (to stdout unless `console` says otherwise)."""
    from rich.table import Table

    console = console or _console()
    console.print(f"[bold]{summary['path']}[/bold] ({summary['kind'].replace('_', '-')})")

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left", title_style="bold")
        for c in columns:  # unnamed columns are labels; the rest hold numbers
            t.add_column(c, justify="left" if c in ("", "g") else "right", no_wrap=True)
        return t

    if run := summary.get("run"):
        model, data, opt = run["model"], run["dataset"], run["optimizer"]
        t = table("Run", "", "")
        t.show_header = False
        # The labels whole, the values wrapped: at 80 columns a long value cut both.
        t.columns[0].min_width = len("fingerprint")
        t.columns[1].no_wrap, t.columns[1].overflow = False, "fold"
        sizes = "-".join(str(n) for n in model.get("sizes") or [])
        status = run["status"]
        if status == "running" and run.get("writing") is False:
            status += (": but no process writes it now (killed?); gradpipe train --resume "
                       f"--out {summary['path']} continues it")
        t.add_row("command", f"{run['command']}  ({status})")
        t.add_row("model", f"{sizes}  {model.get('activation')} / {model.get('output_activation')}"
                  f", {model.get('loss')} loss, {model.get('dtype')}, "
                  f"{_num(model.get('parameters'))} parameters")
        task = data.get("task") or ""
        if task == "classification":
            task += f" ({data.get('n_outputs')} classes)"
        t.add_row("dataset", f"{data.get('source')}: {_count(data.get('rows') or 0, 'row')}, "
                  f"{_count(data.get('files') or 0, 'file')}, "
                  f"{_count(data.get('blocks') or 0, 'block')}, {task}")
        t.add_row("fingerprint", str(data.get("fingerprint")))
        steps = f"{_num(run.get('steps_done'))} of {_num(run.get('steps'))}"
        if run.get("steps_done") is None and run.get("last_checkpoint") is not None:
            steps += f" (last checkpoint: step {_num(run['last_checkpoint'])})"
        if run.get("diverged_at") is not None:
            steps += f", diverged at step {run['diverged_at']}"
        t.add_row("steps", steps)
        t.add_row("optimizer", f"lr {_num(opt.get('lr'))}, momentum {_num(opt.get('momentum'))}, "
                  f"weight decay {_num(opt.get('weight_decay'))}, schedule {opt.get('schedule')}, "
                  f"batch {_batch(opt)}")
        if saved := run.get("saved"):
            t.add_row("saved weights", f"after {_count(saved['steps'], 'step')}, all "
                      f"{_num(saved['samples'])} rows: {'  '.join(metric_parts(saved))}")
        t.add_row("per-sample", str(run.get("per_sample")))
        if p := run.get("privacy"):
            t.add_row("privacy", f"({_num(p['epsilon'], 4)}, {_num(p['delta'], 3)})-DP after "
                      f"{_count(p['steps'] or 0, 'step')}: noise multiplier "
                      f"{_num(p['noise_multiplier'], 4)}, clip {_num(p['clip'])}, sampling "
                      f"rate {_num(p['sampling_rate'])} ({p['accountant']})")
        t.add_row("time", f"{run.get('started')} .. {run.get('finished') or '-'}")
        console.print(t)

    if (metrics := summary.get("metrics")) and metrics["curve"]:
        curve = metrics["curve"]
        has_acc = "accuracy" in curve[0]
        t = table(f"Loss over {_count(metrics['steps'], 'step')}", "step", "loss",
                  *(["accuracy"] if has_acc else []), "lr", "samples")
        for r in curve:
            t.add_row(str(r["step"]), _num(r["loss"]),
                      *([_num(r.get("accuracy"), 4)] if has_acc else []), _num(r.get("lr")),
                      _num(r.get("samples")))
        console.print(t)
        if metrics["best"]:
            console.print(f"lowest loss {_num(metrics['best']['loss'])} at step "
                          f"{metrics['best']['step']}")
        if metrics.get("val"):
            val = metrics["val"]
            keys = [k for k in VAL_COLUMNS if k in val[0]]
            t = table(f"Held-out data (--val) at {_count(len(val), 'recorded step')}", "step",
                      *keys)
            best = metrics.get("best_val")
            shown = {0, len(val) // 2, len(val) - 1} | {i for i, r in enumerate(val) if r is best
                                                         or r == best}
            for r in [val[i] for i in sorted(shown)]:
                t.add_row(str(r["step"]), *[
                    _num(r[k], 4 if k in ("val_accuracy", "val_r2") else 6) for k in keys])
            console.print(t)
            saved = ((summary.get("run") or {}).get("saved") or {}).get("val_loss")
            if saved is not None and best and saved <= best["val_loss"]:
                console.print(f"lowest val_loss {_num(saved)}: the saved weights'")
            elif best:
                where = (f", the weights in {best['checkpoint']}" if best.get("checkpoint")
                         else f" (no checkpoint of that step; the nearest is "
                              f"{best['nearest_checkpoint']})" if best.get("nearest_checkpoint")
                         else " (no checkpoint of that step: --checkpoint-every K keeps some)")
                console.print(f"lowest val_loss {_num(best['val_loss'])} at step "
                              f"{best['step']}{where}"
                              + (f"; the saved weights' {_num(saved)}" if saved is not None
                                 else ""))
        _norm_table(console, table, "Gradient norm |dC/dtheta| per layer", curve,
                    metrics["layers"])

    if noise := summary.get("noise_scale"):
        t = table("Gradient noise scale B_simple", "", "")
        t.show_header = False
        latest = (f"{_num(noise['latest'], 4)} (step {noise['latest_step']})"
                  if noise["latest"] is not None else "- (no finite value)")
        a, b = noise["window_steps"]
        t.add_row("latest", latest)
        t.add_row("median, last 10%", f"{_num(noise['median_last'], 4)} (steps {a}..{b}, "
                  f"{noise['window_finite']} finite)")
        batch = "-" if noise["suggested_batch"] is None else f"~{noise['suggested_batch']:,} rows"
        if noise["samples_per_step"]:
            batch += f" (this run: {noise['samples_per_step']:,} per step)"
        t.add_row("suggested batch", batch)
        if noise["window_finite"] == 0 and noise["latest"] is not None:
            t.caption = ("no estimate in the last 10%: the estimate of |G_true|^2, |G|^2 less "
                         "the per-sample spread over n, is zero, negative or within rounding "
                         "of zero there (the noise dominates the mean gradient; B_simple "
                         "would be beyond any batch), so it reads as null; the suggestion "
                         "comes from the latest finite step, capped at the dataset's rows")
            t.caption_justify = "left"
        for layer in noise.get("layers") or []:  # B_simple of each layer's parameters alone
            latest = (f"{_num(layer['latest'], 4)} (step {layer['latest_step']})"
                      if layer["latest"] is not None else "-")
            t.add_row(f"layer {layer['layer']}",
                      f"{latest}; median, last 10%: {_num(layer['median_last'], 4)}")
        console.print(t)
        console.print(noise["explanation"], style="dim")

    if gradients := summary.get("gradients"):
        steps = gradients["recorded_steps"]
        span = f"{steps[0]}..{steps[-1]}" if steps else "none"
        console.print(f"gradients: {_count(len(steps), 'recorded step')} ({span}), "
                      f"{_num(gradients['parameters'])} parameters each")
        if summary["kind"] == "gradients":  # a run shows the same norms from metrics
            _norm_table(console, table, "Gradient norm |dC/dtheta| per layer",
                        gradients["curve"], gradients["layers"])
        if second := gradients.get("second_moment"):
            t = table(f"Per-sample gradient variance per layer (grad_sq, step {second['step']})",
                      "layer", "parameters", "|grad|^2", "sum variance", "mean variance",
                      "snr")
            for r in second["layers"]:
                t.add_row(str(r["layer"]), _num(r["parameters"]), _num(r["signal"], 5),
                          _num(r["variance"], 5), _num(r["mean_variance"], 5),
                          _num(r["snr"], 4))
            console.print(t)
            console.print(second["explanation"], style="dim")

    if (per_sample := summary.get("per_sample")) is not None:
        gn = per_sample["grad_norm"]
        steps = ", ".join(str(s) for s in per_sample["steps"]) or "-"
        step = per_sample["step"]
        console.print(
            f"per-sample rows at step {step if step is not None else '?'} (steps with "
            f"per-sample files: {steps}): {per_sample['samples']:,} samples")
        line = (f"  grad_norm mean {_num(gn.get('mean'), 4)}, median {_num(gn.get('median'), 4)}, "
                f"p99 {_num(gn.get('p99'), 4)}, max {_num(gn.get('max'), 4)}; "
                f"mean loss {_num(per_sample['loss'].get('mean'))}")
        if el2n := per_sample.get("el2n"):
            line += f"; el2n mean {_num(el2n.get('mean'), 4)}, max {_num(el2n.get('max'), 4)}"
        if per_sample.get("accuracy") is not None:
            line += f"; accuracy {per_sample['accuracy']:.4f}"
        console.print(line)
        if per_sample["top"]:
            first = per_sample["top"][0]
            has_label = "label" in first
            extra = [c for c in ("prediction", "confidence") if c in first]
            t = table(f"Top {len(per_sample['top'])} samples by gradient norm",
                      "rank", "sample", *(["label"] if has_label else []), *extra, "loss",
                      "grad_norm", *(["el2n"] if "el2n" in first else []))
            t.caption = ("the hardest samples, or likely mislabeled ones" if has_label else
                         "the hardest samples, or outliers in the targets")
            t.caption_justify = "left"
            for rank, r in enumerate(per_sample["top"], start=1):
                t.add_row(str(rank), str(r["sample"]),
                          *([str(r.get("label"))] if has_label else []),
                          *(str(r[c]) if c == "prediction" else _num(r[c], 4) for c in extra),
                          _num(r["loss"]), _num(r["grad_norm"]),
                          *([_num(r["el2n"], 4)] if "el2n" in first else []))
            console.print(t)
    elif summary["kind"] == "run":
        console.print("no per-sample files: train with --per-sample norms to rank samples")

    if weights := summary.get("weights"):
        sizes = "-".join(str(n) for n in weights["sizes"])
        title = f"{'Checkpoint' if weights['checkpoint'] else 'Weights'}: {sizes}, " \
                f"{weights['parameters']:,} parameters, {weights['loss']} loss"
        t = table(title, "layer", "shape", "g", "|w|", "|b|", "max |w_jk|")
        for r in weights["layers"]:
            t.add_row(str(r["layer"]), "x".join(map(str, r["shape"])), r["g"],
                      _num(r["w_norm"], 5), _num(r["b_norm"], 5), _num(r["w_abs_max"], 5))
        console.print(t)

    if predictions := summary.get("predictions"):
        _render_predictions(console, table, predictions)
    if influence := summary.get("influence"):
        _render_influence(console, table, influence)

    if scores := summary.get("scores"):
        keys = [k for k in ("label", "self_influence", "el2n_mean", "grand_mean", "loss_last",
                            "forgetting_events", "first_learned") if k in scores["columns"]]
        t = table(f"Scores of {scores['samples']:,} samples (gradpipe scores): top "
                  f"{len(scores['top'])} by self_influence", "sample", *keys)
        for r in scores["top"]:
            t.add_row(str(r["sample"]), *[_num(r[k], 5) if isinstance(r[k], float) else
                                          ("-" if r[k] is None else str(r[k])) for k in keys])
        console.print(t)
        if "never_learned" in scores:
            spread = ", ".join(f"{n:,} with {k}" for k, n in scores["forgetting_events"].items())
            console.print(f"never learned: {scores['never_learned']:,}; forgetting events: "
                          f"{spread}")
        if newer := scores.get("newer_steps"):
            console.print(f"out of date: the run recorded {_count(len(newer), 'step')} of "
                          f"per-sample rows after these scores (up to step {newer[-1]}); run "
                          "gradpipe scores again", style="bold")


def _render_predictions(console: Any, table: Any, p: dict) -> None:
    console.print(f"predictions of {p['model']} on {p['data']}: {_count(p['rows'], 'row')} in "
                  f"{_count(p['parts'], 'part')}, {p['task']}; sample = {p['sample']}")
    if p.get("classes_predicted") is not None:
        t = table("Rows per predicted class", "prediction", "rows", "mean confidence")
        for r in p["classes_predicted"]:
            t.add_row(str(r["prediction"]), _num(r["rows"]), _num(r["mean_confidence"], 4))
        console.print(t)
        c = p["confidence"]
        if c:
            console.print(f"confidence: mean {_num(c['mean'], 4)}, median "
                          f"{_num(c['median'], 4)}, lowest {_num(c['min'], 4)}")
        if p["least_confident"]:
            t = table(f"{len(p['least_confident'])} least confident", "sample", "prediction",
                      "confidence")
            for r in p["least_confident"]:
                t.add_row(str(r["sample"]), str(r["prediction"]), _num(r["confidence"], 4))
            console.print(t)
    else:
        t = table("Predicted targets", "target", "mean", "min", "median", "max")
        for name, st in p["target_spread"].items():
            t.add_row(name, *(_num(st.get(k)) for k in ("mean", "min", "median", "max")))
        console.print(t)


def _render_influence(console: Any, table: Any, inf: dict) -> None:
    console.print(f"influence: {_num(inf['test_samples'])} test samples, top {inf['top']} "
                  f"proponents and opponents each ({_num(inf['rows'])} rows)")
    for kind in ("proponent", "opponent"):
        if inf[kind]:
            t = table(f"Training samples most often a top {kind}", "train_sample",
                      "test samples", "sum of influence")
            for r in inf[kind]:
                t.add_row(str(r["train_sample"]), _num(r["test_samples"]),
                          _num(r["influence_sum"], 5))
            console.print(t)


def _norm_table(console: Any, table: Any, title: str, curve: list[dict],
                layers: list[int]) -> None:
    t = table(title, "step", "total", *(f"layer {l}" for l in layers))
    for r in curve:
        t.add_row(str(r["step"]), _num(r["grad_norm"], 5),
                  *(_num(r.get(f"grad_norm_l{l}"), 5) for l in layers))
    console.print(t)



# --------------------------------------------------------------------------- check, explain


def render_check(report: dict, ok: bool, tol: float, console: Any = None) -> None:
    """Print a finite-difference check: what was compared, the worst error, and ok/FAILED."""
    console = console or _console()
    worst = report["worst"]
    where = f"layer {worst['layer']} {worst['param']}[{worst['j']}" + (
        f", {worst['k']}]" if worst["k"] is not None else "]")
    _line(console, f"compared {len(report['checks'])} per-sample derivatives "
                   f"({report['samples']} samples x {report['parameters']} parameters)")
    scale = worst["scale"] or 1.0
    _line(console, f"worst error {worst['relative_error']:.3e} of the gradient's norm beyond the "
                   f"finite difference's own error (difference {worst['abs_error'] / scale:.1e}, "
                   f"error bound {worst['fd_error'] / scale:.1e}) at {where}, sample "
                   f"{worst['sample']}: backprop {worst['backprop']:.10g}, finite difference "
                   f"{worst['finite_difference']:.10g}")
    if report.get("note"):
        _line(console, f"note: {report['note']}")
    _line(console, "ok" if ok else f"FAILED: above --tol {tol:g}")


EXPLAIN_TERMS = 12  # terms of the sum dC_0/da_j = sum_m w[l+1][m, j] * delta[l+1]_m shown


def render_explain(out: dict, console: Any = None) -> None:
    """Print the chain rule for one weight and one sample: each factor, and the product
    beside the finite difference."""
    console = console or _console()
    l, j, k = out["layer"], out["j"], out["k"]
    what = f"w[{l}][{j}, {k}]" if k is not None else f"b[{l}][{j}]"
    _line(console, f"sample {out['sample']}, {what}, layer {l} activation {out['activation']}, "
                   f"loss {out['loss']}")
    if "note" in out:
        _line(console, f"  {out['note']}")
    else:
        _line(console, f"  dC_0/da_j = {out['dC_da_formula']} = {out['dC_da']:.10g}")
        terms = out.get("dC_da_terms", [])
        for t in terms[:EXPLAIN_TERMS]:
            _line(console, f"      m={t['m']}: w {t['w']:+.6g} * delta {t['delta']:+.6g} = "
                           f"{t['product']:+.6g}")
        if len(terms) > EXPLAIN_TERMS:
            _line(console, f"      ... {len(terms) - EXPLAIN_TERMS} more terms")
    _line(console, f"  da_j/dz_j = g'(z_j) = {out['da_dz']:.10g}   (z_j = {out['z_j']:.6g})")
    dz_dw = "1 (bias)" if k is None else f"a_k^(l-1) = {out['dz_dw']:.10g}"
    _line(console, f"  dz_j/dw   = {dz_dw}")
    _line(console, f"  product   = {out['grad']:.12g}")
    _line(console, f"  finite difference = {out['finite_difference']:.12g} "
                   f"(relative error {out['relative_error']:.2e})")


# --------------------------------------------------------------------------- jobs


def render_jobs(records: list[dict], console: Any = None) -> None:
    """Print jobs as a table: ID, STATUS, START, ENTRYPOINT, one row each.

    ID, STATUS and START are never cut; a long entrypoint wraps on a terminal and stays on
    its row when piped, so `grep` and `awk` see one line per job.
    """
    from rich.table import Table
    from rich.text import Text

    console = console or _console(piped_width=1_000_000)
    rows = [(r["id"] or "", r["status"], (r["start_time"] or "").replace("T", " "),
             r["entrypoint"]) for r in records]
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for i, name in enumerate(("ID", "STATUS", "START")):
        t.add_column(name, no_wrap=True, min_width=max(len(r[i]) for r in [(name,) * 3, *rows]))
    t.add_column("ENTRYPOINT", overflow="fold")
    for row in rows:
        t.add_row(*(Text(v) for v in row))  # Text: brackets in an entrypoint are not markup
    console.print(t)
