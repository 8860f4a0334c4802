"""Where files live: a local path or an object-store URI, with one set of operations for both.

A location is a string: a local path (made absolute) or `s3://bucket/key`. Everything that
reads or writes a run folder, a dataset, weights or predictions goes through here, so the
same code serves a laptop's disk and a cluster's object store.

S3 goes through pyarrow's S3FileSystem. Endpoint, region and credentials come from the
standard AWS environment variables and files (AWS_ENDPOINT_URL, AWS_REGION or
AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials and
~/.aws/config); `--s3-endpoint URL` (and `s3_endpoint` in a job file) overrides the endpoint
for the command and the Ray workers it starts. Connection and request timeouts are short and
retries few, so that a wrong endpoint or credentials fail in seconds with one line.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from .errors import DataError

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# The environment a Ray worker needs to reach the same store (never credentials: those stay
# with each node's own AWS configuration, not in the job's runtime environment).
WORKER_VARS = (*ENDPOINT_VARS, "AWS_REGION", "AWS_DEFAULT_REGION")


def is_remote(loc: str) -> bool:
    """True for a URI (s3://...), False for a local path (file:// counts as local)."""
    return "://" in str(loc) and not str(loc).startswith("file://")


def resolve(loc: str) -> str:
    """The location in its canonical form: an absolute local path, or the URI without a
    trailing slash."""
    loc = str(loc)
    if loc.startswith("file://"):
        loc = loc[len("file://"):]
    if is_remote(loc):
        return loc.rstrip("/")
    return os.path.abspath(loc)


def configure(endpoint: str | None) -> None:
    """Use this S3 endpoint (http://HOST:PORT) in this process and in the processes it
    starts (set as AWS_ENDPOINT_URL, which the AWS tools read too)."""
    if endpoint:
        if "://" not in endpoint:
            raise DataError(f"--s3-endpoint {endpoint}: expected a URL, such as "
                            "http://127.0.0.1:9000 or https://s3.example.com")
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def endpoint() -> str | None:
    """The S3 endpoint override in effect (None: AWS's own)."""
    for name in ENDPOINT_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def worker_env() -> dict[str, str]:
    """The environment variables Ray workers need to reach the same store."""
    return {k: os.environ[k] for k in WORKER_VARS if os.environ.get(k)}


@lru_cache(maxsize=8)
def _s3(endpoint_url: str | None, region: str | None, probe: bool = False
        ) -> pafs.S3FileSystem:
    # The probe (one HEAD of the bucket, the first time a process uses it) gives up after 3
    # s without retrying, so that an endpoint that accepts connections and never answers is
    # one line in seconds; the reads and writes after it wait longer and retry once.
    kwargs: dict = {
        "connect_timeout": 3.0,
        "request_timeout": 3.0 if probe else 30.0,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1 if probe else 2),
    }
    if endpoint_url:
        url = urlparse(endpoint_url)
        kwargs["endpoint_override"] = url.netloc + url.path.rstrip("/")
        kwargs["scheme"] = url.scheme or "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def filesystem(loc: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a location, and the path inside it."""
    loc = resolve(loc)
    if not is_remote(loc):
        return pafs.LocalFileSystem(), loc
    scheme, path = loc.split("://", 1)
    if scheme in ("s3", "s3a"):
        _bucket_found(endpoint(), _region(), path.split("/", 1)[0], loc)
        return _s3(endpoint(), _region()), path
    try:
        return pafs.FileSystem.from_uri(loc)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise DataError(f"{loc}: cannot open: {e}") from None


def failure(loc: str, e: BaseException) -> DataError:
    """One line for a store that refused or did not answer (pyarrow's AWS messages are long)."""
    text = " ".join(str(e).split())
    where = endpoint() or "AWS S3"
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not connect" in text:
        url = endpoint()
        if url is None:
            return DataError(f"{loc}: AWS S3 does not answer, and no S3 endpoint is set. For "
                             "another S3 server pass gradpipe --s3-endpoint URL (or set "
                             "AWS_ENDPOINT_URL).")
        hint = (" (an https:// endpoint: does the server speak plain http?)"
                if url.startswith("https://") else "")
        return DataError(f"{loc}: the S3 endpoint {where} does not answer{hint}. Check "
                         "--s3-endpoint / AWS_ENDPOINT_URL and that the server is running.")
    if any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId",
                               "SignatureDoesNotMatch", "INVALID_ACCESS_KEY", "403",
                               "SIGNATURE_DOES_NOT_MATCH")):
        return DataError(f"{loc}: the store refused the credentials ({where}). Check "
                         "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials.")
    if "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        return DataError(f"{loc}: no such bucket at {where}")
    return DataError(f"{loc}: {text}")


_BUCKETS: dict[tuple, bool] = {}


def _bucket_found(endpoint_url: str | None, region: str | None, bucket: str, loc: str) -> bool:
    """Whether the bucket exists, asked once per process with the quick probe: an endpoint
    that does not answer, or refuses the credentials, is one DataError line in seconds."""
    key = (endpoint_url, region, bucket)
    if key not in _BUCKETS:
        try:
            found = _s3(endpoint_url, region, True).get_file_info(bucket)
        except OSError as e:
            raise failure(loc, e) from None
        _BUCKETS[key] = found.type != pafs.FileType.NotFound
    return _BUCKETS[key]


