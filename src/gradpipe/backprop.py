"""Backpropagation for a block of samples: delta[l], per-sample and summed dC_i/dw[l], dC_i/db[l].

Notation (Nielsen, *Neural Networks and Deep Learning*, ch. 2; batch-major, row i = sample i):

    BP1  delta[L] = dC_i/da[L] * g'(z[L])                  (n, n_L)
    BP2  delta[l] = (delta[l+1] @ w[l+1]) * g'(z[l])       (n, n_l)
    BP3  grad_b[l]_i = delta[l]_i                          (n_l,)   per sample
    BP4  grad_w[l]_i = outer(delta[l]_i, a[l-1]_i)         (n_l, n_{l-1}), i.e. delta_j * a_k

Two identities keep per-sample work cheap: the sum over samples of BP4 is one matrix
product, delta[l].T @ a[l-1]; and BP4 is rank one, so |grad_w[l]_i|_F^2 =
|delta[l]_i|^2 |a[l-1]_i|^2; its elementwise square is outer(delta[l]_i^2, a[l-1]_i^2),
so the second moment sum_i grad_w[l]_i^2 (BackPACK's SumGradSquared) is one more matrix
product, (delta[l]^2).T @ (a[l-1]^2). Per-sample gradients are materialized only when
asked, a bounded number of rows at a time. Sums over samples are accumulated in float64:
within a chunk (`chunk_rows_for`: about 1 MiB per layer's array, at most CHUNK_ROWS rows)
the products for the weights and the biases (1^T delta) run in the compute dtype (float32
by default, about 2e-7 relative), and chunks, losses and norms add in float64. Each block
reuses one set of arrays for all its chunks (`Workspace`).
With clip=C (DP-SGD's clipping, ghost style) each delta[l]_i is scaled by
min(1, C / |g_i|) before the sums, |g_i|^2 = sum_l |delta[l]_i|^2 (|a[l-1]_i|^2 + 1): the
same products then give sum_i clip(g_i), and no per-sample gradient is materialized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from numpy.typing import NDArray

from .activations import ACTIVATIONS
from .losses import LOSSES
from .model import Architecture, Params

Array = NDArray[np.floating]
F64 = NDArray[np.float64]

# Rows per forward/backward pass inside a block: at most CHUNK_ROWS, and few enough that
# the widest layer's (rows, n_l) array fits in about CHUNK_BYTES, so that the elementwise
# work between the matrix products runs in cache (8,192-row chunks of a 256-unit float32
# layer are 8 MiB: the elementwise passes then ran at memory speed and took a third of a
# step). Chosen from the model alone (`chunk_rows_for`), never from the worker count, so
# the float64 sums are the same whatever worker holds the block.
CHUNK_ROWS = 8192
CHUNK_BYTES = 2**20
MIN_CHUNK_ROWS = 256  # below this the summed BP4 products get short (K = rows) and slow
# Bytes of per-sample gradients materialized at once with per_sample="full": small enough
# to stay in cache-friendly pieces (about 200 rows of a 10,000-parameter float32 model).
FULL_CHUNK_BYTES = 8 * 2**20


@dataclass
class Partial:
    """Sums over the samples of one block: what a worker returns to the reducer.

    Sums and a count, never means, so the reducer can add blocks in any grouping: a
    Partial is also a node of reduce's tree, the sums over blocks [block, block + span).
    """

    block: int
    n: int  # samples in this block
    loss_sum: float  # sum_i C_i
    sum_w: list[F64]  # sum_i dC_i/dw[l], (n_l, n_{l-1}); index 0 unused
    sum_b: list[F64]  # sum_i dC_i/db[l], (n_l,)
    sq_norm_sum: F64  # (L+1,): sum_i |dC_i/dw[l]|^2 + |dC_i/db[l]|^2 per layer; index 0 unused
    correct: int  # samples whose arg-max output is the arg-max target (classification)
    # Machine epsilon of the compute dtype: the scale of the sums' rounding (noise scale).
    eps: float = float(np.finfo(np.float64).eps)
    # With second_moment: sum_i (dC_i/dw[l])^2 and sum_i (dC_i/db[l])^2, elementwise, float64.
    sq_w: list[F64] | None = None  # (n_l, n_{l-1}); index 0 unused
    sq_b: list[F64] | None = None  # (n_l,)
    # With output sums (worker.StepRequest.output_sse): sum_i (a[L]_i - y_i)^2 per output
    # unit, (n_L,) float64, y as training sees it (standardized regression targets).
    out_sse: F64 | None = None
    # Blocks summed: [block, block + span), a node of reduce's tree (1: one block's sums).
    span: int = 1


# Sink for per-sample rows:
# (first row in the block, losses (m,), sq_norms (m, L+1), grads (m, P) or None).
Sink = Callable[[int, F64, F64, "Array | None"], None]
# Sink for the output layer of each chunk, called before that chunk's `Sink` calls:
# (first row in the block, a[L] (m, n_L), y (m, n_L)), both in the compute dtype, and
# with `classify` the predicted classes argmax_j a[L]_j (m,), else None. a[L] is the
# workspace's array, which the next chunk overwrites: copy what is kept past the call.
OutputSink = Callable[[int, Array, Array, "NDArray[np.intp] | None"], None]


def output_delta(arch: Architecture, a_L: Array, z_L: Array, y: Array) -> Array:
    """BP1: delta[L] = dC_i/da[L] * g'(z[L]), (n, n_L), exact from z[L] where a[L] saturates.

    Fused shortcut, valid only for softmax + cross_entropy (the only pair with a
    non-elementwise g that Architecture allows): delta[L]_j = a_j S - y_j with S = sum_m y_m,
    which is a - y for rows of y that sum to one, and right for any other row too (the
    sum is cheap, so no precondition is assumed). In the row's arg-max unit m, where
    a_m > 1/2, a_m S - y_m cancels as a_m nears 1; there it is taken as -sum_{j != m}
    delta_j (the deltas of a row sum to zero), whose terms keep their digits.
    The elementwise pairs (sigmoid, tanh, relu, identity + squared) take a - y and g'(z)
    from z where a has rounded near a limit (`Activation.minus`, `.prime_of_a`).
    """
    if arch.output_activation == "softmax":
        ones = np.ones(a_L.shape[1], a_L.dtype)
        delta: Array = a_L * (y @ ones)[:, None]  # a_j S: row sums as a product, not n short sums
        delta -= y
        big = a_L > 0.5  # (n, n_L), at most one unit a row
        delta *= ~big  # delta_m = 0 ...
        rest = delta @ ones  # ... so that this is sum_{j != m} delta_j in rows with one
        np.subtract(delta, rest[:, None], out=delta, where=big)  # delta_m = -rest
        return delta
    g = ACTIVATIONS[arch.output_activation]
    assert g.prime_of_a is not None  # only softmax lacks one, handled above
    delta = LOSSES[arch.loss].grad(a_L, y, z_L, g)
    delta *= g.prime_of_a(a_L, z_L)  # g'(z[L])
    return delta


def output_losses(arch: Architecture, a_L: Array, z_L: Array, y: Array) -> F64:
    """C_i for every sample, (n,) float64, exact from z[L] (the logits for cross_entropy)."""
    c = LOSSES[arch.loss].fn(a_L, y, z_L, ACTIVATIONS[arch.output_activation])
    return np.asarray(c, dtype=np.float64)  # float64 already: no copy


def deltas(arch: Architecture, params: Params, a: list[Array], z: list[Array],
           y: Array) -> list[Array]:
    """delta[l] = dC_i/dz[l] for l = 1..L (BP1, then BP2 backwards); index 0 unused.

    The textbook form, from `model.forward`'s a and z (check and influence use it);
    `block_partial` takes `Workspace.backward`, the same numbers to a few roundings.
    """
    L = arch.L
    delta: list[Array] = [np.empty((0, 0), a[0].dtype)] * (L + 1)
    delta[L] = output_delta(arch, a[L], z[L], y)
    for l in range(L - 1, 0, -1):
        d = delta[l + 1] @ params.w[l + 1]
        d *= hidden_prime(arch, l, a[l], z[l])  # g'(z[l])
        delta[l] = d  # (n, n_l)
    return delta


def hidden_prime(arch: Architecture, l: int, a_l: Array, z_l: Array,
                 out: Array | None = None) -> Array:
    """g'(z[l]) of hidden layer l from a[l] and z[l] (`Activation.prime_of_a`)."""
    prime_of_a = ACTIVATIONS[arch.g(l)].prime_of_a
    assert prime_of_a is not None  # hidden activations are elementwise
    return prime_of_a(a_l, z_l, out=out)


