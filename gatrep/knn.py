"""k-NN graphs over unit vectors: pynndescent build, exact search, mutual k-NN, recall check, graph stage I/O."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from gatrep import io, schemas
from gatrep.config import GraphConfig, to_dict

PAD = -1  # neighbour slot with no neighbour
_CHUNK = 2048  # query rows per exact-search matrix product: 2048 x N float32 scores at a time


class GraphInputError(ValueError):
    """Vectors or a graph table that cannot be turned into (or read as) a k-NN graph."""


@dataclasses.dataclass(frozen=True)
class Nodes:
    """The ok rows of an embeddings stage, sorted by uri: row i is graph node i."""

    image_id: np.ndarray  # object array of str
    uri: np.ndarray
    listing: np.ndarray
    category: np.ndarray
    vectors: np.ndarray  # float32 [n, d], unit rows

    def __len__(self) -> int:
        return len(self.vectors)

    def groups(self, group_by: str) -> np.ndarray:
        """The group label of every node for `group_by` (none, listing, category); nulls become ''."""
        if group_by == "none":
            return np.zeros(len(self), dtype=object)
        labels = self.listing if group_by == "listing" else self.category
        return np.array(["" if v is None else v for v in labels], dtype=object)


@dataclasses.dataclass(frozen=True)
class Graph:
    """A published graph stage: node ids, neighbours [n, k] (PAD where none), cosine similarities [n, k]."""

    node: np.ndarray  # int64 [n], sorted
    image_id: np.ndarray
    neighbours: np.ndarray  # int64 [n, k]
    similarities: np.ndarray  # float32 [n, k]
    manifest: dict[str, Any]

    @property
    def k(self) -> int:
        """Neighbour slots per node."""
        return int(self.neighbours.shape[1])


# ----------------------------------------------------------------------------------------------
# Reading stages


def read_nodes(embeddings_uri: str) -> tuple[Nodes, dict[str, Any]]:
    """(Nodes, manifest) of a published embeddings stage: ok rows only, sorted by uri, vectors as float32.

    Refuses (StageError) a stage without a manifest, (SchemaError) a table that is not the embeddings
    schema, and (GraphInputError) ok rows whose vector is null, NaN/inf or all zeros, naming the uris.
    """
    table, manifest = io.read_stage(embeddings_uri, "embeddings")
    _check_embeddings_schema(table.schema, embeddings_uri)
    ok = table.filter(pc.equal(table[schemas.STATUS], schemas.OK)).sort_by(schemas.URI)
    if ok.num_rows == 0:
        raise GraphInputError(f"{embeddings_uri}: no rows with status 'ok'; nothing to build a graph from")
    vectors = _vectors(ok, embeddings_uri)
    nodes = Nodes(
        image_id=np.array(ok[schemas.IMAGE_ID].to_pylist(), dtype=object),
        uri=np.array(ok[schemas.URI].to_pylist(), dtype=object),
        listing=np.array(ok[schemas.LISTING].to_pylist(), dtype=object),
        category=np.array(ok[schemas.CATEGORY].to_pylist(), dtype=object),
        vectors=vectors,
    )
    return nodes, manifest


def _check_embeddings_schema(schema: pa.Schema, where: str) -> None:
    dim = schemas.vector_dim(schema, schemas.EMBEDDING)
    value_type = schema.field(schemas.EMBEDDING).type.value_type
    dtype = "float16" if value_type == pa.float16() else "float32"
    schemas.validate(schema, schemas.embeddings(dim, dtype), where)


def _vectors(ok: pa.Table, where: str) -> np.ndarray:
    column = ok[schemas.EMBEDDING].combine_chunks()
    if column.null_count:
        bad = [u for u, v in zip(ok[schemas.URI].to_pylist(), column.is_null().to_pylist(), strict=True) if v]
        raise GraphInputError(f"{where}: {len(bad)} ok rows have no embedding, e.g. {bad[:3]}; re-run the embed job")
    dim = column.type.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    finite = np.isfinite(vectors).all(axis=1)
    nonzero = np.abs(vectors).sum(axis=1) > 0
    for mask, what in ((finite, "NaN or infinite values"), (nonzero, "all-zero vectors")):
        if not mask.all():
            uris = ok[schemas.URI].to_numpy(zero_copy_only=False)[~mask]
            raise GraphInputError(
                f"{where}: {len(uris)} ok rows have {what}, e.g. {list(uris[:3])}; "
                "fix or re-embed those images before building the graph"
            )
    return vectors


def read_graph(graph_uri: str) -> Graph:
    """The published graph stage at `graph_uri`, sorted by node.

    Refuses (StageError) a stage without a manifest, (SchemaError) a table that is not `schemas.graph(k)`,
    and (GraphInputError) duplicate nodes or neighbour ids that are not nodes of the graph.
    """
    table, manifest = io.read_stage(graph_uri, "graph")
    k = schemas.vector_dim(table.schema, schemas.NEIGHBOURS)
    schemas.validate(table.schema, schemas.graph(k), graph_uri)
    table = table.sort_by(schemas.NODE)
    node = table[schemas.NODE].to_numpy()
    neighbours = _fixed_list(table, schemas.NEIGHBOURS, np.int64)
    similarities = _fixed_list(table, schemas.SIMILARITIES, np.float32)
    if len(np.unique(node)) != len(node):
        raise GraphInputError(f"{graph_uri}: node ids repeat; rebuild the graph with jobs.graph")
    used = neighbours[neighbours != PAD]
    if len(used) and not np.isin(used, node).all():
        raise GraphInputError(f"{graph_uri}: neighbours name ids that are not nodes of the graph; rebuild it")
    image_id = np.array(table[schemas.IMAGE_ID].to_pylist(), dtype=object)
    return Graph(node=node, image_id=image_id, neighbours=neighbours, similarities=similarities, manifest=manifest)


def _fixed_list(table: pa.Table, column: str, dtype: type) -> np.ndarray:
    array = table[column].combine_chunks()
    width = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, width)


# ----------------------------------------------------------------------------------------------
# Building


def check_size(n: int, k: int, where: str) -> None:
    """Refuse (GraphInputError) fewer than k + 1 nodes: each node needs k neighbours besides itself."""
    if n <= k:
        raise GraphInputError(f"{where}: {n} nodes, but k={k} neighbours need at least {k + 1}; lower --k")


def exact_knn(vectors: np.ndarray, k: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours int64 [q, k], cosine similarities float32 [q, k]) by brute force, best first.

    `queries` are row ids of `vectors` (default: all rows); a query is never its own neighbour. When
    there are fewer than k other rows the remaining slots are PAD with similarity 0. Scores are made
    chunk by chunk, so memory is O(chunk x n), never n x n.
    """
    data = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    rows = torch.arange(len(data)) if queries is None else torch.as_tensor(queries, dtype=torch.long)
    take = min(k, len(data) - 1)
    out_idx = np.full((len(rows), k), PAD, dtype=np.int64)
    out_sim = np.zeros((len(rows), k), dtype=np.float32)
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        scores = data[chunk] @ data.T
        scores[torch.arange(len(chunk)), chunk] = -torch.inf
        top = scores.topk(take, dim=1) if take > 0 else None
        if top is not None:
            out_idx[start:start + len(chunk), :take] = top.indices.numpy()
            out_sim[start:start + len(chunk), :take] = top.values.numpy()
    return out_idx, out_sim


