"""The reduction tree: its definition, the nodes a worker sends and their bound, the same bits
wherever each node is added, every Partial field through the same tree; and a run of 4,096
tiny blocks on 1, 2, 3, 4 and 7 workers with the same bits as in-process, the partials that
reach the driver within W (log2 B + 1)."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradpipe.backprop import Partial
from gradpipe.reduce import reduce
from gradpipe.tree import (
    add,
    complete,
    held_nodes,
    nodes_within,
    partial_bytes,
    split,
    tree_fold,
)

SIZES = (3, 2, 2)  # a 3-2-2 model: P = 6 + 2 + 4 + 2 = 14


def leaf(block: int, rng: np.random.Generator, *, second: bool = False, n: int | None = None
         ) -> Partial:
    """A block's partial with values of wildly different sizes, so that any other order of
    the additions would give other bits."""
    def values(shape):
        return rng.normal(size=shape) * 10.0 ** rng.integers(-8, 9, size=shape)

    w = [np.zeros((0, 0))] + [values((SIZES[l], SIZES[l - 1])) for l in range(1, len(SIZES))]
    b = [np.zeros(0)] + [values(SIZES[l]) for l in range(1, len(SIZES))]
    sq = [np.zeros((0, 0))] + [np.abs(values(x.shape)) for x in w[1:]] if second else None
    sq_b = [np.zeros(0)] + [np.abs(values(x.shape)) for x in b[1:]] if second else None
    return Partial(block, int(rng.integers(0, 5)) if n is None else n, float(values(())), w, b,
                   np.abs(values(len(SIZES))), int(rng.integers(0, 3)),
                   float(np.finfo(np.float64).eps), sq, sq_b)


def leaves(blocks: int, seed: int, **kw) -> list[Partial]:
    rng = np.random.default_rng(seed)
    return [leaf(b, rng, **kw) for b in range(blocks)]


def by_definition(parts: list[Partial], s: int, e: int) -> Partial:
    """The tree as DESIGN states it, recursively: [s, e) = [s, m) + [m, e), m = s + the
    largest power of two below e - s."""
    if e - s == 1:
        return parts[s]
    m = s + 2 ** math.floor(math.log2(e - s - 1))
    return add(by_definition(parts, s, m), by_definition(parts, m, e))


def copies(parts: list[Partial]) -> list[Partial]:
    return [dataclasses.replace(p, sum_w=[w.copy() for w in p.sum_w],
                                sum_b=[b.copy() for b in p.sum_b],
                                sq_norm_sum=p.sq_norm_sum.copy(),
                                sq_w=None if p.sq_w is None else [w.copy() for w in p.sq_w],
                                sq_b=None if p.sq_b is None else [b.copy() for b in p.sq_b])
            for p in parts]


def same_bits(a: Partial, b: Partial) -> bool:
    def eq(x, y):
        if isinstance(x, list):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y, strict=True))
        if isinstance(x, np.ndarray):
            return x.dtype == y.dtype and x.tobytes() == y.tobytes()
        return type(x) is type(y) and (x == y or (x != x and y != y))

    return all(eq(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))


def runs(blocks: int, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *sorted(cuts), blocks]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def worker_nodes(parts: list[Partial], lo: int, hi: int, blocks: int) -> list[Partial]:
    """What a worker holding blocks lo..hi-1 sends (its own copies of the leaves)."""
    return tree_fold(iter(copies(parts[lo:hi])), held_nodes(range(lo, hi), blocks))


# ---------------------------------------------------------------------------- the definition

def test_split_is_the_largest_power_of_two_below_the_size():
    assert [split(0, n) for n in range(2, 10)] == [1, 2, 2, 4, 4, 4, 4, 8]
    assert split(8, 12) == 10 and split(8, 13) == 12 and split(4096, 8192) == 6144


@pytest.mark.parametrize("blocks", [*range(1, 40), 64, 100, 4096])
def test_nodes_within_tile_the_range_with_nodes_of_the_tree(blocks):
    tree: set[tuple[int, int]] = set()

    def collect(s, e):
        tree.add((s, e))
        if e - s > 1:
            collect(s, split(s, e))
            collect(split(s, e), e)

    collect(0, blocks)
    spans = [(lo, hi) for lo in range(blocks) for hi in range(lo + 1, blocks + 1)]
    for lo, hi in spans if blocks <= 64 else random.Random(blocks).sample(spans, 500):
        got = nodes_within(lo, hi, blocks)
        assert got[0][0] == lo and got[-1][1] == hi
        assert all(a[1] == b[0] for a, b in zip(got[:-1], got[1:], strict=True))
        assert set(got) <= tree
        assert len(got) <= 2 * max(1, math.ceil(math.log2(hi - lo))) + 1


@settings(max_examples=300, deadline=None)
@given(blocks=st.integers(1, 5000), data=st.data())
def test_any_split_into_w_runs_sends_at_most_w_log2b_plus_1_nodes(blocks, data):
    workers = data.draw(st.integers(1, 64), label="workers")
    cuts = data.draw(st.lists(st.integers(0, blocks), min_size=workers - 1,
                              max_size=workers - 1), label="cuts")
    sent = sum(len(nodes_within(lo, hi, blocks)) for lo, hi in runs(blocks, cuts))
    depth = math.ceil(math.log2(blocks)) if blocks > 1 else 0
    assert sent <= (workers - 1) * depth + 1
    assert sent <= workers * (math.log2(blocks) + 1)


def test_held_nodes_handles_several_runs_and_none():
    assert held_nodes([], 8) == []
    assert held_nodes(range(8), 8) == [(0, 8)]
    assert held_nodes([1, 2, 3, 6, 7], 8) == [(1, 2), (2, 4), (6, 8)]
    assert held_nodes(range(3, 8), 8) == [(3, 4), (4, 8)]


# ---------------------------------------------------------------------------- the same bits

@settings(max_examples=60, deadline=None)
@given(blocks=st.integers(1, 80), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_every_split_gives_the_bits_of_the_definition(blocks, seed, data):
    parts = leaves(blocks, seed, second=data.draw(st.booleans(), label="second"))
    want = by_definition(copies(parts), 0, blocks)
    workers = data.draw(st.integers(1, 9), label="workers")
    cuts = data.draw(st.lists(st.integers(0, blocks), min_size=workers - 1,
                              max_size=workers - 1), label="cuts")
    sent = [p for lo, hi in runs(blocks, cuts) for p in worker_nodes(parts, lo, hi, blocks)]
    order = data.draw(st.permutations(range(len(sent))), label="order")
    assert same_bits(complete([sent[i] for i in order]), want)
    assert same_bits(complete(copies(parts)), want)  # every block sent alone


def test_the_tree_differs_from_block_order_and_is_its_exact_definition():
    parts = leaves(4096, 7)
    want = by_definition(copies(parts), 0, 4096)
    seq = copies(parts)[0]
    for p in copies(parts)[1:]:
        seq = add(seq, p)
    assert not same_bits(seq, want), "the test values cannot tell the orders apart"
    for workers in (1, 2, 3, 4, 7):
        bounds = np.linspace(0, 4096, workers + 1).astype(int)
        sent = [p for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
                for p in worker_nodes(parts, lo, hi, 4096)]
        assert len(sent) <= workers * (12 + 1)
        assert same_bits(complete(sent), want), workers


def test_folding_reuses_the_leaves_but_completing_leaves_its_nodes_alone():
    parts = leaves(13, 1)
    before = copies(parts)
    sent = [p for lo, hi in ((0, 5), (5, 13)) for p in worker_nodes(parts, lo, hi, 13)]
    assert all(same_bits(p, q) for p, q in zip(parts, before, strict=True))
    kept = copies(sent)
    for p in sent:  # as from the object store
        for arr in [*p.sum_w, *p.sum_b, p.sq_norm_sum]:
            arr.flags.writeable = False
    root = complete(sent)
    assert all(same_bits(p, q) for p, q in zip(sent, kept, strict=True))
    assert same_bits(root, by_definition(before, 0, 13))


def test_complete_refuses_what_is_not_a_tiling_by_nodes():
    parts = leaves(6, 2)
    with pytest.raises(ValueError, match="no partials"):
        complete([])
    with pytest.raises(AssertionError, match="twice"):
        complete([*parts, parts[3]])
    with pytest.raises(AssertionError, match="missing"):
        complete([p for p in parts if p.block != 2])
    # [0, 3) is not a node of the tree over 6 blocks ([0, 4) and [4, 6) are)
    with pytest.raises(AssertionError, match="not a node"):
        complete([add(add(parts[0], parts[1]), parts[2]), *parts[3:]])


def test_tree_fold_refuses_leaves_out_of_order():
    parts = leaves(4, 3)
    with pytest.raises(AssertionError, match="was due"):
        tree_fold(iter([parts[0], parts[2], parts[1], parts[3]]), held_nodes(range(4), 4))
    with pytest.raises(AssertionError, match="never came"):
        tree_fold(iter(parts[:3]), held_nodes(range(4), 4))


# ---------------------------------------------------------------------------- every field

@dataclasses.dataclass
class Extended(Partial):
    """A Partial with sums added later, as DP-SGD may add: each goes through the tree."""

    clipped: int = 0
    noise_free: list = dataclasses.field(default_factory=list)
    bound: float = dataclasses.field(default=0.0, metadata={"reduce": "max"})


def test_fields_added_later_are_summed_along_the_same_tree():
    rng = np.random.default_rng(5)
    parts = [Extended(**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)},
                      clipped=b, noise_free=[np.full(2, float(b))], bound=float(b % 4))
             for b, p in enumerate(leaf(b, rng) for b in range(11))]
    root = complete([q for lo, hi in ((0, 3), (3, 11))
                     for q in tree_fold(iter(parts[lo:hi]), held_nodes(range(lo, hi), 11))])
    assert isinstance(root, Extended)
    assert root.clipped == sum(range(11)) and root.bound == 3.0 and root.span == 11
    assert root.noise_free[0].tolist() == [55.0, 55.0]


def test_a_field_that_cannot_be_summed_is_named():
    @dataclasses.dataclass
    class Odd(Partial):
        note: str = "x"

    rng = np.random.default_rng(0)
    a, b = (Odd(**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)})
            for p in (leaf(0, rng), leaf(1, rng)))
    with pytest.raises(TypeError, match="Partial.note"):
        add(a, b)


def test_partial_bytes_counts_every_array():
    p = leaves(1, 0, second=True)[0]
    # sum_w, sum_b, sq_w, sq_b: 2 x 14 parameters; sq_norm_sum: 3; 8 bytes each
    assert partial_bytes(p) == 8 * (2 * 14 + 3)
    g = reduce(leaves(5, 0))
    assert g.partials == 5 and g.partial_bytes == 5 * 8 * (14 + 3)


# ---------------------------------------------------------------------------- on Ray

BLOCKS = 4096


@pytest.fixture(scope="module")
def tiny_blocks(tmp_path_factory):
    """4,096 blocks of 2 rows (one file, row groups of 64 rows split by block_rows=2)."""
    from conftest import make_classification

    folder = tmp_path_factory.mktemp("tiny") / "data"
    return make_classification(folder, rows=2 * BLOCKS, features=3, classes=2, files=1,
                               row_group_size=64)


WORKERS = (1, 2, 3, 4, 7)
EXECUTION = ["seconds", "partials", "partial_bytes"]  # facts of the run, not of the math


def _run(data, out, workers, **kw):
    from gradpipe.train import TrainConfig, train

    train(TrainConfig(data=str(data), out=str(out), workers=workers, block_rows=2, hidden=(2,),
                      steps=2, record_every=1, dtype="float64", **kw))
    metrics = pq.read_table(out / "metrics")
    return (metrics, pq.read_table(out / "gradients"), pq.read_table(out / "weights.parquet"))


@pytest.mark.ray
@pytest.mark.parametrize("batch", [None, 300])
def test_4096_tiny_blocks_give_the_same_bits_on_any_number_of_workers(
        ray_local, tiny_blocks, tmp_path, batch):
    """In-process (one node: the root) against 1, 2, 3, 4 and 7 Ray workers; with
    --batch 300, most blocks are empty at each step."""
    from gradpipe.data import DataSpec, plan

    assert len(plan(DataSpec(str(tiny_blocks), block_rows=2)).blocks) == BLOCKS
    want_metrics, want_grads, want_weights = _run(tiny_blocks, tmp_path / "w0", 0, batch=batch)
    assert want_metrics["partials"].to_pylist() == [1, 1]
    bound = math.log2(BLOCKS) + 1
    for workers in WORKERS if batch is None else (3, 7):
        metrics, grads, weights = _run(tiny_blocks, tmp_path / f"w{workers}", workers,
                                       batch=batch)
        assert grads.equals(want_grads), workers
        assert weights.equals(want_weights), workers
        assert metrics.drop(EXECUTION).equals(want_metrics.drop(EXECUTION)), workers
        sent = metrics["partials"].to_pylist()
        assert all(1 <= k <= workers * bound for k in sent), (workers, sent)
        assert metrics["partial_bytes"].to_pylist() == [k * _bytes_per_partial(grads)
                                                        for k in sent], workers


def _bytes_per_partial(grads) -> int:
    """8 bytes per parameter and per entry of sq_norm_sum (L + 1, index 0 unused)."""
    params = grads.filter(pc.equal(grads["step"], 0)).num_rows
    layers = len(set(grads["layer"].to_pylist()))
    return 8 * (params + layers + 1)
