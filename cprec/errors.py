"""Error types whose message is shown to the user as one line (see run.py)."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

# The exit status of every command-line entry point for a problem the user can fix (argparse's too).
USER_ERROR_STATUS = 2


class CprecError(Exception):
    """Base class: a user-facing problem with a one-line message naming the fix."""


class ConfigError(CprecError):
    """An invalid config value or override key."""


class DataError(CprecError):
    """A missing, unreadable or malformed dataset."""


class WorkdirError(CprecError):
    """A workdir that belongs to another experiment, or a corrupted checkpoint."""


class EvaluationError(CprecError):
    """Scores that cannot be ranked (NaN or infinite), or an evaluation that cannot run."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For command-line entry points: a CprecError ends the program with ``error: <message>`` on
    stderr and exit status 2 (``SystemExit.code``), the same for every command."""
    try:
        yield
    except CprecError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_STATUS) from None
