"""Private training (DP-SGD): ghost-clipped sums against materialised clipping, the Poisson
draw, the noise, the accountant against documented epsilons, the refusals, and the bits
across worker counts, a killed worker and --resume."""

from __future__ import annotations

import json
import stat

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import clean_and_killed, make_classification, one_line_error, write_parquet
from reference import flat, naive_sample

from gradpipe.backprop import block_partial
from gradpipe.cli import cli
from gradpipe.model import Architecture, init_params
from gradpipe.privacy import (
    Accountant,
    noise_multiplier,
    noisy_gradient,
    poisson_rows,
    sample_key,
    standard_noise,
    uniforms,
)
from gradpipe.reduce import reduce
from gradpipe.train import Run, TrainConfig, train

KEY = "7f" * 32

# --- ghost clipping ----------------------------------------------------------------------------


@pytest.mark.parametrize("output,loss,clip", [
    ("softmax", "cross_entropy", 0.05),
    ("sigmoid", "squared", 0.2),
    ("softmax", "cross_entropy", 1e6),  # no sample clipped: the plain sum
])
def test_clipped_sums_equal_materialise_clip_sum(output, loss, clip):
    rng = np.random.default_rng(4)
    sizes = (5, 4, 3, 3)
    arch = Architecture(sizes, "tanh", output, loss, "float64")
    params = init_params(arch, 2)
    n = 37
    x = rng.normal(size=(n, sizes[0])) * 2
    y = np.eye(3)[rng.integers(0, 3, n)]
    w = [None] + [p.tolist() for p in params.w[1:]]
    b = [None] + [p.tolist() for p in params.b[1:]]
    rows = []
    for i in range(n):  # materialise each sample's gradient by the naive chain rule
        _, gw, gb = naive_sample(sizes, w, b, "tanh", output, loss, x[i], y[i])
        rows.append(flat(sizes, gw, gb))
    g = np.array(rows)  # (n, P)
    norms = np.linalg.norm(g, axis=1)
    clipped = g * np.minimum(1.0, clip / norms)[:, None]
    if clip < 1:
        assert (norms > clip).sum() > n // 2, "the test should clip most samples"
    expected = clipped.sum(axis=0)
    for chunk_rows in (8192, 5):  # one chunk, and chunks of 5 rows
        p = block_partial(arch, params, x, y, clip=clip, chunk_rows=chunk_rows)
        got = reduce([p]).flat() * n
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
        assert p.sq_norm_sum[1:].sum() == pytest.approx((clipped ** 2).sum(), rel=1e-9)
        assert np.linalg.norm(clipped, axis=1).max() <= clip * (1 + 1e-12)


# --- the Poisson draw --------------------------------------------------------------------------


def test_the_draw_has_rate_q_and_is_independent_across_samples_and_steps():
    ids = np.arange(200_000, dtype=np.int64)
    q = 0.03
    steps = 20
    member = np.array([uniforms(ids, sample_key(None, 5, s)) < q for s in range(steps)])
    n = len(ids)
    # the rate, per step: within 4.5 binomial standard deviations
    sd = np.sqrt(n * q * (1 - q))
    assert np.all(np.abs(member.sum(axis=1) - n * q) < 4.5 * sd)
    # each sample's count over the steps is Binomial(steps, q): the chi-square of its histogram
    counts = np.bincount(member.sum(axis=0), minlength=steps + 1)[:4]
    from scipy.stats import binom, chi2

    expected = n * binom.pmf(np.arange(4), steps, q)
    stat_ = ((counts - expected) ** 2 / expected).sum()
    assert stat_ < chi2.ppf(0.999, 3), (counts, expected)
    # pairs: the same sample at two steps, and neighbouring samples at one step, are drawn
    # together at rate q^2 (independent draws)
    for both in (member[0] & member[1], member[3] & member[7],
                 member[0, :-1] & member[0, 1:], member[2, ::2] & member[2, 1::2]):
        m = len(both)
        assert abs(both.sum() - m * q * q) < 4.5 * np.sqrt(m * q * q), both.sum()
    # the uniforms themselves: 10 equal bins
    u = uniforms(ids, sample_key(KEY, 0, 0))
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert ((hist - n / 10) ** 2 / (n / 10)).sum() < chi2.ppf(0.999, 9)


