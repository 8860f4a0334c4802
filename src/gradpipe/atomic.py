"""Atomic writes: every file or folder gradpipe writes appears whole or not at all.

One scheme for all of gradpipe: write under a hidden temporary name in the same folder
(`.NAME.tmp-XXXXXXXX`), then rename onto NAME. A crash or Ctrl-C leaves at most such a
temporary, which no reader lists (hidden names are skipped) and `sweep` removes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError

_TMP = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")


def tmp_name(path: str | Path) -> Path:
    """A fresh temporary name beside `path`: .NAME.tmp-XXXXXXXX."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def is_tmp(path: str | Path) -> bool:
    """True for a name made by tmp_name."""
    return bool(_TMP.match(Path(path).name))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path` (an old folder of that
    name is moved aside first and deleted only after the rename), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = tmp_name(path)
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(old, path)
                raise
            _remove(old)
        else:
            os.rename(tmp, path)
    finally:
        _remove(tmp)


def sweep(folder: str | Path) -> int:
    """Remove the temporaries a killed writer left anywhere under `folder`; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = [p for p in folder.rglob(".*.tmp-*") if is_tmp(p)]
    for p in sorted(found, key=lambda p: len(p.parts), reverse=True):
        _remove(p)
    return len(found)


def check_replaceable(out: str | Path, overwrite: bool, *, name: str,
                      foreign: Callable[[Path], str | None], also: str = "") -> None:
    """Whether a command may write the folder `out`: a new or empty folder, yes; one that
    holds files only with `overwrite`, and only if `foreign(out)` finds nothing there that
    the command did not write (it returns what, or None). `name` is how the user called it,
    `also` another way out for the message (", --resume to continue it")."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{name}: exists and is not a folder. Choose another folder.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{name}: folder exists and is not empty. Pass --overwrite to replace "
                          f"it{also}, or choose another folder.")
    reason = foreign(out)
    if reason is not None:
        raise ConfigError(f"{name}: {reason}; refusing to replace it with --overwrite.")
