"""Bulk categorization of new uploads (`python -m jobs.categorize --input <uploads> --run <root>`): embed them,
categorize each against the current version (by default a k-NN vote over raw backbone features, the most
accurate method measured), and flag the ones a person should look at.

Writes `<output>/embeddings` (the uploads, one row per file, bad ones with their status) and
`<output>/categorized` (schemas.categorized: category, confidence, best similarity, needs_review), whose
manifest also counts uploads per category. The output lives outside the run root's versions, so pruning old
versions never removes it; its manifest names the version used.
"""

from __future__ import annotations

import collections
import dataclasses
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from gatrep import categorize, io, schemas, stages, versions
from gatrep.config import CategorizeConfig, EmbedConfig, QueryConfig, from_dict, to_dict
from gatrep.pipeline import RAW
from gatrep.stages import embed, query
from gatrep.stages.index import check_files, load_searcher

NAME = "categorize"
CONFIG = CategorizeConfig
DESCRIPTION = __doc__


class CategorizeMapper:
    """A Ray Data actor: upload embeddings rows in, categorized rows out. Categorizes with the chosen index (a
    query.QueryMapper) and measures similarity to every category on the raw-feature index."""

    def __init__(self, sources: query.IndexSources, query_cfg: QueryConfig, graph_ref: Any, raw_index: str,
                 typical: np.ndarray, min_confidence: float, fail_once: str | None = None) -> None:
        self.query = query.QueryMapper(sources, query_cfg, graph_ref)
        self.fail_once = fail_once
        self.raw = self.query.searcher if raw_index == sources.index else load_searcher(raw_index)
        self.typical, self.min_confidence = typical, min_confidence

    def __call__(self, batch: pa.Table) -> pa.Table:
        stages.kill_once(self.fail_once)
        ok, x = query.ok_vectors(batch)
        results = self.query.results(batch, ok, x)
        n = batch.num_rows
        confidence = np.full(n, np.nan, dtype=np.float32)
        best = np.full(n, np.nan, dtype=np.float32)
        reasons = np.array(results[schemas.STATUS].to_pylist(), dtype=object)  # a bad file: its status
        if ok.any():
            per_category = self.raw.index.best_per_category(x)
            scores = np.array([[s[schemas.SCORE] for s in row]
                               for row in results[schemas.CATEGORY_SCORES].filter(pa.array(ok)).to_pylist()])
            confidence[ok], reasons[ok] = categorize.review(scores, per_category, self.typical, self.min_confidence)
            best[ok] = np.nanmax(per_category, axis=1)
        return pa.table({
            schemas.IMAGE_ID: batch[schemas.IMAGE_ID], schemas.URI: batch[schemas.URI],
            schemas.STATUS: batch[schemas.STATUS], schemas.ERROR: batch[schemas.ERROR],
            schemas.CATEGORY: results[schemas.CATEGORY],
            schemas.CONFIDENCE: pa.array(confidence, pa.float32(), mask=~ok),
            schemas.BEST_SIMILARITY: pa.array(best, pa.float32(), mask=~ok),
            schemas.NEEDS_REVIEW: pa.array([r is not None for r in reasons], pa.bool_()),
            schemas.REVIEW_REASON: pa.array(list(reasons), pa.string()),
        }, schema=schemas.categorized())


def output_uri(cfg: CategorizeConfig) -> str:
    """--output, else `<run>/categorized/<the input's last path part>`."""
    return cfg.output or io.join(cfg.run, "categorized", posixpath.basename(cfg.input.rstrip("/")))


