"""The query stage on Ray Data: query images (or an embeddings stage) -> the `results` stage (embed the
queries, then categorize and retrieve in an actor pool)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from gatrep import io, schemas, stages, vectors, versions
from gatrep.config import AUTOENCODER, GRAD_NET, EmbedConfig, QueryConfig, from_dict, to_dict
from gatrep.stages import embed
from gatrep.stages.embed import read_nodes
from gatrep.stages.graph import read_graph
from gatrep.stages.index import check_files, load_searcher

NAME = "query"
CONFIG = QueryConfig
DESCRIPTION = "Categorize every query under --input against <--run>/<--index>."


@dataclasses.dataclass(frozen=True)
class IndexSources:
    """The stages an index was built from, found by following its manifests' lineage: the embeddings
    stage (whose backbone embeds the queries) and, for a latents index, the latents, the model and graph of its
    latents, the model's objective, and whether that model aggregates the graph's edges (not a class-nodes model
    trained without --knn-edges)."""

    index: str
    source: str  # schemas.LATENTS or schemas.EMBEDDINGS
    embeddings: str
    model: str | None = None
    graph: str | None = None
    image_edges: bool = True
    latents: str | None = None
    objective: str = AUTOENCODER


def resolve(cfg: QueryConfig) -> IndexSources:
    """The stages behind `cfg.index`, followed through the manifests and checked to be the ones it was built
    from. Raises io.StageError naming what is missing or stale, and for a GRAD-Net index a --query-latent other
    than context-aware (its query latent is QFE)."""
    index_uri = io.join(cfg.run, cfg.index)
    check_files(index_uri)  # here, not in the query actors, where a missing file would kill them
    index_manifest = io.read_manifest(index_uri, schemas.INDEX)
    if cfg.similarity != "content" and not index_manifest.get("style_dim"):
        raise io.StageError(f"--similarity {cfg.similarity}: {index_uri} has no style vectors; embed the images "
                            "with --style true and rebuild the stages after it")
    source = index_manifest["config"]["source"]
    source_uri, source_manifest = io.upstream_stage(cfg.run, index_manifest, "source", source)
    if source == schemas.EMBEDDINGS:
        return IndexSources(index_uri, source, source_uri)
    model_uri, model_manifest = io.upstream_stage(cfg.run, source_manifest, schemas.MODEL, schemas.MODEL)
    graph_uri, graph_manifest = io.upstream_stage(cfg.run, source_manifest, schemas.GRAPH, schemas.GRAPH)
    embeddings_uri, _ = io.upstream_stage(cfg.run, graph_manifest, schemas.EMBEDDINGS, schemas.EMBEDDINGS)
    objective = model_manifest.get("objective", AUTOENCODER)
    if objective == GRAD_NET and cfg.query_latent != "context-aware":
        raise io.StageError(f"--query-latent {cfg.query_latent}: {index_uri} holds GRAD-Net latents, whose query "
                            "latent is query feature expansion from the indexed images (context-aware, the default)")
    return IndexSources(index_uri, source, embeddings_uri, model_uri, graph_uri,
                        image_edges=model_manifest.get("image_edges", True), latents=source_uri, objective=objective)


class QueryMapper:
    """A Ray Data actor holding the index (and model and graph): embeddings rows in, results rows out."""

    def __init__(self, sources: IndexSources, cfg: QueryConfig, graph_ref: Any = None) -> None:
        self.cfg = cfg
        self.searcher = dataclasses.replace(load_searcher(sources.index), options=cfg.options())
        self.encoder: Any = None  # a query_latents.QueryEncoder for a latents index
        if sources.model is not None:
            # torch and PyG are imported here, not at the top: an actor of a raw-feature index never needs them,
            # and starts seconds sooner without.
            import torch

            from gatrep.models import query_latents
            from gatrep.stages.train import load_grad_net_stage, load_model_stage

            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
            if sources.objective == GRAD_NET:
                qfe = load_grad_net_stage(sources.model).config
                raw, latents = ray.get(graph_ref)
                self.encoder = query_latents.ExpansionEncoder(raw, latents, qfe.qfe_k, qfe.qfe_rounds)
                return
            model, _ = load_model_stage(sources.model)
            features, neighbours, categories, image_ids = ray.get(graph_ref)
            self.encoder = query_latents.QueryEncoder(model, features, neighbours, categories, image_ids)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.results(batch, *ok_vectors(batch))

    def results(self, batch: pa.Table, ok: np.ndarray, x: np.ndarray) -> pa.Table:
        """Result rows of `batch`, whose ok rows (mask `ok`) have the vectors `x`."""
        if not ok.any():
            return _results_table(batch, ok, {})
        cfg = self.cfg
        style = ok_vectors(batch, schemas.STYLE)[1] if cfg.similarity != "content" else None
        if self.encoder is None:
            found = self.searcher.search(x, cfg.k, cfg.scoring, cfg.similarity, style, cfg.candidates)
        else:
            from gatrep.models import query_latents

            found = query_latents.search(self.searcher, self.encoder, x, cfg.query_latent, cfg.k, cfg.scoring,
                                         cfg.insert_k, query_latents.Retrieval(cfg.similarity, style, cfg.candidates))
        return _results_table(batch, ok, found.columns())


def ok_vectors(batch: pa.Table, column: str = schemas.EMBEDDING) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the ok rows, their vectors [ok rows, D] of `column`) of an embeddings batch."""
    ok = np.asarray(pc.equal(batch[schemas.STATUS], schemas.OK).to_numpy(zero_copy_only=False), dtype=bool)
    if not ok.any():
        return ok, np.zeros((0, schemas.vector_dim(batch.schema, column)), np.float32)
    return ok, vectors.from_arrow(batch[column].combine_chunks().filter(pa.array(ok)))


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
    """(features [N, D], neighbours [N, k], category [N], image_id [N]) of the indexed graph, node order. The
    neighbours are those the model aggregates over: all PAD for a class-nodes model trained without the image
    k-NN edges (an inserted query then attends to the nodes it is inserted next to, the indexed images to
    themselves, as in training)."""
    nodes, _ = read_nodes(sources.embeddings)
    graph = read_graph(str(sources.graph))
    if len(graph.node) != len(nodes) or not np.array_equal(graph.image_id, nodes.image_id):
        raise io.StageError(f"{sources.graph} was not built from {sources.embeddings}; rebuild the graph")
    neighbours = graph.neighbours if sources.image_edges else np.full_like(graph.neighbours, vectors.PAD)
    return nodes.vectors, neighbours, nodes.category, nodes.image_id


