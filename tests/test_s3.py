"""Everything on an object store: a real S3 server on 127.0.0.1 (moto's standalone server,
started once for this module), driven through the CLI as users drive it.

Each run on S3 is compared with the same run on the local disk: the same bits, file by
file. Errors (missing bucket, refused credentials, an endpoint that does not answer) are
one line, within seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_classification, make_regression, one_line_error

from gradpipe import store
from gradpipe.cli import cli

pytest.importorskip("moto")

BUCKET = "gradpipe-test"
GRADPIPE = shutil.which("gradpipe", path=os.path.dirname(sys.executable)) or "gradpipe"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    pytest.fail("moto's S3 server did not listen within 30 s")


@pytest.fixture(scope="module")
def server():
    proc, url = start_moto()
    yield url
    proc.kill()
    proc.wait()


@pytest.fixture
def s3(server, monkeypatch, tmp_path):
    """A fresh bucket prefix on the module's server, with the environment pointing at it."""
    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": server}.items():
        monkeypatch.setenv(k, v)
    store.configure(server)
    fs = pafs.S3FileSystem(endpoint_override=server, allow_bucket_creation=True,
                           region="us-east-1")
    fs.create_dir(BUCKET)
    prefix = f"s3://{BUCKET}/{tmp_path.name}"
    return prefix


def upload(local: Path, loc: str) -> str:
    fs, path = store.filesystem(loc)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return loc


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def files(loc: str) -> dict[str, bytes]:
    """Every file under a folder, local or on S3, by relative path."""
    return {rel: store.read_bytes(store.join(loc, rel)) for rel in store.walk(str(loc))}


def tables(loc: str, kind: str) -> dict[str, object]:
    """The Parquet tables of a run's records of one kind, by file name."""
    folder = store.join(str(loc), kind)
    return {name: pq.read_table(store.open_input(store.join(folder, name)))
            for name in store.files(folder) if name.endswith(".parquet")}


def same_run(local: Path, remote: str) -> None:
    """The run on S3 holds the same records as the local one, bit for bit."""
    here, there = files(str(local)), files(remote)
    here.pop(".lock", None)  # a local folder's writer lock: object stores have none
    assert sorted(here) == sorted(there)
    for rel in here:
        if rel == "run.json":
            continue  # paths and times differ
        if rel.endswith(".parquet") and rel.startswith("metrics"):
            a = pq.read_table(local / rel).drop(["seconds"])
            b = pq.read_table(store.open_input(store.join(remote, rel))).drop(["seconds"])
            assert a.equals(b), rel
        else:
            assert here[rel] == there[rel], rel


COMMON = ("--hidden", "5", "--steps", "6", "--record-every", "2", "--checkpoint-every", "2",
          "--per-sample", "norms", "--per-sample-every", "2", "--quiet")


def test_train_inspect_scores_predict_and_evaluate_all_on_s3(s3, tmp_path):
    data = make_classification(tmp_path / "data", rows=90, files=3, row_group_size=11)
    val = make_classification(tmp_path / "val", rows=30, files=1, seed=3)
    remote_data, remote_val = upload(data, f"{s3}/data"), upload(val, f"{s3}/val")
    local, remote = tmp_path / "run", f"{s3}/runs/a"
    invoke("train", data, "--val", val, "--out", local, "--workers", "0", *COMMON)
    out = invoke("train", remote_data, "--val", remote_val, "--out", remote, "--workers", "0",
                 *COMMON).output
    assert remote in out
    same_run(local, remote)
    info = json.loads(store.read_text(f"{remote}/run.json"))
    assert info["status"] == "completed" and info["data_path"] == remote_data

    shown = json.loads(invoke("inspect", remote, "--json").output)
    assert shown["metrics"]["steps"] == 6 and shown["per_sample"]["samples"] == 90

    invoke("scores", local, "--workers", "0", "--json")
    invoke("scores", remote, "--workers", "0", "--json")
    for name, table in tables(str(local), "scores").items():
        assert table.equals(tables(remote, "scores")[name]), name
    assert json.loads(invoke("inspect", remote, "--json").output)["scores"]["samples"] == 90

    invoke("predict", local, data, "--out", tmp_path / "pred", "--workers", "0")
    invoke("predict", remote, remote_data, "--out", f"{s3}/pred", "--workers", "0")
    assert sorted(store.files(f"{s3}/pred")) == sorted(os.listdir(tmp_path / "pred"))
    for name in store.files(f"{s3}/pred"):
        if name.endswith(".parquet"):
            assert (pq.read_table(tmp_path / "pred" / name)
                    .equals(pq.read_table(store.open_input(f"{s3}/pred/{name}")))), name
    assert not [n for n in store.listdir(s3) if n.startswith(".")], "a temporary was left"

    a = json.loads(invoke("evaluate", local, val, "--workers", "0", "--json").output)
    b = json.loads(invoke("evaluate", remote, remote_val, "--workers", "0", "--json").output)
    assert a["accuracy"] == b["accuracy"] and a["loss"] == b["loss"]


