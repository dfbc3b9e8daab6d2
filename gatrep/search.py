"""The query stage on Ray Data: embed the queries, then categorize and retrieve in an actor pool."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from gatrep import io, knn, query, schemas
from gatrep.config import EmbedConfig, QueryConfig, from_dict, to_dict
from gatrep.embed import embedding_dataset
from gatrep.inference import QueryEncoder

STAGE = "results"
SEEDS = 5  # best latent matches whose graph neighbourhoods are searched when inserting a query


@dataclasses.dataclass(frozen=True)
class IndexSources:
    """Where an index's vectors come from: the embeddings stage (backbone) and, for latents, the model
    and graph the latents were computed with."""

    index: str
    source: str  # "latents" or "embeddings"
    embeddings: str
    model: str | None
    graph: str | None


def resolve(cfg: QueryConfig) -> IndexSources:
    """The stages behind `cfg.index`, checked to exist. Raises io.StageError naming what is missing."""
    index_uri = io.join(cfg.run, cfg.index)
    index_cfg = io.read_manifest(index_uri, "index")["config"]
    source = index_cfg["source"]
    if source == "embeddings":
        sources = IndexSources(index_uri, source, io.join(cfg.run, index_cfg.get("input_stage") or "embeddings"),
                               None, None)
    else:
        sources = IndexSources(index_uri, source, io.join(cfg.run, "embeddings"), io.join(cfg.run, "model"),
                               io.join(cfg.run, "graph"))
    io.read_manifest(sources.embeddings, "embeddings")
    for uri, stage in ((sources.model, "model"), (sources.graph, "graph")):
        if uri is not None:
            io.read_manifest(uri, stage)
    return sources


class QueryMapper:
    """A Ray Data actor holding the index (and model and graph): embeddings rows in, results rows out."""

    def __init__(self, sources: IndexSources, cfg: QueryConfig, graph_ref: Any = None) -> None:
        import torch

        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.cfg = cfg
        self.searcher = query.load_searcher(sources.index)
        self.encoder: QueryEncoder | None = None
        if sources.source == "latents":
            from gatrep.models import load_model

            model, _ = load_model(str(sources.model))
            features, neighbours, categories, image_ids = ray.get(graph_ref)
            self.encoder = QueryEncoder(model, features, neighbours, categories)
            self.node_of = {image_id: node for node, image_id in reversed(list(enumerate(image_ids)))}
            self.insert_k = cfg.insert_k or neighbours.shape[1]

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = np.asarray(pc.equal(batch[schemas.STATUS], schemas.OK).to_numpy(zero_copy_only=False), dtype=bool)
        dim = schemas.vector_dim(batch.schema, schemas.EMBEDDING)
        x = np.zeros((batch.num_rows, dim), np.float32)
        if ok.any():
            embedding = batch[schemas.EMBEDDING].combine_chunks().filter(pa.array(ok))
            x[ok] = np.asarray(embedding.flatten(), dtype=np.float32).reshape(-1, dim)
        columns = self._search(x[ok]).columns() if ok.any() else {}
        return _results_table(batch, ok, columns)

    def _search(self, x: np.ndarray) -> query.SearchResults:
        cfg, searcher = self.cfg, self.searcher
        if self.encoder is None:
            return searcher.search(x, cfg.k, cfg.scoring)
        z0 = self.encoder.context_free(x)
        if cfg.query_latent == "context-free":
            return searcher.search(z0, cfg.k, cfg.scoring)
        if cfg.query_latent == "context-aware":  # Approach I: join the whole graph, then categorize
            seeds = searcher.index.search_all(z0, SEEDS)[0]
            z1 = self.encoder.context_aware(x, self.encoder.insertion_neighbours(x, self._nodes(seeds), self.insert_k))
            return searcher.search(z1, cfg.k, cfg.scoring)
        # Approach II: categorize context-free, then join the chosen category's graph to retrieve.
        best, scores = searcher.categorize(z0, cfg.scoring, cfg.k)
        seeds = searcher.index.retrieve_many(z0, list(best), SEEDS)[0]
        neighbours = self.encoder.insertion_neighbours(x, self._nodes(seeds), self.insert_k, category=best)
        z1 = self.encoder.context_aware(x, neighbours)
        ids, match_scores, labels = searcher.index.retrieve_many(z1, list(best), cfg.k)
        return query.SearchResults(searcher.names, best, scores.astype(np.float32), ids, match_scores, labels,
                                   np.ones(len(x), dtype=bool))

    def _nodes(self, image_ids: np.ndarray) -> np.ndarray:
        return np.vectorize(lambda i: self.node_of.get(i, -1), otypes=[np.int64])(image_ids)


def _results_table(batch: pa.Table, ok: np.ndarray, columns: dict[str, list[Any]]) -> pa.Table:
    """Result rows in input order: ok rows take their search results, the others keep status and error."""
    n = batch.num_rows
    out: dict[str, list[Any]] = {name: [None] * n for name in (schemas.CATEGORY, schemas.CATEGORY_SCORES,
                                                                schemas.MATCHES)}
    for name, values in columns.items():
        for row, value in zip(np.flatnonzero(ok), values, strict=True):
            out[name][row] = value
    return pa.table({
        schemas.QUERY_ID: batch[schemas.IMAGE_ID], schemas.URI: batch[schemas.URI],
        schemas.LABEL: batch[schemas.CATEGORY], schemas.STATUS: batch[schemas.STATUS],
        schemas.ERROR: batch[schemas.ERROR], **out,
    }, schema=schemas.results())


def graph_arrays(sources: IndexSources) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features [N, D], neighbours [N, k], category [N], image_id [N]) of the indexed graph, node order."""
    nodes, _ = knn.read_nodes(sources.embeddings)
    graph = knn.read_graph(str(sources.graph))
    if len(graph.node) != len(nodes) or not np.array_equal(graph.image_id, nodes.image_id):
        raise io.StageError(f"{sources.graph} was not built from {sources.embeddings}; rebuild the graph")
    return nodes.vectors, graph.neighbours, nodes.category, nodes.image_id