def test_the_draw_depends_on_the_id_alone_not_on_blocks_or_order():
    ids = np.random.default_rng(0).permutation(10_000).astype(np.int64)
    key = sample_key(KEY, 3, 11)
    whole = set(ids[poisson_rows(ids, key, 0.1)])
    pieces = set()
    for part in np.array_split(ids, 7):
        pieces |= set(part[poisson_rows(part, key, 0.1)])
    assert whole == pieces
    assert set(ids[poisson_rows(ids, sample_key(KEY, 3, 12), 0.1)]) != whole  # another step
    assert set(ids[poisson_rows(ids, sample_key(None, 3, 11), 0.1)]) != whole  # another key
    assert len(poisson_rows(ids, key, 1.0)) == len(ids)


# --- the noise ---------------------------------------------------------------------------------


def test_the_noise_has_scale_sigma_c_over_the_expected_batch():
    z = standard_noise(KEY, 0, 3, 400_000)
    assert abs(z.mean()) < 4.5 / np.sqrt(len(z))
    assert abs(z.std() - 1) < 4.5 / np.sqrt(2 * len(z))
    assert np.array_equal(z, standard_noise(KEY, 0, 3, 400_000))  # keyed: the same again
    other = standard_noise(KEY, 0, 4, 400_000)
    assert abs(np.corrcoef(z, other)[0, 1]) < 4.5 / np.sqrt(len(z))
    assert not np.array_equal(standard_noise(None, 0, 3, 10), z[:10])
    # the private gradient of a batch of zero gradients: noise sigma C / (q N) per coordinate
    sizes = (300, 200, 10)
    arch = Architecture(sizes, "relu", "softmax", "cross_entropy", "float64")
    params = init_params(arch, 0)
    x = np.zeros((50, 300))
    y = np.full((50, 10), 0.1)  # uniform targets at uniform outputs: dC/dz = 0
    grad = reduce([block_partial(arch, params, x, y, clip=2.0)])
    assert np.abs(grad.flat()).max() < 1e-15
    sigma, clip, expected = 1.3, 2.0, 250.0
    noisy = noisy_gradient(grad, standard_noise(KEY, 1, 0, arch.n_params), sigma * clip, expected)
    got = noisy.flat()
    assert got.std() == pytest.approx(sigma * clip / expected, rel=4.5 / np.sqrt(2 * got.size))


# --- the accountant ----------------------------------------------------------------------------


def test_epsilon_matches_documented_values():
    # Opacus's RDPAccountant test (opacus/tests/accountants_test.py): sigma 1.5, q 0.04,
    # int(90 / 0.04) steps, delta 1e-5 -> 7.32911117143 (its alpha grid differs slightly).
    assert Accountant(0.04, 1.5).epsilon(2250, 1e-5) == pytest.approx(7.32911117143, rel=1e-4)
    # Abadi et al. 2016, section 3.1: q 0.01, sigma 4, T 10,000, delta 1e-5 gives epsilon
    # 1.26 with the moments accountant; RDP with the tighter conversion gives at most that.
    eps = Accountant(0.01, 4.0).epsilon(10_000, 1e-5)
    assert 0.9 < eps <= 1.26
    assert Accountant(0.01, 4.0).epsilon(0, 1e-5) == 0.0
    # growing in steps, shrinking in sigma
    a = Accountant(0.02, 1.0)
    assert a.epsilon(10, 1e-5) < a.epsilon(100, 1e-5) < Accountant(0.02, 0.8).epsilon(100, 1e-5)


def test_sigma_from_epsilon_matches_opacus_documented_values():
    # Opacus's get_noise_multiplier tests: epsilon 8, delta 1e-5, q 0.04 -> 1.3562 over 2,000
    # steps and 1.416 over 90 epochs (its own search stops within 0.01 of epsilon)
    assert noise_multiplier(8, 1e-5, 0.04, 2000) == pytest.approx(1.3562, abs=1e-4)
    assert noise_multiplier(8, 1e-5, 0.04, 2250) == pytest.approx(1.416, rel=1e-3)
    sigma = noise_multiplier(3, 1e-5, 0.01, 1000)
    assert 2.999 < Accountant(0.01, sigma).epsilon(1000, 1e-5) <= 3