def test_grad_weights_and_influence_on_s3(s3, tmp_path):
    data = upload(make_regression(tmp_path / "data", rows=40), f"{s3}/data")
    common = ("--target", "t0,t1", "--hidden", "3", "--workers", "0", "--quiet")
    invoke("train", data, "--out", f"{s3}/run", "--steps", "4", "--checkpoint-every", "2",
           *common)
    invoke("grad", data, "--weights", f"{s3}/run", "--out", f"{s3}/grad", *common)
    grads = tables(f"{s3}/grad", "gradients")
    assert len(grads) == 1 and next(iter(grads.values())).num_rows > 0
    invoke("influence", f"{s3}/run", "--test", data, "--top", "2", "--out",
           f"{s3}/influence.parquet", "--workers", "0")
    table = pq.read_table(store.open_input(f"{s3}/influence.parquet"))
    assert table.num_rows > 0


def test_resume_on_s3_gives_the_bits_of_an_uninterrupted_run(s3, tmp_path):
    """Interrupted after step 3 (its records written, the last checkpoint at step 2), then
    `train --resume --out s3://...` alone: the records of an uninterrupted run."""
    from gradpipe.config import TrainConfig
    from gradpipe.errors import RunInterrupted
    from gradpipe.train import train

    data = upload(make_classification(tmp_path / "data", rows=60, files=2), f"{s3}/data")
    args = ("--workers", "0", "--hidden", "4", "--steps", "6", "--checkpoint-every", "2",
            "--record-every", "1", "--quiet")
    invoke("train", data, "--out", f"{s3}/whole", *args)

    def stop_after_step_3(done: int, metrics: dict) -> None:
        if done == 4:  # steps 0..3 are done and recorded
            raise KeyboardInterrupt

    config = TrainConfig(data=data, out=f"{s3}/part", workers=0, hidden=(4,), steps=6,
                         checkpoint_every=2, record_every=1)
    with pytest.raises(RunInterrupted) as stopped:
        train(config, progress=stop_after_step_3)
    # the command it prints reaches the same store
    assert str(stopped.value).endswith(f"continue with gradpipe --s3-endpoint "
                                       f"{store.endpoint()} train --resume --out {s3}/part")
    assert json.loads(store.read_text(f"{s3}/part/run.json"))["status"] == "interrupted"
    assert "step-00000003.parquet" in store.files(f"{s3}/part/gradients")
    invoke("train", "--resume", "--out", f"{s3}/part", "--quiet")
    whole, part = files(f"{s3}/whole"), files(f"{s3}/part")
    assert sorted(whole) == sorted(part)
    for rel in whole:
        if rel.startswith(("gradients", "checkpoints")) or rel == "weights.parquet":
            assert whole[rel] == part[rel], rel


def test_ray_workers_write_their_parts_straight_to_the_store(s3, server, tmp_path):
    """A local Ray instance started by the command: its workers read DATA from S3 and write
    per_sample parts to S3; the bits are those of --workers 0."""
    data = upload(make_classification(tmp_path / "data", rows=120, files=4, row_group_size=15),
                  f"{s3}/data")
    common = ["--hidden", "4", "--steps", "3", "--per-sample", "norms", "--quiet"]
    invoke("train", data, "--out", f"{s3}/zero", "--workers", "0", *common)
    env = {**os.environ, **CREDENTIALS}
    env.pop("AWS_ENDPOINT_URL", None)
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([GRADPIPE, "--s3-endpoint", server, "train", data, "--out",
                           f"{s3}/two", "--workers", "2", *common], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    zero, two = files(f"{s3}/zero"), files(f"{s3}/two")
    assert sorted(zero) == sorted(two)
    assert len([r for r in two if r.startswith("per_sample/")]) == 8
    for rel in zero:
        if rel.startswith(("gradients", "per_sample", "checkpoints")):
            assert zero[rel] == two[rel], rel


def _one_line_within(seconds: float, *args) -> str:
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, [str(a) for a in args])
    took = time.perf_counter() - t0
    line = one_line_error(result)
    assert took < seconds, f"{took:.1f} s: {line}"
    return line


