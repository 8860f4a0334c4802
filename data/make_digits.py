"""Regenerate the bundled ``digits`` dataset as Parquet files.

The data are the 8x8 hand-written digits that scikit-learn ships with
:func:`sklearn.datasets.load_digits` (1,797 samples, 64 pixels, 10 classes),
a copy of the test set of the UCI "Optical Recognition of Handwritten Digits"
dataset (E. Alpaydin and C. Kaynak, CC BY 4.0).

scikit-learn is *not* a dependency of gradpipe; it is needed only to run this
script and regenerate the data::

    pip install scikit-learn
    python data/make_digits.py            # writes data/digits/part-*.parquet

Output schema (one row per image, in scikit-learn's order):

* ``x0`` .. ``x63`` -- float32, the pixels of the 8x8 image in row-major order
  (``x{8 * row + col}``), scaled from 0..16 to [0, 1] by dividing by 16;
* ``label`` -- int64, the digit, 0..9.

The rows are split into three files, ``part-0.parquet`` (rows 0..599),
``part-1.parquet`` (600..1199) and ``part-2.parquet`` (1200..1796), each
written with row groups of 256 rows, so every file has several row groups
and the last one of each file is short.  Writing is deterministic: rerunning
with the same versions of pyarrow and scikit-learn gives the same bytes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: Row boundaries of the part files: file ``i`` holds rows ``[b[i], b[i+1])``.
PART_BOUNDS: tuple[int, ...] = (0, 600, 1200, 1797)
ROW_GROUP_SIZE: int = 256
COMPRESSION: str = "zstd"
N_PIXELS: int = 64
PIXEL_MAX: float = 16.0


def load_digits_table() -> pa.Table:
    """Load the digits with scikit-learn and return them as an Arrow table."""
    from sklearn.datasets import load_digits  # only needed to regenerate

    digits = load_digits()
    data = np.asarray(digits.data)
    target = np.asarray(digits.target)
    if data.shape != (1797, N_PIXELS) or target.shape != (1797,):
        raise ValueError(f"unexpected digits shape {data.shape}, {target.shape}")

    pixels = (data / PIXEL_MAX).astype(np.float32)
    columns: dict[str, pa.Array] = {
        f"x{j}": pa.array(pixels[:, j], type=pa.float32()) for j in range(N_PIXELS)
    }
    columns["label"] = pa.array(target.astype(np.int64), type=pa.int64())
    return pa.table(columns)


def write_parts(table: pa.Table, out_dir: Path) -> list[Path]:
    """Write ``table`` to ``out_dir/part-{i}.parquet`` split at ``PART_BOUNDS``.

    Stale ``part-*.parquet`` files in ``out_dir`` are removed first, and each
    file is written to a temporary name and then renamed into place.
    """
    if PART_BOUNDS[-1] != table.num_rows:
        raise ValueError(f"expected {PART_BOUNDS[-1]} rows, got {table.num_rows}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("part-*.parquet"):
        stale.unlink()

    paths: list[Path] = []
    for i, (start, stop) in enumerate(zip(PART_BOUNDS[:-1], PART_BOUNDS[1:])):
        path = out_dir / f"part-{i}.parquet"
        tmp = out_dir / f".part-{i}.parquet.tmp"
        pq.write_table(
            table.slice(start, stop - start),
            tmp,
            row_group_size=ROW_GROUP_SIZE,
            compression=COMPRESSION,
            write_statistics=True,
        )
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "digits",
        help="output folder (default: digits/ next to this script)",
    )
    args = parser.parse_args(argv)
    for path in write_parts(load_digits_table(), args.out):
        meta = pq.read_metadata(path)
        print(
            f"{path}: {meta.num_rows} rows, {meta.num_row_groups} row groups, "
            f"{path.stat().st_size} bytes"
        )


if __name__ == "__main__":
    main()