# --- runs --------------------------------------------------------------------------------------

PRIVATE = dict(hidden=(6,), standardize=False, dp_clip=0.5, dp_noise=1.1, dp_delta=1e-5,
               batch_rate=0.2, record_every=1, checkpoint_every=2)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    return path


def test_a_private_run_records_epsilon_and_its_guarantee(cls_data, tmp_path, key_file):
    out = tmp_path / "run"
    metrics = train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=6,
                                dp_key=str(key_file), **PRIVATE))
    table = pq.read_table(out / "metrics").to_pydict()
    accountant = Accountant(0.2, 1.1)
    assert table["epsilon"] == [accountant.epsilon(s + 1, 1e-5) for s in range(6)]
    assert all(v is None for v in table["noise_scale"])
    info = json.loads((out / "run.json").read_text())
    p = info["privacy"]
    assert p["epsilon"] == table["epsilon"][-1] == metrics["epsilon"]
    assert (p["clip"], p["noise_multiplier"], p["sampling_rate"], p["steps"]) == (0.5, 1.1,
                                                                                   0.2, 6)
    assert p["expected_batch"] == 0.2 * 60 and p["per_sample_outputs_private"] is False
    assert "add or remove one sample" in p["neighbouring"]
    assert KEY not in (out / "run.json").read_text()
    key = out / "privacy-key"
    assert key.read_text().strip() == KEY
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # the batch is a Poisson draw: its size varies, and is about q N
    assert len(set(table["samples"])) > 1 and 0 < np.mean(table["samples"]) < 30


def test_the_update_divides_the_noisy_clipped_sum_by_q_n(cls_data, tmp_path, key_file):
    out = tmp_path / "run"
    config = TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=1, dtype="float64",
                         dp_key=str(key_file), **PRIVATE)
    run = Run(config)
    run.prepare()
    try:
        w0 = run.params.flat()
        run.execute()
    finally:
        run.close()
    grad = pq.read_table(out / "gradients").to_pydict()["grad"]
    # recompute: the rows the draw took, clipped, summed, plus the keyed noise, over q N
    from test_train import load_xy

    x, y = load_xy(cls_data, 3)
    ids = np.arange(len(x), dtype=np.int64)
    rows = poisson_rows(ids, sample_key(KEY, 0, 0), 0.2)
    arch = run.arch
    p = block_partial(arch, init_params(arch, 0), x[rows], y[rows], clip=0.5)
    total = reduce([p]).flat() * len(rows)
    z = standard_noise(KEY, 0, 0, arch.n_params)
    np.testing.assert_allclose(grad, (total + 1.1 * 0.5 * z) / 12, rtol=1e-9, atol=1e-12)
    assert np.array_equal(w0, init_params(arch, 0).flat())


def test_resume_is_bitwise_and_keeps_the_key(cls_data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(TrainConfig(data=str(cls_data), out=str(full), workers=0, steps=6, **PRIVATE))
    # the same secret: the one the first run made
    key = tmp_path / "key"
    key.write_text((full / "privacy-key").read_text())
    train(TrainConfig(data=str(cls_data), out=str(cut), workers=0, steps=3,
                      dp_key=str(key), **PRIVATE))
    key.unlink()  # the run keeps its own copy
    train(TrainConfig(data=str(cls_data), out=str(cut), workers=0, steps=6, resume=True,
                      **PRIVATE))
    for name in ("weights.parquet", "gradients"):
        assert pq.read_table(full / name).equals(pq.read_table(cut / name)), name
    a = pq.read_table(full / "metrics").drop(["seconds"])
    b = pq.read_table(cut / "metrics").drop(["seconds"])
    assert a.equals(b)


def test_epsilon_target_picks_sigma_once_and_resume_keeps_it(cls_data, tmp_path):
    out = tmp_path / "run"
    target = {**PRIVATE, "dp_noise": None, "dp_epsilon": 2.0}
    m = train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=4, **target))
    assert 1.99 < m["epsilon"] <= 2.0
    sigma = json.loads((out / "run.json").read_text())["privacy"]["noise_multiplier"]
    assert sigma == noise_multiplier(2.0, 1e-5, 0.2, 4)
    m = train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=6, resume=True,
                          **target))
    info = json.loads((out / "run.json").read_text())["privacy"]
    assert info["noise_multiplier"] == sigma  # not recalibrated for 6 steps
    assert m["epsilon"] == Accountant(0.2, sigma).epsilon(6, 1e-5) > 2.0
    assert any("above --dp-epsilon 2" in w for w in m["warnings"])


