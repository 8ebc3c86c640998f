"""The user's mistakes, as one error type.

`UserError` is raised for anything the user can fix (a config value, a missing file, a
weights file of the wrong shape): `vgg-jax` and `train.py` print its message in one line
and exit with status 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib


class UserError(ValueError):
    """A mistake in what the user asked for; the message says what to change."""


class NotFound(UserError, FileNotFoundError):
    """A file, directory or dataset the user named does not exist (or is not prepared)."""


class MissingDependency(UserError, ImportError):
    """An optional package the asked-for job needs is not installed: the message names the
    extra to install."""


def closest(value: str, allowed, n: int = 3) -> list[str]:
    return difflib.get_close_matches(str(value), [str(a) for a in allowed], n=n, cutoff=0.5)


def check_choice(what: str, value, allowed) -> None:
    """UserError naming `what`, the allowed values and the closest ones, unless allowed."""
    if value in allowed:
        return
    near = closest(value, allowed)
    hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
    raise UserError(f"unknown {what} {value!r}; choose one of "
                    f"{', '.join(map(str, allowed))}{hint}")
