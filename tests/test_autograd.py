"""`gradpipe grad` against PyTorch autograd (skipped where torch is not installed: it is only
in the optional `bench` extra). Float64, relative 1e-9, for the batch gradient and for the
per-sample losses, norms and full gradients."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_train import load_xy

from gradpipe.cli import cli
from gradpipe.outputs import params_from_flat

torch = pytest.importorskip("torch")
func = pytest.importorskip("torch.func")

ACT = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
       "identity": lambda z: z}


def torch_loss(params: list, x, y, activation: str, output: str, loss: str):
    a = x
    L = len(params) // 2
    for l in range(L):
        z = a @ params[2 * l].T + params[2 * l + 1]
        if l < L - 1:
            a = ACT[activation](z)
        elif output == "softmax":
            a = torch.log_softmax(z, dim=-1)
        else:
            a = ACT[output](z)
    if loss == "cross_entropy":
        return -(y * a).sum(-1)
    return ((a - y) ** 2).sum(-1)


@pytest.mark.parametrize("case", [
    dict(hidden="4", activation="sigmoid", output="sigmoid", loss="squared", target=None),
    dict(hidden="5,4", activation="relu", output="softmax", loss="cross_entropy", target=None),
    dict(hidden="4", activation="tanh", output="identity", loss="squared", target="t0,t1"),
])
def test_grad_matches_torch_autograd(case, cls_data, reg_data, tmp_path):
    data = reg_data if case["target"] else cls_data
    out = tmp_path / "g"
    args = ["grad", str(data), "--workers", "0", "--dtype", "float64", "--hidden", case["hidden"],
            "--activation", case["activation"], "--output-activation", case["output"],
            "--loss", case["loss"], "--per-sample", "full", "--seed", "4", "--out", str(out),
            "--no-standardize"]
    if case["target"]:
        args += ["--target", case["target"]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    target = tuple(case["target"].split(",")) if case["target"] else ("label",)
    x, y = load_xy(data, None if case["target"] else 3, target)
    sizes = (x.shape[1], *map(int, case["hidden"].split(",")), y.shape[1])
    grads = pq.read_table(out / "gradients")
    p = params_from_flat(sizes, grads.column("value").to_numpy(), "float64")
    params = [torch.tensor(t, requires_grad=True) for l in range(1, len(sizes))
              for t in (p.w[l], p.b[l])]
    X, Y = torch.tensor(x), torch.tensor(y)
    act = (case["activation"], case["output"], case["loss"])

    losses = torch_loss(params, X, Y, *act)
    losses.mean().backward()
    expected = torch.cat([t.grad.reshape(-1) for t in params]).numpy()
    np.testing.assert_allclose(grads.column("grad").to_numpy(), expected, rtol=1e-9, atol=1e-15)

    def one(ps, xi, yi):
        return torch_loss(ps, xi[None], yi[None], *act)[0]

    detached = [t.detach() for t in params]
    per = func.vmap(func.grad(one), in_dims=(None, 0, 0))(detached, X, Y)
    per_flat = torch.cat([g.reshape(len(x), -1) for g in per], dim=1).numpy()
    rows = pq.read_table(out / "per_sample").sort_by("sample")
    np.testing.assert_allclose(rows.column("loss").to_numpy(), losses.detach().numpy(),
                               rtol=1e-9)
    np.testing.assert_allclose(np.stack(rows.column("grad").to_numpy(zero_copy_only=False)),
                               per_flat, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(rows.column("grad_norm").to_numpy(),
                               np.linalg.norm(per_flat, axis=1), rtol=1e-9)