def run(cfg: CategorizeConfig, fail_once: str | None = None) -> dict[str, Any]:
    """Embed and categorize every upload into `output_uri(cfg)`; returns the categorized stage's manifest.
    `fail_once` (tests: a marker file's path) kills one categorizing actor once, mid-batch."""
    root = versions.resolve(cfg.run, cfg.version)
    output = output_uri(cfg)
    stage_uri = io.join(output, schemas.CATEGORIZED)
    with io.stage_lock(stage_uri):
        query_cfg = QueryConfig(run=root, input=cfg.input, index=cfg.index, scoring=cfg.scoring, k=cfg.k,
                                batch_size=cfg.batch_size, actors=cfg.actors, device=cfg.device)
        sources = query.resolve(query_cfg)
        raw_index = io.join(root, RAW)
        check_files(raw_index)
        typical = load_searcher(raw_index).index.typical_similarity()
        stages.init_ray()
        uploads_uri = embed_uploads(cfg, sources, output)
        uploads = io.read_manifest(uploads_uri, schemas.EMBEDDINGS)
        upstream = {schemas.INDEX: io.upstream_of(io.read_manifest(sources.index, schemas.INDEX), sources.index),
                    "uploads": io.upstream_of(uploads, uploads_uri)}
        published = io.up_to_date(stage_uri, schemas.CATEGORIZED, to_dict(cfg), upstream)
        if published is not None:
            return published
        graph_ref = ray.put(query.graph_arrays(sources)) if sources.model is not None else None
        run_dir = io.new_run_dir(stage_uri)
        mapper_cpus, read_cpus = stages.fit_cpus(cfg.actors, 1.0, 0.5)
        timings: dict[str, float] = {}
        with io.timed(timings, "categorize"):
            ray.data.read_parquet(io.table_uris(uploads_uri, uploads), num_cpus=read_cpus).map_batches(
                CategorizeMapper, batch_size=cfg.batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=mapper_cpus,
                fn_constructor_kwargs={"sources": sources, "query_cfg": query_cfg, "graph_ref": graph_ref,
                                       "raw_index": raw_index, "typical": typical,
                                       "min_confidence": cfg.min_confidence, "fail_once": fail_once},
            ).write_parquet(run_dir)
        files = io.list_parquet(run_dir)
        categories = collections.Counter(c for f in files for c in io.read_column(f, schemas.CATEGORY) if c)
        counts = io.status_counts(files)
        return io.publish(
            stage_uri, schemas.CATEGORIZED, files, to_dict(cfg), upstream, rows=sum(counts.values()),
            counts=counts, categories=dict(sorted(categories.items())),
            needs_review=sum(flag for f in files for flag in io.read_column(f, schemas.NEEDS_REVIEW)),
            version=None if root == cfg.run else posixpath.basename(root), timings=timings)


def embed_uploads(cfg: CategorizeConfig, sources: query.IndexSources, output: str) -> str:
    """Embed the uploads with the index's backbone into `<output>/embeddings` (a rerun embeds only new or changed
    files); returns the stage URI."""
    index_embed = from_dict(EmbedConfig, io.read_manifest(sources.embeddings, schemas.EMBEDDINGS)["config"])
    embed_cfg = dataclasses.replace(index_embed, input=cfg.input, run=output, stage=schemas.EMBEDDINGS,
                                    device=cfg.device, previous="")
    print(embed.summary(embed.run(embed_cfg)), flush=True)
    return io.join(output, schemas.EMBEDDINGS)


def summary(manifest: dict[str, Any]) -> str:
    """Uploads per status, per category (largest first) and how many need review."""
    counts, categories = manifest["counts"], manifest["categories"]
    version = manifest["version"] or "the run root"
    lines = [f"categorize: {manifest['rows']} uploads against {version}, {counts.get(schemas.OK, 0)} ok, "
             f"{manifest['needs_review']} need review"]
    lines += [f"  {status}: {n}" for status, n in counts.items() if status != schemas.OK]
    top = sorted(categories.items(), key=lambda item: -item[1])
    lines.append("  per category: " + ", ".join(f"{name} {n}" for name, n in top[:20])
                 + (f" ... ({len(top) - 20} more)" if len(top) > 20 else ""))
    return "\n".join(lines)
