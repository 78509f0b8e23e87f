"""Exceptions that mean 'the user can fix this': the CLI prints them as one line, no traceback."""
from __future__ import annotations

import re


class GrowError(Exception):
    """A problem the user can fix: a bad budget, an existing run folder, a diverged run, ..."""


def user_errors() -> tuple[type[BaseException], ...]:
    """GrowError plus the errors of the data and architecture readers."""
    from grow.data import DataError
    from grow.spec import SpecError
    return (GrowError, DataError, SpecError)


# scheme://user:password@host -> scheme://user:***@host; also ?password=... in query strings
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@'\"]*:)[^\s/'\"]*(?P<at>@)")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|secret|token)=)[^&\s'\"]*", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """`text` with the passwords of any URLs in it replaced by ***: error lines, logs and files a
    user shares must not carry a database password (postgresql://user:pass@host/db)."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}***{m['at']}", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['head']}***", text)
