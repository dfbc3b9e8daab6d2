"""A k-NN graph built in shards: k-means cells with overlap, one Ray task per cell, candidate lists merged per node."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import ray

from gatrep import knn
from gatrep.vectors import PAD, approximate_knn, block_rows, exact_knn, normalise

# Rows of the sample k-means is fitted on: enough for stable centres, small next to N.
KMEANS_SAMPLE = 20_000
# Bytes one cell row costs in a task beyond its vector: pynndescent's graph, heap and search trees at build_k = 30.
# An estimate with room to spare, not yet measured (bench/graph.py should measure a task's peak memory).
ROW_OVERHEAD = 1_024
# Fraction of a task's share of cluster memory that its cell may fill.
MEMORY_FRACTION = 0.5


def choose_partitions(n: int, dim: int, memory_bytes: float, cpus: float, overlap: int = 2) -> int:
    """Partitions such that one cell (n * overlap / partitions rows of `dim` float32 plus pynndescent's
    overhead) fits in MEMORY_FRACTION of one CPU's share of `memory_bytes`; 1 when the whole set fits in
    one build. Refuses (ValueError) n, dim or memory that are not positive."""
    if n <= 0 or dim <= 0 or memory_bytes <= 0:
        raise ValueError(f"choose_partitions needs positive n, dim and memory, got {n}, {dim}, {memory_bytes}")
    budget = MEMORY_FRACTION * memory_bytes / max(cpus, 1.0)
    row_bytes = 4 * dim + ROW_OVERHEAD
    if n * row_bytes <= budget:
        return 1
    return max(2, math.ceil(n * overlap * row_bytes / budget))


def cluster_partitions(n: int, dim: int, overlap: int = 2) -> int:
    """`choose_partitions` for the memory and CPUs of the Ray instance this process is connected to."""
    resources = ray.cluster_resources()
    return choose_partitions(n, dim, float(resources.get("memory", 0)) or float(4 << 30),
                             float(resources.get("CPU", 1)), overlap)


def assign_cells(unit: np.ndarray, partitions: int, overlap: int = 2, seed: int = 0,
                 sample: int = KMEANS_SAMPLE) -> np.ndarray:
    """[n, overlap] cell ids of every row, most similar centre first: MiniBatchKMeans on `sample` random
    rows gives the centres (unit length), each row goes to its `overlap` most similar ones by cosine.
    Refuses (ValueError) partitions < 1, overlap not in 1..partitions, or more partitions than rows."""
    from sklearn.cluster import MiniBatchKMeans

    n = len(unit)
    if partitions < 1 or not 1 <= overlap <= partitions or partitions > n:
        raise ValueError(f"{n} rows cannot go to {partitions} cells with overlap {overlap}")
    if partitions == 1:
        return np.zeros((n, 1), dtype=np.int64)
    rng = np.random.default_rng(seed)
    picked = rng.choice(n, size=min(n, max(sample, 50 * partitions)), replace=False)
    kmeans = MiniBatchKMeans(n_clusters=partitions, random_state=seed, n_init=3, batch_size=4096)
    centres = normalise(kmeans.fit(unit[picked]).cluster_centers_)
    cells = np.empty((n, overlap), dtype=np.int64)
    step = block_rows(partitions)
    for start in range(0, n, step):
        scores = unit[start:start + step] @ centres.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :overlap]
        cells[start:start + step] = top
    return cells


def cell_members(cells: np.ndarray, partitions: int) -> list[np.ndarray]:
    """Row ids (sorted) of each of the `partitions` cells, from `assign_cells`' [n, overlap] table."""
    flat_rows = np.repeat(np.arange(len(cells)), cells.shape[1])
    flat_cells = cells.reshape(-1)
    order = np.argsort(flat_cells, kind="stable")
    bounds = np.searchsorted(flat_cells[order], np.arange(partitions + 1))
    return [np.sort(flat_rows[order[bounds[c]:bounds[c + 1]]]) for c in range(partitions)]


