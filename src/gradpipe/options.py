"""One declaration of the options: every field of a config dataclass carries its flag, type,
default, help, choices and range, and the click options, the job files (TOML), the checks
and the --resume comparison are all derived from it. Adding an option is one field.

A value is parsed by `parse` whether it came from the command line (a string) or from a job
file (a TOML value), and checked by `check` in the config's __post_init__, so a bad value
gets the same message from either, and from Python.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import click

from .errors import ConfigError

# Which commands take an option.
ALL = ("train", "grad", "check", "explain")
RUNS = ("train", "grad")
TRAIN = ("train",)


@dataclass(frozen=True)
class Option:
    """How one config field is spelled, parsed, checked and compared on --resume."""

    help: str
    kind: str = "str"  # str | int | float | bool | choice | names | sizes | batch | url
    choices: tuple[str, ...] = ()
    low: float | None = None  # smallest allowed value
    low_open: bool = False  # True: the value must be above `low`
    high: float | None = None
    high_open: bool = False
    optional: bool = False  # None is allowed (and is the meaning of "not set")
    commands: tuple[str, ...] = ALL
    resume: str = "same"  # same: as the run was started | grow: may grow | free: may differ
    metavar: str | None = None
    as_flag: bool = True  # a --flag of the commands above (False: an argument, or set by code)
    in_job: bool = True  # a key of job files and of run.json's config


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field declared as an option."""
    return field(default=default, metadata={"option": Option(help=help, **kw)})


def options(cls: type) -> dict[str, Option]:
    """The declared options of a config dataclass, in field order."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(cls)
            if "option" in f.metadata}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def _bad(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{flag(name)} {_show(value)}: must be {expected}")


def parse(name: str, option: Option, value: Any) -> Any:
    """A flag's string or a job file's TOML value -> the field's value, or a ConfigError."""
    kind = option.kind
    if value is None:
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise _bad(name, value, "true or false")
    if kind == "int" or (kind == "batch" and value != "full"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _bad(name, value, "'full' or a number of rows" if kind == "batch" else
                   "an integer")
    if kind == "batch":
        return None  # "full"
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _bad(name, value, "a number")
    if kind == "names":
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise _bad(name, value, "comma-separated names, or a list of strings")
    if kind == "sizes":
        if isinstance(value, str):
            if value.strip() in ("", "none"):
                return ()
            try:
                return tuple(int(v) for v in value.split(","))
            except ValueError:
                pass
        elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                             for v in value):
            return tuple(value)
        raise _bad(name, value, "comma-separated layer sizes, e.g. 64,32")
    if not isinstance(value, str):
        raise _bad(name, value, "a string")
    if kind == "url" and "://" not in value:
        raise _bad(name, value, "a URL, such as http://127.0.0.1:9000")
    return value


def _allowed(option: Option) -> str:
    lo, hi = option.low, option.high
    if lo is not None and hi is not None:
        return (f"in {'(' if option.low_open else '['}{_show(lo)}, {_show(hi)}"
                f"{')' if option.high_open else ']'}")
    if lo is not None:
        return f"{'>' if option.low_open else '>='} {_show(lo)}"
    return f"{'<' if option.high_open else '<='} {_show(hi)}"


def check(config: Any) -> None:
    """Every field's value within its declared choices and range (a ConfigError otherwise)."""
    for name, option in options(type(config)).items():
        check_value(name, option, getattr(config, name))


def check_values(cls: type, **values: Any) -> None:
    """Check values of some of `cls`'s declared options, for a config that takes them from
    `cls` (evaluate, predict, scores and influence take TrainConfig's --workers, --address,
    --block-rows and --memory-budget): the same checks and messages."""
    declared = options(cls)
    for name, value in values.items():
        check_value(name, declared[name], value)


def check_paths(**paths: str | None) -> None:
    """Refuse an empty path (given, but "": it would mean the current folder)."""
    for name, value in paths.items():
        if value is not None and not value.strip():
            raise ConfigError(f"{flag(name)} is an empty path")


def check_value(name: str, option: Option, value: Any) -> None:
    """One value within its option's declared choices and range (a ConfigError otherwise)."""
    if value is None:
        if option.optional or option.kind == "batch":
            return
        raise _bad(name, "none", "set")
    if option.choices and value not in option.choices:
        raise _bad(name, value, f"one of {', '.join(option.choices)}")
    if option.low is None and option.high is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise _bad(name, value, f"a finite number {_allowed(option)}")
        low_bad = option.low is not None and (
            v <= option.low if option.low_open else v < option.low)
        high_bad = option.high is not None and (
            v >= option.high if option.high_open else v > option.high)
        if low_bad or high_bad:
            raise _bad(name, value, _allowed(option))


