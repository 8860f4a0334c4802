"""gradpipe against real clusters: a `ray start` head on 127.0.0.1, and a simulated two-node
cluster. Each runs in subprocesses with its own token, so the session's Ray is untouched,
and each test stops exactly the processes it started."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import make_classification, stop_head

from gradpipe.train import TrainConfig, train

pytestmark = pytest.mark.cluster
RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
GRADPIPE = shutil.which("gradpipe", path=os.path.dirname(sys.executable)) or "gradpipe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def token_env(tmp_path):
    """Token authentication on, with a token of this test's own (not ~/.ray/auth_token)."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def ray_head(token_env):
    """`ray start --head` on 127.0.0.1 in its own temp folder and process group."""
    temp = tempfile.mkdtemp(prefix="gp-ray-")  # short: Ray's socket paths have a length limit
    port = free_port()
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", temp,
         "--disable-usage-stats"],
        env=token_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray start --head did not listen within 60 s")
    yield address, token_env
    stop_head(proc, temp)


def _reference(data: Path, tmp_path: Path, **options) -> Path:
    out = tmp_path / "local"
    train(TrainConfig(data=str(data), out=str(out), workers=0, **options))
    return out


def test_train_on_a_ray_start_cluster_gives_the_local_bits(ray_head, tmp_path):
    address, env = ray_head
    data = make_classification(tmp_path / "data", rows=200, files=2, row_group_size=30)
    local = _reference(data, tmp_path, hidden=(6,), steps=3, record_every=1)
    out = tmp_path / "remote"
    result = subprocess.run(
        [GRADPIPE, "--address", address, "train", str(data), "--hidden", "6", "--steps", "3",
         "--record-every", "1", "--workers", "2", "--out", str(out), "--quiet", "--json"],
        env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    for name in ("gradients", "weights.parquet"):
        assert pq.read_table(local / name).equals(pq.read_table(out / name)), name


def test_a_missing_token_is_one_clear_line_not_a_hang(ray_head, tmp_path):
    address, env = ray_head
    data = make_classification(tmp_path / "data", rows=20, files=1)
    bad = dict(env, RAY_AUTH_MODE="disabled")
    bad.pop("RAY_AUTH_TOKEN_PATH")
    bad["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    t0 = time.time()
    result = subprocess.run(
        [GRADPIPE, "--address", address, "grad", str(data), "--out", str(tmp_path / "o")],
        env=bad, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "RAY_AUTH_MODE=token" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert time.time() - t0 < 15
    assert not (tmp_path / "o").exists()


SIMULATED = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from gradpipe.train import Run, TrainConfig

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
run = Run(TrainConfig(data=sys.argv[1], out=sys.argv[2], workers=2, hidden=(6,), steps=3,
                      record_every=1))
run.prepare()
nodes = run.pool.nodes()
run.execute()
run.close()
ray.shutdown()
cluster.shutdown()
print(json.dumps({"nodes": nodes}))
"""


def test_a_simulated_two_node_cluster_spreads_blocks_and_gives_the_local_bits(
        token_env, tmp_path):
    data = make_classification(tmp_path / "data", rows=200, files=2, row_group_size=30)
    local = _reference(data, tmp_path, hidden=(6,), steps=3, record_every=1)
    out = tmp_path / "sim"
    result = subprocess.run([sys.executable, "-c", SIMULATED, str(data), str(out)],
                            env=token_env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    nodes = json.loads(result.stdout.strip().splitlines()[-1])["nodes"]
    assert len(set(nodes)) == 2, f"both workers on one node: {nodes}"
    for name in ("gradients", "weights.parquet"):
        assert pq.read_table(local / name).equals(pq.read_table(out / name)), name