def merge_candidates(n: int, k: int, lists: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """([n, k] neighbours, [n, k] similarities): each node's k most similar distinct neighbours among the
    candidates of every cell it is in, self excluded, best first, PAD / NaN where fewer than k.

    `lists` holds one (members, ids, sims) per cell: members [m] are global row ids, ids [m, k'] global
    neighbour ids (PAD allowed), sims [m, k'] their cosines. A neighbour met in two cells counts once."""
    seen = np.zeros(n, dtype=np.int64)
    per_node = np.bincount(np.concatenate([m for m, _, _ in lists] or [np.zeros(0, np.int64)]), minlength=n)
    width = int(max(per_node.max(initial=0), 1)) * max((ids.shape[1] for _, ids, _ in lists), default=1)
    cand_ids = np.full((n, width), PAD, dtype=np.int64)
    cand_sims = np.full((n, width), np.nan, dtype=np.float32)
    for members, ids, sims in lists:
        cols = seen[members][:, None] + np.arange(ids.shape[1])
        cand_ids[members[:, None], cols] = ids
        cand_sims[members[:, None], cols] = sims
        seen[members] += ids.shape[1]
    return _best_distinct(cand_ids, cand_sims, k)


def _best_distinct(cand_ids: np.ndarray, cand_sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best distinct, non-self, non-PAD candidates of each row (see merge_candidates)."""
    own = np.arange(len(cand_ids))[:, None]
    by_id = np.argsort(cand_ids, axis=1, kind="stable")
    ids = np.take_along_axis(cand_ids, by_id, axis=1)
    sims = np.take_along_axis(cand_sims, by_id, axis=1)
    repeat = np.zeros(ids.shape, dtype=bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    drop = repeat | (ids == own) | (ids == PAD) | np.isnan(sims)
    score = np.where(drop, -np.inf, sims)
    best = np.argsort(-score, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(~drop, best, axis=1)
    neighbours = np.where(kept, np.take_along_axis(ids, best, axis=1), PAD)
    similarities = np.where(kept, np.take_along_axis(sims, best, axis=1), np.nan).astype(np.float32)
    if neighbours.shape[1] < k:
        pad = ((0, 0), (0, k - neighbours.shape[1]))
        neighbours = np.pad(neighbours, pad, constant_values=PAD)
        similarities = np.pad(similarities, pad, constant_values=np.nan)
    return neighbours, similarities


@ray.remote
def _cell_knn(rows: np.ndarray, k: int, exact_below: int, approx: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One cell's k-NN in cell-local ids: exact below `exact_below` rows, else pynndescent."""
    if len(rows) < exact_below:
        return exact_knn(rows, k)
    return approximate_knn(rows, k, **approx)


def sharded_knn(unit: np.ndarray, k: int, partitions: int, exact_below: int = 4096, overlap: int = 2,
                seed: int = 0, n_jobs: int = -1, **approx: Any) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(neighbours, similarities, counts): the cosine k-NN graph of the unit rows, built in `partitions` cells.

    One partition is knn.grouped_knn over a single group, today's single build. Otherwise each row goes to
    its `overlap` nearest k-means cells (capped at partitions - 1: with 2 partitions and overlap 2 each cell
    would be everything), each cell's rows are put in the object store once and built by their own Ray task
    (exact below `exact_below` rows, else pynndescent with `approx`), and each node keeps the k best distinct
    candidates of its cells. `counts` are grouped_knn's (exact_groups / approximate_groups count cells) plus
    partitions (non-empty cells), overlap, smallest_cell and largest_cell. Needs Ray initialised when
    partitions > 1. Refuses (ValueError) partitions < 1 or more partitions than rows.
    """
    if partitions == 1:
        groups = np.zeros(len(unit), dtype=np.int64)
        return knn.grouped_knn(unit, groups, k, exact_below, n_jobs=n_jobs, seed=seed, **approx)
    overlap = max(1, min(overlap, partitions - 1))
    cells = assign_cells(unit, partitions, overlap, seed)
    members = [m for m in cell_members(cells, partitions) if len(m)]
    task_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // len(members))
    options = {**approx, "seed": seed, "n_jobs": task_cpus if n_jobs == -1 else n_jobs}
    futures = [_cell_knn.options(num_cpus=task_cpus).remote(ray.put(unit[m]), k, exact_below, options)
               for m in members]
    lists = []
    for rows, future in zip(members, futures, strict=True):
        local, sims = ray.get(future)
        lists.append((rows, np.where(local == PAD, PAD, rows[np.where(local == PAD, 0, local)]), sims))
    neighbours, similarities = merge_candidates(len(unit), k, lists)
    sizes = [len(m) for m in members]
    counts = {"groups": 1, "exact_groups": sum(s < exact_below for s in sizes),
              "approximate_groups": sum(s >= exact_below for s in sizes),
              "groups_smaller_than_k_plus_1": int(len(unit) <= k), "partitions": len(members),
              "overlap": overlap, "largest_cell": max(sizes), "smallest_cell": min(sizes)}
    return neighbours, similarities, counts
