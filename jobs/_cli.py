"""What every job shares: known failures become one clear line on stderr and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from gatrep.config import ConfigError
from gatrep.io import InputError, StageError
from gatrep.schemas import SchemaError

# Errors that describe bad input or a bad invocation: no traceback, the message says what to do.
# FileNotFoundError covers backbones' WeightsNotFound without importing torch into every job.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, InputError, StageError, SchemaError, FileNotFoundError, KeyError, FileExistsError,
)


def run(job: Callable[[], int | None], extra: tuple[type[BaseException], ...] = ()) -> int:
    """Call `job`; a user error prints 'error: ...' and returns 2 instead of a traceback."""
    try:
        return int(job() or 0)
    except USER_ERRORS + extra as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
