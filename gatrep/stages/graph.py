"""The graph stage: the `embeddings` stage -> a cosine k-NN `graph` stage (pynndescent, optional mutual k-NN)."""

from __future__ import annotations

import dataclasses
import posixpath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gatrep import io, knn, schemas, vectors
from gatrep.config import GraphConfig, to_dict
from gatrep.knn import GraphInputError
from gatrep.stages.embed import Nodes, read_nodes
from gatrep.vectors import PAD

if TYPE_CHECKING:
    from gatrep import shard

NAME = schemas.GRAPH
CONFIG = GraphConfig
DESCRIPTION = "Build the k-NN graph of <--run>/embeddings into <--run>/graph."


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


@dataclasses.dataclass(frozen=True)
class NodeIndex:
    """The ok rows of an embeddings stage without their vectors, numbered as embed.read_nodes numbers them (node i is
    the i-th ok row by uri): image ids, the stage's Parquet files and the node id of each of their rows (PAD where a
    row is not ok), the vectors' width, and the stage's URI."""

    image_id: np.ndarray  # object [n]
    files: list[str]
    file_nodes: list[np.ndarray]  # per file: int64 [rows]
    dim: int
    where: str

    def __len__(self) -> int:
        return len(self.image_id)


def read_node_index(embeddings_uri: str) -> tuple[NodeIndex, dict[str, Any]]:
    """(NodeIndex, manifest) of a published embeddings stage, reading its image_id, uri and status columns only.

    Refuses (StageError, SchemaError) what io.read_table refuses and (GraphInputError) a stage without ok rows.
    """
    table, manifest = io.read_table(embeddings_uri, schemas.EMBEDDINGS,
                                    columns=[schemas.IMAGE_ID, schemas.URI, schemas.STATUS])
    ok_rows = np.flatnonzero(pc.equal(table[schemas.STATUS], schemas.OK).to_numpy(zero_copy_only=False))
    if ok_rows.size == 0:
        raise GraphInputError(f"{embeddings_uri}: no rows with status 'ok'; nothing to build a graph from")
    ok = table.take(pa.array(ok_rows))
    order = pc.sort_indices(ok, sort_keys=[(schemas.URI, "ascending")]).to_numpy()
    node_of_row = np.full(table.num_rows, PAD, dtype=np.int64)
    node_of_row[ok_rows[order]] = np.arange(len(order))
    files = io.table_uris(embeddings_uri, manifest)
    bounds = np.cumsum([0, *[_row_count(uri) for uri in files]])
    dim = io.table_schema(embeddings_uri, manifest).field(schemas.EMBEDDING).type.list_size
    image_id = np.array(ok[schemas.IMAGE_ID].take(pa.array(order)).to_pylist(), dtype=object)
    return NodeIndex(image_id=image_id, files=files, dim=dim, where=embeddings_uri,
                     file_nodes=[node_of_row[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]), manifest


def _row_count(file_uri: str) -> int:
    """Rows of one Parquet file, from its footer."""
    fs, path = io.url_to_fs(file_uri)
    with fs.open(path, "rb") as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def read_graph(graph_uri: str) -> Graph:
    """The published graph stage at `graph_uri`, sorted by node.

    Refuses (StageError) a stage without a manifest, (SchemaError) a table that is not `schemas.graph(k)`,
    and (GraphInputError) duplicate nodes or neighbour ids that are not nodes of the graph.
    """
    table, manifest = io.read_table(graph_uri, schemas.GRAPH)
    table = table.sort_by(schemas.NODE)
    node = table[schemas.NODE].to_numpy()
    neighbours = vectors.from_arrow(table[schemas.NEIGHBOURS], np.int64)
    similarities = vectors.from_arrow(table[schemas.SIMILARITIES])
    if len(np.unique(node)) != len(node):
        raise GraphInputError(f"{graph_uri}: node ids repeat; rebuild the graph with jobs.graph")
    used = neighbours[neighbours != PAD]
    if len(used) and not np.isin(used, node).all():
        raise GraphInputError(f"{graph_uri}: neighbours name ids that are not nodes of the graph; rebuild it")
    image_id = np.array(table[schemas.IMAGE_ID].to_pylist(), dtype=object)
    return Graph(node=node, image_id=image_id, neighbours=neighbours, similarities=similarities, manifest=manifest)


def graph_table(node_ids: np.ndarray, image_ids: np.ndarray, neighbours: np.ndarray,
                similarities: np.ndarray) -> pa.Table:
    """The `schemas.graph(k)` table of the given rows."""
    return pa.table({
        schemas.NODE: pa.array(node_ids, type=pa.int64()),
        schemas.IMAGE_ID: pa.array(list(image_ids), type=pa.string()),
        schemas.NEIGHBOURS: vectors.to_arrow(neighbours.astype(np.int64)),
        schemas.SIMILARITIES: vectors.to_arrow(similarities),
    }, schema=schemas.graph(neighbours.shape[1]))


def run(cfg: GraphConfig) -> dict[str, Any]:
    """Build and publish `<run>/graph` from `<run>/embeddings`; returns the manifest.

    Everything is checked before anything is written: a missing or malformed embeddings stage, bad
    vectors, an unknown --only group, or fewer than k + 1 nodes raise and leave the graph stage as it
    was. A rerun with the same config over the same embeddings returns the published manifest as is.
    With --partitions other than 1 this process reads only the ids (`read_node_index`) and Ray tasks read
    the vectors (`_sharded`), unless --partitions 0 finds that one build fits.
    """
    with io.stage_lock(io.join(cfg.run, NAME)):
        embeddings_uri, stage_uri = io.join(cfg.run, schemas.EMBEDDINGS), io.join(cfg.run, NAME)
        timings: dict[str, float] = {}
        index: NodeIndex | None = None
        with io.timed(timings, "read"):
            if cfg.partitions != 1:
                index, embeddings_manifest = read_node_index(embeddings_uri)
            else:
                nodes, embeddings_manifest = read_nodes(embeddings_uri)
        upstream = {schemas.EMBEDDINGS: io.upstream_of(embeddings_manifest, embeddings_uri)}
        old = read_graph(cfg.update_from) if cfg.update_from else None
        if old is not None:
            upstream["previous_graph"] = io.upstream_of(old.manifest, cfg.update_from)
        previous = io.up_to_date(stage_uri, NAME, to_dict(cfg), upstream)
        if previous is not None:
            return previous
        built = None if index is None else _build_sharded(index, cfg, stage_uri, timings)
        if built is None:
            if index is not None:
                with io.timed(timings, "read_vectors"):
                    nodes, _ = read_nodes(embeddings_uri)
            built = _single(nodes, old, cfg, embeddings_uri, timings)
        selected, image_ids, neighbours, similarities, counts, recall = built
        counts["edges_knn"] = int((neighbours != PAD).sum())
        if cfg.mutual:
            neighbours, similarities = knn.mutual_knn(neighbours, similarities)
        counts.update(nodes=len(selected), edges=int((neighbours != PAD).sum()),
                      nodes_without_neighbours=int((neighbours == PAD).all(axis=1).sum()))
        global_ids = np.where(neighbours == PAD, PAD, selected[np.where(neighbours == PAD, 0, neighbours)])
        table = graph_table(selected, image_ids, global_ids, similarities)
        with io.timed(timings, "write"):
            file_uri = io.write_table(table, io.new_run_dir(stage_uri))
        return io.publish(
            stage_uri, NAME, [file_uri], config=to_dict(cfg), upstream=upstream, rows=len(selected),
            k=cfg.k, metric=cfg.metric, mutual=cfg.mutual, group_by=cfg.group_by, only=cfg.only,
            recall={"k": cfg.k, "value": recall, "sample": min(cfg.recall_sample, len(selected)),
                    "measured": "before the mutual filter" if cfg.mutual else "on the published neighbours"},
            counts=counts, timings=timings,
        )


GraphLists = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any], "float | None"]


