"""The PNG of `gradpipe inspect --plot`: loss, per-layer gradient norms, noise scale and the
per-sample gradient-norm histogram, drawn from an `Inspection` (report.py).

Drawn on matplotlib's Agg canvas (no display, no pyplot state) and written through
atomic.atomic_file, so the PNG appears whole or not at all.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_file
from .errors import ConfigError
from .report import F64, Inspection, layer_columns

PLOT_SIZE = (1200, 900)  # default --plot-size, pixels
SIDE = (100, 16384)  # smallest and largest side, pixels


def parse_size(text: str) -> tuple[int, int]:
    """'1200x900' -> (1200, 900), each side 100..16384 pixels."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(
            f"--plot-size {text!r}: write it as WIDTHxHEIGHT in pixels, e.g. 1200x900")
    size = int(match.group(1)), int(match.group(2))
    _check_size(size, text)
    return size


def _check_size(size: tuple[int, int], text: str) -> None:
    if not all(SIDE[0] <= s <= SIDE[1] for s in size):
        raise ConfigError(f"--plot-size {text}: each side must be {SIDE[0]}..{SIDE[1]} pixels")


def _positive(values: Any) -> F64:
    out = np.asarray(values, dtype=np.float64)
    return np.where(out > 0, out, np.nan)  # log axes: drop zeros and nulls


def plot(result: Inspection, png: str | Path, *, size: tuple[int, int] = PLOT_SIZE) -> Path:
    """Draw loss, per-layer |grad| (log y), noise scale and the per-sample histogram to a PNG."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    png = Path(png)
    if png.suffix.lower() != ".png":
        raise ConfigError(f"--plot {png}: only PNG is written; give the file a .png name")
    width, height = size
    _check_size(size, f"{width}x{height}")
    summary, metrics = result.summary, result.metrics
    dpi = 100
    font = max(6.0, min(11.0, min(width, height) / 80))
    with rc_context({"font.size": font}):
        # +0.5 px: Agg truncates width_in * dpi to an integer, and 10.01 * 100 < 1001.
        fig = Figure(figsize=((width + 0.5) / dpi, (height + 0.5) / dpi), dpi=dpi,
                     layout="constrained")
        FigureCanvasAgg(fig)
        (ax_loss, ax_norm), (ax_noise, ax_hist) = fig.subplots(2, 2)
        fig.suptitle(f"{summary['path']} ({summary['kind'].replace('_', '-')})")

        def empty(ax: Any, what: str) -> None:
            ax.text(0.5, 0.5, f"no {what} in this output", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])

        if metrics is not None and metrics.num_rows:
            steps = metrics.column("step").to_numpy()
            ax_loss.plot(steps, metrics.column("loss").to_numpy(zero_copy_only=False),
                         color="C0", label="loss")
            if "val_loss" in metrics.column_names:  # --val: the held-out loss where recorded
                val = metrics.column("val_loss").to_numpy(zero_copy_only=False).astype(float)
                held = np.isfinite(val)
                ax_loss.plot(steps[held], val[held], "o-", color="C2", markersize=3,
                             label="held-out loss")
            ax_loss.set(title="loss C", xlabel="step", ylabel="loss")
            if "accuracy" in metrics.column_names:
                ax_acc = ax_loss.twinx()
                ax_acc.plot(steps, metrics.column("accuracy").to_numpy(zero_copy_only=False),
                            color="C1", label="accuracy")
                ax_acc.set_ylabel("accuracy")
                ax_acc.set_ylim(0, 1)
                if "val_accuracy" in metrics.column_names:
                    val = metrics.column("val_accuracy").to_numpy(
                        zero_copy_only=False).astype(float)
                    held = np.isfinite(val)
                    ax_acc.plot(steps[held], val[held], "o-", color="C3", markersize=3,
                                label="held-out accuracy")
                ax_loss.legend(handles=ax_loss.lines + ax_acc.lines, loc="center right")
            elif "val_loss" in metrics.column_names:
                ax_loss.legend(loc="upper right")
            norm_steps = steps
            norms = {"total": metrics.column("grad_norm").to_numpy(zero_copy_only=False)}
            norms.update({f"layer {c.removeprefix('grad_norm_l')}":
                          metrics.column(c).to_numpy(zero_copy_only=False)
                          for c in layer_columns(metrics.column_names)})
        else:
            empty(ax_loss, "metrics")
            norm_steps, norms = None, {}
            if result.recorded_norms:
                rows = result.recorded_norms
                norm_steps = np.array([r["step"] for r in rows])
                norms = {"total": [r["grad_norm"] for r in rows]}
                norms.update({f"layer {k.removeprefix('grad_norm_l')}": [r[k] for r in rows]
                              for k in rows[0] if k.startswith("grad_norm_l")})
        if norms:
            for name, values in norms.items():
                ax_norm.plot(norm_steps, _positive(values), label=name,
                             linewidth=2 if name == "total" else 1,
                             marker="o" if len(norm_steps) < 30 else None, markersize=3)
            ax_norm.set_yscale("log")
            ax_norm.set(title="gradient norm per layer", xlabel="step", ylabel="|dC/dtheta|")
            ax_norm.legend()
        else:
            empty(ax_norm, "gradient norms")

        noise = summary.get("noise_scale")
        if metrics is not None and noise and noise["finite_steps"]:
            values = _positive(metrics.column("noise_scale").to_numpy(zero_copy_only=False))
            ax_noise.plot(metrics.column("step").to_numpy(), values, color="C2")
            ax_noise.set_yscale("log")
            if noise["median_last"] is not None and noise["median_last"] > 0:
                ax_noise.axhline(noise["median_last"], color="gray", linestyle="--",
                                 label=f"median, last 10%: {noise['median_last']:.4g}")
                ax_noise.legend()
            ax_noise.set(title="noise scale B_simple = tr(Sigma)/|G|^2", xlabel="step",
                         ylabel="B_simple (samples)")
        else:
            empty(ax_noise, "noise scale")

        sample_norms = result.sample_norms
        if sample_norms is not None and sample_norms.size:
            finite = sample_norms[np.isfinite(sample_norms)]
            bins = int(min(60, max(10, math.sqrt(finite.size))))
            ax_hist.hist(finite, bins=bins, color="C4")
            per_sample = summary["per_sample"]
            if per_sample["top"]:
                cut = per_sample["top"][-1]["grad_norm"]
                ax_hist.axvline(cut, color="C3", linestyle="--",
                                label=f"top {len(per_sample['top'])}: >= {cut:.4g}")
                ax_hist.legend()
            step = per_sample["step"]
            ax_hist.set(title=f"per-sample gradient norm, step {step if step is not None else '?'}"
                        f" ({finite.size:,} samples)", xlabel="|dC_i/dtheta|", ylabel="samples")
        else:
            empty(ax_hist, "per-sample norms")

        with atomic_file(png) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    return png