def per_sample_sq_norms(delta: list[Array], a: list[Array]) -> F64:
    """|grad_w[l]_i|_F^2 + |grad_b[l]_i|^2 = |delta[l]_i|^2 (|a[l-1]_i|^2 + 1), (n, L+1).

    Column 0 is unused (zero), column l is layer l.
    """
    n, L = a[0].shape[0], len(delta) - 1
    out = np.zeros((n, L + 1))
    for l in range(1, L + 1):
        # Row sums of squares in the compute dtype (2.7e-7 relative in float32, 5x faster
        # than casting each row to float64); the product is float64.
        dd = row_sq(delta[l]).astype(np.float64)
        aa = row_sq(a[l - 1]).astype(np.float64)
        out[:, l] = dd * (aa + 1.0)
    return out


def row_sq(x: Array) -> Array:
    """|x_i|^2 for each row of x (n, k), (n,) in the dtype of x.

    numpy's vecdot (a SIMD dot product a row) is twice as fast as einsum's loop on rows of
    a hundred values or more; einsum stays faster on short rows (and on numpy 1.x).
    """
    if x.shape[1] >= 32 and hasattr(np, "vecdot"):
        return np.vecdot(x, x)
    return np.einsum("nj,nj->n", x, x)


def total_sq(sq: F64) -> F64:
    """|g_i|^2 = sum_l sq[i, l] over the layers of per_sample_sq_norms (n, L+1), (n,): the
    columns added in layer order (a row sum of L values, `sum(axis=1)`, was 10x slower)."""
    total = sq[:, 1].copy() if sq.shape[1] > 1 else np.zeros(sq.shape[0])
    for l in range(2, sq.shape[1]):
        total += sq[:, l]
    return total


