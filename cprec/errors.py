"""Error types whose message is shown to the user as one line (see run.py)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


class CprecError(Exception):
    """Base class: a user-facing problem with a one-line message naming the fix."""


class ConfigError(CprecError):
    """An invalid config value or override key."""


class DataError(CprecError):
    """A missing, unreadable or malformed dataset."""


class WorkdirError(CprecError):
    """A workdir that belongs to another experiment, or a corrupted checkpoint."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For command-line entry points: a CprecError ends the program with its one-line message."""
    try:
        yield
    except CprecError as e:
        raise SystemExit(f"error: {e}") from None
