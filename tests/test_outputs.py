"""Run-folder files: readable by DuckDB as users would, round trips, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradpipe.model import Architecture, init_params
from gradpipe.outputs import read_weights, weights_table, write_table
from gradpipe.train import TrainConfig, train


def readme_queries() -> list[str]:
    """The DuckDB queries of the README's outputs section, with RUN as the run folder."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text.split("<!-- duckdb-queries -->", 1)[1].split("```sql", 1)[1].split("```")[0]
    return [q.strip() for q in block.split(";") if q.strip()]


def test_duckdb_reads_every_output_with_the_readme_queries(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(4,), steps=3,
                      per_sample="full", per_sample_every=1, checkpoint_every=1,
                      record_every=2, standardize=True))
    results = [duckdb.sql(q.replace("RUN", str(out))).fetchall() for q in readme_queries()]
    assert len(results) == 7 and all(results)
    metrics, gradients, per_sample, weights, checkpoints, status, top = results
    assert [r[0] for r in metrics] == [0, 1, 2]
    assert sorted({r[0] for r in gradients}) == [0, 2]
    assert len(gradients) == 2 * (4 * 6 + 3 * 5)
    assert sorted({r[0] for r in per_sample}) == [0, 1, 2] and len(per_sample) == 3 * 60
    assert len(weights) == 4 * 6 + 3 * 5 and len(checkpoints) == 4 * len(weights)
    assert status == [("completed", 3, 2.0)]
    assert len(top) == 10 and [r[3] for r in top] == sorted((r[3] for r in top), reverse=True)
    # Every Parquet file of the run is readable on its own too.
    for path in sorted(out.rglob("*.parquet")):
        assert duckdb.sql(f"select count(*) from read_parquet('{path}')").fetchall()[0][0] > 0


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


@pytest.mark.parametrize("dtype, given", [("float64", np.float32), ("float32", np.float64)])
def test_per_sample_writer_writes_grads_in_its_dtype_whatever_it_is_given(tmp_path, dtype, given):
    """The grad list is in the writer's dtype (the compute dtype) even when a caller hands it
    other floats: a bench gave float32 gradients to a float64 writer and pyarrow refused."""
    from gradpipe.outputs import PerSampleWriter

    path = tmp_path / "part.parquet"
    w = PerSampleWriter(path, 1, full=True, classify=False, dtype=dtype)
    grads = np.arange(6, dtype=given).reshape(2, 3)
    w.write(np.arange(2), None, np.zeros(2), np.ones((2, 2)), grads)
    w.close()
    table = pq.read_table(path)
    assert table.schema.field("grad").type.value_type == pa.from_numpy_dtype(np.dtype(dtype))
    np.testing.assert_array_equal(np.stack(table.column("grad").to_numpy(zero_copy_only=False)),
                                  grads.astype(dtype))


@pytest.mark.parametrize("full", [True, False])
def test_per_sample_writer_closed_without_rows_leaves_an_empty_part(tmp_path, full):
    """Norms parts are encoded at close, full ones stream: either way a writer that got no
    rows leaves a 0-row file with the schema, and no temporary beside it."""
    from gradpipe.outputs import PerSampleWriter

    path = tmp_path / "part.parquet"
    w = PerSampleWriter(path, 2, full=full, classify=True, outputs=True)
    w.close()
    table = pq.read_table(path)
    assert table.num_rows == 0 and table.schema.names[:3] == ["sample", "label", "loss"]
    assert [p.name for p in tmp_path.iterdir()] == ["part.parquet"]


@pytest.mark.parametrize("bound", [None, 64])
def test_norms_part_with_a_large_class_list_and_any_buffer_size(tmp_path, monkeypatch, bound):
    """A norms part is encoded into a buffer sized from its columns and schema; 20,000 long
    class names (a footer far larger than the rows) fit, and a buffer too small for the
    file (forced here) falls back to a growing one: the same bytes either way."""
    from gradpipe import outputs
    from gradpipe.outputs import PerSampleWriter

    classes = tuple(f"class number {i} with a long name" for i in range(20_000))

    def part(path):
        w = PerSampleWriter(path, 1, full=False, classify=True, outputs=True,
                            classes=classes, class_type="str")
        ids = np.arange(3)
        w.write(ids, ids, np.zeros(3), np.ones((3, 2)), None,
                {"prediction": ids, "confidence": np.ones(3), "el2n": np.zeros(3)})
        w.close()
        return Path(path).read_bytes()

    want = part(tmp_path / "a.parquet")
    if bound is not None:
        monkeypatch.setattr(outputs, "_encoded_bound", lambda table: bound)
    got = part(tmp_path / "b.parquet")
    assert got == want and len(want) > 20_000 * 30
    table = pq.read_table(tmp_path / "b.parquet")
    assert table.column("grad_norm").to_pylist() == [1.0] * 3
    assert json.loads(table.schema.metadata[b"gradpipe"])["classes"] == list(classes)
