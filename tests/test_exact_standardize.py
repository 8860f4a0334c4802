"""--standardize: constant columns are found with a relative threshold (worker.combine_moments)
and only centred, so float32 and float64 runs see the same standardized inputs.

Before, a column of 0.1s in float64 got the std of its mean's rounding (about 1e-13 for a
65,536-row block) and was divided by it, while float32 saw std 0: two different inputs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradpipe.data import DataSpec, plan
from gradpipe.worker import BlockSet, Moments, combine_moments

CONSTANTS = {"c01": 0.1, "c1e6": 1e6, "c_odd": 123456.789, "c_neg": -3e-5, "c0": 0.0,
             "c_tiny": 1e-300}


def block_moments(x: np.ndarray, sizes: list[int]) -> list[Moments]:
    """Moments per block, computed as BlockSet.moments does (float64, mean over axis 0)."""
    out, at = [], 0
    for b, m in enumerate(sizes):
        xb = x[at : at + m].astype(np.float64)
        mean = xb.mean(axis=0) if m else np.zeros(x.shape[1])
        out.append(Moments(b, m, mean, ((xb - mean) ** 2).sum(axis=0)))
        at += m
    return out


@pytest.mark.parametrize("sizes", [[1], [3], [65536, 4464], [1000] * 7 + [0, 5], [70000]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_columns_get_std_one_and_real_ones_keep_theirs(sizes, dtype):
    n = sum(sizes)
    rng = np.random.default_rng(0)
    const = np.array(list(CONSTANTS.values()))
    x = np.concatenate([
        np.broadcast_to(const, (n, len(const))),
        rng.normal(loc=5.0, scale=2.0, size=(n, 1)),  # a real column
        1 + 1e-6 * rng.normal(size=(n, 1)),  # nearly constant, but real: 1e-6 relative
    ], axis=1).astype(dtype)
    mean, std = combine_moments(block_moments(x, sizes))
    k = len(const)
    np.testing.assert_array_equal(std[:k], 1.0)
    np.testing.assert_allclose(mean[:k], x[0, :k].astype(np.float64), rtol=1e-10, atol=0)
    if n > 1:
        x64 = x[:, k:].astype(np.float64)
        np.testing.assert_allclose(std[k:], x64.std(axis=0), rtol=1e-6, atol=0)
        assert np.all(std[k:] < 3)  # not replaced by 1: the real columns keep their std
    else:
        np.testing.assert_array_equal(std, 1.0)  # one sample: every column is constant


def test_threshold_is_relative_to_the_column_size():
    # The same absolute std, 1e-9, is rounding for a column near 1e6 and signal near 1e-3.
    parts = [Moments(0, 10, np.array([1e6, 1e-3]), np.array([1e-17, 1e-17]))]
    _, std = combine_moments(parts)
    assert std[0] == 1.0
    np.testing.assert_allclose(std[1], 1e-9, rtol=1e-12)


@pytest.fixture(scope="module")
def constant_data(tmp_path_factory):
    rng = np.random.default_rng(1)
    n = 70_000  # one row group: a 65,536-row block and a 4,464-row one
    cols = {name: np.full(n, v) for name, v in CONSTANTS.items() if name in ("c01", "c1e6")}
    cols["f"] = rng.normal(loc=3.0, scale=0.5, size=n)
    cols["label"] = rng.integers(0, 3, size=n)
    path = tmp_path_factory.mktemp("const") / "data.parquet"
    pq.write_table(pa.table(cols), path, row_group_size=n)
    return path


def standardized(path, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    dataset = plan(DataSpec(str(path)))
    blocks = BlockSet(dataset, list(dataset.blocks), dtype)
    mean, std = combine_moments(blocks.moments())
    x = np.concatenate([d.x for d in blocks.iter_blocks((mean, std))])
    return x, std


def test_float32_and_float64_runs_see_the_same_standardized_inputs(constant_data):
    x32, std32 = standardized(constant_data, "float32")
    x64, std64 = standardized(constant_data, "float64")
    assert len(plan(DataSpec(str(constant_data))).blocks) == 2
    # Columns c01, c1e6, f (the features, in file order).
    np.testing.assert_array_equal(std32[:2], 1.0)
    np.testing.assert_array_equal(std64[:2], 1.0)
    np.testing.assert_array_equal(x32[:, :2], 0.0)  # float32: the mean is the value
    # float64: 0 up to the rounding of the mean (0.1 summed 65,536 times); 1e6 is exact.
    np.testing.assert_allclose(x64[:, :2], 0.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(x64[:, 1], 0.0)
    np.testing.assert_allclose(x32[:, 2], x64[:, 2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(x64[:, 2].std(), 1.0, rtol=1e-12)