def approximate_knn(vectors: np.ndarray, k: int, metric: str = "cosine", n_jobs: int = -1, seed: int = 0,
                    build_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours int64 [n, k], cosine similarities float32 [n, k]) from pynndescent's k-NN graph.

    pynndescent keeps `build_k` neighbours while it builds (default max(2k, 30): fewer lose recall);
    the node itself is dropped from its list, and similarities are recomputed as dot products of the
    unit vectors, so they are cosine whatever `metric` pynndescent searched with.
    """
    import pynndescent  # numba-compiled: imported only where a graph is built

    build_k = build_k or max(2 * k, 30)
    index = pynndescent.NNDescent(
        np.ascontiguousarray(vectors, dtype=np.float32), n_neighbors=min(build_k, len(vectors)), metric=metric,
        random_state=seed, n_jobs=None if n_jobs == -1 else n_jobs, low_memory=True,
    )
    candidates, _ = index.neighbor_graph
    neighbours = drop_self(candidates.astype(np.int64), k)
    return neighbours, similarities_of(vectors, neighbours)


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


def similarities_of(vectors: np.ndarray, neighbours: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of each row's node to each of its neighbours (0 where PAD), float32 [r, k].

    Row i of `neighbours` belongs to node `rows[i]` (default: node i)."""
    rows = np.arange(len(neighbours)) if rows is None else rows
    out = np.zeros(neighbours.shape, dtype=np.float32)
    for start in range(0, len(neighbours), _CHUNK):
        block = neighbours[start:start + _CHUNK]
        safe = np.where(block == PAD, 0, block)
        sims = np.einsum("nkd,nd->nk", vectors[safe], vectors[rows[start:start + len(block)]])
        out[start:start + len(block)] = np.where(block == PAD, 0.0, sims)
    return out


