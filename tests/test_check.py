"""check.py: finite differences that hold at any scale, and a verdict that agrees with its number.

The synthetic datasets copy what broke the old fixed-step check on scikit-learn's data:
features of scale 1e3 with targets of scale 300 (diabetes: a loss of ~1e5, whose rounding
swamped a step of 1e-6), and features from 0.01 to 4e3 (breast_cancer: saturated sigmoid units
whose derivatives are ~0, where |a - b| / (|a| + |b|) reads 1). Each is checked with the
configurations `gradpipe check` builds by default, with --standardize, and with --hidden 16,8
and tanh or relu; a gradient off by a factor (1 + 1e-6) must fail, the true one pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import write_parquet

from gradpipe.check import TOL, WEAK, _derivative, _position, _read, _setup, finite_difference_check
from gradpipe.losses import LOSSES
from gradpipe.model import Architecture, Params, forward
from gradpipe.outputs import param_index, params_from_flat
from gradpipe.train import TrainConfig

# The model is spelled out (sigmoid output, squared loss, raw features: the CLI's defaults when
# issue 10 was filed) so that a change of defaults does not change what these tests check;
# "cli_default" is whatever the CLI builds today, and "task_output" the output layer that
# suits the task (softmax + cross_entropy for classes, identity for regression).
PINNED = {"standardize": False, "output_activation": "sigmoid", "loss": "squared"}
VARIANTS = {
    "cli_default": {},
    "sigmoid": PINNED,
    "standardize": {**PINNED, "standardize": True},
    "tanh": {**PINNED, "hidden": (16, 8), "activation": "tanh"},
    "relu": {**PINNED, "hidden": (16, 8), "activation": "relu"},
    "task_output": {"standardize": False},  # the output layer is set in config_for
}
TASK_OUTPUT = {"diabetes_like": {"output_activation": "identity", "loss": "squared"},
               "breast_cancer_like": {"output_activation": "softmax", "loss": "cross_entropy"}}


def diabetes_like(folder: Path, rows: int = 40, seed: int = 0) -> Path:
    """Regression: 10 features of scale 1e3, a target around 300 +- 100 (never whole)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 10)) * 1e3
    t = 300 + 100 * np.tanh(x @ rng.normal(size=10) / 3e3) + rng.uniform(0.1, 0.9, size=rows)
    write_parquet(folder / "part-0.parquet", {**{f"x{d}": x[:, d] for d in range(10)}, "t": t})
    return folder


def breast_cancer_like(folder: Path, rows: int = 40, seed: int = 0) -> Path:
    """Two classes, 6 positive features of scales 0.01 .. 4e3."""
    rng = np.random.default_rng(seed)
    scales = np.array([0.01, 1.0, 10.0, 100.0, 1e3, 4e3])
    x = rng.uniform(0.2, 1.0, size=(rows, len(scales))) * scales
    label = (x[:, 4] / 1e3 + rng.normal(scale=0.1, size=rows) > 0.6).astype(np.int64)
    label[:2] = [0, 1]
    write_parquet(folder / "part-0.parquet",
                  {**{f"x{d}": x[:, d] for d in range(len(scales))}, "label": label})
    return folder


DATASETS = {"diabetes_like": (diabetes_like, {"target": ("t",)}),
            "breast_cancer_like": (breast_cancer_like, {})}


def config_for(tmp_path: Path, dataset: str, variant: str, **extra) -> TrainConfig:
    make, options = DATASETS[dataset]
    model = {**VARIANTS[variant], **(TASK_OUTPUT[dataset] if variant == "task_output" else {})}
    return TrainConfig(data=str(make(tmp_path / dataset)), workers=0,
                       **{**options, **model, **extra})


def assert_verdict_agrees(report: dict) -> None:
    """The number printed as worst is the one compared with tol, and the largest of its kind."""
    judged = [c for c in report["checks"] if c["smooth"]]
    assert report["worst"]["relative_error"] == max(c["relative_error"] for c in judged)
    assert report["ok"] == (report["worst"]["relative_error"] <= report["tol"])