def clip_factors(sq: F64, clip: float) -> F64:
    """min(1, C / |g_i|) for each sample, (n,) float64, from per_sample_sq_norms (n, L+1).

    |g_i|^2 = sum_l |delta[l]_i|^2 (|a[l-1]_i|^2 + 1): the norms the block computes anyway,
    so clipping costs one scaling of delta (their row sums are in the compute dtype, about
    3e-7 relative in float32, as Opacus's float32 norms). A zero gradient keeps factor 1.
    """
    norm = np.sqrt(total_sq(sq))
    return np.minimum(1.0, clip / np.maximum(norm, np.finfo(np.float64).tiny))


def per_sample_grads(delta: list[Array], a: list[Array], out: Array | None = None) -> Array:
    """BP3/BP4 materialized: row i is dC_i/dtheta, (n, P) in gradients row order.

    In the compute dtype: these are per-sample values, not sums, and writing them is
    bound by memory bandwidth (float32 halves the bytes of float64). Into `out`, a
    C-contiguous (n, P) array, when given.

    grad_w[l]_i = einsum("nj,nk->njk", delta[l], a[l-1]) flattened (j, k) row-major,
    followed by grad_b[l]_i = delta[l]_i, layer after layer.
    """
    n = a[0].shape[0]
    sizes = [d.shape[1] * (a_l.shape[1] + 1) for d, a_l in zip(delta[1:], a[:-1], strict=True)]
    if out is None:
        out = np.empty((n, sum(sizes)), dtype=delta[-1].dtype)  # (n, P)
    assert out.shape == (n, sum(sizes)) and out.flags.c_contiguous
    pos = 0
    for l in range(1, len(delta)):
        n_l, n_k = delta[l].shape[1], a[l - 1].shape[1]
        # Written straight into its columns: no temporaries, no concatenation.
        gw = out[:, pos : pos + n_l * n_k].reshape(n, n_l, n_k)  # (n, j, k), a view
        assert np.shares_memory(gw, out), "reshape copied: the products would be lost"
        np.multiply(delta[l][:, :, None], a[l - 1][:, None, :], out=gw)
        pos += n_l * n_k
        out[:, pos : pos + n_l] = delta[l]
        pos += n_l
    return out


