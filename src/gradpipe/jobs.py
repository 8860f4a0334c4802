"""Job files (TOML) with the same options as the flags, and Ray Jobs that run them on a cluster.

A job file's keys are the option names with underscores or dashes (`hidden`, `lr`,
`per_sample`, ...), plus `command` ("train", the default, or "grad"); `data`, `weights` and
`out` name paths on the machine that runs the job. `gradpipe train --job FILE` reads one
here; `gradpipe submit FILE` sends one to a cluster's Jobs API (the dashboard,
http://HEAD:8265), where it runs `gradpipe train --job FILE` inside an uploaded copy of
the working directory, so relative paths in the file are relative to that copy.

How the cluster gets gradpipe: by default the source folder of the gradpipe imported here
(`Path(gradpipe.__file__).parent`, a few hundred KB, uploaded once per content hash) goes
in the job's `py_modules`. Ray puts it first on the path of the job's driver and of every
actor it starts, so the cluster runs exactly the code of the submitting machine, whatever
(if anything) is installed there; it only needs gradpipe's dependencies (numpy, pyarrow,
click, rich). `JobConfig.use_installed` runs the cluster's own `gradpipe` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from . import raycompat
from .errors import ConfigError, JobError

COMMANDS = ("train", "grad")  # what a job file may run: `command = "train"` (default) or "grad"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")  # Ray job states that do not change any more
AUTH_HINT = ("Set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, "
             "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).")


@dataclass(frozen=True)
class JobFile:
    """A parsed job file: which command it runs and the TrainConfig values it sets."""

    path: Path
    command: str  # train | grad
    values: dict[str, Any]  # TrainConfig field values (not `command`)
    command_given: bool = False  # the file has a `command` key (else "train" by default)


def read_job_file(path: str | Path) -> JobFile:
    """Read a job file: its keys are the options declared in config.py (with _ or -), parsed
    and refused exactly as the flags are, plus `command`."""
    from .config import TrainConfig
    from .options import parse_values

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--job {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--job {path}: is a folder, not a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    given = "command" in raw
    command = raw.pop("command", "train")
    if command not in COMMANDS:
        raise ConfigError(f"{path}: key 'command' must be one of "
                          f"{', '.join(repr(c) for c in COMMANDS)}, got {command!r}")
    return JobFile(path, command, parse_values(TrainConfig, raw, where=f"{path}: "), given)


# --- Ray Jobs -------------------------------------------------------------------------------

# Never uploaded, wherever they are in the working dir: version control, caches, build
# metadata. Folders holding a `pyvenv.cfg` (virtual environments) are skipped too.
SKIP_ANYWHERE = (".git", ".hg", ".svn", "__pycache__", ".pytest_cache", ".hypothesis",
                 ".mypy_cache", ".ruff_cache", ".tox", ".nox", ".ipynb_checkpoints",
                 "node_modules")
# Never uploaded at the top of the working dir: run folders (outputs) and build outputs.
SKIP_TOP = ("runs", "build", "dist")


def dashboard_url(address: str | None) -> str:
    """The Jobs API URL for an address: http(s)://HOST:PORT as given, HOST:PORT -> http://."""
    if not address:
        raise ConfigError("no cluster address: pass --address http://HEAD:8265 (the Ray "
                          "dashboard) or set RAY_ADDRESS")
    address = address.strip().rstrip("/")
    if address == "auto" or address.startswith("ray://"):
        raise ConfigError(f"--address {address}: the Jobs API needs the Ray dashboard's URL, "
                          "http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--address {address}: expected http://HOST:PORT, the Ray "
                          "dashboard (port 8265 by default)")
    try:
        _ = parts.port  # urllib checks the port only when it is read
    except ValueError:
        raise ConfigError(f"--address {address}: the port is not a number") from None
    return address


@dataclass(frozen=True)
class JobConfig:
    """One submission: a job file, the cluster to run it on, and what to upload with it."""

    job_file: str  # TOML job file, inside working_dir (it is uploaded with it)
    address: str  # the cluster's Jobs API: its dashboard, http://HEAD:8265
    working_dir: str = "."  # folder uploaded as the job's cwd; job-file paths are relative to it
    args: tuple[str, ...] = ()  # extra flags for `gradpipe train|grad`, after --job FILE
    use_installed: bool = False  # True: run the cluster's gradpipe; False: upload ours
    max_file_mb: float = 50.0  # files above this size (MiB) are not uploaded
    submission_id: str | None = None  # None: Ray makes one (raysubmit_...)

    def __post_init__(self) -> None:
        dashboard_url(self.address)
        if not self.max_file_mb > 0:
            raise ConfigError(f"--max-file-mb {self.max_file_mb}: must be a positive number")

    @property
    def url(self) -> str:
        return dashboard_url(self.address)


