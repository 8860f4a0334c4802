"""Atomic writes: every file or folder gradpipe writes appears whole or not at all.

One scheme for all of gradpipe, on a local disk and on an object store (store.py):

- A file is written to a local temporary and then committed. Locally the temporary is a
  hidden name in the same folder (`.NAME.tmp-XXXXXXXX`) renamed onto NAME. On S3, which has
  no rename, it is a spool file uploaded whole to its final key in one write: S3 shows an
  object only once its upload completes, so a reader sees the old object, the new one or
  none, never a part.
- A folder is filled under a hidden temporary name beside it and then committed: locally
  one rename; on S3 each object is moved (copied, then deleted) into the final prefix,
  after the old folder's objects are deleted. Those moves are not one atomic step: a crash
  inside them (a few requests per file) can leave the new folder partly moved, which the
  next write of it with --overwrite replaces. The run folder does not depend on this: its
  commit records are its checkpoints' state.json, written last (recorder.py).

A crash or Ctrl-C leaves at most a temporary, which no reader lists (hidden names are
skipped) and `sweep` removes.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

from . import store
from .errors import ConfigError

_TMP = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")


def tmp_name(loc: str | Path) -> str:
    """A fresh temporary name beside `loc`: .NAME.tmp-XXXXXXXX."""
    loc = store.resolve(str(loc))
    return store.join(store.parent(loc), f".{store.name(loc)}.tmp-{uuid.uuid4().hex[:8]}")


def is_tmp(loc: str | Path) -> bool:
    """True for a name made by tmp_name."""
    return bool(_TMP.match(store.name(str(loc))))


class Staged:
    """A file being written: `tmp` is a local path to write; `commit` puts it at `loc`
    whole, `abort` drops it."""

    def __init__(self, loc: str | Path) -> None:
        self.loc = store.resolve(str(loc))
        self.remote = store.is_remote(self.loc)
        if self.remote:
            fd, tmp = tempfile.mkstemp(prefix="gradpipe-", suffix=".part")
            os.close(fd)
            self.tmp = Path(tmp)
        else:
            store.makedirs(store.parent(self.loc))
            self.tmp = Path(tmp_name(self.loc))

    def commit(self) -> None:
        if self.remote:
            try:
                store.upload(str(self.tmp), self.loc)
            finally:
                self.tmp.unlink(missing_ok=True)
        else:
            os.replace(self.tmp, self.loc)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(loc: str | Path) -> Iterator[Path]:
    """Yield a local temporary path to write; on success it is committed to `loc`, else
    removed."""
    staged = Staged(loc)
    try:
        yield staged.tmp
        staged.commit()
    finally:
        staged.abort()


@contextlib.contextmanager
def atomic_dir(loc: str | Path) -> Iterator[str]:
    """Yield a temporary folder (a location beside `loc`) to fill; on success it replaces
    `loc` (an old folder of that name is moved aside first and deleted only after the
    rename; on S3 its objects are deleted, then the new ones moved in), else it is
    removed."""
    loc = store.resolve(str(loc))
    tmp = tmp_name(loc)
    store.makedirs(tmp)
    try:
        yield tmp
        if store.is_remote(loc):
            _commit_prefix(tmp, loc)
        elif os.path.exists(loc):
            old = tmp_name(loc)
            os.rename(loc, old)
            try:
                os.rename(tmp, loc)
            except OSError:
                os.rename(old, loc)
                raise
            store.remove(old)
        else:
            os.rename(tmp, loc)
    finally:
        store.remove(tmp)


def _commit_prefix(tmp: str, loc: str) -> None:
    store.remove(loc)
    # Markers (_predictions.json, _scores.json) last: a folder with its marker is complete.
    for rel in sorted(store.walk(tmp), key=lambda rel: (store.name(rel).startswith("_"), rel)):
        store.move(store.join(tmp, rel), store.join(loc, rel))


def sweep(folder: str | Path) -> int:
    """Remove the temporaries a killed writer left anywhere under `folder`; returns how many."""
    folder = store.resolve(str(folder))
    if not store.is_remote(folder):
        found = [str(p) for p in Path(folder).rglob(".*.tmp-*") if is_tmp(p)]
    else:
        tops = set()
        for rel in store.walk(folder):
            parts = rel.split("/")
            for i, part in enumerate(parts):  # the topmost temporary on the path
                if _TMP.match(part):
                    tops.add(store.join(folder, *parts[:i + 1]))
                    break
        found = list(tops)
    for loc in sorted(found, key=len, reverse=True):
        store.remove(loc)
    return len(found)


def refuse_bucket_root(out: str, name: str, example: str = "runs/NAME") -> None:
    """An output that is a whole bucket (s3://bucket): replacing it would delete the bucket."""
    out = store.resolve(str(out))
    if store.is_remote(out) and "/" not in out.split("://", 1)[1].rstrip("/"):
        raise ConfigError(f"{name}: a bucket, not a folder in it; write to a prefix such as "
                          f"{out.rstrip('/')}/{example}")


def check_replaceable(out: str | Path, overwrite: bool, *, name: str,
                      foreign: Callable[[str], str | None], also: str = "") -> None:
    """Whether a command may write the folder `out`: a new or empty folder, yes; one that
    holds files only with `overwrite`, and only if `foreign(out)` finds nothing there that
    the command did not write (it returns what, or None). `name` is how the user called it,
    `also` another way out for the message (", --resume to continue it")."""
    out = store.resolve(str(out))
    refuse_bucket_root(out, name)
    store.check_bucket(out)
    if store.is_file(out):
        raise ConfigError(f"{name}: exists and is not a folder. Choose another folder.")
    if not store.listdir(out):
        return
    if not overwrite:
        raise ConfigError(f"{name}: folder exists and is not empty. Pass --overwrite to replace "
                          f"it{also}, or choose another folder.")
    reason = foreign(out)
    if reason is not None:
        raise ConfigError(f"{name}: {reason}; refusing to replace it with --overwrite.")
