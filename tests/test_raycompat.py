"""raycompat.py: the private Ray names gradpipe relies on still exist in the installed Ray, and
no other module of gradpipe uses Ray's private names.

A Ray upgrade that moves one of them fails here, by name, before pyproject's bound is raised.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
from pathlib import Path

import pytest

from gradpipe import raycompat

SRC = Path(__file__).resolve().parents[1] / "src" / "gradpipe"
PRIVATE = re.compile(r"ray\._|_raylet|\b_private\b|_node_ip")  # not make_private etc.


def test_only_raycompat_names_rays_private_parts() -> None:
    found = [f"{path.name}:{n}: {line.strip()}"
             for path in sorted(SRC.glob("*.py")) if path.name != "raycompat.py"
             for n, line in enumerate(path.read_text().splitlines(), start=1)
             if PRIVATE.search(line)]
    assert found == []


def test_the_loopback_switch_is_the_one_ray_reads() -> None:
    constants = importlib.import_module(raycompat._CONSTANTS_MODULE)
    assert constants.ENABLE_RAY_CLUSTERS_ENV_VAR == raycompat.LOOPBACK_SWITCH
    assert isinstance(constants.ENABLE_RAY_CLUSTER, bool)


def test_loopback_only_sets_the_switch_and_ray_s_parsed_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    constants = importlib.import_module(raycompat._CONSTANTS_MODULE)
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.delenv(raycompat.LOOPBACK_SWITCH, raising=False)
    raycompat.loopback_only()
    assert os.environ[raycompat.LOOPBACK_SWITCH] == "0"
    assert constants.ENABLE_RAY_CLUSTER is False


def test_ray_init_takes_the_node_address() -> None:
    import ray

    # ray.init pops its private arguments from **kwargs; an unknown one raises TypeError.
    (name,) = raycompat.local_init_kwargs()
    assert f'kwargs.pop("{name}"' in inspect.getsource(ray.init)


def test_the_gcs_client_and_its_token_error_exist() -> None:
    # GcsClient forwards `cluster_id` to an inner client: test_security.py calls it for real.
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # noqa: F401
    from ray.exceptions import AuthenticationError

    assert issubclass(AuthenticationError, Exception)


def test_the_job_client_loggers_are_ray_modules() -> None:
    for name in raycompat.JOB_CLIENT_LOGGERS:
        assert importlib.util.find_spec(name) is not None, name


def test_stderr_to_devnull_restores_fd_2(capfd: pytest.CaptureFixture[str]) -> None:
    with raycompat.stderr_to_devnull():
        os.write(2, b"hidden\n")
    os.write(2, b"shown\n")
    assert capfd.readouterr().err == "shown\n"


@pytest.mark.ray
def test_the_local_instance_is_on_the_loopback_address(ray_local) -> None:
    assert {node["NodeManagerAddress"] for node in ray_local.nodes()} == {raycompat.LOOPBACK_IP}
