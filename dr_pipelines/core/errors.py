"""One error tree for the whole product: every failure the domain can name is a `DrError`.

The command line prints a `DrError`'s message (no traceback) and exits with its `exit_code`; the
Dagster layer turns it into a `dg.Failure` with the same message. Anything else is a bug and keeps
its full stack trace. The exit code comes from the class (isinstance), never from its name.
"""

from __future__ import annotations


class DrError(Exception):
    """A failure the product names: the message says what happened and what to do."""

    exit_code = 1


class UsageError(DrError):
    """The request itself is wrong (bad config, bad arguments): fix it and run again."""

    exit_code = 2


class RunFailed(DrError):
    """A job run from the shell failed; the message and exit code are the failing step's own."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code for a named failure; None for a bug (which keeps its traceback)."""
    return exc.exit_code if isinstance(exc, DrError) else None