def test_a_draw_that_takes_no_sample_is_a_step_of_noise(cls_data, tmp_path, key_file):
    out = tmp_path / "run"
    config = {**PRIVATE, "batch_rate": 0.005}
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=5,
                      dp_key=str(key_file), **config))
    table = pq.read_table(out / "metrics").to_pydict()
    ids = np.arange(60, dtype=np.int64)
    assert table["samples"] == [len(poisson_rows(ids, sample_key(KEY, 0, s), 0.005))
                                for s in range(5)]
    assert 0 in table["samples"]
    empty = table["samples"].index(0)
    assert np.isnan(table["loss"][empty]) and table["grad_norm"][empty] > 0


def test_per_sample_rows_need_the_acknowledgement(cls_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=2,
                      per_sample="norms", dp_allow_per_sample=True, **PRIVATE))
    rows = pq.read_table(out / "per_sample").to_pydict()
    samples = pq.read_table(out / "metrics").to_pydict()["samples"]
    assert len(rows["sample"]) == samples[-1]  # the rows of the last step's draw
    info = json.loads((out / "run.json").read_text())
    assert info["privacy"]["per_sample_outputs_private"] is False


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("flags,names", [
    (["--dp-clip", 1, "--dp-noise", 1, "--dp-delta", 1e-5, "--batch-rate", 0.1],
     ["--standardize", "--no-standardize"]),
    (["--dp-clip", 1, "--dp-noise", 1, "--dp-delta", 1e-5, "--batch", 10,
      "--no-standardize"], ["--batch N", "--batch-rate"]),
    (["--dp-clip", 1, "--dp-noise", 1, "--dp-delta", 1e-5, "--no-standardize"],
     ["--batch-rate"]),
    (["--dp-clip", 1, "--dp-noise", 1, "--batch-rate", 0.1, "--no-standardize"],
     ["--dp-delta"]),
    (["--dp-clip", 1, "--dp-noise", 1, "--dp-epsilon", 3, "--dp-delta", 1e-5,
      "--batch-rate", 0.1, "--no-standardize"], ["--dp-noise", "--dp-epsilon"]),
    (["--dp-noise", 1], ["--dp-noise", "--dp-clip"]),
    (["--dp-clip", 1, "--dp-noise", 1, "--dp-delta", 1e-5, "--batch-rate", 0.1,
      "--no-standardize", "--per-sample", "norms"], ["--dp-allow-per-sample"]),
    (["--dp-clip", 1, "--dp-noise", 1, "--dp-delta", 1e-5, "--batch-rate", 0.1,
      "--no-standardize", "--second-moment"], ["--second-moment"]),
    (["--batch", 10, "--batch-rate", 0.1], ["--batch N", "--batch-rate"]),
    (["--batch-rate", 1.5], ["--batch-rate"]),
    (["--dp-clip", 1, "--dp-epsilon", 1e8, "--dp-delta", 1e-5, "--batch-rate", 0.1,
      "--steps", 20, "--no-standardize"], ["--dp-epsilon 1e+08", "--dp-noise"]),
])
def test_what_the_accountant_does_not_cover_is_refused_in_one_line(cls_data, tmp_path, flags,
                                                                   names):
    out = tmp_path / "run"
    result = _cli("train", cls_data, "--out", out, "--workers", 0, *flags)
    one_line_error(result, *names)
    assert not out.exists()