def expansion_arrays(sources: IndexSources) -> tuple[np.ndarray, np.ndarray]:
    """(raw embeddings [N, d], diffused latents [N, D]) of the indexed images of a GRAD-Net index, row for row:
    what query feature expansion reads. Refuses (io.StageError) latents whose images are not the embeddings'."""
    nodes, _ = read_nodes(sources.embeddings)
    table, _ = io.read_table(str(sources.latents), schemas.LATENTS)
    node = table[schemas.NODE].to_numpy()
    ids = np.array(table[schemas.IMAGE_ID].to_pylist(), dtype=object)
    if len(node) and (node.min() < 0 or node.max() >= len(nodes) or not np.array_equal(nodes.image_id[node], ids)):
        raise io.StageError(f"{sources.latents} was not computed from {sources.embeddings}; rebuild the graph, "
                            "train and index stages")
    return np.asarray(nodes.vectors[node]), vectors.from_arrow(table[schemas.LATENT])


def query_embeddings(cfg: QueryConfig, sources: IndexSources) -> str:
    """The embeddings stage of the queries: --input itself when it is one, else the embed stage run first over
    the query images (with the index's backbone) into `<run>/<stage>-embeddings`, so that embedding and
    querying never compete for the same CPUs. A folder that looks like a stage (a manifest, or `run-*`
    folders) is read as one or refused, never taken for images. Refuses queries embedded with another
    backbone."""
    index_embed = from_dict(EmbedConfig, io.read_manifest(sources.embeddings, schemas.EMBEDDINGS)["config"])
    if io.looks_like_stage(cfg.input):
        manifest = io.read_manifest(cfg.input, schemas.EMBEDDINGS)
        if manifest["config"]["backbone"] != index_embed.backbone:
            raise io.StageError(f"{cfg.input} holds {manifest['config']['backbone']} embeddings, but the index "
                                f"was built from {index_embed.backbone}; embed the queries with it")
        if cfg.similarity != "content" and not manifest.get("style_dim"):
            raise io.StageError(f"--similarity {cfg.similarity}: {cfg.input} has no style vectors; embed the "
                                "queries with --style true")
        return cfg.input
    stage = f"{cfg.stage}-embeddings"
    embed_cfg = dataclasses.replace(index_embed, input=cfg.input, run=cfg.run, stage=stage, device=cfg.device)
    print(embed.summary(embed.run(embed_cfg)), flush=True)
    return io.join(cfg.run, stage)


