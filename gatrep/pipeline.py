"""Every stage in order on one input (`python -m jobs.pipeline`); without --input, the digits demo.

embed -> graph -> train -> index (GAT-AE latents) and the paper's baselines (raw backbone features,
HOG) -> embed the held-out queries -> query with every method -> evaluate (one table) -> report. With
--style, index-raw/knn is also queried with retrieval by style and by the adaptive score, and the report
shows the three side by side.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from gatrep import io, schemas, stages
from gatrep.config import (
    ConfigError,
    EmbedConfig,
    EvaluateConfig,
    GraphConfig,
    IndexConfig,
    PipelineConfig,
    QueryConfig,
    ReportConfig,
    TrainConfig,
)

NAME = "pipeline"
CONFIG = PipelineConfig
DESCRIPTION = __doc__
RAW, HOG = "index-raw", "index-hog"  # the baselines' index stages


def step(stage: str, cfg: Any) -> dict[str, Any]:
    """Run one stage and print its summary; a user error stops the pipeline (the command line reports it)."""
    given = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
             if f.default is dataclasses.MISSING or getattr(cfg, f.name) != f.default]
    print(f"\n== {stage} {' '.join(given)}", flush=True)
    module = stages.module(stage)
    result = module.run(cfg)
    print(module.summary(result), flush=True)
    return result


def demo_inputs(run: str) -> tuple[str, str]:
    """Write the digits demo (80% indexed, 20% held out as queries); returns (index root, query root)."""
    from gatrep import datasets

    tree = datasets.write_digits(io.join(run, "inputs", "digits"), size=64, holdout=0.2,
                                 query_root=io.join(run, "inputs", "digits-query"))
    assert tree.query is not None
    print(f"demo input: {len(tree.files)} digit images under {tree.root}; "
          f"{len(tree.query.files)} held-out queries under {tree.query.root}")
    return tree.root, tree.query.root


# (index stage, category scoring, query latent): the paper's Approach II and I on the GAT-AE latents, a
# k-NN vote over them, then the baselines on raw backbone features and on HOG.
METHODS = [(schemas.INDEX, "single", "category-aware"), (schemas.INDEX, "single", "context-aware"),
           (schemas.INDEX, "knn", "context-aware"), (RAW, "single", ""), (RAW, "max", ""), (RAW, "knn", "")]


def all_methods(cfg: PipelineConfig) -> list[tuple[str, str, str]]:
    """Every method the pipeline can query: METHODS, and the HOG baseline with --hog."""
    return [*METHODS, (HOG, "single", "")] if cfg.hog else METHODS


def build_indexes(cfg: PipelineConfig, source: str) -> None:
    """embed -> graph -> train -> the GAT-AE index and the baselines' indexes."""
    embed = EmbedConfig(input=source, run=cfg.run, backbone=cfg.backbone, weights=cfg.weights, device=cfg.device,
                        style=cfg.style)
    step("embed", embed)
    step("graph", GraphConfig(run=cfg.run, k=cfg.k))
    step("train", TrainConfig(run=cfg.run, epochs=cfg.epochs, seed=cfg.seed))
    step("index", IndexConfig(run=cfg.run))
    step("index", IndexConfig(run=cfg.run, source=schemas.EMBEDDINGS, stage=RAW))
    if cfg.hog:
        step("embed", EmbedConfig(input=source, run=cfg.run, backbone="hog", stage="embeddings-hog"))
        step("index", IndexConfig(run=cfg.run, source=schemas.EMBEDDINGS, input_stage="embeddings-hog", stage=HOG))


def method_name(index: str, scoring: str, latent: str) -> str:
    """The method's name for --methods: index/scoring[/query latent] (the evaluation table's name, from
    query.method_name, adds the default query expansion's suffix)."""
    return "/".join([index, scoring, *([latent] if latent else [])])


