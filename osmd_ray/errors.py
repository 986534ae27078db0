"""Every error the package raises on purpose, and how a failure is shown to a user.

The command line turns the input errors below (a bad config, dataset, spec, run folder,
deployment export or object store) into a one-line message and exit code 2; anything else
is a failed run, shown by its root cause (:func:`describe`), exit code 1.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config problem; ``key`` is the dotted key at fault ("" when it is the file as a whole)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray ships exceptions between processes by pickling; the default reduce would call
        # ConfigError(message) and lose the key.
        return (type(self), (str(self), self.key))


class SpecError(ConfigError):
    """A compare spec problem; ``key`` is the spec key at fault (e.g. ``variants[2].name``)."""


class SweepSpecError(ConfigError):
    """A sweep spec problem; ``key`` is the spec key at fault (e.g. ``space.train.lr``)."""


class DataError(Exception):
    """A dataset (or the input to write one) breaks the contract; the message says where."""


class StorageError(OSError):
    """An object store that cannot be used: the message names the bucket and what to check."""


class DeployError(Exception):
    """An export that cannot be loaded or an input the deployed model cannot take."""


class RunError(RuntimeError):
    """A run could not start or finish; the message says why and what to do."""


class NonFiniteLossError(RuntimeError):
    """A loss term or the weights became NaN or inf; raised on every rank so none is left
    waiting."""


INPUT_ERRORS = (ConfigError, DataError, DeployError, RunError, StorageError)
"""What the command line reports as bad input (exit code 2) rather than a failed run."""


def root_cause(error: BaseException) -> BaseException:
    """The innermost cause of ``error``: Ray wraps a worker's exception (``cause``) in its own
    errors, and those in others (``__cause__``); what the user needs is the first one."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        nxt = error.__cause__ or getattr(error, "cause", None)
        if not isinstance(nxt, BaseException):
            break
        error = nxt
    return error


def describe(error: BaseException, one_line: bool = True) -> str:
    """``Type: message`` of the root cause; ``one_line`` folds its whitespace (a table cell,
    a progress line) instead of keeping the message as it was written."""
    cause = root_cause(error)
    text = " ".join(str(cause).split()) if one_line else str(cause)
    return f"{type(cause).__name__}: {text}"
