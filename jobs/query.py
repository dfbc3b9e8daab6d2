"""`python -m jobs.query`: categorize query images and retrieve their matches -> the `results` table."""

from __future__ import annotations

from gatrep import config
from gatrep.config import QueryConfig
from jobs import _cli


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(QueryConfig, argv, "Categorize every query under --input against <--run>/<--index>.")
    from gatrep import search  # imports ray

    def job() -> None:
        print(search.summary(search.run(cfg)))

    return _cli.run(job)


if __name__ == "__main__":
    raise SystemExit(main())
