"""`python -m jobs.train`: `graph` + `embeddings` -> a GAT-AE `model` (Ray Train, DDP) and the `latents` table."""

from __future__ import annotations

import sys
import time

from gatrep import config
from gatrep.config import TrainConfig
from jobs import _cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = config.parse(TrainConfig, argv, "Train the graph autoencoder on <--run>/graph; write model and latents.")
    import ray  # kept out of --help

    from gatrep import knn, models, train

    def job() -> None:
        start = time.perf_counter()
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init()  # joins the cluster named by RAY_ADDRESS, else starts a local one
        try:
            manifests = train.run(cfg)
        finally:
            if started_ray:
                ray.shutdown()
        print(train.summary(manifests, time.perf_counter() - start))

    return _cli.run(job, extra=(knn.GraphInputError, train.CheckpointMismatch, models.ModelLoadError))


if __name__ == "__main__":
    raise SystemExit(main())
