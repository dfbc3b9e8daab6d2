"""The pipeline's stages, one module each with one interface: NAME, CONFIG (its config class), DESCRIPTION,
`run(cfg) -> manifest` and `summary(manifest) -> str`.

Only stage modules read or write stage directories (through gatrep.io and the contract in
gatrep.schemas) or touch Ray; the algorithms they call take and return arrays. A stage that needs Ray
calls `init_ray()`, the one place Ray is started.
"""

from __future__ import annotations

import importlib
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