def _single(nodes: Nodes, old: Graph | None, cfg: GraphConfig, embeddings_uri: str,
            timings: dict[str, float]) -> GraphLists:
    """(selected node ids, their image ids, neighbours, similarities, counts, recall) of the graph built in this
    process: updated from `old`, or knn.grouped_knn over the selected nodes (all, or the --only group)."""
    selected = _select(nodes, cfg, embeddings_uri)
    check_size(len(selected), cfg, embeddings_uri)
    unit, groups = nodes.vectors[selected], nodes.groups(cfg.group_by)[selected]
    with io.timed(timings, "build"):
        if old is not None:
            neighbours, similarities, counts = _update(nodes, old, cfg)
        else:
            neighbours, similarities, counts = knn.grouped_knn(
                unit, groups, cfg.k, cfg.exact_below, metric=cfg.metric, n_jobs=cfg.n_jobs, seed=cfg.seed,
                build_k=cfg.build_k)
    with io.timed(timings, "recall"):
        recall = knn.recall_at_k(unit, neighbours, groups, cfg.recall_sample, cfg.seed)
    return selected, nodes.image_id[selected], neighbours, similarities, counts, recall


def _build_sharded(index: NodeIndex, cfg: GraphConfig, stage_uri: str, timings: dict[str, float]) -> GraphLists | None:
    """What _single returns, built by `_sharded` over every node; None when --partitions 0 finds one build fits."""
    partitions = _partitions(index, cfg)
    if partitions == 1:
        return None
    check_size(len(index), cfg, index.where)
    with io.timed(timings, "build"):
        built = _sharded(index, partitions, cfg, stage_uri)
    counts: dict[str, Any] = {**built.counts, **{f"peak_{kind}_bytes": peak for kind, peak in built.peak_bytes.items()}}
    recall = knn.recall_of(built.neighbours, built.similarities, built.query_similarities, cfg.recall_sample,
                           cfg.seed)
    if built.unrefined is not None:  # what the refinement rounds gained, measured on the same sample
        counts["recall_before_refine"] = knn.recall_of(*built.unrefined, built.query_similarities,
                                                       cfg.recall_sample, cfg.seed)
    return np.arange(len(index)), index.image_id, built.neighbours, built.similarities, counts, recall


