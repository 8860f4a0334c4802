"""Job files (TOML) with the same options as the flags.

A job file's keys are the option names with underscores or dashes (`hidden`, `lr`,
`per_sample`, ...); `data` and `out` name paths on the machine that runs the job.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ConfigError


def _fields() -> dict[str, Any]:
    from .train import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_job_file(path: str | Path) -> dict[str, Any]:
    """Read a job file into TrainConfig field values; unknown keys and wrong types are refused."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--job {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    fields = _fields()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in ("update", "verbose") or name not in fields:
            raise ConfigError(f"{path}: unknown key {key!r}. Known keys: "
                              f"{', '.join(sorted(k for k in fields if k not in ('update', 'verbose')))}.")
        out[name] = _coerce(path, key, name, value)
    return out


_TYPES = {
    "features": "list", "target": "list", "hidden": "intlist",
    "standardize": bool, "overwrite": bool, "resume": bool,
    "lr": float, "momentum": float, "weight_decay": float, "tol": float,
    "steps": int, "seed": int, "record_every": int, "per_sample_every": int,
    "checkpoint_every": int, "block_rows": int,
}


def _coerce(path: Path, key: str, name: str, value: Any) -> Any:
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{path}: key {key!r} must be {expected}, got {value!r}")

    kind = _TYPES.get(name)
    if kind == "list":
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise wrong("a string or a list of strings")
    if kind == "intlist":
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in value):
            return tuple(value)
        raise wrong("a list of integers, e.g. [64, 32]")
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if name == "batch":
        if value == "full":
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong("'full' or a number of rows")
    if name in ("workers", "memory_budget"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if not isinstance(value, str):
        raise wrong("a string")
    return value
