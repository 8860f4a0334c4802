"""Bad input (DESIGN.md section 2), through the CLI: one line, exit 2, nothing written.

Every case is run through `gradpipe grad` and `gradpipe train --steps 1` (options that only
`train` has, only through train), in-process (`--workers 0`). The checks, the same for all:

- exit status 2, and a SystemExit, not an exception that escaped;
- stderr is exactly one line, `gradpipe: error: ...`, naming the file (or the option) and
  the column where there is one; stdout is empty; no traceback;
- nothing was written: the --out folder does not exist and no file under the test's
  folder (the data, the cwd) was created, changed or removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from conftest import DIGITS, make_classification, make_regression, write_parquet

from gradpipe.cli import cli

# --------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and folder under root: size, mtime and (small files) content."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            content = p.read_bytes() if p.is_file() and st.st_size < 1 << 20 else b""
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, content)
    return out


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args)


def assert_one_line_error(result: Result, *names: str) -> str:
    """exit 2, one `gradpipe: error:` line on stderr naming all of `names`; returns it."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("gradpipe: error: "), line
    assert len(line) > len("gradpipe: error: ") + 10
    for name in names:
        assert name in line, f"{name!r} not in {line!r}"
    return line


def cmd(command: str, data: str, out: Path, extra: list[str]) -> list[str]:
    defaults = {"--workers": "0", "--out": str(out), "--steps": "1" if command == "train"
                else None}
    base = [command, data, "--quiet"]
    for flag, value in defaults.items():  # a flag in extra replaces its default here
        if value is not None and flag not in extra:
            base += [flag, value]
    return base + extra


