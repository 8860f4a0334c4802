"""Differential privacy for training (DP-SGD): the Poisson draw, the noise and the accountant.

Each step s draws every sample into its batch with probability q, from a counter-based
hash of (key, seed, s, sample id), so each worker draws its own rows; the workers sum the
clipped per-sample gradients (backprop.block_partial, clip=C); the driver adds
N(0, sigma^2 C^2) to the summed gradient once, from a generator keyed by (key, seed, s),
and divides by the expected batch q N. The run's secret key keeps the draw and the noise
unknown to whoever reads run.json. The accounting is Google's dp-accounting (RDP), never
written here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import secrets
import warnings
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.typing import NDArray

from . import store
from .errors import ConfigError, DataError
from .reduce import Gradient

F64 = NDArray[np.float64]

# Domain tags, so that the draw, the noise and optim.draw_batch never share a stream.
_SAMPLE_TAG = 0x5053  # "PS": Poisson sampling
_NOISE_TAG = 0x474E  # "GN": Gaussian noise
KEY_BYTES = 32
KEY_FILE = "privacy-key"

ACCOUNTANT = "RDP accountant (Poisson-subsampled Gaussian, add/remove one sample)"
# What a private run writes that the accountant does not cover (run.json lists it).
NOT_PROTECTED = (
    "per_sample/: exact per-sample rows (only with --dp-allow-per-sample)",
    "metrics loss, accuracy and samples: exact statistics of each step's batch",
    "the class list and the row count N (read from the data; N sets the divisor q N)",
    "--weights statistics and classes: protected only if that model's data was public",
)


# --- keys ---------------------------------------------------------------------------------


def new_key() -> str:
    """A fresh secret key: 32 random bytes from the OS, as hex."""
    return secrets.token_hex(KEY_BYTES)


def key_digest(key: str) -> str:
    """SHA-256 of a key, kept in run.json to recognise the key given again on --resume (a
    key of 32 random bytes cannot be recovered from it)."""
    return hashlib.sha256(key.encode()).hexdigest()


def read_key(path: str | Path) -> str:
    """The hex key in `path` (a file written by new_key or by hand: 64 hex digits)."""
    try:
        text = store.read_text(str(path)).strip()
    except DataError as e:
        raise ConfigError(f"--dp-key {path}: cannot read it ({e})") from None
    except OSError as e:
        raise ConfigError(f"--dp-key {path}: cannot read it ({e.strerror or e})") from None
    try:
        if len(bytes.fromhex(text)) < 16:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--dp-key {path}: expected at least 32 hex digits (128 bits), "
                          "e.g. from `python -c 'import secrets; print(secrets.token_hex(32))'`"
                          ) from None
    return text


def _entropy(key: str | None, seed: int, step: int, tag: int) -> list[int]:
    """The SeedSequence entropy of one stream: the key's 64-bit words, then seed, step, tag."""
    raw = bytes.fromhex(key) if key else b""
    words = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
    return [*words, seed, step, tag]


# --- Poisson sampling ---------------------------------------------------------------------


def sample_key(key: str | None, seed: int, step: int) -> tuple[int, int]:
    """The two 64-bit words that decide step's batch; workers get these, not the key."""
    state = np.random.SeedSequence(_entropy(key, seed, step, _SAMPLE_TAG)).generate_state(
        2, np.uint64)
    return int(state[0]), int(state[1])


_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (the golden ratio)


def _hashes(ids: NDArray[np.int64], skey: tuple[int, int]) -> NDArray[np.uint64]:
    """splitmix64's output for counter `id` under the step's seed: mix(k0 + id gamma),
    then mixed again with k1 (Steele, Lea and Flood, 2014), (n,) uint64.

    Counter-based: any worker computes the value of any id without the others. uint64
    arithmetic wraps modulo 2^64, as the algorithm wants; in place, so that a step costs
    a few passes over the ids.
    """
    z = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64) * _GAMMA
    t = np.empty_like(z)
    for k in skey:
        z += np.uint64(k)
        np.right_shift(z, np.uint64(30), out=t)
        z ^= t
        z *= np.uint64(0xBF58476D1CE4E5B9)
        np.right_shift(z, np.uint64(27), out=t)
        z ^= t
        z *= np.uint64(0x94D049BB133111EB)
        np.right_shift(z, np.uint64(31), out=t)
        z ^= t
    return z