def mutual_knn(neighbours: np.ndarray, similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep edge i-j only when j lists i and i lists j (GRAD-Net eq. 8); dropped slots become PAD / 0.

    Kept neighbours stay in their order (best first) and move to the front of the row. `neighbours`
    holds ids 0..n-1 of the same rows (PAD allowed). Memory is O(chunk x k x k).
    """
    n, k = neighbours.shape
    keep = np.zeros((n, k), dtype=bool)
    for start in range(0, n, _CHUNK):
        block = neighbours[start:start + _CHUNK]
        own = np.arange(start, start + len(block))[:, None, None]
        their_lists = neighbours[np.where(block == PAD, 0, block)]  # [b, k, k]
        keep[start:start + len(block)] = (their_lists == own).any(axis=2) & (block != PAD)
    order = np.argsort(~keep, axis=1, kind="stable")
    kept = np.take_along_axis(keep, order, axis=1)
    return (np.where(kept, np.take_along_axis(neighbours, order, axis=1), PAD),
            np.where(kept, np.take_along_axis(similarities, order, axis=1), 0.0).astype(np.float32))


def group_indices(groups: np.ndarray) -> Iterator[tuple[Any, np.ndarray]]:
    """(label, node ids) of every group, labels sorted."""
    labels, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(labels) + 1))
    for i, label in enumerate(labels):
        yield label, order[bounds[i]:bounds[i + 1]]


def grouped_knn(vectors: np.ndarray, groups: np.ndarray, k: int, exact_below: int,
                **approx: Any) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(neighbours, similarities, counts): a k-NN graph inside each group, with global node ids.

    Groups smaller than `exact_below` use exact search (for a handful of images pynndescent costs more
    than it saves); groups of k nodes or fewer get every other member and PAD. `counts` says how many
    groups went each way. `approx` goes to approximate_knn.
    """
    n = len(vectors)
    neighbours = np.full((n, k), PAD, dtype=np.int64)
    similarities = np.zeros((n, k), dtype=np.float32)
    counts = {"groups": 0, "exact_groups": 0, "approximate_groups": 0, "groups_smaller_than_k_plus_1": 0}
    for _, members in group_indices(groups):
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


def recall_at_k(vectors: np.ndarray, neighbours: np.ndarray, groups: np.ndarray, sample: int,
                seed: int = 0) -> float | None:
    """Recall@k of `neighbours` against exact search within each node's group, on `sample` random nodes.

    A returned neighbour counts as found when its similarity reaches the k-th exact one (minus 1e-5),
    as ann-benchmarks does, so ties between equal vectors are not counted as misses. PAD slots of
    nodes that have k or more group mates count as misses. None when `sample` is 0.
    """
    if sample <= 0:
        return None
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False))
    found = expected = 0
    for label, members in group_indices(groups):
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


# ----------------------------------------------------------------------------------------------
# The graph table


def graph_table(node_ids: np.ndarray, image_ids: np.ndarray, neighbours: np.ndarray,
                similarities: np.ndarray) -> pa.Table:
    """The `schemas.graph(k)` table of the given rows."""
    k = neighbours.shape[1]
    return pa.table({
        schemas.NODE: pa.array(node_ids, type=pa.int64()),
        schemas.IMAGE_ID: pa.array(list(image_ids), type=pa.string()),
        schemas.NEIGHBOURS: pa.FixedSizeListArray.from_arrays(pa.array(neighbours.reshape(-1), pa.int64()), k),
        schemas.SIMILARITIES: pa.FixedSizeListArray.from_arrays(
            pa.array(similarities.reshape(-1), pa.float32()), k),
    }, schema=schemas.graph(k))


# ----------------------------------------------------------------------------------------------
# The graph stage