def query_dataset(cfg: QueryConfig, sources: IndexSources) -> ray.data.Dataset:
    """Embeddings rows of the queries: read from an embeddings stage, or embedded with the index's backbone."""
    try:
        manifest = io.read_manifest(cfg.input, "embeddings")
    except io.StageError:
        manifest = None
    index_embed = from_dict(EmbedConfig, io.read_manifest(sources.embeddings, "embeddings")["config"])
    if manifest is not None:
        if manifest["config"]["backbone"] != index_embed.backbone:
            raise io.StageError(f"{cfg.input} holds {manifest['config']['backbone']} embeddings, but the index "
                                f"was built from {index_embed.backbone}; embed the queries with it")
        return ray.data.read_parquet(io.stage_file_uris(cfg.input, manifest))
    inputs = io.discover_inputs(cfg.input)
    embed_cfg = dataclasses.replace(index_embed, input=cfg.input, run=cfg.run, device=cfg.device)
    return embedding_dataset(inputs, embed_cfg)


def run(cfg: QueryConfig) -> dict[str, Any]:
    """Categorize and retrieve every query into `<run>/<stage>`; returns the published manifest."""
    sources = resolve(cfg)
    if not ray.is_initialized():
        ray.init()
    graph_ref = ray.put(graph_arrays(sources)) if sources.source == "latents" else None
    timings: dict[str, float] = {}
    stage_uri = io.join(cfg.run, cfg.stage)
    run_dir = io.new_run_dir(stage_uri)
    with io.timed(timings, "query"):
        ds = query_dataset(cfg, sources).map_batches(
            QueryMapper, batch_size=cfg.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=1,
            fn_constructor_kwargs={"sources": sources, "cfg": cfg, "graph_ref": graph_ref},
        )
        ds.write_parquet(run_dir)
    files = io.list_parquet(run_dir)
    counts = io.status_counts(files)
    return io.publish(stage_uri, STAGE, files, to_dict(cfg), {"index": sources.index}, rows=sum(counts.values()),
                      counts=counts, method=method_name(cfg, sources), timings=timings)


def method_name(cfg: QueryConfig, sources: IndexSources) -> str:
    """A short label for evaluation tables: index stage, scoring and (latents) how query latents are formed."""
    parts = [cfg.index, cfg.scoring]
    if sources.source == "latents":
        parts.append(cfg.query_latent)
    return "/".join(parts)


def summary(manifest: dict[str, Any]) -> str:
    """A few lines for the terminal: rows, ok, failures, queries/s."""
    counts = manifest["counts"]
    seconds = manifest["timings"]["query"]
    lines = [f"{manifest['method']}: {manifest['rows']} queries, {counts.get(schemas.OK, 0)} ok, "
             f"{manifest['rows'] / max(seconds, 1e-9):.1f} queries/s over {seconds:.1f} s"]
    lines += [f"  {status}: {n}" for status, n in counts.items() if status != schemas.OK]
    return "\n".join(lines)
