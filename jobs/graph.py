"""`python -m jobs.graph`: the `embeddings` stage -> a cosine k-NN `graph` stage (pynndescent, optional mutual k-NN)."""

from __future__ import annotations

import sys
import time

from gatrep import config, knn
from gatrep.config import GraphConfig
from jobs import _cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = config.parse(GraphConfig, argv, "Build the k-NN graph of <--run>/embeddings into <--run>/graph.")

    def job() -> None:
        start = time.perf_counter()
        manifest = knn.run(cfg)
        print(knn.summary(manifest, time.perf_counter() - start))

    return _cli.run(job, extra=(knn.GraphInputError,))


if __name__ == "__main__":
    raise SystemExit(main())
