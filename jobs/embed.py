"""`python -m jobs.embed`: images -> the `embeddings` table (Parquet, one row per input file)."""

from __future__ import annotations

import sys
import time

from gatrep import backbones, config
from gatrep.config import EmbedConfig
from jobs import _cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--list" in argv:
        for name in backbones.names():
            print(f"{name:14s} {backbones.get(name).description}")
        return 0
    cfg = config.parse(EmbedConfig, argv, "Embed every image under --input into <--run>/<--stage>.")
    from gatrep import embed  # imports ray: kept out of --help and --list

    def job() -> None:
        start = time.perf_counter()
        manifest = embed.run(cfg)
        print(embed.summary(manifest, time.perf_counter() - start))

    return _cli.run(job, extra=(embed.StageMismatch,))


if __name__ == "__main__":
    raise SystemExit(main())
