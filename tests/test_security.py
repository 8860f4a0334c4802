"""The local instance gradpipe starts is reachable from this machine only, and only with the
token gradpipe gave it; nothing is unpickled."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gradpipe"


def _listening() -> dict[int, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket, from /proc/net."""
    out: dict[int, tuple[str, int]] = {}
    for name, _width in (("tcp", 8), ("tcp6", 32)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A":  # LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc stores each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[inode] = (str(ipaddress.ip_address(raw)), int(hex_port, 16))
    return out


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _sockets_of(pids: set[int]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
                if m:
                    out.setdefault(pid, set()).add(int(m.group(1)))
        except OSError:  # the process ended meanwhile
            continue
    return out


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.mark.ray
def test_the_local_instance_listens_on_loopback_only(ray_local):
    @ray_local.remote
    def ping() -> int:
        return 1

    assert ray_local.get(ping.remote()) == 1  # workers up, so their ports exist too
    assert ray_local.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    listening = _listening()
    ours = _sockets_of(_descendants(os.getpid()) | {os.getpid()})
    found = [(pid, listening[i]) for pid, inodes in ours.items() for i in inodes if i in listening]
    assert found, "no listening socket found: the check would pass vacuously"
    exposed = [(pid, Path(f"/proc/{pid}/comm").read_text().strip(), addr, port)
               for pid, (addr, port) in found if not _is_loopback(addr)]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_nothing_is_unpickled():
    """No pickle or np.load with pickles in gradpipe's own reading code."""
    for path in SRC.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b", text,
                             re.M), path.name
        assert not re.search(r"\bpickle\.loads?\(", text), path.name
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (path.name, call)


@pytest.mark.ray
def test_the_local_instance_refuses_clients_without_its_token(ray_local, tmp_path):
    """Token authentication stays on: a client with auth disabled and no token is refused."""
    import subprocess
    import sys

    address = ray_local.get_runtime_context().gcs_address
    # raycompat's probe: exit 3 only if the GCS raised AuthenticationError (any other
    # failure, or a Ray that moved GcsClient, gives 0).
    probe = (
        "import sys\n"
        "from gradpipe.raycompat import gcs_refuses_token\n"
        f"sys.exit(3 if gcs_refuses_token({address!r}) else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE="disabled", HOME=str(tmp_path))  # no ~/.ray/auth_token either
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                            timeout=60)
    assert result.returncode == 3, result.stderr.decode()[-2000:]


# Run in a clean process: starts gradpipe's local instance, checks it from inside, then asks
# clients without its token (in processes of their own) to connect. Exit 0 when all is well.
CLEAN_START = """
import json, os, subprocess, sys
from pathlib import Path
from gradpipe.worker import ray_init
import ray

ray_init("local", num_cpus=1)
address = ray.get_runtime_context().gcs_address
report = {"env_after": {k: os.environ.get(k) for k in
                        ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}}

@ray.remote
def mode():
    return os.environ.get("RAY_AUTH_MODE")

report["worker_mode"] = ray.get(mode.remote())  # a worker started after ray_init returned
from gradpipe.raycompat import gcs_refuses_token
report["self_refused"] = gcs_refuses_token(address)  # this process holds the token
probe = ("import sys\\nfrom gradpipe.raycompat import gcs_refuses_token\\n"
         f"sys.exit(3 if gcs_refuses_token({address!r}) else 0)\\n")
clients = {}
for name, extra in (("no mode", {}), ("disabled", {"RAY_AUTH_MODE": "disabled"}),
                    ("wrong token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    done = subprocess.run([sys.executable, "-c", probe], env={**env, **extra},
                          capture_output=True, timeout=60)
    clients[name] = done.returncode
report["clients"] = clients
report["home"] = sorted(str(p.relative_to(Path.home())) for p in Path.home().rglob("*"))
ray.shutdown()
print(json.dumps(report))
"""


@pytest.mark.parametrize("environment_mode", [None, "disabled"])
def test_gradpipe_turns_token_authentication_on_in_a_clean_environment(
        tmp_path, environment_mode):
    """No RAY_AUTH_MODE (or RAY_AUTH_MODE=disabled) and no ~/.ray/auth_token: the local
    instance still has token authentication, with a token of its own that reaches neither
    the disk nor the processes gradpipe starts afterwards, and refuses clients without it."""
    import json
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["HOME"] = str(home)
    if environment_mode is not None:
        env["RAY_AUTH_MODE"] = environment_mode
    done = subprocess.run([sys.executable, "-c", CLEAN_START], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["clients"] == {"no mode": 3, "disabled": 3, "wrong token": 3}, report
    assert report["self_refused"] is False  # the probe tells a refusal from a connection
    assert report["worker_mode"] == "token"
    assert report["env_after"] == {"RAY_AUTH_MODE": environment_mode, "RAY_AUTH_TOKEN": None,
                                   "RAY_AUTH_TOKEN_PATH": None}
    assert not any(p.startswith(".ray") for p in report["home"]), report["home"]


def test_a_run_writes_only_inside_its_run_folder(cls_data, tmp_path, monkeypatch):
    from gradpipe.train import TrainConfig, train

    monkeypatch.chdir(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "run"
    train(TrainConfig(data=str(cls_data), out=str(out), workers=0, hidden=(3,), steps=3,
                      per_sample="full", checkpoint_every=1))
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == out or out in p.parents for p in new), sorted(new - {out})
