"""The one base class of errors a user can fix: the command line prints them as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad flag or a missing or stale stage: the message says what was wrong and what to do.

    Anything else that escapes a job is a bug, and the command line shows its traceback."""
