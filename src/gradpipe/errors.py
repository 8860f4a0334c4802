"""Errors meant for users: each message says where, what was found, what was expected.

`cli.py` turns any `GradpipeError` into one line on stderr and exit status 2. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


# How a warning line starts (cli.py prints them; train.py says early ones through its note).
WARNING = "gradpipe: warning: "


class GradpipeError(Exception):
    """Base class of the errors gradpipe reports to users as one line."""


class DataError(GradpipeError):
    """The dataset is missing, unreadable or does not fit the model."""


class ConfigError(GradpipeError):
    """An option, job file or run folder has a value outside what is allowed."""


class JobError(GradpipeError):
    """A Ray cluster or job could not be reached, submitted or followed."""


class DivergenceError(GradpipeError):
    """Training produced a non-finite loss or gradient."""


class RunInterrupted(GradpipeError):
    """The user stopped a run (Ctrl-C); its checkpoints remain for --resume."""


def lookup(table: dict[str, T], name: str, what: str) -> T:
    """table[name]; an unknown name raises a ConfigError listing the valid ones."""
    try:
        return table[name]
    except KeyError:
        raise ConfigError(
            f"unknown {what} {name!r}. Choose one of: {', '.join(sorted(table))}.") from None
