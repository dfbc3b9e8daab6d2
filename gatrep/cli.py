"""The command line of every job (`gatrep <job> [flags]`, `python -m jobs.<job>`): flags -> config -> run -> summary.

A user error (bad input, a missing or stale stage, a bad flag: gatrep.errors.UserError) prints one line
and exits 2; anything else is a bug and shows its traceback (exit 1).
"""

from __future__ import annotations

import importlib
import sys
import time
from types import ModuleType

from gatrep import config, stages
from gatrep.errors import UserError

JOBS = (*stages.NAMES, "pipeline", "reindex", "categorize")


def job_module(name: str) -> ModuleType:
    """The module that runs job `name`: a stage module, or gatrep.pipeline / gatrep.reindex."""
    if name in ("pipeline", "reindex"):
        return importlib.import_module(f"gatrep.{name}")
    return stages.module(name)


def run_job(name: str, argv: list[str] | None = None) -> int:
    """Parse `argv` into the job's config, run it and print its summary; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    module = job_module(name)
    if "--list" in argv and hasattr(module, "list_names"):
        print(module.list_names())
        return 0
    cfg = config.parse(module.CONFIG, argv, module.DESCRIPTION)
    start = time.perf_counter()
    try:
        result = module.run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(module.summary(result))
    print(f"  total: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`gatrep <job> [flags]`: run one job by name."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in JOBS:
        print(f"usage: gatrep {{{','.join(JOBS)}}} [flags]   (gatrep <job> --help for a job's flags)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return run_job(argv[0], argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
