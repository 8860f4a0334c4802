"""Synthetic datasets for `gradpipe data synth`: deterministic, learnable, one row group at a time.

Features are standard normal; the targets come from a fixed random "teacher" network
(one tanh hidden layer) drawn from the seed, so a student MLP can learn them. Row group g
is drawn from its own generator seeded with (seed, g), so any row group can be made
without the others and memory never holds more than one. The files are written into a
hidden temporary folder that replaces OUT only when all are written (convert.new_folder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .convert import check_out, new_folder
from .errors import ConfigError

TEACHER_HIDDEN = 32


def _teacher(seed: int, features: int, outputs: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 2**31])
    w1 = rng.normal(0, 1 / np.sqrt(features), size=(features, TEACHER_HIDDEN))
    w2 = rng.normal(0, 1 / np.sqrt(TEACHER_HIDDEN), size=(TEACHER_HIDDEN, outputs))
    return w1, w2


def synth_group(seed: int, group: int, rows: int, features: int, classes: int, targets: int,
                teacher: tuple[np.ndarray, np.ndarray]) -> pa.Table:
    """Row group `group` of the dataset: `rows` rows, from its own seeded generator."""
    rng = np.random.default_rng([seed, group])
    x = rng.standard_normal((rows, features), dtype=np.float32)  # (rows, D)
    h = np.tanh(x.astype(np.float64) @ teacher[0])
    out = h @ teacher[1]  # (rows, K or T)
    cols = {f"x{d}": x[:, d] for d in range(features)}
    if classes:
        # Gumbel noise makes the label a draw from softmax(3 * out), not a hard argmax.
        noisy = 3 * out + rng.gumbel(size=out.shape)
        cols["label"] = noisy.argmax(axis=1).astype(np.int64)
    else:
        noisy = out + 0.05 * rng.standard_normal(out.shape)
        for t in range(targets):
            cols[f"t{t}"] = noisy[:, t].astype(np.float32)
    return pa.table(cols)


def synth(out: str | Path, *, rows: int, features: int, classes: int, files: int = 1,
          row_group_size: int = 65536, seed: int = 0, targets: int = 1,
          overwrite: bool = False, progress: Callable[[int], None] | None = None) -> dict:
    """Write the dataset as `files` Parquet files part-00000.parquet...; returns a summary.

    OUT must be new or empty, or with `overwrite` hold only Parquet files: it is replaced
    as a whole once the new files are complete, and left as it was on an error or Ctrl-C.
    `progress`, if given, is called with the rows written so far after each row group.
    """
    for name, value, low in (("rows", rows, 1), ("features", features, 1), ("files", files, 1),
                             ("row-group-size", row_group_size, 1), ("classes", classes, 0),
                             ("targets", targets, 1)):
        if value < low:
            raise ConfigError(f"--{name} {value}: must be >= {low}")
    if classes == 1:
        raise ConfigError("--classes 1: use 0 for regression or >= 2 classes")
    if files > rows:
        raise ConfigError(f"--files {files}: more files than --rows {rows}")
    out = Path(out)
    check_out(out, overwrite)
    teacher = _teacher(seed, features, classes or targets)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    group = 0
    with new_folder(out) as tmp:
        for f in range(files):
            writer = None
            try:
                for start in range(bounds[f], bounds[f + 1], row_group_size):
                    n = min(row_group_size, bounds[f + 1] - start)
                    table = synth_group(seed, group, n, features, classes, targets, teacher)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp / f"part-{f:05d}.parquet", table.schema,
                                                  compression="zstd")
                    writer.write_table(table, row_group_size=row_group_size)
                    group += 1
                    if progress is not None:
                        progress(start + n)
            finally:
                if writer is not None:
                    writer.close()
    return {"out": str(out), "rows": rows, "features": features, "classes": classes,
            "files": files, "row_groups": group}