def _partitions(index: NodeIndex, cfg: GraphConfig) -> int:
    """--partitions, or (0) what gatrep.shard.cluster_partitions picks for the data and the Ray instance; at most
    one cell per k + 1 nodes."""
    from gatrep import shard
    from gatrep.stages import init_ray

    init_ray()
    partitions = cfg.partitions or shard.cluster_partitions(len(index), index.dim, cfg.overlap)
    return max(1, min(partitions, len(index) // (cfg.k + 1)))


def _sharded(index: NodeIndex, partitions: int, cfg: GraphConfig, stage_uri: str) -> shard.Built:
    """gatrep.shard.build_from_files over the embeddings files in `partitions` cells: Ray tasks read the vectors,
    this process holds ids and [n, k] lists only. The recall queries are the nodes knn.recall_at_k would check."""
    from gatrep import shard

    source = shard.Source(uris=index.files, nodes=index.file_nodes, column=schemas.EMBEDDING,
                          uri_column=schemas.URI, where=index.where)
    queries = knn.recall_queries(len(index), cfg.recall_sample, cfg.seed)
    return shard.build_from_files(source, cfg.k, partitions, io.new_run_dir(stage_uri), queries,
                                  exact_below=cfg.exact_below, overlap=cfg.overlap, probe=cfg.probe,
                                  refine=cfg.refine, seed=cfg.seed, n_jobs=cfg.n_jobs, metric=cfg.metric,
                                  build_k=cfg.build_k)


def _update(nodes: Nodes, old: Graph, cfg: GraphConfig) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The graph of `nodes` updated from `old`, the graph stage at `cfg.update_from` (knn.update_knn): a node is
    the same as an old one when its uri and content hash are. Refuses (GraphInputError) an old graph of another k
    or metric, not plain k-NN, or no longer matching the embeddings it was built from."""
    if not updatable(old.manifest, cfg):
        raise GraphInputError(f"{cfg.update_from} is not a plain k={cfg.k} {cfg.metric} k-NN graph of every node; "
                              "build the graph anew (without --update-from)")
    record = old.manifest["upstream"][schemas.EMBEDDINGS]
    old_embeddings_uri = io.join(posixpath.dirname(cfg.update_from.rstrip("/")), record["stage"])
    old_nodes, old_manifest = read_nodes(old_embeddings_uri)
    if not io.is_current(record, old_manifest) or len(old_nodes) != len(old.node):
        raise GraphInputError(f"{cfg.update_from} was not built from {old_embeddings_uri} as published now; "
                              "build the graph anew (without --update-from)")
    position = {(u, i): n for n, (u, i) in enumerate(zip(old_nodes.uri, old_nodes.image_id, strict=True))}
    previous = np.array([position.get((u, i), PAD) for u, i in zip(nodes.uri, nodes.image_id, strict=True)], np.int64)
    neighbours, similarities, counts = knn.update_knn(nodes.vectors, previous, old.neighbours, old.similarities)
    counts.update(groups=1, exact_groups=0, approximate_groups=0, groups_smaller_than_k_plus_1=0,
                  removed_nodes=len(old_nodes) - int((previous != PAD).sum()))
    return neighbours, similarities, counts


def updatable(manifest: dict[str, Any], cfg: GraphConfig) -> bool:
    """Whether the graph stage of `manifest` can be updated into the graph `cfg` asks for: both plain k-NN graphs of
    every node (no --mutual, --group-by or --only) with the same k and metric."""
    built = manifest["config"]
    plain = (built["k"], built["metric"], built["mutual"], built["group_by"], built["only"])
    return plain == (cfg.k, cfg.metric, False, "none", None) and not cfg.mutual and cfg.group_by == "none"


def check_size(n: int, cfg: GraphConfig, embeddings_uri: str) -> None:
    """Refuse fewer than k + 1 nodes in the collection (or the --only group)."""
    knn.check_size(n, cfg.k, embeddings_uri if cfg.only is None else f"{cfg.group_by} {cfg.only!r}")


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


def summary(manifest: dict[str, Any]) -> str:
    """A few lines for the console: nodes, edges, recall, timings."""
    counts, recall = manifest["counts"], manifest["recall"]
    value = recall["value"] if recall["value"] is None else round(recall["value"], 4)
    return "\n".join([
        f"graph: {counts['nodes']} nodes, k={manifest['k']} ({manifest['metric']}, group_by={manifest['group_by']}"
        + (f", only={manifest['only']!r}" if manifest.get("only") else "")
        + (", mutual" if manifest["mutual"] else "") + ")",
        f"  edges: {counts['edges']} (k-NN {counts['edges_knn']}); nodes without neighbours: "
        f"{counts['nodes_without_neighbours']}; "
        + (f"{counts['partitions']} cells of {counts['smallest_cell']}..{counts['largest_cell']} nodes (overlap "
           f"{counts['overlap']}" + (f", probe {counts['probe']}: {counts['visitors']} visits"
                                     if counts.get("probe", 0) > counts["overlap"] else "")
           + (f", {counts['refine']} refinement rounds (recall before them: {counts['recall_before_refine']:.4f})"
              if counts.get("recall_before_refine") is not None else "") + "; "
           if "partitions" in counts else f"groups: {counts['groups']} (")
        + f"{counts['exact_groups']} exact, {counts['approximate_groups']} pynndescent)",
        *([f"  updated from {manifest['upstream']['previous_graph']['uri']}: {counts['new_nodes']} new or changed "
           f"nodes, {counts['removed_nodes']} removed, {counts['searched_again']} searched again, "
           f"{counts['lists_repaired']} lists repaired"] if "new_nodes" in counts else []),
        f"  recall@{recall['k']}: {value} on {recall['sample']} nodes ({recall['measured']})",
        f"  timings (s): {manifest['timings']}" + (" [already published: reused]" if manifest.get("reused") else ""),
    ])