def info(loc: str) -> pafs.FileInfo:
    """The file info of a location (type NotFound if nothing is there); a store error
    becomes one DataError line."""
    fs, path = filesystem(loc)
    try:
        found = fs.get_file_info(path)
    except OSError as e:
        raise failure(resolve(loc), e) from None
    return found


def check_bucket(loc: str) -> None:
    """Refuse, in one line, a location whose bucket does not exist (before anything runs)."""
    loc = resolve(loc)
    if not is_remote(loc):
        return
    bucket = loc.split("://", 1)[1].split("/", 1)[0]
    if not _bucket_found(endpoint(), _region(), bucket, loc):
        raise DataError(f"{loc}: no such bucket {bucket!r} at {endpoint() or 'AWS S3'}")


def exists(loc: str) -> bool:
    return info(loc).type != pafs.FileType.NotFound


def is_dir(loc: str) -> bool:
    return info(loc).type == pafs.FileType.Directory


def is_file(loc: str) -> bool:
    return info(loc).type == pafs.FileType.File


def join(loc: str, *parts: str) -> str:
    loc = resolve(loc)
    return posixpath.join(loc, *parts) if is_remote(loc) else os.path.join(loc, *parts)


def parent(loc: str) -> str:
    loc = resolve(loc)
    return posixpath.dirname(loc) if is_remote(loc) else os.path.dirname(loc)


def name(loc: str) -> str:
    return posixpath.basename(resolve(loc))


def inside(loc: str, folder: str) -> bool:
    """True if `loc` is `folder` or lies under it."""
    loc, folder = resolve(loc), resolve(folder)
    if not is_remote(loc):
        loc, folder = os.path.realpath(loc), os.path.realpath(folder)
    return loc == folder or loc.startswith(folder.rstrip("/") + "/")


def _entries(loc: str) -> list[pafs.FileInfo]:
    fs, path = filesystem(loc)
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise failure(resolve(loc), e) from None


def listdir(loc: str) -> list[str]:
    """The names directly inside a folder (empty if it does not exist), in one listing."""
    return sorted(posixpath.basename(e.path.rstrip("/")) for e in _entries(loc))


def files(loc: str) -> list[str]:
    """The names of the files directly inside a folder, sorted, in one listing."""
    return sorted(posixpath.basename(e.path) for e in _entries(loc)
                  if e.type == pafs.FileType.File)


def walk(loc: str) -> list[str]:
    """Every file under a folder, as paths relative to it, sorted."""
    fs, path = filesystem(loc)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as e:
        raise failure(resolve(loc), e) from None
    root = path.rstrip("/") + "/"
    return sorted(e.path[len(root):] for e in entries
                  if e.type == pafs.FileType.File and e.path.startswith(root))


def makedirs(loc: str) -> None:
    """Create a folder and its parents (on an object store folders need no creating)."""
    if not is_remote(resolve(loc)):
        os.makedirs(resolve(loc), exist_ok=True)


def remove(loc: str) -> None:
    """Remove a file or a whole folder, if there."""
    loc = resolve(loc)
    if not is_remote(loc):
        if os.path.isdir(loc) and not os.path.islink(loc):
            shutil.rmtree(loc, ignore_errors=True)
        elif os.path.lexists(loc):
            os.unlink(loc)
        return
    fs, path = filesystem(loc)
    found = info(loc)
    try:
        if found.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif found.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise failure(loc, e) from None


def read_bytes(loc: str) -> bytes:
    fs, path = filesystem(loc)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise failure(resolve(loc), e) from None


def read_text(loc: str) -> str:
    return read_bytes(loc).decode()


def open_input(loc: str) -> pa.NativeFile:
    """A random-access file (for pyarrow.parquet)."""
    fs, path = filesystem(loc)
    try:
        return fs.open_input_file(path)
    except OSError as e:
        raise failure(resolve(loc), e) from None


def upload(local: str, loc: str) -> None:
    """Put a local file at `loc` as one object: S3 shows it whole once the upload completes,
    and an upload cut short leaves nothing at the key."""
    fs, path = filesystem(loc)
    try:
        # One write of the whole (memory-mapped) file: a Ctrl-C can only land before it or
        # after it, never between two pieces (pyarrow's stream cannot abort: closed early it
        # would complete the upload with what it had).
        with pa.memory_map(local) if os.path.getsize(local) else pa.BufferReader(b"") as src, \
                fs.open_output_stream(path) as dst:
            dst.write(src.read_buffer())
        kept = fs.get_file_info(path).size
    except OSError as e:
        raise failure(resolve(loc), e) from None
    written = os.path.getsize(local)
    if kept != written:
        # Seen with moto and no credentials: an unsigned upload stored with its chunk framing.
        try:
            fs.delete_file(path)  # nothing that would not read back is left
        except OSError:
            pass
        raise DataError(f"{resolve(loc)}: the store kept {kept} bytes of the {written} written, "
                        "so the file would not read back. Check the credentials "
                        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials) "
                        "on every machine that writes.")


def move(src: str, dst: str) -> None:
    """Rename a file (local: atomic; S3: copy, then delete)."""
    fs, a = filesystem(src)
    _, b = filesystem(dst)
    try:
        fs.move(a, b)
    except OSError as e:
        raise failure(resolve(src), e) from None


__all__ = ["check_bucket", "configure", "endpoint", "exists", "failure", "files",
           "filesystem", "info", "inside", "is_dir", "is_file", "is_remote", "join", "listdir",
           "makedirs", "move", "name", "open_input", "parent", "read_bytes", "read_text",
           "remove", "resolve", "upload", "walk", "worker_env"]
