"""A k-NN graph built in shards: k-means cells with overlap, a Ray task per cell, lists merged; tasks read vectors."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import posixpath
import resource
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from gatrep import io, knn
from gatrep.vectors import (
    PAD,
    approximate_knn,
    approximate_search,
    block_rows,
    exact_knn,
    exact_topk,
    from_arrow,
    normalise,
    to_arrow,
)

# Rows of the sample k-means is fitted on: enough for stable centres, small next to N.
KMEANS_SAMPLE = 20_000
# Bytes one cell row costs in a task beyond its vector: pynndescent's graph, heap and search trees at build_k = 30,
# and the cell's table as read. bench/graph.py measured about 3-7 KB per 128-d row (a cell task's peak memory
# against its cell size, 20k-235k rows, with a worker's ~0.5 GiB of libraries on top).
ROW_OVERHEAD = 4_096
# Fraction of a task's share of cluster memory that its cell may fill.
MEMORY_FRACTION = 0.5
# Nodes a refinement task ranks candidates for at once: 8,192 x (30 + 900) candidates is 60 MB of ids.
REFINE_BLOCK = 8_192


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
    """[n, overlap] cell ids of every row, most similar centre first: the centres of `fit_centres` on `sample`
    random rows, each row in its `overlap` most similar ones (`nearest_cells`). Refuses (ValueError)
    partitions < 1, overlap not in 1..partitions, or more partitions than rows."""
    n = len(unit)
    if partitions < 1 or not 1 <= overlap <= partitions or partitions > n:
        raise ValueError(f"{n} rows cannot go to {partitions} cells with overlap {overlap}")
    if partitions == 1:
        return np.zeros((n, 1), dtype=np.int64)
    picked = np.random.default_rng(seed).choice(n, size=min(n, max(sample, 50 * partitions)), replace=False)
    return nearest_cells(unit, fit_centres(unit[picked], partitions, seed), overlap)


def fit_centres(sample: np.ndarray, partitions: int, seed: int = 0) -> np.ndarray:
    """[partitions, d] unit cell centres: MiniBatchKMeans on the sample rows (at least `partitions` of them)."""
    from sklearn.cluster import MiniBatchKMeans

    kmeans = MiniBatchKMeans(n_clusters=partitions, random_state=seed, n_init=3, batch_size=4096)
    return normalise(kmeans.fit(sample).cluster_centers_)


def sample_size(n: int, partitions: int) -> int:
    """Rows of n that k-means is fitted on: KMEANS_SAMPLE, at least 50 per cell, at most n."""
    return min(n, max(KMEANS_SAMPLE, 50 * partitions))


def nearest_cells(unit: np.ndarray, centres: np.ndarray, overlap: int) -> np.ndarray:
    """[n, overlap] ids of each row's `overlap` most similar centres by cosine, most similar first."""
    cells = np.empty((len(unit), overlap), dtype=np.int64)
    step = block_rows(len(centres))
    for start in range(0, len(unit), step):
        scores = unit[start:start + step] @ centres.T
        cells[start:start + step] = np.argsort(-scores, axis=1, kind="stable")[:, :overlap]
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


