"""Exceptions that mean 'the user can fix this': the CLI prints them as one line, no traceback."""
from __future__ import annotations


class GrowError(Exception):
    """A problem the user can fix: a bad budget, an existing run folder, a diverged run, ..."""


def user_errors() -> tuple[type[BaseException], ...]:
    """GrowError plus the errors of the data and architecture readers."""
    from grow.data import DataError
    from grow.spec import SpecError
    return (GrowError, DataError, SpecError)
