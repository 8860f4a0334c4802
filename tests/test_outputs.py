"""Run-folder files: readable by DuckDB as users would, round trips, atomic writes."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from gradpipe.model import Architecture, init_params
from gradpipe.outputs import read_weights, weights_table, write_table
from gradpipe.train import TrainConfig, train


def test_duckdb_reads_every_output_file(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=3,
                      per_sample="full", per_sample_every=1, checkpoint_every=1,
                      standardize=True))
    parquet = sorted(out.rglob("*.parquet"))
    assert {p.name for p in parquet} >= {"metrics.parquet", "gradients.parquet",
                                         "weights.parquet", "part-00000.parquet"}
    for path in parquet:
        rows = duckdb.sql(f"select count(*) from read_parquet('{path}')").fetchall()[0][0]
        assert rows > 0, path
    per_sample = duckdb.sql(
        f"select step, count(*), count(distinct sample), min(len(grad)) from "
        f"read_parquet('{out}/per_sample/*/*.parquet', hive_partitioning = true) "
        f"group by step order by step").fetchall()
    assert per_sample == [(s, 60, 60, 4 * 6 + 3 * 5) for s in range(3)]
    status = duckdb.sql(f"select status from read_json_auto('{out}/run.json')").fetchall()
    assert status == [("completed",)]


def test_weights_round_trip_with_model_and_standardization(tmp_path):
    arch = Architecture((3, 4, 2), "tanh", "identity", "squared", "float64")
    params = init_params(arch, 7)
    mean, std = np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 2.0])
    velocity = np.arange(arch.n_params, dtype=np.float64)
    write_table(weights_table(arch, params, standardize=(mean, std), velocity=velocity),
                tmp_path / "weights.parquet")
    arch2, params2, standardize, velocity2 = read_weights(tmp_path)
    assert arch2 == arch
    np.testing.assert_array_equal(params2.flat(), params.flat())
    np.testing.assert_array_equal(standardize[0], mean)
    np.testing.assert_array_equal(velocity2, velocity)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.parquet"
    write_table(pa.table({"a": [1]}), path)

    def broken(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half")  # a crash mid-write
        raise OSError("disk full")

    monkeypatch.setattr("gradpipe.outputs.pq.write_table", broken)
    with pytest.raises(OSError):
        write_table(pa.table({"a": [2]}), path)
    assert duckdb.sql(f"select a from '{path}'").fetchall() == [(1,)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]