def uniforms(ids: NDArray[np.int64], skey: tuple[int, int]) -> F64:
    """u_i in [0, 1) for each sample id, a function of (step key, id) alone, (n,) float64:
    the top 53 bits of its hash."""
    return (_hashes(ids, skey) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def poisson_rows(ids: NDArray[np.int64], skey: tuple[int, int], q: float) -> NDArray[np.int64]:
    """Indexes into `ids` of the samples in this step's batch: u_i < q (each with
    probability q, independently), sorted; compared as integers, without the floats."""
    if q >= 1.0:
        return np.arange(len(ids), dtype=np.int64)
    z = _hashes(ids, skey)
    z >>= np.uint64(11)
    # u < q  <=>  top53 < q 2^53  <=>  top53 < ceil(q 2^53) (q 2^53 is exact in float64)
    return np.flatnonzero(z < np.uint64(math.ceil(q * 2.0**53))).astype(np.int64)


# --- noise --------------------------------------------------------------------------------


def standard_noise(key: str | None, seed: int, step: int, size: int) -> F64:
    """z ~ N(0, I), (size,) float64, keyed by (key, seed, step): numpy's PCG64."""
    rng = np.random.default_rng(np.random.SeedSequence(_entropy(key, seed, step, _NOISE_TAG)))
    return rng.standard_normal(size)


def noisy_gradient(grad: Gradient, z: F64, noise_std: float, expected_batch: float
                   ) -> Gradient:
    """The private gradient (sum_i clip(g_i) + noise_std z) / expected_batch.

    `grad` is the reducer's mean over the n sampled rows, so n grad is the clipped sum
    (exact up to the division's rounding, which is the same bits for any worker count);
    z is in the flat parameter order (layer, w then b, j, k). Loss, n and the correct
    count are kept (exact batch statistics); the second moments are dropped.
    """
    w, b = [np.zeros((0, 0))], [np.zeros(0)]
    pos = 0
    for l in range(1, grad.L + 1):
        size_w, size_b = grad.w[l].size, grad.b[l].size
        zw = z[pos:pos + size_w].reshape(grad.w[l].shape)
        zb = z[pos + size_w:pos + size_w + size_b]
        pos += size_w + size_b
        w.append((grad.w[l] * grad.n + noise_std * zw) / expected_batch)
        b.append((grad.b[l] * grad.n + noise_std * zb) / expected_batch)
    assert pos == len(z), "the noise does not match the parameters"
    return dataclasses.replace(grad, w=w, b=b, sq_w=None, sq_b=None)


def empty_gradient(sizes: tuple[int, ...]) -> Gradient:
    """The gradient of a step whose Poisson draw took no sample: zero, loss NaN."""
    w = [np.zeros((0, 0))] + [np.zeros((sizes[l], sizes[l - 1])) for l in range(1, len(sizes))]
    b = [np.zeros(0)] + [np.zeros(sizes[l]) for l in range(1, len(sizes))]
    return Gradient(0, float("nan"), w, b, np.zeros(len(sizes)), 0)


# --- accounting ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    """dp-accounting logs through absl when a series for a fractional RDP order does not
    converge (small orders at large q), and then leaves that order out of the minimum,
    which keeps the bound valid: not a line for the user's terminal."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # numpy's overflow at an epsilon of 1e300, say
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        log.setLevel(level)


def _event(q: float, sigma: float, steps: int = 1):  # -> dp_accounting.DpEvent
    import dp_accounting  # type: ignore[import-untyped]

    one = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return one if steps == 1 else dp_accounting.SelfComposedDpEvent(one, steps)


@dataclasses.dataclass(frozen=True)
class Accountant:
    """epsilon at delta after any number of DP-SGD steps with sampling rate q and noise
    multiplier sigma, from dp-accounting's RDP accountant (add/remove one sample).

    The accountant composes one step's event once; RDP composes by addition, so the
    epsilon of s steps is dp-accounting's conversion of s times that vector
    (`compute_epsilon`, the same numbers as `RdpAccountant.compose(event, s)`), about 0.3 ms
    a step instead of 70 ms.
    """

    q: float
    sigma: float

    @cached_property
    def _one_step(self) -> tuple[F64, F64]:
        from dp_accounting import rdp  # type: ignore[import-untyped]

        accountant = rdp.RdpAccountant()  # NeighboringRelation.ADD_OR_REMOVE_ONE
        with _quiet_accountant():
            accountant.compose(_event(self.q, self.sigma))
        return np.asarray(accountant.orders, dtype=np.float64), np.asarray(accountant.rdp)

    def epsilon(self, steps: int, delta: float) -> float:
        """epsilon after `steps` steps (0 for none)."""
        if steps <= 0:
            return 0.0
        from dp_accounting.rdp import rdp_privacy_accountant  # type: ignore[import-untyped]

        orders, rdp = self._one_step
        return float(rdp_privacy_accountant.compute_epsilon(orders, steps * rdp, delta)[0])


def noise_multiplier(epsilon: float, delta: float, q: float, steps: int) -> float:
    """The smallest sigma whose `steps` steps at rate q spend at most epsilon at delta:
    dp-accounting's calibrate_dp_mechanism (Brent's method) over fresh RDP accountants,
    as Opacus's make_private_with_epsilon does with its own."""
    import dp_accounting  # type: ignore[import-untyped]
    from dp_accounting import rdp  # type: ignore[import-untyped]

    try:
        with _quiet_accountant():
            sigma = dp_accounting.calibrate_dp_mechanism(
                rdp.RdpAccountant, lambda s: _event(q, s, steps), epsilon, delta,
                bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-6)
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError:
        # even sigma = 0.001, where the search starts, spends less than epsilon
        raise ConfigError(f"--dp-epsilon {epsilon:g}: so large that its noise multiplier "
                          f"would be below 0.001 (at --dp-delta {delta:g}, --batch-rate {q:g}, "
                          f"{steps} steps); pass --dp-noise instead") from None
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"--dp-epsilon {epsilon:g}: no noise multiplier reaches it at "
                          f"--dp-delta {delta:g} with --batch-rate {q:g} over {steps} steps "
                          f"({e})") from None
    # Brent's tolerance is on sigma: step up to the first sigma that meets the budget.
    sigma = float(sigma)
    accountant = Accountant(q, sigma)
    while accountant.epsilon(steps, delta) > epsilon:
        sigma *= 1 + 1e-6
        accountant = Accountant(q, sigma)
    return sigma


def accountant_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dp-accounting")
    except PackageNotFoundError:
        return "unknown"


__all__ = ["ACCOUNTANT", "Accountant", "KEY_FILE", "NOT_PROTECTED", "empty_gradient",
           "key_digest", "new_key", "noise_multiplier", "noisy_gradient", "poisson_rows",
           "read_key", "sample_key", "standard_noise", "uniforms"]