def good_columns(rows: int = 20, features: int = 5, classes: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    cols = {f"x{d}": rng.normal(size=rows) for d in range(features)}
    cols["label"] = np.arange(rows) % classes
    return cols


# --------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs made with `grad --out` on good data: 5 features and 3 classes."""
    root = tmp_path_factory.mktemp("weights")
    data = make_classification(root / "data", rows=30, features=5, classes=3, files=1)
    run = root / "w5x3"
    result = invoke(["grad", str(data), "--workers", "0", "--hidden", "4", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "weights.parquet").is_file()
    return {"run": run, "file": run / "weights.parquet"}


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One bad input: `make(tmp)` builds it and returns (DATA, extra args, names)."""

    id: str
    make: Callable[[Path, dict], tuple[str, list[str], list[str]]]
    commands: tuple[str, ...] = ("grad", "train")
    marks: list = field(default_factory=list)


def _missing_path(tmp: Path, w: dict):
    p = tmp / "no-such-data"
    return str(p), [], [str(p), "no such file"]


def _empty_folder(tmp: Path, w: dict):
    (tmp / "empty").mkdir()
    return str(tmp / "empty"), [], [str(tmp / "empty"), "no Parquet files"]


def _only_bookkeeping(tmp: Path, w: dict):
    d = tmp / "bk"
    d.mkdir()
    (d / "_SUCCESS").write_text("")
    write_parquet(d / ".x.parquet", good_columns())
    write_parquet(d / "_tmp" / "part-0.parquet", good_columns())
    (d / "notes.csv").write_text("x0,label\n1,0\n")
    return str(d), [], [str(d), "no Parquet files"]


def _run_folder(tmp: Path, w: dict):
    # a run folder as DATA: its weights and checkpoints are Parquet too
    d = tmp / "run"
    write_parquet(d / "weights.parquet", {"layer": np.array([1]), "value": np.array([0.5])})
    (d / "run.json").write_text(json.dumps({"config": {"data": "data/train"}}))
    return str(d), [], [str(d), "a gradpipe run folder (it has run.json), not a dataset",
                        "the run's own data/train"]


def _not_parquet(tmp: Path, w: dict):
    d = tmp / "txt"
    d.mkdir()
    (d / "data.parquet").write_text("x0,x1,label\n0.5,0.25,1\n0.1,0.2,0\n")
    return str(d), [], [str(d / "data.parquet"), "not a readable Parquet file"]


def _not_parquet_single_file(tmp: Path, w: dict):
    f = tmp / "data.parquet"
    f.write_bytes(b"PAR1 this is not really parquet at all PAR1")
    return str(f), [], [str(f), "not a readable Parquet file"]


def _truncated(tmp: Path, w: dict):
    d = tmp / "trunc"
    d.mkdir()
    shutil.copy(DIGITS / "part-0.parquet", d / "part-0.parquet")
    whole = (DIGITS / "part-1.parquet").read_bytes()
    (d / "part-1.parquet").write_bytes(whole[: len(whole) // 2])
    return str(d), [], [str(d / "part-1.parquet"), "not a readable Parquet file"]


def _empty_file(tmp: Path, w: dict):
    d = tmp / "zero-bytes"
    d.mkdir()
    (d / "part-0.parquet").write_bytes(b"")
    return str(d), [], [str(d / "part-0.parquet")]


def _missing_target(tmp: Path, w: dict):
    cols = good_columns()
    cols["y"] = cols.pop("label")
    f = write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), [], [str(f), "'label'", "missing target column", "y"]


def _missing_named_target(tmp: Path, w: dict):
    data = make_regression(tmp / "reg")
    return str(data), ["--target", "t0,t9"], [str(data / "part-0.parquet"), "'t9'"]


def _missing_feature(tmp: Path, w: dict):
    f = write_parquet(tmp / "d" / "part-0.parquet", good_columns())
    return str(tmp / "d"), ["--features", "x0,x_missing"], [str(f), "'x_missing'"]


def _glob_matches_nothing(tmp: Path, w: dict):
    f = write_parquet(tmp / "d" / "part-0.parquet", good_columns())
    return str(tmp / "d"), ["--features", "pixel_*"], [str(f), "'pixel_*'"]


def _string_feature(tmp: Path, w: dict):
    cols = good_columns()
    cols["colour"] = ["red", "green"] * 10
    f = write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), [], [str(f), "'colour'", "not numeric"]


def _string_feature_named(tmp: Path, w: dict):
    cols = good_columns()
    cols["colour"] = ["red", "green"] * 10
    f = write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), ["--features", "x0,colour"], [str(f), "'colour'"]


def _list_of_strings(tmp: Path, w: dict):
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(["a", "b"] * 20), 2)
    f = write_parquet(tmp / "d" / "part-0.parquet", {"tokens": tokens, "label": np.arange(20) % 2})
    return str(tmp / "d"), [], [str(f), "'tokens'"]


def _nan(tmp: Path, w: dict):
    # The NaNs are in the second file, in one row group: rows 3 and 5 of that file.
    d = tmp / "d"
    write_parquet(d / "part-0.parquet", good_columns(seed=0))
    cols = good_columns(seed=1)
    cols["x1"][[3, 5]] = np.nan
    f = write_parquet(d / "part-1.parquet", cols)
    return str(d), [], [str(f), "'x1'", "2 NaN values", "first at row 3"]


def _nan_in_later_row_group(tmp: Path, w: dict):
    cols = good_columns(rows=40)
    cols["x4"][[27, 33]] = np.nan
    f = write_parquet(tmp / "d" / "part-0.parquet", cols, row_group_size=10)
    return str(tmp / "d"), [], [str(f), "'x4'", "NaN", "first at row 27"]


def _inf(tmp: Path, w: dict):
    cols = good_columns()
    cols["x2"][7] = np.inf
    f = write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), [], [str(f), "'x2'", "1 infinite", "row 7"]


def _minus_inf(tmp: Path, w: dict):
    cols = good_columns()
    cols["x0"][0] = -np.inf
    f = write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), [], [str(f), "'x0'", "infinite", "row 0"]


def _too_large_for_float32(tmp: Path, w: dict):
    # Finite in float64, infinite in the default float32 compute dtype.
    cols = good_columns()
    cols["x3"][11] = 1e300
    f = write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), [], [str(f), "'x3'", "infinite", "row 11"]


def _nan_regression_target(tmp: Path, w: dict):
    rng = np.random.default_rng(0)
    cols = {"x0": rng.normal(size=20), "t0": rng.normal(size=20), "t1": rng.normal(size=20)}
    cols["t1"][9] = np.nan
    f = write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), ["--target", "t0,t1"], [str(f), "'t1'", "NaN", "row 9"]


def _null_feature(tmp: Path, w: dict):
    cols = good_columns()
    cols["x3"] = pa.array([None if i in (4, 6) else float(i) for i in range(20)])
    f = write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), [], [str(f), "'x3'", "2 null values", "first at row 4"]


def _null_label(tmp: Path, w: dict):
    cols = good_columns()
    cols["label"] = pa.array([None if i == 13 else i % 3 for i in range(20)], pa.int64())
    f = write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), [], [str(f), "'label'", "null", "row 13"]


def _single_class(tmp: Path, w: dict):
    cols = good_columns()
    cols["label"] = np.zeros(20, dtype=np.int64)
    write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), [], [str(tmp / "d"), "'label'", "one class only (0)"]


def _label_above_model(tmp: Path, w: dict):
    # Weights from a 3-class run; the data has labels 0..5.
    cols = good_columns(classes=6)
    write_parquet(tmp / "d" / "part-0.parquet", cols)
    return str(tmp / "d"), ["--weights", str(w["run"])], [str(tmp / "d"), "'label'", "0..2"]


def _schema_type_differs(tmp: Path, w: dict):
    d = tmp / "d"
    write_parquet(d / "part-0.parquet", good_columns(seed=0))
    cols = good_columns(seed=1)
    # a string where the first file has numbers (int64 against double is one column)
    cols["x1"] = np.array([str(v) for v in range(20)])
    f = write_parquet(d / "part-1.parquet", cols)
    return str(d), [], [str(f), "'x1'", "schema differs", str(d / "part-0.parquet")]


def _schema_column_missing(tmp: Path, w: dict):
    d = tmp / "d"
    write_parquet(d / "a" / "part-0.parquet", good_columns(seed=0))
    cols = good_columns(seed=1)
    del cols["x4"]
    f = write_parquet(d / "b" / "part-0.parquet", cols)
    return str(d), [], [str(f), "'x4'", "schema differs"]


def _schema_extra_column(tmp: Path, w: dict):
    d = tmp / "d"
    write_parquet(d / "part-0.parquet", good_columns(seed=0))
    cols = good_columns(seed=1)
    cols["x5"] = np.ones(20)
    f = write_parquet(d / "part-1.parquet", cols)
    return str(d), [], [str(f), "'x5'", "schema differs"]


def _zero_rows(tmp: Path, w: dict):
    cols = {k: v[:0] for k, v in good_columns().items()}
    write_parquet(tmp / "d" / "part-0.parquet", cols)
    write_parquet(tmp / "d" / "part-1.parquet", cols)
    return str(tmp / "d"), [], [str(tmp / "d"), "zero rows"]


def _input_size_mismatch_run_folder(tmp: Path, w: dict):
    write_parquet(tmp / "d" / "part-0.parquet", good_columns(features=4))
    # The model's features are selected by name: the one the data lacks is named.
    return str(tmp / "d"), ["--weights", str(w["run"])], [str(tmp / "d"), "'x4'"]


def _weights_missing(tmp: Path, w: dict):
    write_parquet(tmp / "d" / "part-0.parquet", good_columns())
    missing = tmp / "no-run" / "weights.parquet"
    return str(tmp / "d"), ["--weights", str(missing)], [str(missing)]


def _weights_not_gradpipe(tmp: Path, w: dict):
    f = write_parquet(tmp / "d" / "part-0.parquet", good_columns())
    return str(tmp / "d"), ["--weights", str(f)], [str(f), "not a gradpipe weights file"]


def _job_unknown_key(tmp: Path, w: dict):
    write_parquet(tmp / "d" / "part-0.parquet", good_columns())
    job = tmp / "bad.toml"
    job.write_text('hidden = [4]\nlearning_rate = 0.5\n')
    return str(tmp / "d"), ["--job", str(job)], [str(job), "'learning_rate'", "unknown key"]


def _job_wrong_type(tmp: Path, w: dict):
    write_parquet(tmp / "d" / "part-0.parquet", good_columns())
    job = tmp / "bad.toml"
    job.write_text('hidden = true\n')
    return str(tmp / "d"), ["--job", str(job)], [str(job), "--hidden true"]


def _job_not_toml(tmp: Path, w: dict):
    write_parquet(tmp / "d" / "part-0.parquet", good_columns())
    job = tmp / "bad.toml"
    job.write_text("hidden = [4\nlr = \n")
    return str(tmp / "d"), ["--job", str(job)], [str(job), "not valid TOML"]


def _job_missing(tmp: Path, w: dict):
    write_parquet(tmp / "d" / "part-0.parquet", good_columns())
    job = tmp / "nope.toml"
    return str(tmp / "d"), ["--job", str(job)], [str(job), "--job"]


def _column_twice(tmp: Path, w: dict):
    cols = good_columns()
    table = pa.Table.from_arrays([pa.array(cols["x0"]), pa.array(cols["label"]),
                                  pa.array(cols["x1"])], names=["x0", "label", "x0"])
    (tmp / "d").mkdir()
    pq.write_table(table, tmp / "d" / "part-0.parquet")
    return str(tmp / "d"), [], ["part-0.parquet", "column 'x0' appears 2 times"]


def _option(*args: str, names: tuple[str, ...]) -> Callable:
    def make(tmp: Path, w: dict):
        write_parquet(tmp / "d" / "part-0.parquet", good_columns())
        return str(tmp / "d"), list(args), list(names)

    return make


TRAIN = ("train",)

CASES = [
    Case("missing-path", _missing_path),
    Case("empty-folder", _empty_folder),
    Case("only-hidden-and-underscore-files", _only_bookkeeping),
    Case("run-folder", _run_folder),
    Case("text-named-parquet", _not_parquet),
    Case("text-named-parquet-single-file", _not_parquet_single_file),
    Case("truncated-parquet", _truncated),
    Case("zero-byte-file", _empty_file),
    Case("missing-target", _missing_target),
    Case("missing-named-target", _missing_named_target),
    Case("missing-feature", _missing_feature),
    Case("feature-glob-matches-nothing", _glob_matches_nothing),
    Case("string-feature", _string_feature),
    Case("string-feature-named", _string_feature_named),
    Case("list-of-strings-feature", _list_of_strings),
    Case("nan", _nan),
    Case("nan-in-later-row-group", _nan_in_later_row_group),
    Case("plus-inf", _inf),
    Case("minus-inf", _minus_inf),
    Case("too-large-for-float32", _too_large_for_float32,
         marks=[pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]),
    Case("nan-regression-target", _nan_regression_target),
    Case("null-feature", _null_feature),
    Case("null-label", _null_label),
    Case("single-class", _single_class),
    Case("label-above-weights-model", _label_above_model),
    Case("schema-type-differs", _schema_type_differs),
    Case("schema-column-missing", _schema_column_missing),
    Case("schema-extra-column", _schema_extra_column),
    Case("zero-rows", _zero_rows),
    Case("input-size-mismatch-run-folder", _input_size_mismatch_run_folder),
    Case("weights-missing", _weights_missing),
    Case("weights-not-gradpipe", _weights_not_gradpipe),
    Case("job-unknown-key", _job_unknown_key),
    Case("job-wrong-type", _job_wrong_type),
    Case("job-not-toml", _job_not_toml),
    Case("job-missing", _job_missing),
    Case("block-rows-0", _option("--block-rows", "0", names=("--block-rows",))),
    Case("hidden-0", _option("--hidden", "4,0", names=("--hidden",))),
    Case("workers-negative", _option("--workers", "-1", names=("--workers",))),
    Case("target-empty", _option("--target", "", names=("--target is empty",))),
    Case("target-only-commas", _option("--target", ",", names=("--target is empty",))),
    Case("target-twice", _option("--target", "label,label",
                                 names=("--target label,label", "'label' is named twice"))),
    Case("feature-twice", _option("--features", "x0,x1,x0", names=("'x0' is named twice",))),
    Case("feature-is-the-target", _option("--features", "x0,label",
                                          names=("--features names 'label'",))),
    Case("column-twice-in-a-file", _column_twice),
    Case("out-empty", _option("--out", "", names=("--out is an empty path",))),
    Case("val-missing", _option("--val", "no-such-val",
                                names=("--val: no-such-val: no such file or folder",)), TRAIN),
    Case("lr-0", _option("--lr", "0", names=("--lr",)), TRAIN),
    Case("lr-negative", _option("--lr", "-1", names=("--lr",)), TRAIN),
    Case("lr-nan", _option("--lr", "nan", names=("--lr",)), TRAIN),
    Case("steps-0", _option("--steps", "0", names=("--steps",)), TRAIN),
    Case("momentum-1", _option("--momentum", "1", names=("--momentum",)), TRAIN),
    Case("batch-0", _option("--batch", "0", names=("--batch",)), TRAIN),
    Case("weight-decay-negative", _option("--weight-decay", "-0.1", names=("--weight-decay",)),
         TRAIN),
]

PARAMS = [
    pytest.param(case, command, id=f"{command}-{case.id}", marks=case.marks)
    for case in CASES
    for command in case.commands
]


@pytest.mark.parametrize(("case", "command"), PARAMS)
def test_bad_input_refused(case: Case, command: str, tmp_path: Path, weights: dict,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a stray relative write would land here and be caught
    data, extra, names = case.make(tmp_path, weights)
    out = tmp_path / "runs" / "out"
    before = snapshot(tmp_path)
    weights_before = snapshot(weights["run"])
    result = invoke(cmd(command, data, out, extra))
    assert_one_line_error(result, *names)
    assert not out.exists() and not out.parent.exists()
    assert snapshot(tmp_path) == before
    assert snapshot(weights["run"]) == weights_before


def test_good_input_control(tmp_path: Path, weights: dict) -> None:
    """The harness is not vacuous: the same commands on good data succeed and write."""
    write_parquet(tmp_path / "d" / "part-0.parquet", good_columns())
    for command in ("grad", "train"):
        out = tmp_path / command
        result = invoke(cmd(command, str(tmp_path / "d"), out, ["--weights", str(weights["run"])]))
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        assert (out / "run.json").is_file() and (out / "weights.parquet").is_file()


# --------------------------------------------------------------------------- others


@pytest.mark.parametrize("command", ["grad", "train"])
def test_unknown_activation_is_a_usage_error(command: str, tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", good_columns())
    out = tmp_path / "out"
    result = invoke(cmd(command, str(tmp_path / "d"), out, ["--activation", "Relu"]))
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "--activation Relu" in result.stderr
    for name in ("identity", "relu", "sigmoid", "tanh"):
        assert name in result.stderr  # click lists the choices
    assert not out.exists()


def test_existing_out_without_overwrite_is_untouched(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", good_columns())
    for command in ("grad", "train"):
        out = tmp_path / f"old-{command}"
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
        (out / "sub").mkdir()
        (out / "sub" / "keep.parquet").write_bytes(b"keep")
        before = snapshot(out)
        result = invoke(cmd(command, str(tmp_path / "d"), out, []))
        assert_one_line_error(result, f"--out {out}", "--overwrite")
        assert snapshot(out) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", good_columns())
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    before = snapshot(out)
    result = invoke(cmd("train", str(tmp_path / "d"), out, ["--overwrite"]))
    assert_one_line_error(result, str(out), "not a gradpipe run folder")
    assert snapshot(out) == before


def test_out_that_is_a_file(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", good_columns())
    out = tmp_path / "out.txt"
    out.write_text("a file")
    result = invoke(cmd("grad", str(tmp_path / "d"), out, []))
    assert_one_line_error(result, str(out), "not a folder")
    assert out.read_text() == "a file"


def test_out_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    """The system's refusal (under a file here; /proc or a read-only mount alike) is the
    path and the reason in one line, not a traceback."""
    write_parquet(tmp_path / "d" / "part-0.parquet", good_columns())
    (tmp_path / "afile").write_text("a file")
    out = tmp_path / "afile" / "run"
    result = invoke(cmd("train", str(tmp_path / "d"), out, []))
    assert_one_line_error(result, str(out), "Not a directory")
    assert (tmp_path / "afile").read_text() == "a file"


@pytest.mark.parametrize("exists", [True, False], ids=["plain-folder", "missing-folder"])
def test_resume_on_a_folder_that_is_not_a_run(tmp_path: Path, exists: bool) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", good_columns())
    out = tmp_path / "not-a-run"
    if exists:
        out.mkdir()
        (out / "data.csv").write_text("a,b\n")
    before = snapshot(tmp_path)
    result = invoke(cmd("train", str(tmp_path / "d"), out, ["--resume"]))
    assert_one_line_error(result, "--resume", str(out), "run.json")
    assert snapshot(tmp_path) == before
    assert out.exists() == exists


def test_resume_with_overwrite(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", good_columns())
    out = tmp_path / "out"
    result = invoke(cmd("train", str(tmp_path / "d"), out, ["--resume", "--overwrite"]))
    assert_one_line_error(result, "--resume", "--overwrite")
    assert not out.exists()


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A finished run folder, to be --overwrite'n by a run that is then refused."""
    write_parquet(tmp_path / "good" / "part-0.parquet", good_columns())
    out = tmp_path / "old"
    result = invoke(["train", str(tmp_path / "good"), "--workers", "0", "--steps", "2",
                     "--hidden", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "run.json").is_file()
    return out


def _bad_nan(tmp: Path) -> tuple[str, list[str], str]:
    cols = good_columns()
    cols["x2"][5] = np.nan
    write_parquet(tmp / "bad" / "part-0.parquet", cols)
    return str(tmp / "bad"), [], "'x2'"


def _bad_missing(tmp: Path) -> tuple[str, list[str], str]:
    return str(tmp / "missing"), [], "no such file"


def _bad_schema(tmp: Path) -> tuple[str, list[str], str]:
    write_parquet(tmp / "bad" / "part-0.parquet", good_columns())
    write_parquet(tmp / "bad" / "part-1.parquet", good_columns(features=6))
    return str(tmp / "bad"), [], "'x5'"


def _bad_model(tmp: Path) -> tuple[str, list[str], str]:
    write_parquet(tmp / "bad" / "part-0.parquet", good_columns(features=2))
    # The old run itself is the --weights: 5 features, data with 2.
    return str(tmp / "bad"), ["--weights", str(tmp / "old")], "features"


def _bad_lr(tmp: Path) -> tuple[str, list[str], str]:
    return str(tmp / "good"), ["--lr", "0"], "--lr"


@pytest.mark.parametrize(("command", "bad"), [
    pytest.param(command, bad, id=f"{command}-{name}")
    for name, bad in [("nan", _bad_nan), ("missing-path", _bad_missing),
                      ("schema", _bad_schema), ("model-size", _bad_model), ("lr-0", _bad_lr)]
    for command in ("grad", "train")
    if not (command == "grad" and bad is _bad_lr)  # grad has no --lr
])
def test_overwrite_keeps_old_run_when_refused(old_run: Path, tmp_path: Path, command: str,
                                              bad: Callable) -> None:
    data, extra, name = bad(tmp_path)
    before = snapshot(old_run)
    assert any(k.startswith("checkpoints") for k in before)
    result = invoke(cmd(command, data, old_run, ["--overwrite", *extra]))
    assert_one_line_error(result, name)
    assert snapshot(old_run) == before


# ------------------------------------------------------------ fixed bugs, kept as tests


@pytest.mark.parametrize("kind", ["NaN", "null"])
def test_bad_value_count_names_its_row_range(tmp_path: Path, kind: str) -> None:
    """Blocks are checked one at a time: the count is the first bad block's, and says so."""
    cols = good_columns(rows=30)
    bad_rows = (3, 12, 25)  # in row groups 0, 1 and 2
    if kind == "NaN":
        cols["x1"][list(bad_rows)] = np.nan
    else:
        cols["x1"] = pa.array([None if i in bad_rows else float(i) for i in range(30)])
    f = write_parquet(tmp_path / "d" / "part-0.parquet", cols, row_group_size=10)
    result = invoke(cmd("grad", str(tmp_path / "d"), tmp_path / "out", []))
    assert_one_line_error(result, str(f), "'x1'", f"1 {kind} value in rows 0..9",
                          "first at row 3")


def test_label_above_weights_model_names_column(tmp_path: Path, weights: dict) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", good_columns(classes=6))
    result = invoke(cmd("grad", str(tmp_path / "d"), tmp_path / "out",
                        ["--weights", str(weights["run"])]))
    assert_one_line_error(result, "'label'", "0..2", "5")


@pytest.mark.parametrize("command", ["grad", "train"])
def test_weights_model_accepts_subset_of_classes(tmp_path: Path, weights: dict,
                                                 command: str) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", good_columns(classes=2))
    out = tmp_path / "out"
    result = invoke(cmd(command, str(tmp_path / "d"), out, ["--weights", str(weights["run"])]))
    assert result.exit_code == 0, result.output
    assert (out / "weights.parquet").is_file()


# --------------------------------------------------------------------------- a real process


def run_gradpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed CLI in a fresh process: what a user's terminal shows, warnings included."""
    return subprocess.run(
        [sys.executable, "-c", "from gradpipe.cli import main; main()", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARNINGS")},
    )


def test_real_process_one_line(tmp_path: Path) -> None:
    cols = good_columns()
    cols["x1"][4] = np.nan
    f = write_parquet(tmp_path / "d" / "part-0.parquet", cols)
    p = run_gradpipe("grad", str(tmp_path / "d"), "--workers", "0", "--out", "out", cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [
        f"gradpipe: error: {f}: column 'x1' has 1 NaN value in rows 0..19 (first at row 4). "
        "Drop or impute them first."
    ]
    assert not (tmp_path / "out").exists()


def test_real_process_float32_overflow_one_line(tmp_path: Path) -> None:
    cols = good_columns()
    cols["x3"][11] = 1e300
    write_parquet(tmp_path / "d" / "part-0.parquet", cols)
    p = run_gradpipe("grad", str(tmp_path / "d"), "--workers", "0", "--out", "out", cwd=tmp_path)
    assert p.returncode == 2
    assert not (tmp_path / "out").exists()
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradpipe: error: "), p.stderr