def _best_distinct(cand_ids: np.ndarray, cand_sims: np.ndarray, k: int,
                   own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best distinct, non-self, non-PAD candidates of each row (see merge_candidates); row i is node
    `own[i]` (default i)."""
    own = (np.arange(len(cand_ids)) if own is None else own)[:, None]
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



# ----------------------------------------------------------------------------------------------
# The build from Parquet files: tasks read the vectors, the driver holds ids and similarities only


@dataclasses.dataclass(frozen=True)
class Source:
    """Parquet files that hold the vectors of a sharded build: their URIs, the node id of each of their rows
    (PAD: a row that is not a node, such as a failed image), the vector and uri columns, and the stage that
    error messages name."""

    uris: list[str]
    nodes: list[np.ndarray]  # per file: int64 [rows of the file]
    column: str
    uri_column: str
    where: str

    @property
    def n(self) -> int:
        """Nodes over all files."""
        return sum(int((rows != PAD).sum()) for rows in self.nodes)


@dataclasses.dataclass(frozen=True)
class Built:
    """A graph built from a Source: [n, k] neighbours (PAD) and cosines (NaN), counts as sharded_knn's, the
    exact [q, k] cosines of the query nodes (for recall), the largest peak RSS in bytes of each task kind, and the
    (neighbours, cosines) the cells gave before any refinement round (None without one)."""

    neighbours: np.ndarray
    similarities: np.ndarray
    counts: dict[str, int]
    query_similarities: np.ndarray
    peak_bytes: dict[str, int]
    unrefined: tuple[np.ndarray, np.ndarray] | None = None


def build_from_files(source: Source, k: int, partitions: int, scratch: str, queries: np.ndarray, *,
                     exact_below: int = 4096, overlap: int = 2, probe: int = 0, refine: int = 2, seed: int = 0,
                     n_jobs: int = -1, **approx: Any) -> Built:
    """The cosine k-NN graph of the vectors in `source`, built as sharded_knn builds it (partitions >= 2), with
    no process holding more than one file's or one cell's vectors.

    Tasks read `sample_size` random nodes for k-means (and the `queries` nodes); one task per file checks its
    vectors, assigns them to their `overlap` nearest cells (members) and their next nearest up to `probe`
    (visitors), writes them to one Parquet file per cell under `scratch` (removed at the end) and searches the
    queries exactly among them; one task per cell builds its members' k-NN and searches its visitors in it; the
    driver merges the candidate lists as they come. Then `refine` rounds of `_refine_cell` tasks, one per cell,
    each give its home nodes (those whose nearest cell it is) the best of their neighbours and their neighbours'
    neighbours by exact cosine. While refining, every list is 2k long (the cells give their next k neighbours too:
    pynndescent keeps them while it builds anyway): those are the bridges to neighbours across a cell boundary
    (bench/graph.py, 1M x 512 in 16 cells, two rounds: recall@15 0.997 with 2k-long lists, 0.962 with k-long ones);
    the best k are kept. Refuses (GraphInputError) null, NaN/inf or all-zero vectors, naming uris, before any cell
    is built. Needs Ray initialised.
    """
    n = source.n
    overlap = max(1, min(overlap, partitions - 1))
    probe = max(overlap, min(probe, partitions))
    picks = io.sample_positions(n, sample_size(n, partitions), seed)
    wanted = np.union1d(picks, queries)
    ids, sample = _read_nodes(source, wanted)
    fit = sample[np.isin(ids, picks)]
    if len(fit) < partitions:
        raise knn.GraphInputError(f"{source.where}: only {len(fit)} of {len(picks)} sampled nodes have a usable "
                                  f"vector, too few for {partitions} partitions; check the embeddings stage")
    centres = fit_centres(fit, partitions, seed)
    query_vectors = np.zeros((len(queries), sample.shape[1]), dtype=np.float32)
    found = np.isin(queries, ids)
    query_vectors[found] = sample[np.searchsorted(ids, queries[found])]
    del sample, fit
    try:
        split = _split(source, centres, (overlap, probe), queries, query_vectors, k, scratch)
        approx = {**approx, "seed": seed, "build_k": approx.get("build_k") or max(2 * k, 30)}  # as for k alone
        built, homes = _build_cells(n, 2 * k if refine else k, split, scratch, exact_below, approx, n_jobs,
                                    (overlap, probe), keep_homes=refine > 0)
        if refine:
            built = _refine(built, split["home"], homes, refine, k)
        return dataclasses.replace(built, neighbours=built.neighbours[:, :k], similarities=built.similarities[:, :k],
                                   counts={**built.counts, "refine": refine})
    finally:
        fs, path = io.url_to_fs(scratch)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _read_nodes(source: Source, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted node ids, float32 vectors) of the `wanted` nodes that have a usable vector, read by one task per
    file that holds some."""
    futures = [_take_file.remote(uri, np.where(np.isin(rows, wanted), rows, PAD), source.column)
               for uri, rows in zip(source.uris, source.nodes, strict=True) if np.isin(rows, wanted).any()]
    parts = ray.get(futures)
    ids = np.concatenate([i for i, _ in parts])
    order = np.argsort(ids)
    return ids[order], np.concatenate([v for _, v in parts])[order]


def _split(source: Source, centres: np.ndarray, reach: tuple[int, int], queries: np.ndarray,
           query_vectors: np.ndarray, k: int, scratch: str) -> dict[str, Any]:
    """One _split_file task per file; their cell sizes and query cosines summed up, and each node's home cell (its
    nearest), or GraphInputError."""
    centres_ref, queries_ref, vectors_ref = ray.put(centres), ray.put(queries), ray.put(query_vectors)
    futures = [_split_file.remote(uri, rows, (source.column, source.uri_column), centres_ref, reach, queries_ref,
                                  vectors_ref, k, scratch, f"file-{i:05d}.parquet")
               for i, (uri, rows) in enumerate(zip(source.uris, source.nodes, strict=True))]
    results = ray.get(futures)
    problems: dict[str, list[Any]] = {}
    for result in results:
        for what, (count, examples) in result["problems"].items():
            _note(problems, what, np.asarray(examples, dtype=object), count)
    _refuse(problems, source.where)
    sims = np.full((len(queries), k), np.nan, dtype=np.float32)
    for result in results:
        sims = _top_similarities(sims, result["query_similarities"], k)
    home = np.full(source.n, -1, dtype=np.int32)
    for result in results:
        home[result["nodes"]] = result["home"]
    return {"sizes": sum(r["sizes"] for r in results), "visitors": sum(r["visitors"] for r in results),
            "query_similarities": sims, "home": home,
            "peak": max(r["peak"] for r in results)}


def _refuse(problems: dict[str, list[Any]], where: str) -> None:
    """Raise GraphInputError for the first kind of bad vector found, in embed.read_nodes' order and words."""
    if "no embedding" in problems:
        count, examples = problems["no embedding"]
        raise knn.GraphInputError(f"{where}: {count} ok rows have no embedding, e.g. {examples}; re-run the embed job")
    for what in ("NaN or infinite values", "all-zero vectors"):
        if what in problems:
            count, examples = problems[what]
            raise knn.GraphInputError(f"{where}: {count} ok rows have {what}, e.g. {examples}; "
                                      "fix or re-embed those images before building the graph")


def _build_cells(n: int, k: int, split: dict[str, Any], scratch: str, exact_below: int, approx: dict[str, Any],
                 n_jobs: int, reach: tuple[int, int], keep_homes: bool) -> tuple[Built, dict[int, Any]]:
    """One _cell_task per non-empty cell; their candidate lists (members' and visitors') merged into [n, k] as
    they finish; and, with `keep_homes`, each cell's reference to its home rows (left in the object store)."""
    cells = [int(c) for c in np.flatnonzero(split["sizes"])]
    task_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // len(cells))
    options = {**approx, "n_jobs": task_cpus if n_jobs == -1 else n_jobs}
    refs: dict[int, Any] = {  # cell: [lists, homes] (two returns; Ray's stubs know one)
        c: _cell_task.options(num_cpus=task_cpus).remote(scratch, c, k, exact_below, options, keep_homes)
        for c in cells}
    pending = [lists for lists, _ in refs.values()]
    neighbours = np.full((n, k), PAD, dtype=np.int64)
    similarities = np.full((n, k), np.nan, dtype=np.float32)
    peak = 0
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        *lists, task_peak = ray.get(done[0])
        for nodes, ids, sims in (lists[:3], lists[3:]):
            merged = _best_distinct(np.concatenate([neighbours[nodes], ids], axis=1),
                                    np.concatenate([similarities[nodes], sims], axis=1), k, own=nodes)
            neighbours[nodes], similarities[nodes] = merged
        peak = max(peak, task_peak)
    sizes = [int(s) for s in split["sizes"][cells]]
    counts = {"groups": 1, "exact_groups": sum(s < exact_below for s in sizes),
              "approximate_groups": sum(s >= exact_below for s in sizes),
              "groups_smaller_than_k_plus_1": int(n <= k), "partitions": len(cells), "overlap": reach[0],
              "largest_cell": max(sizes), "smallest_cell": min(sizes), "probe": reach[1],
              "visitors": int(split["visitors"].sum())}
    return (Built(neighbours, similarities, counts, split["query_similarities"],
                  {"split_task": split["peak"], "cell_task": peak}),
            {c: homes for c, (_, homes) in refs.items()})


def _refine(built: Built, home: np.ndarray, homes: dict[int, Any], rounds: int, k: int) -> Built:
    """`rounds` rounds of NN-descent's join over forward edges: each node's list becomes the best (as many as it
    holds), by exact cosine, of its neighbours and their neighbours, so that a neighbour that shared no cell with it
    is found through a neighbour they share. `homes`: each cell's home nodes (those whose nearest cell it is) and
    their vectors, left in the object store by its `_cell_task`; one `_refine_cell` task per cell refines its home
    nodes, taking the vectors of their candidates from the cells that hold them. The driver holds object references,
    ids and cosines. `unrefined` keeps the best k of each list before the rounds."""
    unrefined = built.neighbours[:, :k], built.similarities[:, :k]
    cells = [int(c) for c in np.unique(home)]
    home_ref = ray.put(home)
    peak = 0
    for _ in range(rounds):
        graph_ref = ray.put(built.neighbours)
        pending = [_refine_cell.remote(homes[cell], graph_ref, home_ref, homes) for cell in cells]
        neighbours, similarities = built.neighbours.copy(), built.similarities.copy()
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            nodes, ids, sims, task_peak = ray.get(done[0])
            neighbours[nodes], similarities[nodes] = ids, sims
            peak = max(peak, task_peak)
        built = dataclasses.replace(built, neighbours=neighbours, similarities=similarities)
    return dataclasses.replace(built, peak_bytes={**built.peak_bytes, "refine_task": peak}, unrefined=unrefined)


@ray.remote
def _refine_cell(own: tuple[np.ndarray, np.ndarray], graph: np.ndarray, home: np.ndarray, homes: dict[int, Any],
                 block: int = REFINE_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The `own` home nodes of one cell (ids, vectors), their [m, k] refined neighbours and cosines (see `_refine`),
    and this task's peak bytes. `homes`: every cell's home rows reference (`_cell_task`), fetched for the cells
    that hold a candidate. Candidates are made, scored and ranked `block` nodes at a time: a cell of m nodes
    holds m x (w + w^2) of them for lists of w: 2 GB of ids alone for 250k nodes at w = 30."""
    _reset_peak()
    mine, mine_vecs = own
    blocks = [slice(start, start + block) for start in range(0, len(mine), block)]
    # Each block's candidates are made twice, here to know which vectors to fetch and below to score them: cheap
    # index lookups, against holding every block's at once.
    wanted = np.unique(np.concatenate([np.unique(_candidates(graph, mine[b])) for b in blocks]))
    wanted = wanted[wanted != PAD]
    if len(wanted) == 0:  # no node of the cell has a neighbour yet: nothing to refine
        return mine, graph[mine], np.full(graph[mine].shape, np.nan, dtype=np.float32), _peak_bytes()
    vecs = np.empty((len(wanted), mine_vecs.shape[1]), dtype=np.float32)
    for cell in np.unique(home[wanted]):
        nodes, cell_vecs = ray.get(homes[int(cell)])
        here = np.flatnonzero(home[wanted] == cell)
        vecs[here] = cell_vecs[np.searchsorted(nodes, wanted[here])]
    neighbours = np.empty((len(mine), graph.shape[1]), dtype=np.int64)
    similarities = np.empty(neighbours.shape, dtype=np.float32)
    for b in blocks:
        candidates = _candidates(graph, mine[b])
        sims = np.full(candidates.shape, np.nan, dtype=np.float32)
        # 32 MB gathered at a time: np.take + matmul took 0.94 s where 128 MB blocks, fancy indexing and einsum took
        # 1.63 s (2,000 nodes x 930 candidates x 512-d, one run each)
        step = max(1, (8 << 20) // (candidates.shape[1] * vecs.shape[1]))
        for start in range(0, len(candidates), step):
            part = candidates[start:start + step]
            gathered = np.take(vecs, np.searchsorted(wanted, np.where(part == PAD, wanted[0], part)), axis=0)
            scores = np.matmul(gathered, mine_vecs[b][start:start + step, :, None])[:, :, 0]
            sims[start:start + step] = np.where(part == PAD, np.nan, scores)
        neighbours[b], similarities[b] = _best_distinct(candidates, sims, graph.shape[1], own=mine[b])
    return mine, neighbours, similarities, _peak_bytes()


def _candidates(graph: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """[len(nodes), k + k^2]: each node's neighbours in `graph` and their neighbours, PAD where none."""
    first = graph[nodes]
    second = np.where((first == PAD)[:, :, None], PAD, graph[np.where(first == PAD, 0, first)])
    return np.concatenate([first, second.reshape(len(nodes), -1)], axis=1)


def _top_similarities(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """The k largest of each row of a and b side by side, largest first, NaN last."""
    both = np.nan_to_num(np.concatenate([a, b], axis=1), nan=-np.inf)
    top = -np.sort(-both, axis=1)[:, :k]
    return np.where(np.isneginf(top), np.nan, top).astype(np.float32)


def _reset_peak() -> None:
    """Start this process's peak-memory count afresh, so that a reused Ray worker reports one task's peak (Linux:
    /proc/self/clear_refs); where that is refused, `_peak_bytes` stays the process's peak since it started."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_bytes() -> int:
    """This process's peak resident memory in bytes since `_reset_peak` (VmHWM), or since it started."""
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _batches(uri: str, columns: list[str], rows: np.ndarray) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """(record batch of `columns`, the node id of each of its rows) over one Parquet file; non-node rows (PAD in
    `rows`, one entry per row of the file) are dropped."""
    fs, path = io.url_to_fs(uri)
    offset = 0
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=io.BATCH_ROWS, columns=columns):
            node = rows[offset:offset + batch.num_rows]
            offset += batch.num_rows
            keep = node != PAD
            if keep.any():
                yield batch.filter(pa.array(keep)), node[keep]


def _usable(batch: pa.RecordBatch, column: str, uri_column: str,
            problems: dict[str, list[Any]]) -> np.ndarray | None:
    """The batch's vectors as float32 [b, d], or None after noting its bad rows in `problems` (what -> [count,
    first uris]): null vectors, NaN or infinite values, all zeros, as embed.read_nodes refuses them."""
    vectors = batch.column(column)
    uris = np.asarray(batch.column(uri_column).to_pylist(), dtype=object)
    if vectors.null_count:
        _note(problems, "no embedding", uris[np.asarray(vectors.is_null().to_pylist(), dtype=bool)])
        return None
    unit = from_arrow(vectors)
    finite = np.isfinite(unit).all(axis=1)
    nonzero = np.abs(unit).sum(axis=1) > 0
    _note(problems, "NaN or infinite values", uris[~finite])
    _note(problems, "all-zero vectors", uris[finite & ~nonzero])
    return unit if finite.all() and nonzero.all() else None


def _note(problems: dict[str, list[Any]], what: str, uris: np.ndarray, count: int | None = None) -> None:
    """Add `count` (default len(uris)) bad rows of kind `what`, keeping the first three uris in sorted order."""
    if len(uris):
        total, examples = problems.get(what, [0, []])
        problems[what] = [total + (len(uris) if count is None else count), sorted([*examples, *uris.tolist()])[:3]]


@ray.remote
def _take_file(uri: str, rows: np.ndarray, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(node ids, float32 vectors) of the rows of one file whose `rows` entry is not PAD, those with a null,
    non-finite or all-zero vector left out."""
    ids, parts = [np.zeros(0, np.int64)], []
    for batch, node in _batches(uri, [column], rows):
        vectors = batch.column(column)
        valid = np.asarray(vectors.is_valid().to_pylist(), dtype=bool)
        unit = from_arrow(vectors.filter(pa.array(valid)))
        good = np.isfinite(unit).all(axis=1) & (np.abs(unit).sum(axis=1) > 0)
        ids.append(node[valid][good])
        parts.append(unit[good])
    return np.concatenate(ids), np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


@ray.remote
def _split_file(uri: str, rows: np.ndarray, columns: tuple[str, str], centres: np.ndarray, reach: tuple[int, int],
                queries: np.ndarray, query_vectors: np.ndarray, k: int, scratch: str, name: str) -> dict[str, Any]:
    """One file's share of the split: its vectors (`columns`: vector and uri column) checked, each written with
    its node id to its nearest cells (`<scratch>/cell-<c>/<name>`: one Parquet file per cell and input file), as
    a member of the first `reach[0]` and a visitor of the next up to `reach[1]`, and the queries' k best exact
    cosines among them (themselves excluded). Returns sizes and visitors [cells], problems, query_similarities,
    the file's nodes and their home (nearest) cells, peak."""
    _reset_peak()
    problems: dict[str, list[Any]] = {}
    nodes, homes = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
    sizes, visitors = np.zeros(len(centres), dtype=np.int64), np.zeros(len(centres), dtype=np.int64)
    best = np.full((len(queries), k), np.nan, dtype=np.float32)
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for batch, node in _batches(uri, list(columns), rows):
            unit = _usable(batch, *columns, problems)
            if unit is None or problems:
                continue
            cells = nearest_cells(unit, centres, reach[1])
            nodes.append(node)
            homes.append(cells[:, 0].astype(np.int32))
            for cell in np.unique(cells):
                mine = (cells == cell).any(axis=1)
                member = (cells[mine, :reach[0]] == cell).any(axis=1)
                _write_cell(writers, _cell_dir(scratch, int(cell)), name, node[mine], unit[mine], member,
                            cells[mine, 0] == cell)
                sizes[cell] += int(member.sum())
                visitors[cell] += int((~member).sum())
            best = _top_similarities(best, _query_similarities(query_vectors, queries, unit, node, k), k)
    finally:
        for writer in writers.values():
            writer.close()
    return {"sizes": sizes, "visitors": visitors, "problems": problems, "query_similarities": best,
            "nodes": np.concatenate(nodes), "home": np.concatenate(homes), "peak": _peak_bytes()}


def _write_cell(writers: dict[str, pq.ParquetWriter], cell_dir: str, name: str, node: np.ndarray,
                unit: np.ndarray, member: np.ndarray, home: np.ndarray) -> None:
    """Append (node, vector, member, home) rows to the file `name` in `cell_dir`, opening it on first use."""
    table = pa.table({"node": pa.array(node, pa.int64()), "vector": to_arrow(unit), "member": pa.array(member),
                      "home": pa.array(home)})
    if cell_dir not in writers:
        fs, path = io.url_to_fs(cell_dir)
        fs.makedirs(path, exist_ok=True)
        writers[cell_dir] = pq.ParquetWriter(posixpath.join(path, name), table.schema, filesystem=fs)
    writers[cell_dir].write_table(table)


def _cell_dir(scratch: str, cell: int) -> str:
    """Where the split writes the rows of `cell`."""
    return io.join(scratch, f"cell-{cell:05d}")


def _query_similarities(query_vectors: np.ndarray, queries: np.ndarray, unit: np.ndarray, node: np.ndarray,
                        k: int) -> np.ndarray:
    """[q, k] best exact cosines of each query among the rows `unit` (node ids `node`), the query itself left out."""
    if len(queries) == 0:
        return np.zeros((0, k), dtype=np.float32)
    ids, sims = exact_topk(query_vectors, unit, min(k + 1, len(unit)))
    own = (np.where(ids == PAD, PAD, node[np.where(ids == PAD, 0, ids)]) == queries[:, None]) | (ids == PAD)
    return _top_similarities(np.where(own, np.nan, sims), np.full((len(queries), k), np.nan, np.float32), k)


@ray.remote(num_returns=2)
def _cell_task(scratch: str, cell: int, k: int, exact_below: int, approx: dict[str, Any], keep_homes: bool
               ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int],
                          tuple[np.ndarray, np.ndarray] | None]:
    """One cell from its Parquet files: its members' k-NN and its visitors' k nearest members (exact below
    `exact_below` members, else pynndescent's graph and search), as (member ids, [m, k] neighbour ids, cosines,
    visitor ids, [v, k] neighbour ids, cosines, peak bytes), all node ids; and, with `keep_homes`, its home nodes
    (sorted) and their vectors, for the refinement rounds."""
    _reset_peak()
    table = _read_cell(scratch, cell)
    table = table.sort_by("node")
    member = table["member"].to_numpy(zero_copy_only=False)
    home = table["home"].to_numpy(zero_copy_only=False)
    nodes = table["node"].to_numpy()
    unit = from_arrow(table["vector"])
    del table
    homes = (nodes[home], unit[home]) if keep_homes else None
    members, visitors, inside, outside = nodes[member], nodes[~member], unit[member], unit[~member]
    del unit
    if len(members) < exact_below:
        (local, sims), (found, found_sims) = exact_knn(inside, k), exact_topk(outside, inside, k)
    else:
        (local, sims), (found, found_sims) = approximate_search(inside, outside, k, **approx)
    return (members, _global(members, local), sims, visitors, _global(members, found), found_sims,
            _peak_bytes()), homes


def _global(members: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Cell-local row ids (PAD kept) as node ids."""
    return np.where(local == PAD, PAD, members[np.where(local == PAD, 0, local)])


def _read_cell(scratch: str, cell: int) -> pa.Table:
    """Every row the split wrote to `cell` (node, vector, member, home), from all its Parquet files."""
    return pa.concat_tables(_read_parquet(uri) for uri in io.list_parquet(_cell_dir(scratch, cell)))


def _read_parquet(uri: str) -> pa.Table:
    """One whole Parquet file."""
    fs, path = io.url_to_fs(uri)
    return pq.read_table(path, filesystem=fs)
