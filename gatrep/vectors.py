"""The vector toolkit every stage shares: unit rows, exact and approximate cosine k-NN, grouping, Arrow conversion.

One padding convention throughout: a missing neighbour or match is `PAD` (-1) and its similarity is NaN.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

PAD = -1
# A similarity block of this many float32 cells (64 MiB) bounds the memory of every chunked n*n computation.
BLOCK_CELLS = 1 << 24


def normalise(vectors: Any) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero, so their cosine with anything is 0."""
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    return array / np.where(norms > 0, norms, 1.0).astype(np.float32)


def block_rows(n: int) -> int:
    """Rows of a [rows, n] similarity block that fit in BLOCK_CELLS."""
    return max(1, BLOCK_CELLS // max(n, 1))


def exact_topk(queries: np.ndarray, data: np.ndarray, k: int,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every query row over the rows of `data` by dot product (cosine for unit rows).

    Returns ([B, k] row ids of `data`, [B, k] similarities), best first, PAD / NaN where fewer than k
    rows qualify. `exclude[b]` (optional) is a row of `data` that query b may not match: its own row
    when the queries are rows of `data`. Scores are made in blocks of BLOCK_CELLS, never B x n at once.
    """
    queries = np.asarray(queries, dtype=np.float32)
    b, n = queries.shape[0], data.shape[0]
    width = min(k, n - (exclude is not None))
    rows = np.full((b, k), PAD, dtype=np.int64)
    scores = np.full((b, k), np.nan, dtype=np.float32)
    if width < 1:
        return rows, scores
    step = block_rows(n)
    for start in range(0, b, step):
        block = queries[start:start + step] @ data.T
        if exclude is not None:
            block[np.arange(block.shape[0]), exclude[start:start + step]] = -np.inf
        if width < n:
            part = np.argpartition(-block, width - 1, axis=1)[:, :width]
        else:
            part = np.broadcast_to(np.arange(n), block.shape)
        part_scores = np.take_along_axis(block, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        rows[start:start + step, :width] = np.take_along_axis(part, order, axis=1)
        scores[start:start + step, :width] = np.take_along_axis(part_scores, order, axis=1)
    return rows, scores


def exact_knn(unit: np.ndarray, k: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (or each of the `queries` row ids') k most similar other rows of `unit`, exactly:
    ([q, k] ids, [q, k] cosines), PAD / NaN padded when there are fewer than k other rows."""
    rows = np.arange(len(unit)) if queries is None else np.asarray(queries, dtype=np.int64)
    return exact_topk(unit[rows], unit, k, exclude=rows)


def approximate_knn(unit: np.ndarray, k: int, metric: str = "cosine", n_jobs: int = -1, seed: int = 0,
                    build_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows from pynndescent's k-NN graph: ([n, k] ids, [n, k] cosines).

    pynndescent keeps `build_k` neighbours while it builds (default max(2k, 30): fewer lose recall); the
    row itself is dropped from its list, and similarities are recomputed as dot products of the unit
    rows, so they are cosine whatever `metric` pynndescent searched with.
    """
    import pynndescent  # numba-compiled: imported only where a graph is built (gatrep/__init__ sets its cache)

    build_k = build_k or max(2 * k, 30)
    index = pynndescent.NNDescent(
        np.ascontiguousarray(unit, dtype=np.float32), n_neighbors=min(build_k, len(unit)), metric=metric,
        random_state=seed, n_jobs=None if n_jobs == -1 else n_jobs, low_memory=True,
    )
    candidates, _ = index.neighbor_graph
    neighbours = drop_self(candidates.astype(np.int64), k)
    return neighbours, similarities_of(unit, neighbours)


def approximate_search(unit: np.ndarray, queries: np.ndarray, k: int, metric: str = "cosine", n_jobs: int = -1,
                       seed: int = 0, build_k: int = 0) -> tuple[tuple[np.ndarray, np.ndarray],
                                                                 tuple[np.ndarray, np.ndarray]]:
    """(the rows' k-NN as approximate_knn gives it, ([q, k] row ids, cosines) of the `queries` (not rows of
    `unit`) searched in the same pynndescent index); PAD / NaN where fewer than k."""
    import pynndescent

    build_k = build_k or max(2 * k, 30)
    index = pynndescent.NNDescent(
        np.ascontiguousarray(unit, dtype=np.float32), n_neighbors=min(build_k, len(unit)), metric=metric,
        random_state=seed, n_jobs=None if n_jobs == -1 else n_jobs, low_memory=True,
    )
    neighbours = drop_self(index.neighbor_graph[0].astype(np.int64), k)
    found = np.full((len(queries), k), PAD, dtype=np.int64)
    if len(queries):
        width = min(k, len(unit))
        found[:, :width] = index.query(np.ascontiguousarray(queries, dtype=np.float32), k=width)[0]
    found_sims = np.full(found.shape, np.nan, dtype=np.float32)
    for rows in row_chunks(len(found), block_rows(k * unit.shape[1])):
        safe = np.where(found[rows] == PAD, 0, found[rows])
        sims = np.einsum("qkd,qd->qk", unit[safe], np.asarray(queries[rows], dtype=np.float32))
        found_sims[rows] = np.where(found[rows] == PAD, np.nan, sims)
    return (neighbours, similarities_of(unit, neighbours)), (found, found_sims)


def drop_self(candidates: np.ndarray, k: int) -> np.ndarray:
    """The first k entries of each row that are not the row's own id (or PAD); rows short of k are PAD-filled."""
    own = np.arange(len(candidates))[:, None]
    keep = (candidates != own) & (candidates != PAD)
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in their original order
    picked = np.take_along_axis(candidates, order, axis=1)[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)[:, :k]
    out = np.where(kept, picked, PAD)
    if out.shape[1] < k:
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=PAD)
    return out


def similarities_of(unit: np.ndarray, neighbours: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Cosine of each row's node to each of its neighbours (NaN where PAD), float32 [r, k].

    Row i of `neighbours` belongs to node `rows[i]` (default: node i)."""
    rows = np.arange(len(neighbours)) if rows is None else rows
    out = np.full(neighbours.shape, np.nan, dtype=np.float32)
    step = max(1, block_rows(neighbours.shape[1] * unit.shape[1]))
    for start in range(0, len(neighbours), step):
        block = neighbours[start:start + step]
        safe = np.where(block == PAD, 0, block)
        sims = np.einsum("nkd,nd->nk", unit[safe], unit[rows[start:start + len(block)]])
        out[start:start + len(block)] = np.where(block == PAD, np.nan, sims)
    return out


def group_rows(labels: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """(sorted unique labels, the row positions of each label, in row order); refuses null labels."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"group labels must be one per row, got shape {labels.shape}")
    if labels.dtype == object and any(label is None for label in labels):
        raise ValueError("group labels contain nulls: every row needs a listing or category")
    unique, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(unique.size + 1))
    return unique, [order[bounds[i]:bounds[i + 1]] for i in range(unique.size)]


def row_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices of `size` rows covering 0..n."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def to_arrow(array: np.ndarray, value_type: pa.DataType | None = None) -> pa.FixedSizeListArray:
    """[n, d] -> fixed_size_list<value_type>[d] (float32 by default, or the array's own integer type)."""
    value_type = value_type or (pa.float32() if array.dtype.kind == "f" else pa.from_numpy_dtype(array.dtype))
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), value_type), array.shape[1])


def from_arrow(column: pa.Array | pa.ChunkedArray, dtype: Any = np.float32) -> np.ndarray:
    """A fixed_size_list column without nulls -> [n, d] array of `dtype`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    width = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=dtype).reshape(-1, width)
