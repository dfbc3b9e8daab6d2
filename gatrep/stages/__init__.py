"""The pipeline's stages, one module each with one interface: NAME, CONFIG (its config class), DESCRIPTION,
`run(cfg) -> manifest` and `summary(manifest) -> str`.

Only stage modules read or write stage directories (through gatrep.io and the contract in
gatrep.schemas); the algorithms they call take and return arrays. Ray is touched by the stage modules and
by gatrep.shard (the graph's cells as Ray tasks, on arrays); a stage that needs Ray calls `init_ray()`,
the one place Ray is started.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

# In pipeline order; `gatrep <name>` and `python -m jobs.<name>` run each.
NAMES = ("embed", "graph", "train", "index", "query", "evaluate", "report")


def module(name: str) -> ModuleType:
    """The stage module called `name` (see NAMES)."""
    return importlib.import_module(f"gatrep.stages.{name}")


def init_ray() -> None:
    """Join the Ray cluster that RAY_ADDRESS names (`ray job submit` sets it), else start a local instance,
    unless this process already has one (a test, the pipeline, a notebook): then that one is used. The
    instance lives as long as the process."""
    import ray

    if not ray.is_initialized():
        ray.init()


def fit_cpus(actors: int, actor_cpus: float, task_cpus: float) -> tuple[float, float]:
    """CPU requests for `actors` actors of `actor_cpus` each beside tasks of `task_cpus`, scaled down together
    when the Ray instance has fewer CPUs than that (a laptop, a 1- or 2-CPU node): Ray Data starts its actors
    first, and an actor or task that asks for more than is left waits forever. A cluster that shows no CPUs
    yet (an autoscaler starting from zero) gets them unscaled. Returns (CPUs per actor, CPUs per task)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    need = actors * actor_cpus + task_cpus
    if total <= 0 or need <= total:
        return actor_cpus, task_cpus
    scale = total / need
    return round(actor_cpus * scale, 3), round(task_cpus * scale, 3)


def kill_once(marker: str | None) -> None:
    """Fault injection for tests: end this process at once, like an OOM kill or a lost node (no cleanup runs),
    the first time it is called with `marker`, a file path that records that it happened. A no-op for None."""
    if marker is None or os.path.exists(marker):
        return
    open(marker, "w").close()
    os._exit(1)