def run(cfg: GraphConfig) -> dict[str, Any]:
    """Build and publish `<run>/graph` from `<run>/embeddings`; returns the manifest.

    Everything is checked before anything is written: a missing or malformed embeddings stage, bad
    vectors, an unknown --only group, or fewer than k + 1 nodes raise and leave the graph stage as it
    was. A rerun with the same config over the same embeddings returns the published manifest as is.
    """
    embeddings_uri, stage_uri = io.join(cfg.run, "embeddings"), io.join(cfg.run, "graph")
    timings: dict[str, float] = {}
    with io.timed(timings, "read"):
        nodes, upstream = read_nodes(embeddings_uri)
    previous = _published(stage_uri, cfg, upstream)
    if previous is not None:
        return previous
    selected = _select(nodes, cfg, embeddings_uri)
    vectors, groups = nodes.vectors[selected], nodes.groups(cfg.group_by)[selected]
    check_size(len(selected), cfg.k, embeddings_uri if cfg.only is None else f"{cfg.group_by} {cfg.only!r}")
    with io.timed(timings, "build"):
        neighbours, similarities, counts = grouped_knn(
            vectors, groups, cfg.k, cfg.exact_below, metric=cfg.metric, n_jobs=cfg.n_jobs, seed=cfg.seed,
            build_k=cfg.build_k)
    with io.timed(timings, "recall"):
        recall = recall_at_k(vectors, neighbours, groups, cfg.recall_sample, cfg.seed)
    counts["edges_knn"] = int((neighbours != PAD).sum())
    if cfg.mutual:
        neighbours, similarities = mutual_knn(neighbours, similarities)
    counts.update(nodes=len(selected), edges=int((neighbours != PAD).sum()),
                  nodes_without_neighbours=int((neighbours == PAD).all(axis=1).sum()))
    global_ids = np.where(neighbours == PAD, PAD, selected[np.where(neighbours == PAD, 0, neighbours)])
    table = graph_table(selected, nodes.image_id[selected], global_ids, similarities)
    with io.timed(timings, "write"):
        file_uri = io.write_table(table, io.new_run_dir(stage_uri))
    return io.publish(
        stage_uri, "graph", [file_uri], config=to_dict(cfg),
        upstream={"embeddings": upstream_of(upstream, embeddings_uri)}, rows=len(selected),
        k=cfg.k, metric=cfg.metric, mutual=cfg.mutual, group_by=cfg.group_by, only=cfg.only,
        recall={"k": cfg.k, "value": recall, "sample": min(cfg.recall_sample, len(selected)),
                "measured": "before the mutual filter" if cfg.mutual else "on the published neighbours"},
        counts=counts, timings=timings,
    )


def _published(stage_uri: str, cfg: GraphConfig, upstream: dict[str, Any]) -> dict[str, Any] | None:
    try:
        manifest = io.read_manifest(stage_uri, "graph")
    except io.StageError:
        return None
    same_input = manifest.get("upstream", {}).get("embeddings") == upstream_of(upstream, io.join(cfg.run, "embeddings"))
    return {**manifest, "reused": True} if same_input and manifest.get("config") == to_dict(cfg) else None


def upstream_of(manifest: dict[str, Any], stage_uri: str) -> dict[str, Any]:
    """What a downstream manifest records of a stage it read: io.upstream_summary plus the data files, whose
    run-directory names are unique per publish (two publishes within a second share `created`)."""
    return {**io.upstream_summary(manifest, stage_uri), "files": manifest["files"]}


def _select(nodes: Nodes, cfg: GraphConfig, where: str) -> np.ndarray:
    """Node ids the graph covers: all, or those of the --only group (refused by name when it has none)."""
    if cfg.only is None:
        return np.arange(len(nodes))
    groups = nodes.groups(cfg.group_by)
    selected = np.flatnonzero(groups == cfg.only)
    if len(selected) == 0:
        known = sorted(set(groups.tolist()))
        raise GraphInputError(
            f"{where}: no ok rows with {cfg.group_by} {cfg.only!r}; known: {', '.join(map(repr, known[:10]))}"
            + (" ..." if len(known) > 10 else ""))
    return selected


def summary(manifest: dict[str, Any], seconds: float | None = None) -> str:
    """A few lines for the console: nodes, edges, recall, timings."""
    counts, recall = manifest["counts"], manifest["recall"]
    lines = [
        f"graph: {counts['nodes']} nodes, k={manifest['k']} ({manifest['metric']}, group_by={manifest['group_by']}"
        + (f", only={manifest['only']!r}" if manifest.get("only") else "")
        + (", mutual" if manifest["mutual"] else "") + ")",
        f"  edges: {counts['edges']} (k-NN {counts['edges_knn']}); nodes without neighbours: "
        f"{counts['nodes_without_neighbours']}; groups: {counts['groups']} "
        f"({counts['exact_groups']} exact, {counts['approximate_groups']} pynndescent)",
        f"  recall@{recall['k']}: {recall['value'] if recall['value'] is None else round(recall['value'], 4)} "
        f"on {recall['sample']} nodes ({recall['measured']})",
        f"  timings (s): {manifest['timings']}" + (" [already published: reused]" if manifest.get("reused") else ""),
    ]
    if seconds is not None:
        lines.append(f"  total: {seconds:.1f} s")
    return "\n".join(lines)