# relu passes unscaled features of 1e3 on, and the sigmoid output saturates: every derivative
# is lost in rounding (as on breast_cancer with relu). The check passes and says so.
SATURATED = {("diabetes_like", "relu")}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_true_gradient_passes_and_one_off_by_1e_6_fails(tmp_path, dataset, variant):
    config = config_for(tmp_path, dataset, variant)
    report = finite_difference_check(config)
    assert_verdict_agrees(report)
    assert report["ok"], report["worst"]
    assert report["tol"] == TOL and report["not_smooth"] == 0
    perturbed = finite_difference_check(config, perturb=1e-6)
    assert_verdict_agrees(perturbed)
    if (dataset, variant) in SATURATED:
        assert "float64 rounding" in report["note"] and perturbed["ok"]
        return
    # Enough of the gradient stands above rounding for a 1e-6 error to show, and it does.
    assert report["detectable_error"] < 1e-7 and "note" not in report
    assert not perturbed["ok"]
    assert TOL < perturbed["worst"]["relative_error"] <= 1e-6 * (1 + 1e-3)


def test_fixed_step_central_difference_is_off_on_diabetes_like_data(tmp_path):
    """Why the step is scaled: h = 1e-6 on a loss of ~1e5 loses more than TOL of the gradient to
    rounding; the scaled, extrapolated difference stays within its rounding bound."""
    config = config_for(tmp_path, "diabetes_like", "sigmoid")
    report = finite_difference_check(config)
    dataset, arch, params, _ = _setup(config)
    flat = params.flat()

    def loss(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        a, _ = forward(arch, params_from_flat(arch.sizes, theta, "float64"), x)
        return float(LOSSES[arch.loss].fn(a[arch.L], y)[0])

    worst = 0.0
    for c in report["checks"]:
        _, x, y = _read(dataset, [c["sample"]], (None, None))
        plus, minus = flat.copy(), flat.copy()
        p = _position(arch.sizes, c["layer"], c["j"], c["k"])
        plus[p] += 1e-6
        minus[p] -= 1e-6
        fixed_step = (loss(plus, x, y) - loss(minus, x, y)) / 2e-6
        worst = max(worst, abs(fixed_step - c["backprop"]) / c["scale"])
    assert worst > TOL  # a false alarm at this tolerance
    assert all(c["abs_error"] <= c["fd_error"] for c in report["checks"])
    assert report["ok"]


def test_near_zero_derivatives_are_judged_against_the_sample_gradient(tmp_path):
    """breast_cancer: |a - b| / (|a| + |b|) read 1 between two tiny numbers (printed as 'ok')."""
    report = finite_difference_check(config_for(tmp_path, "breast_cancer_like", "sigmoid"))
    tiny = [c for c in report["checks"] if abs(c["backprop"]) < 1e-9 * c["scale"]]
    assert tiny, "expected saturated units with derivatives ~0"
    # Each against itself they would fail; against the sample's gradient they are exact.
    assert max(c["elementwise_relative_error"] for c in tiny) > 100 * TOL
    assert report["ok"] and report["worst"]["relative_error"] <= TOL
    assert_verdict_agrees(report)


def test_a_zero_gradient_fails_with_an_error_of_one(tmp_path):
    report = finite_difference_check(config_for(tmp_path, "diabetes_like", "tanh"), perturb=-1.0)
    assert not report["ok"]
    assert report["worst"]["relative_error"] == pytest.approx(
        abs(report["worst"]["finite_difference"]) / report["worst"]["scale"], rel=1e-6)
    assert report["worst"]["relative_error"] > 0.1


def test_saturated_network_passes_but_says_what_it_could_not_see(tmp_path):
    """Features of 4e3 through relu and a sigmoid output: outputs at 0 and 1 to the last bit."""
    config = config_for(tmp_path, "breast_cancer_like", "relu", hidden=(64,))
    report = finite_difference_check(config)
    assert report["ok"]
    assert report["detectable_error"] is None or report["detectable_error"] > WEAK
    assert "float64 rounding" in report["note"]


def test_standardize_reaches_the_check(tmp_path):
    raw = finite_difference_check(config_for(tmp_path, "breast_cancer_like", "sigmoid"))
    std = finite_difference_check(config_for(tmp_path, "breast_cancer_like", "standardize"))
    # Same rows and parameters, other inputs: the gradients differ.
    assert [(c["sample"], c["layer"], c["j"], c["k"]) for c in raw["checks"]] == [
        (c["sample"], c["layer"], c["j"], c["k"]) for c in std["checks"]]
    assert not np.allclose([c["backprop"] for c in raw["checks"]],
                           [c["backprop"] for c in std["checks"]])


def tiny_relu(z1: float) -> tuple[Architecture, Params, np.ndarray, np.ndarray]:
    """1-1-1: z1 = w1 x + b1 with x = 1, relu, then identity; a1 = max(z1, 0)."""
    arch = Architecture((1, 1, 1), "relu", "identity", "squared", "float64")
    params = Params([np.empty((0, 0)), np.array([[0.5]]), np.array([[2.0]])],
                    [np.empty(0), np.array([z1 - 0.5]), np.array([0.0])])
    return arch, params, np.array([[1.0]]), np.array([[3.0]])


def test_a_step_across_a_relu_kink_shrinks_until_it_does_not():
    arch, params, x, y = tiny_relu(z1=1e-5)  # STEP would cross z1 = 0
    p = _position(arch.sizes, 1, 0, None)  # b1
    fd = _derivative(arch, params.flat(), p, x, y, 2.0**-10)
    # C = (2 a1 - 3)^2; dC/db1 = 4 (2 a1 - 3) for z1 > 0.
    exact = 4 * (2 * 1e-5 - 3)
    assert fd["smooth"] and fd["step"] < 1e-5
    np.testing.assert_allclose(fd["value"], exact, rtol=1e-9, atol=0)
    assert abs(fd["value"] - exact) <= fd["error"] + 1e-12


def test_a_kink_at_the_point_itself_is_left_out():
    arch, params, x, y = tiny_relu(z1=0.0)
    fd = _derivative(arch, params.flat(), _position(arch.sizes, 1, 0, None), x, y, 2.0**-10)
    assert not fd["smooth"]


def test_position_follows_the_flat_order():
    sizes = (5, 4, 3, 2)
    index = param_index(sizes)
    for p in range(len(index["layer"])):
        k = int(index["k"][p])
        assert _position(sizes, int(index["layer"][p]), int(index["j"][p]),
                         None if k < 0 else k) == p


SKLEARN = {"breast_cancer": "label", "wine": "label", "iris": "label", "diabetes": "target",
           "digits": "label"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(SKLEARN))
def test_sklearn_datasets(tmp_path, name, variant):
    """The real data of issue 10, when scikit-learn is installed."""
    datasets = pytest.importorskip("sklearn.datasets")
    frame = getattr(datasets, f"load_{name}")(as_frame=True).frame
    target = SKLEARN[name]
    frame = frame.rename(columns={"target": target})
    folder = tmp_path / name
    folder.mkdir()
    frame.to_parquet(folder / "data.parquet", index=False)
    extra: dict = {"target": (target,)}
    if name == "diabetes":
        # Whole-number float targets: say that they are numbers (where TrainConfig knows how).
        if "task" not in {f.name for f in dataclasses.fields(TrainConfig)}:
            pytest.skip("TrainConfig has no `task` to declare diabetes a regression")
        extra["task"] = "regression"
    if variant == "task_output":
        extra.update(TASK_OUTPUT["diabetes_like" if name == "diabetes" else "breast_cancer_like"])
    config = TrainConfig(data=str(folder), workers=0, **{**VARIANTS[variant], **extra})
    report = finite_difference_check(config)
    assert_verdict_agrees(report)
    assert report["ok"], report["worst"]
    if report["detectable_error"] is not None and report["detectable_error"] < 1e-7:
        assert not finite_difference_check(config, perturb=1e-6)["ok"]