def chosen(cfg: PipelineConfig, methods: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The methods --methods names (all when it names none); refuses an unknown name, listing the known ones."""
    known = {method_name(*m): m for m in methods}
    unknown = [name for name in cfg.methods if name not in known]
    if unknown:
        raise ConfigError(f"unknown --methods {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[name] for name in cfg.methods] if cfg.methods else methods


# The method the report's look-alikes (--style) rank by content, by style and by the adaptive score.
LOOKS_METHOD = (RAW, "knn", "")


def query_all(cfg: PipelineConfig, queries: str, methods: list[tuple[str, str, str]]) -> list[str]:
    """Embed the queries once per backbone, then query every method (and with --style, LOOKS_METHOD by style
    and by the adaptive score); returns the results stages."""
    step("embed", EmbedConfig(input=queries, run=cfg.run, backbone=cfg.backbone, weights=cfg.weights,
                              device=cfg.device, stage="query-embeddings", style=cfg.style))
    if any(index == HOG for index, _, _ in methods):
        step("embed", EmbedConfig(input=queries, run=cfg.run, backbone="hog", stage="query-embeddings-hog"))
    wanted = [(m, "content") for m in methods]
    if cfg.style:
        wanted += [(LOOKS_METHOD, "content")] * (LOOKS_METHOD not in methods)
        wanted += [(LOOKS_METHOD, "style"), (LOOKS_METHOD, "adaptive")]
    results = []
    for (index, scoring, latent), similarity in wanted:
        stage = results_stage(index, scoring, latent, similarity)
        query_input = io.join(cfg.run, "query-embeddings-hog" if index == HOG else "query-embeddings")
        query = QueryConfig(run=cfg.run, input=query_input, index=index, scoring=scoring, k=cfg.k, stage=stage,
                            similarity=similarity)
        step("query", dataclasses.replace(query, query_latent=latent) if latent else query)
        results.append(stage)
    return results


def results_stage(index: str, scoring: str, latent: str, similarity: str = "content") -> str:
    """results-<index>-<scoring>[-<latent>][-<similarity> unless content]: where a method's results go."""
    extra = [latent] if latent else []
    return "-".join([schemas.RESULTS, index, scoring, *extra, *([similarity] if similarity != "content" else [])])


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage; returns {"run": the run root, "evaluation": the evaluation manifest or None, "headline":
    the most accurate method's line or ""}."""
    methods = chosen(cfg, all_methods(cfg))  # an unknown name is refused before any work
    source, queries = (cfg.input, cfg.queries) if cfg.input else demo_inputs(cfg.run)
    build_indexes(cfg, source)
    evaluation = None
    if queries:
        results = query_all(cfg, queries, methods)
        evaluation = step("evaluate", EvaluateConfig(run=cfg.run, results=tuple(results), k=cfg.k))
    looks = tuple(results_stage(*LOOKS_METHOD, s) for s in ("content", "style", "adaptive"))
    step("report", ReportConfig(run=cfg.run, looks=looks if queries and cfg.style else ()))
    return {"run": cfg.run, "evaluation": evaluation,
            "headline": most_accurate(cfg.run, evaluation) if evaluation is not None else ""}


def most_accurate(run: str, evaluation: dict[str, Any]) -> str:
    """The headline: the method that categorized the held-out queries best (the first of equals), its accuracy
    and its mAP@k."""
    uri = io.join(run, schemas.EVALUATION)
    document = json.loads(io.read_text_file(uri, evaluation, schemas.EVALUATION_FILE) or "{}")
    best = max(document["methods"], key=lambda m: m["categorization"]["accuracy"])
    retrieval = best.get("retrieval") or {}
    return (f"most accurate on the held-out queries: {best['name']} ({best['categorization']['accuracy']:.1%} "
            f"categorized right, mAP@{document['k']} {retrieval.get('map', float('nan')):.3f})")


def summary(result: dict[str, Any]) -> str:
    """The headline and where the stages are (each stage printed its own summary, the evaluation its table)."""
    return "\n".join(["", *([result["headline"]] if result.get("headline") else []),
                      f"pipeline finished; stages under {result['run']}"])
