"""`gatrep <job> [flags]` (or `python -m jobs <job>`): run one of the jobs by name."""

from __future__ import annotations

import importlib
import importlib.util
import sys

JOBS = ("embed", "graph", "train", "index", "query", "evaluate", "pipeline", "reindex", "report")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    available = [job for job in JOBS if importlib.util.find_spec(f"jobs.{job}") is not None]
    if not argv or argv[0] not in available:
        print(f"usage: gatrep {{{','.join(available)}}} [flags]   (gatrep <job> --help for a job's flags)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(f"jobs.{argv[0]}").main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
