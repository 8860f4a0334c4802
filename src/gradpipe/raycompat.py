"""Ray's private names, all in one place: what gradpipe uses that Ray does not promise to keep.

Each one says why gradpipe needs it and what breaks if Ray changes it. pyproject.toml bounds
`ray` to the versions the tests ran on, and tests/test_raycompat.py checks that every name
here still exists, so a Ray that moves one fails there, not in a user's run. Nothing else
in gradpipe imports from `ray._private` or `ray._raylet`; this module imports Ray lazily.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

LOOPBACK_IP = "127.0.0.1"

# Why: Ray takes a node's address from the network unless it believes it runs on a laptop
# (Windows or macOS); this switch, read when `ray._private.ray_constants` is imported (by us
# and by every process the instance starts), makes it take 127.0.0.1 instead, so a local
# instance binds the loopback interface, not all of them.
# If Ray changes it: the local instance listens on every interface again (no error); the
# `_node_ip_address` below still names the node 127.0.0.1.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_CONSTANTS_MODULE = "ray._private.ray_constants"  # holds ENABLE_RAY_CLUSTER, the parsed switch

# Why: `JobSubmissionClient` logs every upload at INFO and warns about a missing token on
# these loggers (Ray's dashboard modules, named by their import paths); gradpipe says it in
# one line of its own.
# If Ray renames the modules: their lines reach the terminal again (no error).
JOB_CLIENT_LOGGERS = ("ray", "ray.dashboard.modules.dashboard_sdk",
                      "ray.dashboard.modules.job.sdk")


def loopback_only() -> None:
    """Make a local Ray instance started by this process bind 127.0.0.1 only.

    Call it before `import ray`: Ray reads the switch when it is imported. If Ray was
    imported already, its parsed copy (ray_constants.ENABLE_RAY_CLUSTER, private) is set
    too; a Ray without that attribute is left alone and the switch still reaches the
    processes the instance starts.
    """
    os.environ[LOOPBACK_SWITCH] = "0"
    constants = sys.modules.get(_CONSTANTS_MODULE)
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        setattr(constants, "ENABLE_RAY_CLUSTER", False)  # noqa: B010 (a private name)


def local_init_kwargs() -> dict[str, Any]:
    """The private `ray.init` argument that names the local node 127.0.0.1.

    Why: with it the raylet, the object store and the workers advertise the loopback address.
    If Ray drops `_node_ip_address`, `ray.init` raises TypeError at once (every local run
    fails loudly); if it ignores it, the address comes from the switch above.
    """
    return {"_node_ip_address": LOOPBACK_IP}


# Why: Ray (2.52 on) turns token authentication on for a new local instance only when
# RAY_AUTH_MODE is unset (RAY_AUTH_MODE=disabled in the environment starts it open, and so
# do older Rays), and then takes its token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token, writing the last when missing: one long-lived token for every instance
# and cluster of this user. gradpipe decides instead: the mode and a fresh token of its own
# go into the environment that the instance's processes (GCS, raylet, workers) inherit.
# This process read the mode when Ray was imported and caches the token once loaded, so
# both are read again: `Config.initialize` and the token loader's `reset_cache` (private).
# If Ray changes them: ImportError or AttributeError at the start of every local run
# (loudly), and tests/test_security.py fails by name; if Ray renames the variables, the
# instance starts without authentication and the same test fails.
AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"


@contextlib.contextmanager
def token_auth(token: str) -> Iterator[None]:
    """Token authentication on, with `token` and no other, for a Ray instance started inside.

    The environment is restored on exit, so the token does not reach processes this one
    starts later; this process keeps the mode and the token it loaded for the instance's
    lifetime.
    """
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    saved = {k: os.environ.get(k) for k in (AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH)}
    os.environ.pop(AUTH_TOKEN_PATH, None)
    os.environ.update({AUTH_MODE: "token", AUTH_TOKEN: token})
    Config.initialize("")  # this process: token mode
    AuthenticationTokenLoader.instance().reset_cache()  # this process: this token
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def stderr_to_devnull() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration (C++ logs bypass sys.stderr)."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def gcs_refuses_token(address: str) -> bool:
    """True when the GCS at HOST:PORT refuses this process for want of a valid token.

    Why: `ray.init` retries a refused connection for 20-40 s before it fails; asking the GCS
    for its cluster id (`ray._raylet.GcsClient`, private) is refused at once, so gradpipe can
    say in seconds that a token is missing.
    If Ray moves GcsClient or its `cluster_id`: this returns False and `ray.init` reports the
    refusal itself, slowly. Any other failure also returns False, for the same reason.
    """
    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
        from ray.exceptions import AuthenticationError
    except ImportError:
        return False
    try:
        # The C++ client logs each refused attempt on fd 2 before Ray's logging is set up.
        with stderr_to_devnull():
            _ = GcsClient(address=address).cluster_id  # the call that asks for the token
    except AuthenticationError:
        return True
    except Exception:  # anything else: let ray.init report it in its own words
        return False
    return False


def quiet_job_client(verbose: bool) -> None:
    """Keep Ray's Jobs client at ERROR (INFO with `verbose`) on the loggers named above."""
    for name in JOB_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
