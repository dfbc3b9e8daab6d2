"""`python -m jobs.reindex`: see `gatrep.cli` and the job's `--help`."""
from gatrep.cli import run_job

if __name__ == "__main__":
    raise SystemExit(run_job("reindex"))
