"""Job files and Ray Jobs: `gradpipe submit` and `gradpipe jobs list|status|logs|stop`.

The first tests need no cluster. The `cluster` tests share one `ray start --head` with its
dashboard (the Jobs API) on 127.0.0.1, token authentication on and a token of its own, in
its own process group; gradpipe runs in subprocesses with the head's environment, and the
fixture stops exactly the group it started.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import REPO, make_classification, stop_head

from gradpipe.cli import cli
from gradpipe.errors import ConfigError
from gradpipe.jobs import JobConfig, dashboard_url, plan_submission, read_job_file
from gradpipe.train import TrainConfig

GRADPIPE = shutil.which("gradpipe", path=os.path.dirname(sys.executable)) or "gradpipe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- job files and submission plans (no cluster) ---------------------------------------------


def test_a_job_file_names_its_command_train_by_default(tmp_path):
    job = tmp_path / "j.toml"
    job.write_text('data = "d"\nhidden = [4]\n')
    assert read_job_file(job).command == "train"
    job.write_text('command = "grad"\ndata = "d"\n')
    parsed = read_job_file(job)
    assert parsed.command == "grad" and parsed.values == {"data": "d"}
    job.write_text('command = "fit"\n')
    with pytest.raises(ConfigError, match=r"j\.toml: key 'command' must be one of 'train', "
                                          r"'grad', got 'fit'"):
        read_job_file(job)


@pytest.mark.parametrize("command", ["train", "grad"])
def test_train_and_grad_read_a_job_file_that_names_a_command(tmp_path, command):
    data = make_classification(tmp_path / "data", rows=30)
    job = tmp_path / "j.toml"
    job.write_text(f'command = "{command}"\ndata = "{data}"\nhidden = [3]\nsteps = 2\n'
                   f'workers = 0\nout = "{tmp_path / "run"}"\n')
    result = CliRunner().invoke(cli, [command, "--job", str(job), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["step"] == (1 if command == "train" else 0)


def test_a_job_file_naming_the_other_command_is_refused(tmp_path):
    """`gradpipe train --job` on a file that says command = "grad" trained 300 steps; the
    other way round it computed one gradient: refused in one line, nothing written. A file
    without `command` goes with either, and check takes a train file."""
    data = make_classification(tmp_path / "data", rows=30)
    for command, other in (("grad", "train"), ("train", "grad")):
        job = tmp_path / f"{command}.toml"
        job.write_text(f'command = "{command}"\ndata = "{data}"\nhidden = [3]\nsteps = 2\n'
                       f'workers = 0\nout = "{tmp_path / command}"\n')
        result = CliRunner().invoke(cli, [other, "--job", str(job)])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.stderr == (f"gradpipe: error: --job {job}: the file says command = "
                                 f"{command!r}, and this is gradpipe {other}: run gradpipe "
                                 f"{command} --job {job}, or change the file\n")
        assert not (tmp_path / command).exists()
    plain = tmp_path / "plain.toml"
    plain.write_text(f'data = "{data}"\nhidden = [3]\nworkers = 0\n')
    result = CliRunner().invoke(cli, ["grad", "--job", str(plain), "--out", str(tmp_path / "g"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["check", "--job", str(tmp_path / "train.toml")])
    assert result.exit_code == 0, result.output


def test_an_upload_over_the_clusters_cap_is_said_with_the_ways_out():
    """Ray's dashboard answers 413 to a working directory over its request cap (100 MiB
    measured): one line that says so and how to upload less, not Ray's raw error."""
    from gradpipe.errors import JobError
    from gradpipe.jobs import Jobs

    jobs = Jobs.__new__(Jobs)  # no cluster: only the error mapping is under test
    jobs.url = "http://127.0.0.1:8265"
    with pytest.raises(JobError) as e, jobs._errors():
        raise RuntimeError("Request failed with status code 413: Maximum request body size "
                           "104857600 exceeded.")
    assert str(e.value) == (
        "http://127.0.0.1:8265: the working directory is too large to upload (Request failed "
        "with status code 413: Maximum request body size 104857600 exceeded). Upload less: "
        "--working-dir a smaller folder, a smaller --max-file-mb, or name what stays behind in "
        ".rayignore; read large data from shared storage or s3://, not the upload")