def chunk_rows_for(arch: Architecture) -> int:
    """Rows per chunk for this model: a power of two in [MIN_CHUNK_ROWS, CHUNK_ROWS] whose
    widest (rows, n_l) array takes at most CHUNK_BYTES (1,024 rows for 256 float32 units)."""
    width = max(arch.sizes[1:]) * np.dtype(arch.dtype).itemsize
    rows = max(1, CHUNK_BYTES // width)
    rows = 1 << (rows.bit_length() - 1)  # the power of two at or below
    return min(CHUNK_ROWS, max(MIN_CHUNK_ROWS, rows))


class Workspace:
    """What every chunk of one block reuses: the weights in the layouts the passes want, and
    the arrays of a chunk's forward and backward pass, allocated once per block.

    Weights: w[l].T C-ordered (BLAS's fastest layout for a @ w.T, and the one `forward`
    uses) and b[l] repeated on every row (adding it is then one flat pass: 1.7x faster than
    broadcasting a row of 256 over 1,024 rows). Hidden sigmoid layers ("exp layers") keep
    -w[l].T: their product is -z less the bias, so that exp(-z) needs no negation pass.
    Arrays: a[l], z[l], delta[l] and g'(z[l]) or exp(-z[l]) (rows, n_l), and the summed
    BP4 product (n_l, n_{l-1}). A chunk of m rows uses their first m rows.
    """

    def __init__(self, arch: Architecture, params: Params, rows: int) -> None:
        dt = np.dtype(arch.dtype)
        units = arch.sizes
        empty = np.empty((0, 0), dt)

        def per_layer() -> list[Array]:
            return [empty] + [np.empty((rows, n), dt) for n in units[1:]]

        L = arch.L
        self.exp_layer = [False] + [l < L and arch.g(l) == "sigmoid" for l in range(1, L + 1)]
        self.w_t = [np.ascontiguousarray(-w.T if self.exp_layer[l] else w.T)
                    for l, w in enumerate(params.w)]
        self.b_rows = [empty] + [np.tile(b, (rows, 1)) for b in params.b[1:]]
        self.a, self.delta, self.prime = per_layer(), per_layer(), per_layer()
        # z[l] of exp layers is never kept: their exp(-z) lives in `prime`.
        self.z = [empty] + [empty if self.exp_layer[l] else np.empty((rows, n), dt)
                            for l, n in enumerate(units) if l > 0]
        self.product = [empty] + [np.empty((units[l], units[l - 1]), dt)
                                  for l in range(1, len(units))]
        self.ones = np.ones(rows, dt)
        self.huge = np.finfo(dt).max

    def forward(self, arch: Architecture, x: Array) -> tuple[list[Array], list[Array]]:
        """a[l] for a chunk x (m <= rows), the bits of `model.forward`; also z[l], or for
        exp layers e[l] = exp(-z[l]) in its place (what `backward` needs of the layer).

        An exp layer: e = exp(a[l-1] @ (-w[l].T) - b[l]) = exp(-z[l]) exactly (negation is
        exact in every product, sum and rounding), a[l] = 1 / (1 + e): the ufuncs `sigmoid`
        applies to z[l], so the same bits. Where exp overflows (z[l] below about -88 in
        float32, -709 in float64) e = inf gives a[l] = 0, as sigmoid does; e is then capped
        at the largest float so that e a[l] = 1 - a[l] stays 0 there, not inf * 0.
        """
        m = x.shape[0]
        a, z = [x], [np.empty((0, 0), x.dtype)]
        for l in range(1, arch.L + 1):
            a_l = self.a[l][:m]
            if self.exp_layer[l]:
                e = np.matmul(a[l - 1], self.w_t[l], out=self.prime[l][:m])  # -(a w.T)
                e -= self.b_rows[l][:m]  # -z[l]
                try:
                    with np.errstate(over="raise"):
                        np.exp(e, out=e)  # the whole array is written before the raise
                    overflow = False
                except FloatingPointError:
                    overflow = True
                np.add(e, 1, out=a_l)
                np.divide(1, a_l, out=a_l)  # sigmoid's bits (see activations.sigmoid)
                if overflow:
                    np.minimum(e, self.huge, out=e)
                z.append(e)
            else:
                z_l = np.matmul(a[l - 1], self.w_t[l], out=self.z[l][:m])
                z_l += self.b_rows[l][:m]
                z.append(z_l)
                a_l = ACTIVATIONS[arch.g(l)].fn(z_l, out=a_l)
            a.append(a_l)
        return a, z

    def backward(self, arch: Architecture, params: Params, a: list[Array], z: list[Array],
                 y: Array) -> list[Array]:
        """delta[l] for l = 1..L (BP1, then BP2 backwards) from `forward`'s a and z.

        An exp layer takes g'(z) = a (1 - a) as a (e a), since 1 - a = e / (1 + e) = e a:
        no cancellation where a rounds to 1, so no tail to look for; other layers take
        `prime_of_a` (see `deltas`).
        """
        m = y.shape[0]
        L = arch.L
        delta: list[Array] = [np.empty((0, 0), y.dtype)] * (L + 1)
        delta[L] = output_delta(arch, a[L], z[L], y)
        for l in range(L - 1, 0, -1):
            d = np.matmul(delta[l + 1], params.w[l + 1], out=self.delta[l][:m])
            if self.exp_layer[l]:
                e = z[l]
                d *= a[l]
                e *= a[l]  # 1 - a[l]
                d *= e
            else:
                d *= hidden_prime(arch, l, a[l], z[l], out=self.prime[l][:m])
            delta[l] = d
        return delta


def block_partial(
    arch: Architecture,
    params: Params,
    x: Array,
    y: Array,
    *,
    block: int = 0,
    classify: bool = False,
    sink: Sink | None = None,
    full: bool = False,
    chunk_rows: int | None = None,
    second_moment: bool = False,
    outputs: OutputSink | None = None,
    clip: float | None = None,
    reuse_grads: bool = False,
    labels: NDArray[np.int64] | None = None,
) -> Partial:
    """Sum the per-sample gradients, losses and squared norms of one block of samples.

    x is (n, n_0) and y (n, n_L), both in the compute dtype of `arch`. The block is
    processed `chunk_rows` rows at a time (default `chunk_rows_for(arch)`), in one set of
    arrays reused by every chunk (`Workspace`); per chunk, sum_i grad_w[l]_i =
    delta[l].T @ a[l-1] and sum_i grad_b[l]_i = 1^T delta[l] (one matrix product each, in
    the compute dtype), added into float64 sums. When `sink` is given it receives each
    chunk's per-sample losses and squared norms, and with `full=True` the per-sample
    gradients too, in pieces of at most FULL_CHUNK_BYTES; `outputs` receives each chunk's
    a[L], y and predicted classes first. With `reuse_grads=True` every piece of per-sample
    gradients is written into one array (page-faulting a new 8 MiB array per piece cost
    more than computing it): the sink must be done with it when it returns, as
    PerSampleWriter is, which writes each piece at once. With `second_moment=True` the
    Partial also holds the elementwise sums of squares
    sum_i grad_w[l]_i^2 = (delta[l]^2).T @ (a[l-1]^2) and sum_i grad_b[l]_i^2 =
    sum_i delta[l]_i^2, one more matrix product per layer.

    With `clip` = C every sum is over the clipped gradients clip(g_i) = g_i min(1, C/|g_i|)
    (ghost clipping: delta[l]_i scaled by the factor, then the same products), sq_norm_sum
    included; the sink still receives the unclipped per-sample values.

    `labels` (classification): the rows' class indices, the arg-max of each one-hot row of
    y, when the caller has them: the accuracy count compares predictions with them instead
    of taking y's arg-max chunk by chunk (2.5% of a step of 10 classes).
    """
    L = arch.L
    params = params.astype(arch.dtype)  # no copy when already in the compute dtype
    sum_w = [np.zeros((0, 0))] + [np.zeros(w.shape) for w in params.w[1:]]
    sum_b = [np.zeros(0)] + [np.zeros(b.shape) for b in params.b[1:]]
    sq_w: list[F64] | None = None
    sq_b: list[F64] | None = None
    if second_moment:
        sq_w = [np.zeros((0, 0))] + [np.zeros(w.shape) for w in params.w[1:]]
        sq_b = [np.zeros(0)] + [np.zeros(b.shape) for b in params.b[1:]]
    sq_norm_sum = np.zeros(L + 1)
    loss_sum = 0.0
    correct = 0
    n = x.shape[0]
    rows = chunk_rows if chunk_rows is not None else chunk_rows_for(arch)
    ws = Workspace(arch, params, min(rows, n))
    full_rows = max(1, FULL_CHUNK_BYTES // (np.dtype(arch.dtype).itemsize * arch.n_params))
    grads_out = None
    if full and sink is not None and reuse_grads:
        grads_out = np.empty((min(full_rows, rows, n), arch.n_params), arch.dtype)  # (r, P)
    for start in range(0, n, rows):
        xc, yc = x[start : start + rows], y[start : start + rows]
        m = xc.shape[0]
        a, z = ws.forward(arch, xc)
        delta = ws.backward(arch, params, a, z, yc)
        losses = output_losses(arch, a[L], z[L], yc)  # (m,)
        sq = per_sample_sq_norms(delta, a)  # (m, L+1)
        summed, sq_summed = delta, sq
        if clip is not None:
            factor = clip_factors(sq, clip)  # (m,)
            scale = factor.astype(xc.dtype)[:, None]  # (m, 1)
            if sink is None:  # nothing needs the unclipped deltas: scale them in place
                for d in delta[1:]:
                    d *= scale
            else:
                summed = [d if l == 0 else d * scale for l, d in enumerate(delta)]
            sq_summed = sq * (factor * factor)[:, None]
        ones = ws.ones[:m]  # (m,)
        for l in range(1, L + 1):
            product = np.matmul(summed[l].T, a[l - 1], out=ws.product[l])  # BP4 summed
            sum_w[l] += product  # (n_l, n_{l-1}), float64
            # BP3 summed as a product in the compute dtype, like the weights: a float64
            # column sum of a float32 array casts as it goes and took 6% of a step.
            sum_b[l] += ones @ summed[l]  # (n_l,)
        if sq_w is not None and sq_b is not None:
            for l in range(1, L + 1):
                dd = summed[l] * summed[l]  # (m, n_l)
                sq_w[l] += dd.T @ (a[l - 1] * a[l - 1])  # (n_l, n_{l-1}), BP4 squared, summed
                # BP3 squared, summed as a product in the compute dtype like sq_w: a tenth of
                # the time of a float64 sum, which cost a tenth of the second moment's time.
                sq_b[l] += ones @ dd  # (n_l,)
        loss_sum += float(losses.sum())
        sq_norm_sum += sq_summed.sum(axis=0)
        prediction = a[L].argmax(axis=1) if classify else None  # (m,)
        if prediction is not None:
            truth = labels[start : start + m] if labels is not None else yc.argmax(axis=1)
            correct += int(np.count_nonzero(prediction == truth))
        if outputs is not None:
            outputs(start, a[L], yc, prediction)
        if sink is None:
            continue
        if not full:
            sink(start, losses, sq, None)
            continue
        for s in range(0, m, full_rows):
            piece = slice(s, s + full_rows)
            out = None if grads_out is None else grads_out[: min(full_rows, m - s)]
            grads = per_sample_grads([d[piece] for d in delta], [a_l[piece] for a_l in a], out)
            sink(start + s, losses[piece], sq[piece], grads)
    eps = float(np.finfo(arch.dtype).eps)
    return Partial(block, n, loss_sum, sum_w, sum_b, sq_norm_sum, correct, eps, sq_w, sq_b)
