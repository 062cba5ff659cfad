"""Error types whose message is shown to the user as one line (see run.py)."""


class CprecError(Exception):
    """Base class: a user-facing problem with a one-line message naming the fix."""


class ConfigError(CprecError):
    """An invalid config value or override key."""


class DataError(CprecError):
    """A missing, unreadable or malformed dataset."""


class WorkdirError(CprecError):
    """A workdir that belongs to another experiment, or a corrupted checkpoint."""