def test_the_bundled_job_files_are_valid():
    digits = read_job_file(REPO / "jobs" / "digits.toml")
    assert digits.command == "train"
    config = TrainConfig(**digits.values)
    # its own folder: the README's runs/digits (scores, influence) is not replaced
    assert (config.data, config.out, config.per_sample) == ("data/digits", "runs/digits-job",
                                                            "norms")
    synth = read_job_file(REPO / "jobs" / "synth-1m.toml")
    config = TrainConfig(**synth.values)
    assert (config.data, config.hidden) == ("data/synth-1m", (256, 64)) and config.steps <= 10
    assert "--rows 1000000 --features 128 --classes 10 --files 8" in \
        (REPO / "jobs" / "synth-1m.toml").read_text()


def _project(root: Path) -> Path:
    """A working dir with data, a job file, and things that must not be uploaded."""
    make_classification(root / "data", rows=30, files=1)
    (root / "jobs").mkdir()
    (root / "jobs" / "small.toml").write_text('data = "data"\nhidden = [3]\nout = "runs/s"\n')
    for folder in ("runs/old", ".git/objects", "venv/lib", "src/pkg/__pycache__"):
        (root / folder).mkdir(parents=True)
    (root / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "big.bin").write_bytes(b"\0" * 2**20)
    return root


def test_a_submission_uploads_the_working_dir_and_this_gradpipe(tmp_path):
    wd = _project(tmp_path / "proj")
    plan = plan_submission(JobConfig(job_file=str(wd / "jobs" / "small.toml"),
                                     address="127.0.0.1:8265", working_dir=str(wd),
                                     args=("--steps", "2"), max_file_mb=0.5))
    assert plan.entrypoint == "python -m gradpipe train --job jobs/small.toml --steps 2"
    env = plan.runtime_env
    import gradpipe

    assert env["working_dir"] == str(wd)
    assert env["py_modules"] == [str(Path(gradpipe.__file__).resolve().parent)]
    assert {"/runs/", "/.git/", "/venv/", "/src/pkg/__pycache__/", "/big.bin",
            "__pycache__/"} <= set(env["excludes"])
    assert not any("data" in e or "jobs" in e for e in env["excludes"])
    assert any("out = 'runs/s' is relative" in n for n in plan.notes)

    installed = plan_submission(JobConfig(job_file=str(wd / "jobs" / "small.toml"),
                                          address="http://h:8265", working_dir=str(wd),
                                          use_installed=True))
    assert installed.entrypoint == "gradpipe train --job jobs/small.toml"
    assert "py_modules" not in installed.runtime_env


def test_a_submission_refuses_a_job_file_outside_the_working_dir_and_warns_of_missing_data(
        tmp_path):
    wd = _project(tmp_path / "proj")
    outside = tmp_path / "elsewhere.toml"
    outside.write_text('data = "data"\n')
    with pytest.raises(Exception, match="not inside the working dir"):
        plan_submission(JobConfig(job_file=str(outside), address="h:8265", working_dir=str(wd)))
    missing = wd / "jobs" / "missing.toml"
    missing.write_text('data = "nope"\nout = "/abs/run"\n')
    plan = plan_submission(JobConfig(job_file=str(missing), address="h:8265",
                                     working_dir=str(wd)))
    assert plan.notes == (f"data = 'nope' is not in {wd.resolve()}: the job will not find it",)


def test_addresses_of_the_jobs_api():
    assert dashboard_url("10.0.0.1:8265") == "http://10.0.0.1:8265"
    assert dashboard_url("https://ray.example.com/") == "https://ray.example.com"
    for bad in (None, "auto", "ray://h:10001", "http://:8265"):
        with pytest.raises(ConfigError):
            dashboard_url(bad)