@dataclass(frozen=True)
class Submission:
    """What a submission sends: the entrypoint, the runtime_env, and notes for the user."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    skipped: tuple[str, ...]  # paths (relative to working_dir) left out of the upload
    notes: tuple[str, ...]  # warnings about the job's paths, for stderr


def left_out(root: Path, max_bytes: int) -> list[str]:
    """What an upload of `root` leaves out, as paths relative to it ("dir/" for folders)."""
    skipped: list[str] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        rel = here.relative_to(root)
        keep = []
        for d in sorted(dirs):
            if (d in SKIP_ANYWHERE or (rel == Path(".") and d in SKIP_TOP)
                    or d.endswith(".egg-info") or (here / d / "pyvenv.cfg").is_file()):
                skipped.append(f"{(rel / d).as_posix()}/")
            else:
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            try:
                size = (here / f).stat().st_size
            except OSError:  # a dangling link: Ray skips it as well
                continue
            if size > max_bytes:
                skipped.append((rel / f).as_posix())
    return skipped


def _pattern(path: str) -> str:
    """A relative path as an anchored, literal gitignore line (Ray's `excludes` syntax)."""
    return "/" + "".join("\\" + c if c in "\\[]*?!# " else c for c in path)


def _is_skipped(rel: Path, skipped: list[str]) -> bool:
    text = rel.as_posix()
    return any(text == s or (s.endswith("/") and (text + "/").startswith(s)) for s in skipped)


def plan_submission(config: JobConfig, job: JobFile | None = None) -> Submission:
    """The entrypoint and runtime_env for `config`, checked here before anything is sent."""
    wd = Path(config.working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise JobError(f"--working-dir {config.working_dir}: no such folder")
    job = job or read_job_file(config.job_file)
    job_path = Path(config.job_file).expanduser().resolve()
    try:
        rel_job = job_path.relative_to(wd)
    except ValueError:
        raise JobError(f"{config.job_file}: not inside the working dir {wd}, which is what "
                       "gets uploaded. Move the job file there or pass --working-dir.") from None
    address = job.values.get("address")
    if address not in (None, "auto"):
        raise JobError(f"{config.job_file}: key 'address' = {address!r}: a submitted job runs "
                       "on the cluster it is submitted to. Remove the key.")
    if not config.args and "data" in job.values:
        from .train import TrainConfig

        try:
            TrainConfig(**job.values)  # refuse bad values here, not on the cluster
        except ConfigError as e:
            raise ConfigError(f"{config.job_file}: {e}") from None
    max_bytes = int(config.max_file_mb * 2**20)
    skipped = left_out(wd, max_bytes)
    if _is_skipped(rel_job, skipped):
        raise JobError(f"{config.job_file}: the job file is in a folder that is not uploaded "
                       f"({', '.join(s for s in skipped if _is_skipped(rel_job, [s]))}). "
                       "Move it.")
    notes = []
    unless = " (unless the flags after -- say otherwise)" if config.args else ""
    for key in ("data", "weights"):
        value = job.values.get(key)
        if not isinstance(value, str) or "://" in value or Path(value).is_absolute():
            continue
        path = wd / value
        if not path.exists():
            notes.append(f"{key} = {value!r} is not in {wd}: the job will not find it{unless}")
            continue
        files = [p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
        left = [p for p in files if _is_skipped(p.relative_to(wd), skipped)]
        if left:
            notes.append(f"{key} = {value!r}: {len(left)} of its {len(files)} files are not "
                         f"uploaded (over --max-file-mb {config.max_file_mb:g} or in a skipped "
                         "folder); put the data where the cluster's nodes can read it "
                         f"(shared storage, s3://) and point the job file at it{unless}")
    out = job.values.get("out")
    if "--out" in config.args:  # the flag after -- overrides the file
        out = config.args[config.args.index("--out") + 1] if config.args[-1] != "--out" else None
    if isinstance(out, str) and "://" not in out and not Path(out).is_absolute():
        notes.append(f"out = {out!r} is relative: the run folder is written inside the job's "
                     "copy of the working dir on the cluster; use an absolute path on shared "
                     "storage to keep it")

    runner = "gradpipe" if config.use_installed else "python -m gradpipe"
    entrypoint = " ".join([runner, job.command, "--job", shlex.quote(rel_job.as_posix()),
                           *map(shlex.quote, config.args)])
    # `excludes` applies to working_dir and py_modules alike; the anchored lines match
    # only in the working dir, and __pycache__/ (anywhere) keeps bytecode out of both.
    excludes = [_pattern(p) for p in skipped] + ["__pycache__/"]
    runtime_env: dict[str, Any] = {"working_dir": str(wd), "excludes": excludes}
    if not config.use_installed:
        import gradpipe

        runtime_env["py_modules"] = [str(Path(gradpipe.__file__).resolve().parent)]
    metadata = {"gradpipe_job_file": rel_job.as_posix(), "gradpipe_command": job.command}
    return Submission(entrypoint, runtime_env, metadata, tuple(skipped), tuple(notes))


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000).isoformat(timespec="seconds")


def job_record(details: Any) -> dict[str, Any]:
    """A Ray JobDetails as a plain, JSON-ready dict; `id` is the submission id (or job id)."""
    status = getattr(details.status, "value", str(details.status))
    start, end = details.start_time, details.end_time
    return {
        "id": details.submission_id or details.job_id,
        "status": status,
        "message": details.message,
        "entrypoint": details.entrypoint,
        "start_time": _iso(start),
        "end_time": _iso(end),
        "seconds": None if start is None or end is None else (end - start) / 1000,
        "type": getattr(details.type, "value", str(details.type)).lower(),
        "job_id": details.job_id,
        "submission_id": details.submission_id,
        "driver_exit_code": getattr(details, "driver_exit_code", None),
        "metadata": details.metadata or {},
    }


class Jobs:
    """A cluster's Jobs API (Ray's JobSubmissionClient), with every failure a one-line JobError.

    Connecting checks, within `timeout` seconds, that something listens at the address, then
    asks the API for its version, which a cluster with token authentication refuses at once
    (401) when this process has no token.
    """

    def __init__(self, address: str, *, verbose: bool = False, timeout: float = 5.0) -> None:
        self.url = dashboard_url(address)
        from ray.job_submission import JobSubmissionClient  # importing ray sets its log levels

        # Ray's client logs each upload and a warning for a missing token; our one line says it.
        raycompat.quiet_job_client(verbose)
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                pass
        except OSError as e:
            raise JobError(f"--address {self.url}: nothing answers there "
                           f"({e.strerror or e}). The Jobs API is the Ray dashboard, "
                           "http://HEAD:8265.") from None
        with self._errors():
            self.client = JobSubmissionClient(self.url)

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as e:
            what = "refused the token" if "invalid" in str(e) else "needs a token"
            raise JobError(f"{self.url}: the cluster uses token authentication and "
                           f"{what}. {AUTH_HINT}") from None
        except (ConnectionError, requests.RequestException, OSError) as e:
            found = _first(e).rstrip(".")
            raise JobError(f"--address {self.url}: no Ray Jobs API answers there ({found}). "
                           "The Jobs API is the Ray dashboard, http://HEAD:8265 (not the "
                           "GCS port 6379).") from None
        except RuntimeError as e:
            text = _first(e)
            if job_id is not None and ("404" in text or "does not exist" in text):
                raise JobError(f"job {job_id}: no such job on {self.url}. "
                               "See `gradpipe jobs list`.") from None
            if "413" in text or "request body size" in text:  # the upload is over the cap
                raise JobError(f"{self.url}: the working directory is too large to upload "
                               f"({text.rstrip('.')}). Upload less: --working-dir a smaller "
                               "folder, a smaller --max-file-mb, or name what stays behind in "
                               ".rayignore; read large data from shared storage or s3://, "
                               "not the upload") from None
            raise JobError(f"{self.url}: {text}") from None
        except ValueError as e:  # a package too large to upload, or a reply that is not JSON
            raise JobError(f"{self.url}: {_first(e)}") from None

    def submit(self, config: JobConfig, plan: Submission) -> str:
        """Upload the working dir (and gradpipe), start the job; returns its submission id."""
        with self._errors():
            return self.client.submit_job(entrypoint=plan.entrypoint,
                                          runtime_env=plan.runtime_env,
                                          metadata=plan.metadata,
                                          submission_id=config.submission_id)

    def info(self, job_id: str) -> dict[str, Any]:
        with self._errors(job_id):
            return job_record(self.client.get_job_info(job_id))

    def list(self) -> list[dict[str, Any]]:
        """Every job the cluster knows, oldest first."""
        with self._errors():
            jobs = [job_record(d) for d in self.client.list_jobs()]
        return sorted(jobs, key=lambda j: (j["start_time"] or "", j["id"] or ""))

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> dict[str, Any]:
        """Stream the job's logs to `write` until it ends; returns its final record."""
        self.info(job_id)  # an unknown id fails here, in one line

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        import aiohttp

        try:
            asyncio.run(tail())
        except (aiohttp.ClientError, RuntimeError):
            pass  # the stream broke (or was refused): wait() polls, and reports auth errors
        return self.wait(job_id)

    def wait(self, job_id: str, poll: float = 0.5) -> dict[str, Any]:
        """Poll until the job reaches SUCCEEDED, FAILED or STOPPED; returns its record."""
        while True:
            record = self.info(job_id)
            if record["status"] in TERMINAL:
                return record
            time.sleep(poll)

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False if it had already ended."""
        with self._errors(job_id):
            return self.client.stop_job(job_id)


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