def test_the_summary_line_says_epsilon_at_delta(cls_data, tmp_path):
    result = _cli("train", cls_data, "--out", tmp_path / "run", "--workers", 0, "--steps", 3,
                  "--hidden", 4, "--no-standardize", "--dp-clip", 1, "--dp-epsilon", 2,
                  "--dp-delta", 1e-5, "--batch-rate", 0.3, "-q")
    assert result.exit_code == 0, result.output
    assert "absl" not in result.stderr  # the accountant's own log lines stay out of it
    assert "epsilon 2 at delta 1e-05" in result.stdout.splitlines()[0]
    # inspect says the budget the run spent, from run.json
    info = json.loads((tmp_path / "run" / "run.json").read_text())["privacy"]
    shown = json.loads(_cli("inspect", tmp_path / "run", "--json").stdout)["run"]
    assert shown["privacy"]["epsilon"] == info["epsilon"] and shown["privacy"]["steps"] == 3
    text = " ".join(_cli("inspect", tmp_path / "run").stdout.split())
    assert f"({info['epsilon']:.4g}, 1e-05)-DP after 3 steps" in text
    # no noise scale is kept: no table of dashes for it
    assert json.loads(_cli("inspect", tmp_path / "run", "--json").stdout)["noise_scale"] is None
    assert "noise scale" not in text
    assert "Poisson, rate 0.3, private (clip 1)" in text


# --- the same bits on any number of workers, and after a killed worker ------------------------


@pytest.mark.ray
def test_private_runs_are_bitwise_identical_for_any_worker_count(ray_local, tmp_path, key_file):
    data = make_classification(tmp_path / "data", rows=600, features=6, classes=4, files=3,
                               row_group_size=45)
    tables = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train(TrainConfig(data=str(data), out=str(out), workers=workers, steps=5,
                          dp_key=str(key_file), momentum=0.5, **PRIVATE))
        tables[workers] = [pq.read_table(out / n) for n in ("gradients", "weights.parquet")]
        metrics = pq.read_table(out / "metrics")
        # what reached the driver differs by design (the reducer's own counts)
        tables[workers].append(metrics.drop([c for c in ("seconds", "partials",
                                                         "partial_bytes")
                                             if c in metrics.column_names]))
    for a, b in zip(tables[0], tables[2], strict=True):
        assert a.equals(b)


@pytest.mark.ray
def test_a_killed_worker_leaves_a_private_run_bitwise_unchanged(ray_local, tmp_path, key_file):
    data = make_classification(tmp_path / "data", rows=40000, features=32, classes=5,
                               files=2, row_group_size=5000)
    common = dict(data=str(data), workers=2, steps=5, dp_key=str(key_file),
                  **{**PRIVATE, "hidden": (64,), "batch_rate": 0.5})
    clean, crashed, kills, after = clean_and_killed(tmp_path, common, (2,))
    assert kills and not set(kills) & set(after), "a worker was restarted"
    for name in ("gradients", "weights.parquet"):
        assert pq.read_table(clean / name).equals(pq.read_table(crashed / name)), name


def test_resume_refuses_another_key_and_a_missing_one(cls_data, tmp_path, key_file):
    from gradpipe.errors import ConfigError

    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=2,
                      dp_key=str(key_file), **PRIVATE))
    other = tmp_path / "other"
    other.write_text("ab" * 32)
    with pytest.raises(ConfigError, match="not the key the run"):
        train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=4, resume=True,
                          dp_key=str(other), **PRIVATE))
    (out / "privacy-key").unlink()  # as the README allows once the run is done
    with pytest.raises(ConfigError, match="privacy-key is missing.*pass the key it began "
                                          "with as --dp-key FILE"):
        train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=4, resume=True,
                          **PRIVATE))
    with pytest.raises(ConfigError, match=f"privacy-key is missing.*--dp-key {other} is not"):
        train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=4, resume=True,
                          dp_key=str(other), **PRIVATE))
    # the key given again, recognised by its SHA-256 in run.json: the run goes on, and the
    # same bits as a run never stopped
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, steps=4, resume=True,
                      dp_key=str(key_file), **PRIVATE))
    assert (out / "privacy-key").read_text().strip() == key_file.read_text().strip()
    whole = tmp_path / "whole"
    train(TrainConfig(data=str(cls_data), out=str(whole), workers=0, steps=4,
                      dp_key=str(key_file), **PRIVATE))
    assert pq.read_table(out / "weights.parquet").equals(pq.read_table(whole / "weights.parquet"))


def test_a_warning_known_before_the_first_step_is_said_before_it_once(cls_data, tmp_path):
    result = _cli("train", cls_data, "--out", tmp_path / "run", "--workers", 0, "--steps", 2,
                  "--hidden", 4, "--no-standardize", "--dp-clip", 1, "--dp-noise", 1,
                  "--dp-delta", 0.5, "--batch-rate", 0.3)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    warned = [i for i, line in enumerate(lines) if "is not below 1/N" in line]
    assert len(warned) == 1 and lines[warned[0]].startswith("gradpipe: warning: --dp-delta 0.5")
    assert warned[0] == 1  # right after the schema line, before any step
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert any("is not below 1/N" in w for w in info["warnings"])


