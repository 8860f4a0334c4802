"""The reduction tree: block partials are added along a binary tree fixed by the blocks.

The tree over blocks [0, B) is defined by the block indices alone (`split`); workers fold
the nodes inside their blocks (`held_nodes`, `tree_fold`), and the reducer completes it
from the nodes that arrive (`complete`). Each addition is left + right in float64, so the
sums have the same bits wherever each node was added. Pure numpy: no I/O, no Ray.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np

from .backprop import Partial

# The tree over blocks [0, B): node [s, e) is the partial of block s when e - s = 1, and
# otherwise node [s, m) + node [m, e), left + right, with m = split(s, e): s plus the largest
# power of two below e - s. So every left child is a complete subtree of 2^h blocks, block
# i*2^h to (i+1)*2^h - 1, summed pairwise; the root is [0, B).


def split(start: int, stop: int) -> int:
    """Where node [start, stop) of the tree splits: start + the largest power of two
    below stop - start (for stop - start >= 2)."""
    return start + (1 << ((stop - start - 1).bit_length() - 1))


def nodes_within(start: int, stop: int, blocks: int) -> list[tuple[int, int]]:
    """The largest nodes of the tree over [0, blocks) inside [start, stop), left to right:
    what a worker holding blocks start..stop-1 sends. At most 2 log2(stop - start) + 1 of
    them; over the runs of any split of [0, blocks) into W runs, at most (W - 1) log2(blocks)
    + 1 in all (each inner boundary cuts one node per level)."""
    out: list[tuple[int, int]] = []

    def visit(s: int, e: int) -> None:
        if e <= start or s >= stop:
            return
        if start <= s and e <= stop:
            out.append((s, e))
            return
        m = split(s, e)
        visit(s, m)
        visit(m, e)

    if start < stop:
        visit(0, blocks)
    return out


# How each Partial field combines: a field not named here is a sum (arrays, lists of
# arrays per layer, numbers; None where absent), so a sum added to Partial later (DP-SGD's)
# goes through the same tree. A field may also say so itself, with
# dataclasses.field(metadata={"reduce": "sum" | "max" | "first" | "span"}).
RULES = {"block": "first", "span": "span", "eps": "max"}


def _rule(f: dataclasses.Field) -> str:
    return f.metadata.get("reduce", RULES.get(f.name, "sum"))


def _sum(name: str, a: Any, b: Any, inplace: bool) -> Any:
    if a is None or b is None:
        assert a is None and b is None, f"mixed partials: {name} in one, not in the other"
        return None
    if isinstance(a, list):
        return [_sum(name, x, y, inplace) for x, y in zip(a, b, strict=True)]
    if isinstance(a, np.ndarray):
        return np.add(a, b, out=a) if inplace else np.add(a, b)
    if isinstance(a, (int, float, np.number)) and not isinstance(a, bool):
        return a + b
    raise TypeError(f"Partial.{name}: cannot sum a {type(a).__name__}")


def add(left: Partial, right: Partial, *, inplace: bool = False) -> Partial:
    """The node whose children are `left` and `right` (adjacent, left first): left + right,
    field by field (RULES), in float64. `inplace` reuses left's arrays (its owner's choice:
    never for arrays from the object store, which are read-only, or a caller's)."""
    assert left.block + left.span == right.block, "only adjacent nodes add"
    assert type(left) is type(right), "mixed partials"
    out = {}
    for f in dataclasses.fields(left):
        a, b = getattr(left, f.name), getattr(right, f.name)
        rule = _rule(f)
        out[f.name] = (a if rule == "first" else a + b if rule == "span" else
                       max(a, b) if rule == "max" else _sum(f.name, a, b, inplace))
    return type(left)(**out)


def _fold(stack: list[Partial], inplace: bool) -> Partial:
    """The node made of a run of complete subtrees of decreasing size, P1 > P2 > ... > Pm:
    P1 + (P2 + (... + Pm)), since each split takes the largest power of two on the left."""
    node = stack[-1]
    for p in reversed(stack[:-1]):
        node = add(p, node, inplace=inplace)
    return node


def held_nodes(held: Iterable[int], blocks: int) -> list[tuple[int, int]]:
    """The nodes a worker holding blocks `held` sends: nodes_within each run of
    consecutive blocks (assign_blocks gives each worker one run)."""
    out: list[tuple[int, int]] = []
    start = stop = -1
    for b in sorted(held):
        if b != stop:
            out += nodes_within(start, stop, blocks)
            start = b
        stop = b + 1
    return out + nodes_within(start, stop, blocks)


def tree_fold(leaves: Iterable[Partial], nodes: list[tuple[int, int]]) -> list[Partial]:
    """Fold block partials, given in block order, into `nodes` (held_nodes): one pass,
    holding O(log B) partials. Within a node the leaves form complete subtrees as a binary
    counter does (two of 2^h blocks side by side are siblings: left + right), and the node
    is their fold once its last block arrives. The leaves are the caller's to give away:
    their arrays are reused."""
    out: list[Partial] = []
    todo = iter(nodes)
    stack: list[Partial] = []
    node = next(todo, None)
    for leaf in leaves:
        assert node is not None, f"block {leaf.block} is in no node"
        expected = stack[-1].block + stack[-1].span if stack else node[0]
        assert leaf.span == 1 and leaf.block == expected, (
            f"block {leaf.block} came where block {expected} was due")
        stack.append(leaf)
        while len(stack) >= 2 and stack[-2].span == stack[-1].span:
            right = stack.pop()
            stack.append(add(stack.pop(), right, inplace=True))
        if leaf.block + 1 == node[1]:
            out.append(_fold(stack, inplace=True))
            stack = []
            node = next(todo, None)
    assert node is None and not stack, "blocks of a node never came"
    return out


def complete(partials: list[Partial]) -> Partial:
    """The root of the tree over [0, B) from nodes that tile it (each block once; leaves
    are nodes too), B the end of the last: what the workers did not add, added here."""
    if not partials:
        raise ValueError("no partials to reduce")
    at: dict[int, Partial] = {}
    for p in partials:
        assert p.block not in at, "a block was reduced twice"
        at[p.block] = p
    blocks = max(p.block + p.span for p in partials)
    used = 0

    def node(s: int, e: int) -> tuple[Partial, bool]:
        """Node [s, e) and whether it was made here (its arrays are then ours to reuse;
        the nodes given may be a caller's, or read-only views of the object store)."""
        nonlocal used
        p = at.get(s)
        if p is not None and p.span == e - s:
            used += 1
            return p, False
        assert e - s > 1 and (p is None or p.span < e - s), (
            f"blocks {s}..{e - 1}: missing, or not a node of the tree")
        m = split(s, e)
        (left, fresh), (right, _) = node(s, m), node(m, e)
        return add(left, right, inplace=fresh), True

    root, _ = node(0, blocks)
    assert used == len(partials), "a partial is not a node of the tree, or a block repeats"
    return root


def partial_bytes(p: Partial) -> int:
    """The bytes of a partial's arrays: what it costs to send."""
    def size(v: Any) -> int:
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return v.nbytes if isinstance(v, np.ndarray) else 0

    return sum(size(getattr(p, f.name)) for f in dataclasses.fields(p))