def run(cfg: QueryConfig) -> dict[str, Any]:
    """Categorize and retrieve every query into `<run>/<stage>`; returns the published manifest."""
    cfg = dataclasses.replace(cfg, run=versions.resolve(cfg.run, cfg.version), version="")
    with io.stage_lock(io.join(cfg.run, cfg.stage)):
        sources = resolve(cfg)
        stages.init_ray()
        queries_uri = query_embeddings(cfg, sources)
        queries_manifest = io.read_manifest(queries_uri, schemas.EMBEDDINGS)
        io.check_table_schemas(queries_uri, queries_manifest)  # here, not in Ray's read tasks
        graph_ref = None if sources.model is None else ray.put(
            expansion_arrays(sources) if sources.objective == GRAD_NET else graph_arrays(sources))
        timings: dict[str, float] = {}
        stage_uri = io.join(cfg.run, cfg.stage)
        run_dir = io.new_run_dir(stage_uri)
        mapper_cpus, read_cpus = stages.fit_cpus(cfg.actors, 1.0, 0.5)
        with io.timed(timings, "query"):
            ds = ray.data.read_parquet(io.table_uris(queries_uri, queries_manifest), num_cpus=read_cpus)
            ds.map_batches(
                QueryMapper, batch_size=cfg.batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=mapper_cpus,
                fn_constructor_kwargs={"sources": sources, "cfg": cfg, "graph_ref": graph_ref},
            ).write_parquet(run_dir)
        files = io.list_parquet(run_dir)
        counts = io.status_counts(files)
        upstream = {schemas.INDEX: io.upstream_of(io.read_manifest(sources.index, schemas.INDEX), sources.index),
                    "queries": io.upstream_of(queries_manifest, queries_uri)}
        return io.publish(stage_uri, schemas.RESULTS, files, to_dict(cfg), upstream, rows=sum(counts.values()),
                          counts=counts, method=method_name(cfg, sources), timings=timings)


def method_name(cfg: QueryConfig, sources: IndexSources) -> str:
    """A short label for evaluation tables: index stage, scoring (with the vote's power), (latents) how query
    latents are formed, query expansion, what retrieval ranks by when it is not content, and where from."""
    parts = [cfg.index, cfg.scoring + (f"^{cfg.vote_power:g}" if cfg.scoring == "knn" and cfg.vote_power else "")]
    if sources.model is not None:
        parts.append("qfe" if sources.objective == GRAD_NET else cfg.query_latent)
    if cfg.expand and cfg.similarity == "content":
        parts.append(f"expand-{cfg.expand}^{cfg.expand_power:g}")
    if cfg.similarity != "content":
        parts.append(f"{cfg.similarity}-retrieval")
    if cfg.scope != "category":
        parts.append(f"{cfg.scope}-retrieval")
    return "/".join(parts)


def summary(manifest: dict[str, Any]) -> str:
    """A few lines for the terminal: rows, ok, failures, queries/s."""
    counts = manifest["counts"]
    seconds = manifest["timings"]["query"]
    lines = [f"{manifest['method']}: {manifest['rows']} queries, {counts.get(schemas.OK, 0)} ok, "
             f"{manifest['rows'] / max(seconds, 1e-9):.1f} queries/s over {seconds:.1f} s"]
    lines += [f"  {status}: {n}" for status, n in counts.items() if status != schemas.OK]
    return "\n".join(lines)
