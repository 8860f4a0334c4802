"""`gradpipe data synth`: the asked layout, deterministic, valid labels, learnable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from conftest import ok, one_line_error

from gradpipe.cli import cli
from gradpipe.data import DataSpec, plan


def synth(out: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["data", "synth", str(out), *args])




def read(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def layout(folder: Path) -> dict[str, list[int]]:
    """File name -> rows of each row group, from the Parquet metadata."""
    out = {}
    for f in sorted(folder.iterdir()):
        md = pq.ParquetFile(f).metadata
        out[f.name] = [md.row_group(r).num_rows for r in range(md.num_row_groups)]
    return out


def test_layout_rows_files_row_groups(tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = ok(synth(out, "--rows", "1000", "--features", "6", "--classes", "4",
                      "--files", "3", "--row-group-size", "100"))
    assert result.stdout.strip() == f"wrote 1000 rows in 3 files (12 row groups) to {out}"
    # Files split the rows evenly; each file is cut into row groups of the asked size.
    assert layout(out) == {
        "part-00000.parquet": [100, 100, 100, 33],
        "part-00001.parquet": [100, 100, 100, 33],
        "part-00002.parquet": [100, 100, 100, 34],
    }
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.names == ["x0", "x1", "x2", "x3", "x4", "x5", "label"]
    assert all(pa.types.is_floating(schema.field(f"x{d}").type) for d in range(6))
    assert pa.types.is_integer(schema.field("label").type)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files

    # gradpipe itself reads it as planned: one block per row group.
    ds = plan(DataSpec(str(out)))
    assert ds.n_rows == 1000 and ds.n_features == 6 and ds.n_outputs == 4
    assert len(ds.blocks) == 12 and ds.classify


def test_json_summary_and_defaults(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "folder" / "s"  # parents are created
    result = ok(synth(out, "--rows", "300", "--json"))
    summary = json.loads(result.stdout)
    assert summary == {"out": str(out), "rows": 300, "features": 16, "classes": 10,
                       "files": 1, "row_groups": 1}
    assert layout(out) == {"part-00000.parquet": [300]}


def test_row_group_larger_than_file(tmp_path: Path) -> None:
    ok(synth(tmp_path / "s", "--rows", "10", "--files", "4", "--row-group-size", "1000",
             "--features", "2", "--classes", "2"))
    assert layout(tmp_path / "s") == {f"part-0000{i}.parquet": [n]
                                      for i, n in enumerate([2, 3, 2, 3])}


def test_deterministic(tmp_path: Path) -> None:
    args = ["--rows", "500", "--features", "5", "--classes", "3", "--files", "2",
            "--row-group-size", "64"]
    ok(synth(tmp_path / "a", *args, "--seed", "7"))
    ok(synth(tmp_path / "b", *args, "--seed", "7"))
    ok(synth(tmp_path / "c", *args, "--seed", "8"))
    a, b, c = read(tmp_path / "a"), read(tmp_path / "b"), read(tmp_path / "c")
    assert a.equals(b)
    assert layout(tmp_path / "a") == layout(tmp_path / "b")
    assert not a.equals(c)
    assert not np.array_equal(a.column("x0").to_numpy(), c.column("x0").to_numpy())
    assert not np.array_equal(a.column("label").to_numpy(), c.column("label").to_numpy())


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_labels_are_class_indices_and_all_present(tmp_path: Path, classes: int) -> None:
    ok(synth(tmp_path / "s", "--rows", "2000", "--features", "8", "--classes", str(classes),
             "--row-group-size", "512"))
    labels = read(tmp_path / "s").column("label").to_numpy()
    assert labels.min() >= 0 and labels.max() <= classes - 1
    counts = np.bincount(labels, minlength=classes)
    assert (counts > 0).all(), counts
    # No class is a rounding error: each has at least a quarter of its fair share.
    assert counts.min() >= 2000 / classes / 4, counts
    x = np.stack([read(tmp_path / "s").column(f"x{d}").to_numpy() for d in range(8)])
    np.testing.assert_allclose(x.mean(), 0, atol=0.05)  # standard normal features
    np.testing.assert_allclose(x.std(), 1, atol=0.05)


def test_regression_targets(tmp_path: Path) -> None:
    out = tmp_path / "r"
    ok(synth(out, "--rows", "400", "--features", "3", "--classes", "0", "--targets", "2"))
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.names == ["x0", "x1", "x2", "t0", "t1"]
    assert pa.types.is_floating(schema.field("t0").type)
    assert pa.types.is_floating(schema.field("t1").type)
    t = read(out)
    assert np.isfinite(t.column("t0").to_numpy()).all()
    assert t.column("t0").to_numpy().std() > 0
    assert not np.array_equal(t.column("t0").to_numpy(), t.column("t1").to_numpy())
    ds = plan(DataSpec(str(out), target=("t0", "t1")))
    assert ds.task == "regression" and ds.n_outputs == 2 and ds.n_features == 3


def test_refuses_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = synth(out, "--rows", "100")
    one_line_error(result, str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_refuses_existing_dataset_and_overwrite_replaces_it(tmp_path: Path) -> None:
    out = tmp_path / "s"
    ok(synth(out, "--rows", "300", "--files", "3", "--features", "2", "--classes", "2"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(synth(out, "--rows", "50"), str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces the part files: none of the old three is left behind.
    ok(synth(out, "--rows", "50", "--files", "1", "--features", "2", "--classes", "2",
             "--overwrite"))
    assert layout(out) == {"part-00000.parquet": [50]}
    assert plan(DataSpec(str(out))).n_rows == 50


def test_empty_existing_folder_is_fine(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    ok(synth(tmp_path / "s", "--rows", "20", "--features", "2", "--classes", "2"))
    assert layout(tmp_path / "s") == {"part-00000.parquet": [20]}


@pytest.mark.parametrize(("args", "name"), [
    (["--rows", "0"], "--rows"),
    (["--features", "0"], "--features"),
    (["--files", "0"], "--files"),
    (["--row-group-size", "0"], "--row-group-size"),
    (["--classes", "-1"], "--classes"),
    (["--classes", "1"], "--classes"),
    (["--classes", "0", "--targets", "0"], "--targets"),
    (["--rows", "3", "--files", "5"], "--files"),
])
def test_bad_options(tmp_path: Path, args: list[str], name: str) -> None:
    out = tmp_path / "s"
    one_line_error(synth(out, *args), name)
    assert not out.exists()


def test_out_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "data.csv"
    out.write_text("a,b\n")
    one_line_error(synth(out, "--rows", "10"), str(out))
    assert out.read_text() == "a,b\n"


def _train(data: Path, out: Path, *args: str) -> pa.Table:
    result = CliRunner().invoke(cli, ["train", str(data), "--workers", "0", "--quiet",
                                      "--out", str(out), *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return pq.read_table(out / "metrics")


def test_classification_is_learnable(tmp_path: Path) -> None:
    ok(synth(tmp_path / "s", "--rows", "2000", "--features", "8", "--classes", "3",
             "--files", "2", "--row-group-size", "500", "--seed", "3"))
    metrics = _train(tmp_path / "s", tmp_path / "run", "--steps", "40", "--hidden", "16")
    loss = metrics.column("loss").to_numpy()
    acc = metrics.column("accuracy").to_numpy()
    assert metrics.column("step").to_pylist() == list(range(40))
    assert (metrics.column("samples").to_numpy() == 2000).all()
    assert np.isfinite(loss).all()
    assert loss[-1] < 0.7 * loss[0], loss
    assert loss[-5:].max() < loss[:5].min()
    assert acc[-1] > acc[0] + 0.15 and acc[-1] > 0.55, acc  # chance is 1/3


def test_regression_is_learnable(tmp_path: Path) -> None:
    ok(synth(tmp_path / "r", "--rows", "2000", "--features", "8", "--classes", "0",
             "--targets", "2"))
    metrics = _train(tmp_path / "r", tmp_path / "run", "--target", "t0,t1",
                     "--output-activation", "identity", "--lr", "0.05", "--steps", "40")
    loss = metrics.column("loss").to_numpy()
    assert np.isfinite(loss).all()
    assert loss[-1] < 0.5 * loss[0], loss


def test_interrupt_leaves_nothing_and_keeps_the_old_dataset(tmp_path: Path) -> None:
    """Ctrl-C while writing: a new OUT (and its new parents) never appears; with --overwrite
    the old files stay whole, since they are replaced only once the new ones are complete."""
    from gradpipe.synth import synth as synth_fn

    def stop_after_first_group(rows: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synth_fn(tmp_path / "new" / "s", rows=100, features=2, classes=2, files=2,
                 row_group_size=10, progress=stop_after_first_group)
    assert list(tmp_path.iterdir()) == []

    out = tmp_path / "s"
    ok(synth(out, "--rows", "300", "--files", "3", "--features", "2", "--classes", "2"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        synth_fn(out, rows=50, features=2, classes=2, overwrite=True,
                 progress=stop_after_first_group)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folder left


def test_overwrite_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    out = tmp_path / "s"
    ok(synth(out, "--rows", "30", "--features", "2", "--classes", "2"))
    (out / "notes.txt").write_text("mine")
    one_line_error(synth(out, "--rows", "30", "--overwrite"), str(out), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"