def _help(option: Option, default: Any, name: str = "") -> str:
    text = option.help  # the choices show in the metavar
    if option.kind == "bool":
        if default is True:  # spelled --NAME/--no-NAME: say which is the default
            text += f" Default: {flag(name)}."
    elif option.kind == "batch" and default is None:
        text += " Default: full."
    elif default is not None and default != ():
        text += f" Default: {_show(default)}."
    return text


def _metavar(option: Option) -> str:
    return option.metavar or ("|".join(option.choices) if option.choices else
                              option.kind.upper())


def click_options(cls: type, command: str) -> Callable[[Callable], Callable]:
    """Decorator adding a click option for every field of `cls` that `command` takes.

    Every option defaults to None ("not given"), so that a job file, the run being resumed,
    or the field's default fills it; values stay strings until `parse`.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}

    def decorate(f: Callable) -> Callable:
        for name, option in reversed(options(cls).items()):
            if not option.as_flag or command not in option.commands:
                continue
            text = _help(option, defaults[name], name)
            if option.kind == "bool":
                spelled = (flag(name) if defaults[name] is False
                           else f"{flag(name)}/--no-{name.replace('_', '-')}")
                f = click.option(spelled, name, is_flag=True, default=None, help=text)(f)
            else:
                f = click.option(flag(name), name, default=None, metavar=_metavar(option),
                                 help=text)(f)
        return f

    return decorate


def click_option(cls: type, name: str) -> Callable[[Callable], Callable]:
    """One declared option of `cls` as a click option of a command whose config is not `cls`:
    its flag, metavar, help and default; the value is parsed and checked by the
    declaration, so a bad one gets the message it gets in `cls`."""
    option = options(cls)[name]
    default = {f.name: f.default for f in dataclasses.fields(cls)}[name]

    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return default
        value = parse(name, option, value)
        check_value(name, option, value)
        return value

    assert option.kind != "bool", "flags are spelled by click_options"
    return click.option(flag(name), name, default=None, metavar=_metavar(option),
                        help=_help(option, default, name), callback=convert)


def parse_values(cls: type, raw: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Parse {field: flag string or TOML value}; unknown keys are refused, listing the known."""
    declared = {n: o for n, o in options(cls).items() if o.in_job}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in declared:
            raise ConfigError(f"{where}unknown key {key!r}. Known keys: "
                              f"{', '.join(sorted(declared))}.")
        try:
            out[name] = parse(name, declared[name], value)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
    return out


def build(cls: type, values: dict[str, Any], sources: dict[str, str] | None = None) -> Any:
    """cls(**values); a ConfigError about a value from a job file names that file."""
    try:
        return cls(**values)
    except ConfigError as e:
        for name, where in (sources or {}).items():
            if str(e).startswith(flag(name) + " "):
                raise ConfigError(f"{where}: {e}") from None
        raise


def resume_rules(cls: type, command: str = "train") -> str:
    """What --resume lets change, from the declarations: '--steps may grow; --workers, ...
    may change'."""
    declared = [(n, o) for n, o in options(cls).items()
                if o.as_flag and command in o.commands and n not in ("resume", "overwrite")]
    grow = [flag(n) for n, o in declared if o.resume == "grow"]
    free = [flag(n) for n, o in declared if o.resume == "free"]
    return (f"{', '.join(grow)} may grow" if grow else "") + (
        f"; {', '.join(free)} may change" if free else "")


def resume_conflict(cls: type, old: dict[str, Any], given: dict[str, Any]) -> str | None:
    """The first given option that the run being resumed does not allow, as a message."""
    declared = options(cls)
    for name, value in given.items():
        option = declared.get(name)
        if option is None or option.resume == "free" or name not in old:
            continue
        before = old[name]
        now = list(value) if isinstance(value, tuple) else value
        if option.resume == "grow" and now is not None and before is not None and now >= before:
            continue
        if now != before:
            more = " (it may only grow)" if option.resume == "grow" else ""
            return (f"{flag(name)} is {_show(value)} but the run was started "
                    + (f"with {_show(before)}{more}" if before is not None else "without it"))
    return None