def test_an_address_where_nothing_listens_is_one_line_in_seconds():
    t0 = time.time()
    result = CliRunner().invoke(cli, ["jobs", "list", "--address",
                                      f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "nothing answers there" in result.stderr
    assert time.time() - t0 < 10


# --- against a real head ------------------------------------------------------------------


def python_without_gradpipe(folder: Path) -> Path:
    """A virtual environment with this one's packages but not gradpipe: its .pth lists our
    site-packages as plain paths, so the .pth of gradpipe's editable install is not read."""
    venv.create(folder, with_pip=False, symlinks=True)
    site = next(folder.glob("lib/python*/site-packages"))
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (site / "this-env.pth").write_text("\n".join(paths) + "\n")
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` with its dashboard on 127.0.0.1, token auth on, in its own group.

    The head runs from a Python that has Ray and numpy but (with gradpipe installed editable,
    as in development) cannot import gradpipe, and puts it first on PATH (a job's `python`),
    so every job here, and its actors, run the uploaded gradpipe."""
    tmp = tmp_path_factory.mktemp("head")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    python = python_without_gradpipe(tmp / "cluster-venv")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    # No `gradpipe` command on the cluster's PATH either (an activated venv has one).
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and not (Path(p) / "gradpipe").exists()]
    cluster_env = dict(env, PATH=os.pathsep.join([str(python.parent), *path]))
    check = subprocess.run([python, "-c", "import ray, numpy, pyarrow, click, rich, gradpipe"],
                           capture_output=True, text=True, env=cluster_env)
    # gradpipe installed into site-packages (not editable) cannot be hidden this way.
    has_gradpipe = check.returncode == 0
    assert has_gradpipe or "No module named 'gradpipe'" in check.stderr, check.stderr
    temp = tempfile.mkdtemp(prefix="gp-ray-")  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port"]
    proc = subprocess.Popen(
        [python, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), *[a for p in ports for a in (p, str(free_port()))],
         "--num-cpus", "2", "--temp-dir", temp, "--disable-usage-stats"],
        env=cluster_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    request = urllib.request.Request(f"{url}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token.read_text()}"})
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.time() > deadline or proc.poll() is not None:
            stop_head(proc, temp)
            pytest.fail("the dashboard of ray start --head did not answer within 60 s")
        time.sleep(0.5)
    yield url, env, has_gradpipe
    stop_head(proc, temp)


def gradpipe(env: dict, *args: str, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run([GRADPIPE, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    """Two jobs from a small working dir: one that trains, one with a data path that is not
    there. Both are submitted first and then waited for, so they run side by side."""
    url, env, _ = head
    wd = tmp_path_factory.mktemp("project")
    make_classification(wd / "data", rows=60, files=2, row_group_size=10)
    out = tmp_path_factory.mktemp("outputs") / "run"  # absolute: the job runs in a copy of wd
    (wd / "ok.toml").write_text(f'data = "data"\nhidden = [4]\nsteps = 3\nworkers = 1\n'
                                f'record_every = 1\nout = "{out}"\n')
    (wd / "bad.toml").write_text('data = "no-such-data"\nsteps = 3\nworkers = 0\n'
                                 f'out = "{out}-bad"\n')
    procs = {name: subprocess.Popen(
        [GRADPIPE, "submit", f"{name}.toml", "--address", url, "--wait", "--json"],
        env=env, cwd=wd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("ok", "bad")}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return url, env, out, results


@pytest.mark.cluster
def test_submit_wait_runs_the_job_file_on_the_cluster_and_exits_0(submitted):
    url, env, out, results = submitted
    ok = results["ok"]
    assert ok.returncode == 0, ok.stderr
    record = json.loads(ok.stdout)
    assert record["status"] == "SUCCEEDED" and record["address"] == url
    assert record["entrypoint"].endswith("train --job ok.toml")
    assert (out / "weights.parquet").is_file()
    assert pq.read_table(out / "metrics").num_rows == 3


@pytest.mark.cluster
def test_a_job_that_fails_exits_1_with_wait(submitted):
    _, _, out, results = submitted
    bad = results["bad"]
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["status"] == "FAILED"
    assert "data = 'no-such-data' is not in" in bad.stderr  # warned before it was sent
    assert not Path(f"{out}-bad").exists()


@pytest.mark.cluster
def test_jobs_list_status_and_logs(submitted):
    url, env, _, results = submitted
    ids = {name: json.loads(r.stdout)["id"] for name, r in results.items()}
    listed = gradpipe(env, "jobs", "list", "--address", url)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "START", "ENTRYPOINT"]
    for name, status in (("ok", "SUCCEEDED"), ("bad", "FAILED")):
        row = next(line for line in lines if line.startswith(ids[name]))
        assert row.split()[1] == status and f"--job {name}.toml" in row
    as_json = json.loads(gradpipe(env, "jobs", "list", "--address", url, "--json").stdout)
    assert {ids["ok"], ids["bad"]} <= {j["id"] for j in as_json}

    # The group's --address (here RAY_ADDRESS) serves as well.
    status = gradpipe(dict(env, RAY_ADDRESS=url), "jobs", "status", ids["ok"], "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"
    human = gradpipe(env, "jobs", "status", ids["bad"], "--address", url)
    assert human.stdout.startswith(f"{ids['bad']}  FAILED")

    logs = gradpipe(env, "jobs", "logs", ids["ok"], "--address", url)
    assert logs.returncode == 0 and "step 2  loss" in logs.stdout and "wrote" in logs.stdout
    bad_logs = gradpipe(env, "jobs", "logs", ids["bad"], "--address", url, "--follow")
    assert bad_logs.returncode == 0 and "gradpipe: error:" in bad_logs.stdout
    assert "no-such-data" in bad_logs.stdout

    unknown = gradpipe(env, "jobs", "status", "raysubmit_nope", "--address", url)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "no such job" in unknown.stderr


@pytest.mark.cluster
def test_submit_follow_streams_the_logs_and_jobs_stop_ends_it_with_exit_1(head, tmp_path):
    url, env, _ = head
    make_classification(tmp_path / "data", rows=30, files=1)
    (tmp_path / "long.toml").write_text(f'data = "data"\nhidden = [3]\nsteps = 1000000\n'
                                        f'workers = 0\nrecord_every = 0\ncheckpoint_every = 0\n'
                                        f'out = "{tmp_path / "run"}"\n')
    follow = subprocess.Popen([GRADPIPE, "submit", "long.toml", "--address", url, "--follow"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        job_id = follow.stdout.readline().strip()
        assert job_id.startswith("raysubmit_"), follow.stderr.read()
        deadline = time.time() + 60
        while json.loads(gradpipe(env, "jobs", "status", job_id, "--address", url,
                                  "--json").stdout)["status"] != "RUNNING":
            assert time.time() < deadline
            time.sleep(0.5)
        stop = gradpipe(env, "jobs", "stop", job_id, "--address", url)
        assert stop.returncode == 0 and stop.stdout.strip() == f"stopping {job_id}"
        rest, stderr = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 1, stderr
    assert "Running entrypoint for job" in rest  # the job's log, streamed
    assert f"job {job_id} STOPPED" in stderr


@pytest.mark.cluster
def test_a_missing_token_is_one_clear_line_in_seconds(head, tmp_path):
    url, env, _ = head
    bad = dict(env, RAY_AUTH_MODE="disabled", HOME=str(tmp_path))  # no ~/.ray/auth_token
    bad.pop("RAY_AUTH_TOKEN_PATH")
    make_classification(tmp_path / "data", rows=30, files=1)
    (tmp_path / "j.toml").write_text(f'data = "data"\nout = "{tmp_path / "run"}"\n')
    for args in (["jobs", "list", "--address", url], ["submit", "j.toml", "--address", url]):
        t0 = time.time()
        result = gradpipe(bad, *args, cwd=tmp_path, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gradpipe: error:"), result.stderr
        assert "RAY_AUTH_MODE=token" in lines[0]
        assert time.time() - t0 < 15


@pytest.mark.cluster
def test_use_installed_runs_the_clusters_own_gradpipe(head, tmp_path):
    """This cluster has none, so the job fails where the default (uploaded) one succeeds."""
    url, env, has_gradpipe = head
    if has_gradpipe:
        pytest.skip("gradpipe is installed in site-packages: the cluster's Python imports it")
    make_classification(tmp_path / "data", rows=30, files=1)
    (tmp_path / "j.toml").write_text(f'data = "data"\nworkers = 0\nsteps = 1\n'
                                     f'out = "{tmp_path / "run"}"\n')
    result = gradpipe(env, "submit", "j.toml", "--address", url, "--use-installed", "--wait",
                      "--json", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    record = json.loads(result.stdout)
    assert record["entrypoint"] == "gradpipe train --job j.toml"
    logs = gradpipe(env, "jobs", "logs", record["id"], "--address", url)
    assert "gradpipe: not found" in logs.stdout or "command not found" in logs.stdout