def test_a_missing_bucket_is_one_line(s3, tmp_path):
    line = _one_line_within(10, "train", "s3://no-such-bucket-here/data", "--workers", "0")
    assert "no such bucket 'no-such-bucket-here'" in line
    data = upload(make_classification(tmp_path / "data"), f"{s3}/data")
    line = _one_line_within(10, "train", data, "--workers", "0", "--out",
                            "s3://no-such-bucket-here/run")
    assert "no such bucket 'no-such-bucket-here'" in line
    assert not store.exists(f"{s3}/run")
    # a data error names the file as the URI it was given as, scheme included
    line = _one_line_within(10, "train", data, "--workers", "0", "--target", "nope")
    assert line.startswith(f"gradpipe: error: {data}/") and "missing target column" in line


def test_refused_credentials_are_one_line(s3, tmp_path):
    proc, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # every request needs a key
    try:
        line = _one_line_within(10, "--s3-endpoint", url, "train", f"s3://{BUCKET}/data",
                                "--workers", "0")
    finally:
        proc.kill()
        proc.wait()
    assert "refused the credentials" in line and url in line


def test_an_endpoint_that_does_not_answer_is_one_line_within_seconds(s3, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    line = _one_line_within(10, "--s3-endpoint", closed, "train", f"s3://{BUCKET}/data",
                            "--workers", "0")
    assert "does not answer" in line and closed in line
    # A server that accepts the connection and then says nothing.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        line = _one_line_within(10, "--s3-endpoint",
                                f"http://127.0.0.1:{silent.getsockname()[1]}", "train",
                                f"s3://{BUCKET}/data", "--workers", "0")
    finally:
        stop.set()
        for c in held:
            c.close()
        silent.close()
    assert "does not answer" in line


def test_data_import_to_a_store_is_refused_not_written_to_a_local_s3_folder(tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "x.csv"
    csv.write_text("a,label\n1,0\n2,1\n")
    result = CliRunner().invoke(cli, ["data", "import", str(csv), f"s3://{BUCKET}/x"])
    assert "write it here, then copy it to the store" in one_line_error(result)
    assert not (tmp_path / "s3:").exists()


@pytest.mark.cluster
def test_a_simulated_4_node_cluster_streams_from_s3_and_gives_the_in_process_bits(tmp_path):
    """benches/cluster_s3.py, small: 4 nodes of 1 CPU (ray.cluster_utils.Cluster), DATA and
    the run on a local S3 server, every worker streaming its own blocks."""
    bench = Path(__file__).resolve().parents[1] / "benches" / "cluster_s3.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    done = subprocess.run([sys.executable, str(bench), "--rows", "24000", "--row-group-size",
                           "1000", "--files", "3", "--steps", "2", "--features", "8"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bitwise_equal"], report["differing_files"]
    assert report["files_compared"] >= 8
    assert report["streaming"] and report["distinct_nodes"] == 4
    assert report["reads_match_assignment"]
    # load, moments (--standardize), one read per step and one for the saved weights'
    # metrics: every block read equally often
    assert report["reads_per_block"] == [2 + 2 + 1]
    assert report["driver_rss_growth"] < 1.1


def test_a_bucket_root_is_no_output_folder(s3, tmp_path):
    data = upload(make_classification(tmp_path / "data"), f"{s3}/data")
    local = make_classification(tmp_path / "local")
    line = _one_line_within(10, "train", local, "--workers", "0", "--out", f"s3://{BUCKET}",
                            "--overwrite")
    assert "a bucket, not a folder in it" in line
    assert store.exists(data)
    # with the data in the bucket, it is the data that the bucket would hold
    line = _one_line_within(10, "train", data, "--workers", "0", "--out", f"s3://{BUCKET}")
    assert "inside --out" in line
    # scores too (pyarrow's 'Would delete bucket' came through before)
    run = tmp_path / "run"
    assert CliRunner().invoke(cli, ["train", str(local), "--workers", "0", "--steps", "2",
                                    "--per-sample", "norms", "--out", str(run),
                                    "--quiet"]).exit_code == 0
    line = _one_line_within(10, "scores", run, "--workers", "0", "--out", f"s3://{BUCKET}")
    assert f"--out s3://{BUCKET}: a bucket, not a folder in it; write to a prefix such as " \
        f"s3://{BUCKET}/scores" in line


def test_an_upload_the_store_does_not_keep_whole_is_refused_and_removed(s3, tmp_path,
                                                                       monkeypatch):
    """moto stores an unsigned upload (no credentials anywhere) with its chunk framing:
    gradpipe says so in one line instead of writing files that do not read back."""
    data = upload(make_classification(tmp_path / "data"), f"{s3}/data")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    store._s3.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["train", data, "--workers", "0", "--out",
                                          f"{s3}/run", "--steps", "2"])
    finally:
        store._s3.cache_clear()
    assert result.exit_code == 2
    # the schema line, then the error of the first write
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("gradpipe: error: ") and "Traceback" not in result.stderr
    assert "the store kept" in line and "Check the credentials" in line
    assert not store.exists(f"{s3}/run/run.json")
