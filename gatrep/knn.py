"""k-NN graphs over unit vectors: one graph per group (exact or pynndescent), mutual k-NN, recall check."""

from __future__ import annotations

from typing import Any

import numpy as np

from gatrep.errors import UserError
from gatrep.vectors import PAD, approximate_knn, block_rows, exact_knn, exact_topk, group_rows, similarities_of


class GraphInputError(UserError, ValueError):
    """Vectors or a graph table that cannot be turned into (or read as) a k-NN graph."""


def check_size(n: int, k: int, where: str) -> None:
    """Refuse (GraphInputError) fewer than k + 1 nodes: each node needs k neighbours besides itself."""
    if n <= k:
        raise GraphInputError(f"{where}: {n} nodes, but k={k} neighbours need at least {k + 1}; lower --k")


def mutual_knn(neighbours: np.ndarray, similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep edge i-j only when j lists i and i lists j (GRAD-Net eq. 8); dropped slots become PAD / NaN.

    Kept neighbours stay in their order (best first) and move to the front of the row. `neighbours`
    holds ids 0..n-1 of the same rows (PAD allowed). Memory is O(block x k x k).
    """
    n, k = neighbours.shape
    keep = np.zeros((n, k), dtype=bool)
    step = block_rows(k * k)
    for start in range(0, n, step):
        block = neighbours[start:start + step]
        own = np.arange(start, start + len(block))[:, None, None]
        their_lists = neighbours[np.where(block == PAD, 0, block)]  # [b, k, k]
        keep[start:start + len(block)] = (their_lists == own).any(axis=2) & (block != PAD)
    order = np.argsort(~keep, axis=1, kind="stable")
    kept = np.take_along_axis(keep, order, axis=1)
    return (np.where(kept, np.take_along_axis(neighbours, order, axis=1), PAD),
            np.where(kept, np.take_along_axis(similarities, order, axis=1), np.nan).astype(np.float32))


def grouped_knn(vectors: np.ndarray, groups: np.ndarray, k: int, exact_below: int,
                **approx: Any) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(neighbours, similarities, counts): a k-NN graph inside each group, with global node ids.

    Groups smaller than `exact_below` use exact search (for a handful of images pynndescent costs more
    than it saves); groups of k nodes or fewer get every other member and PAD. `counts` says how many
    groups went each way. `approx` goes to vectors.approximate_knn.
    """
    n = len(vectors)
    neighbours = np.full((n, k), PAD, dtype=np.int64)
    similarities = np.full((n, k), np.nan, dtype=np.float32)
    counts = {"groups": 0, "exact_groups": 0, "approximate_groups": 0, "groups_smaller_than_k_plus_1": 0}
    for members in group_rows(groups)[1]:
        local = vectors[members]
        if len(members) < exact_below:
            idx, sims = exact_knn(local, k)
            counts["exact_groups"] += 1
        else:
            idx, sims = approximate_knn(local, k, **approx)
            counts["approximate_groups"] += 1
        counts["groups"] += 1
        counts["groups_smaller_than_k_plus_1"] += int(len(members) <= k)
        neighbours[members] = np.where(idx == PAD, PAD, members[np.where(idx == PAD, 0, idx)])
        similarities[members] = sims
    return neighbours, similarities, counts


def update_knn(unit: np.ndarray, previous: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(neighbours, similarities, counts): a k-NN graph of `unit` updated from an older graph instead of rebuilt.

    `previous[i]` is node i's id in the old graph, or PAD when node i is new or its vector changed;
    `neighbours` / `similarities` are the old graph's [n_old, k] lists (old ids). Nodes that are new, or
    lost a neighbour (removed or changed), get exact lists over every node; every other node keeps its
    list, merged with the new nodes that come closer than its k-th neighbour. The cost is exact search
    of the changed nodes against all of them, O(changed x n x d): the update pays off for small changes
    (jobs.reindex rebuilds past --rebuild-above). pynndescent has no insert of its own to use instead.
    """
    n, k = len(unit), neighbours.shape[1]
    kept = previous != PAD
    old_to_new = np.full(len(neighbours), PAD, dtype=np.int64)
    old_to_new[previous[kept]] = np.flatnonzero(kept)
    old_lists = neighbours[previous[kept]]
    mapped = np.where(old_lists == PAD, PAD, old_to_new[np.where(old_lists == PAD, 0, old_lists)])
    lost = np.zeros(n, dtype=bool)
    lost[kept] = ((old_lists != PAD) & (mapped == PAD)).any(axis=1)
    out_neighbours = np.full((n, k), PAD, dtype=np.int64)
    out_similarities = np.full((n, k), np.nan, dtype=np.float32)
    out_neighbours[kept], out_similarities[kept] = mapped, similarities[previous[kept]]
    fresh = np.flatnonzero(~kept)
    repaired = np.flatnonzero(kept & ~lost)
    before = out_neighbours[repaired]
    if fresh.size and repaired.size:
        ids, sims = exact_topk(unit[repaired], unit[fresh], k)
        ids = np.where(ids == PAD, PAD, fresh[np.where(ids == PAD, 0, ids)])
        merged_ids = np.concatenate([out_neighbours[repaired], ids], axis=1)
        merged_sims = np.concatenate([out_similarities[repaired], sims], axis=1)
        order = np.argsort(-np.nan_to_num(merged_sims, nan=-np.inf), axis=1, kind="stable")[:, :k]
        out_neighbours[repaired] = np.take_along_axis(merged_ids, order, axis=1)
        out_similarities[repaired] = np.take_along_axis(merged_sims, order, axis=1)
    redo = np.flatnonzero(~kept | lost)
    if redo.size:
        out_neighbours[redo], out_similarities[redo] = exact_knn(unit, k, queries=redo)
    repaired_count = int((out_neighbours[repaired] != before).any(axis=1).sum())
    return out_neighbours, out_similarities, {"new_nodes": int(fresh.size), "searched_again": int(lost.sum()),
                                              "lists_repaired": repaired_count}


def recall_at_k(vectors: np.ndarray, neighbours: np.ndarray, groups: np.ndarray, sample: int,
                seed: int = 0) -> float | None:
    """Recall@k of `neighbours` against exact search within each node's group, on `sample` random nodes.

    A returned neighbour counts as found when its similarity reaches the k-th exact one (minus 1e-5),
    as ann-benchmarks does, so ties between equal vectors are not counted as misses. PAD slots of
    nodes that have k or more group mates count as misses. None when `sample` is 0.
    """
    if sample <= 0:
        return None
    picked = recall_queries(len(vectors), sample, seed)
    found = expected = 0
    labels, members_of = group_rows(groups)
    for label, members in zip(labels, members_of, strict=True):
        queries = picked[groups[picked] == label]
        if len(queries) == 0 or len(members) < 2:
            continue
        local_queries = np.searchsorted(members, queries)
        _, exact_sims = exact_knn(vectors[members], neighbours.shape[1], queries=local_queries)
        take = min(neighbours.shape[1], len(members) - 1)
        kth = exact_sims[:, take - 1:take] - 1e-5
        got = similarities_of(vectors, neighbours[queries], rows=queries)
        found += int(((got >= kth) & (neighbours[queries] != PAD)).sum())
        expected += take * len(queries)
    return found / expected if expected else None


def recall_queries(n: int, sample: int, seed: int = 0) -> np.ndarray:
    """The sorted node ids recall_at_k checks: `sample` (at most n) drawn at random with `seed`."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(max(sample, 0), n), replace=False))


def recall_of(neighbours: np.ndarray, similarities: np.ndarray, exact_similarities: np.ndarray, sample: int,
              seed: int = 0) -> float | None:
    """recall_at_k of one group from similarities alone: `neighbours` / `similarities` are the [n, k] lists of
    all nodes, `exact_similarities` the exact [q, k] cosines (NaN-padded) of the `recall_queries(n, sample,
    seed)` nodes. Counts as recall_at_k does; None when `sample` is 0."""
    queries = recall_queries(len(neighbours), sample, seed)
    if len(queries) == 0 or len(neighbours) < 2:
        return None
    take = min(neighbours.shape[1], len(neighbours) - 1)
    kth = exact_similarities[:, take - 1:take] - 1e-5
    got = neighbours[queries] != PAD
    return int(((similarities[queries] >= kth) & got).sum()) / (take * len(queries))
