"""plot.py: the PNG appears whole or not at all, and sizes are checked before drawing.

Runs and the CLI's --plot are checked in test_report.py; here an Inspection is built by hand.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pytest

from gradpipe import plot
from gradpipe.errors import ConfigError
from gradpipe.report import Inspection


def inspection() -> Inspection:
    steps = np.arange(5)
    metrics = pa.table({"step": steps, "loss": 1.0 / (steps + 1), "grad_norm": 0.5 / (steps + 1),
                        "grad_norm_l1": 0.3 / (steps + 1), "grad_norm_l2": 0.4 / (steps + 1)})
    return Inspection({"path": "m.parquet", "kind": "metrics", "noise_scale": None,
                       "per_sample": None}, metrics=metrics)


def test_png_of_the_asked_size_and_nothing_else(tmp_path: Path) -> None:
    png = tmp_path / "new" / "m.png"  # the folder is created
    assert plot.plot(inspection(), png, size=(320, 240)) == png
    assert mpimg.imread(png).shape[:2] == (240, 320)
    assert [p.name for p in png.parent.iterdir()] == ["m.png"]


def test_a_failed_write_leaves_the_old_png_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    png = tmp_path / "m.png"
    png.write_bytes(b"old")

    def half_written(self, fname, **kwargs) -> None:
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        plot.plot(inspection(), png, size=(200, 200))
    assert png.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


@pytest.mark.parametrize(("text", "size"), [("1200x900", (1200, 900)), (" 640 X 480 ", (640, 480))])
def test_parse_size(text: str, size: tuple[int, int]) -> None:
    assert plot.parse_size(text) == size


@pytest.mark.parametrize("text", ["1200", "12x", "99x100", "100x16385", "axb"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError, match="--plot-size"):
        plot.parse_size(text)


def test_bad_size_or_name_draws_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="100..16384"):
        plot.plot(inspection(), tmp_path / "a.png", size=(50, 400))
    with pytest.raises(ConfigError, match=r"\.png"):
        plot.plot(inspection(), tmp_path / "a.jpg")
    assert list(tmp_path.iterdir()) == []