def test_unscaled_features_of_a_private_run_are_said_with_the_advice(tmp_path):
    # breast_cancer's raw areas reach thousands: clipping leaves the gradient mostly noise,
    # and the model ends no better than the most common class; both are said
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    label = (x[:, 0] + 0.3 * rng.normal(size=300) > 0.6).astype(np.int64)  # 27% class 1
    write_parquet(tmp_path / "d" / "a.parquet", {"area": 2000 + 800 * x[:, 0],
                                                 "x1": x[:, 1], "x2": x[:, 2], "label": label})
    result = _cli("train", tmp_path / "d", "--out", tmp_path / "run", "--workers", 0,
                  "--steps", 200, "--no-standardize", "--dp-clip", 1, "--dp-noise", 1,
                  "--dp-delta", 1e-4, "--batch-rate", 0.05, "--seed", 1)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[1].startswith("gradpipe: warning: feature 'area' reaches ")  # before step 0
    assert "a private run does not standardize its features" in lines[1]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    trivial = [w for w in info["warnings"] if "do no better than always answering" in w]
    assert len(trivial) == 1, info["warnings"]
    assert ("or scale the features first (a private run does not standardize them; 'area' "
            "is one)") in trivial[0]
    # scaled features: no such warning
    write_parquet(tmp_path / "s" / "a.parquet", {"area": x[:, 0], "x1": x[:, 1],
                                                 "x2": x[:, 2], "label": label})
    result = _cli("train", tmp_path / "s", "--out", tmp_path / "scaled", "--workers", 0,
                  "--steps", 2, "--no-standardize", "--dp-clip", 1, "--dp-noise", 1,
                  "--dp-delta", 1e-4, "--batch-rate", 0.05)
    assert result.exit_code == 0 and "reaches" not in result.stderr, result.stderr


def test_resume_with_the_other_noise_flag_says_the_run_chose_its_noise(cls_data, tmp_path):
    out = tmp_path / "run"
    result = _cli("train", cls_data, "--out", out, "--workers", 0, "--steps", 2, "--hidden", 4,
                  "--no-standardize", "--dp-clip", 1, "--dp-epsilon", 3, "--dp-delta", 1e-5,
                  "--batch-rate", 0.3, "-q")
    assert result.exit_code == 0, result.output
    result = _cli("train", "--resume", "--out", out, "--dp-noise", 2)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--dp-noise is 2 but the run was started without it" in result.stderr


def test_a_private_run_refuses_repeated_ids(tmp_path):
    """The guarantee is per row and the Poisson draw keys on the id: rows sharing an id would
    always be drawn together. A repeat across files is named by both of its rows; unique
    ids train."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    for name, ids in (("a", np.arange(20)), ("b", np.r_[np.arange(20, 33), 7, 34, 35, 36,
                                                           37, 38, 39])):
        rows = slice(0, 20) if name == "a" else slice(20, 40)
        write_parquet(tmp_path / "d" / f"{name}.parquet",
                      {"uid": ids, "x0": x[rows, 0], "x1": x[rows, 1], "x2": x[rows, 2],
                       "label": np.arange(20) % 2}, row_group_size=6)
    flags = ["--id-column", "uid", "--no-standardize", "--dp-clip", 1, "--dp-noise", 1,
             "--dp-delta", 1e-3, "--batch-rate", 0.3, "--steps", 2, "--workers", 0, "-q"]
    out = tmp_path / "run"
    message = one_line_error(_cli("train", tmp_path / "d", "--out", out, *flags),
                             "--id-column 'uid'", "id 7")
    assert f"row 7 of {tmp_path / 'd' / 'a.parquet'}" in message
    assert f"row 13 of {tmp_path / 'd' / 'b.parquet'}" in message
    assert "1 repeated id in all" in message and not out.exists()
    (tmp_path / "d" / "b.parquet").unlink()
    assert _cli("train", tmp_path / "d", "--out", out, *flags).exit_code == 0
