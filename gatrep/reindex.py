"""The nightly re-index (`python -m jobs.reindex --input <images> --run <root>`): a new complete version of the
run root from what changed since the current one, published by switching `<run>/CURRENT` last.

embed (only new or changed images; the rest is copied from the current version) -> graph (updated, or rebuilt
past --rebuild-above) -> train (fine-tuned from the current model, or --retrain) -> the GAT-AE index and the
raw-feature index that jobs.categorize votes over -> `_version.json` -> CURRENT -> older versions pruned.

Readers never see a half-built version: every stage is written inside `<run>/versions/<vNNNN>/`, which no
reader resolves until the pointer names it. A run killed anywhere leaves the pointer on the old version; the
same command run again finishes the interrupted version, reusing the stages it had published.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gatrep import io, schemas, versions
from gatrep.config import EmbedConfig, GraphConfig, IndexConfig, ReindexConfig, TrainConfig, to_dict
from gatrep.errors import UserError
from gatrep.pipeline import RAW, step
from gatrep.stages import graph

NAME = "reindex"
CONFIG = ReindexConfig
DESCRIPTION = __doc__
# Flags that say how a run goes, not what it builds: changing only these is no reason to build a version.
OPERATIONAL = ("input", "device", "keep", "rollback", "allow_shrink", "max_shrink", "rebuild_above")


class ShrinkRefused(UserError, RuntimeError):
    """The input lost more of the current version's files than --max-shrink allows."""


def run(cfg: ReindexConfig) -> dict[str, Any]:
    """Build, publish and switch to a new version (or roll back); returns what was done (see `summary`)."""
    with io.stage_lock(io.join(cfg.run, versions.VERSIONS)):  # one rebuild of a run root at a time
        if cfg.rollback:
            return {"run": cfg.run, "rolled_back": versions.rollback(cfg.run)}
        current = versions.current(cfg.run)
        base = versions.record(cfg.run, current["version"]) if current else None
        inputs = io.discover_inputs(cfg.input)
        check_shrink(cfg, inputs.num_rows, base)
        version = versions.next_version(cfg.run)
        target = versions.root(cfg.run, version)
        base_root = versions.root(cfg.run, base["version"]) if base else None
        print(f"reindex: {inputs.num_rows} input files -> {target} "
              f"(current version: {base['version'] if base else 'none'})", flush=True)

        same_backbone = base is not None and _embedding_settings(base["config"]) == _embedding_settings(to_dict(cfg))
        # Rows are reused only with the same style setting; the model is fine-tuned whenever the backbone is the same.
        same_rows = same_backbone and base is not None and base["config"].get("style", False) == cfg.style
        previous = io.join(base_root, schemas.EMBEDDINGS) if base_root and same_rows else ""
        step("embed", EmbedConfig(input=cfg.input, run=target, backbone=cfg.backbone, weights=cfg.weights,
                                  device=cfg.device, previous=previous, style=cfg.style))
        change = changes(previous, io.join(target, schemas.EMBEDDINGS)) if previous else None
        if base and change and not change["total"] and _settings(base["config"]) == _settings(to_dict(cfg)):
            _discard(target)
            return {"run": cfg.run, "version": base["version"], "published": False}

        graph_cfg = GraphConfig(run=target, k=cfg.k, seed=cfg.seed)
        old_graph = io.join(base_root, schemas.GRAPH) if base_root else ""
        update = bool(change and change["fraction"] <= cfg.rebuild_above  # a change implies a current version
                      and graph.updatable(io.read_manifest(old_graph, schemas.GRAPH), graph_cfg))
        if update:
            graph_cfg = dataclasses.replace(graph_cfg, update_from=old_graph)
        step("graph", graph_cfg)
        fine_tune = bool(base_root and same_backbone and not cfg.retrain)
        train_cfg = TrainConfig(run=target, seed=cfg.seed, epochs=cfg.epochs)
        if fine_tune and base_root:
            train_cfg = dataclasses.replace(train_cfg, epochs=cfg.fine_tune_epochs, lr=cfg.fine_tune_lr,
                                            init_from=io.join(base_root, schemas.MODEL))
        step("train", train_cfg)
        step("index", IndexConfig(run=target))
        step("index", IndexConfig(run=target, source=schemas.EMBEDDINGS, stage=RAW))

        versions.finish(cfg.run, version, {
            "input": cfg.input, "inputs": inputs.num_rows, "config": to_dict(cfg), "change": change,
            "previous": base["version"] if base else None,
            "graph": "updated" if update else "rebuilt", "model": "fine-tuned" if fine_tune else "trained"})
        pointer = versions.switch(cfg.run, version)
        removed = versions.prune(cfg.run, cfg.keep)
        return {"run": cfg.run, "version": version, "published": True, "pointer": pointer, "change": change,
                "graph": "updated" if update else "rebuilt", "model": "fine-tuned" if fine_tune else "trained",
                "removed": removed}


def check_shrink(cfg: ReindexConfig, files: int, base: dict[str, Any] | None) -> None:
    """Refuse (ShrinkRefused), before any work, an input that lost more than --max-shrink of the files the current
    version was built from, unless --allow-shrink."""
    if base is None or cfg.allow_shrink:
        return
    before = int(base["inputs"])
    if files < (1 - cfg.max_shrink) * before:
        raise ShrinkRefused(
            f"{cfg.input} holds {files} files, {before - files} fewer than the {before} of version {base['version']} "
            f"({(before - files) / before:.0%} > --max-shrink {cfg.max_shrink:.0%}): an empty bucket or a wrong "
            "prefix? Nothing was published; pass --allow-shrink if the images were removed on purpose")


def changes(old_uri: str, new_uri: str) -> dict[str, Any]:
    """How the rows of two embeddings stages differ: files added, removed and changed (content, status or
    labels), their total and its share of the old rows."""
    from gatrep.stages.embed import rows_by_uri

    old = rows_by_uri(io.stage_file_uris(old_uri, io.read_manifest(old_uri, schemas.EMBEDDINGS)))
    new = rows_by_uri(io.stage_file_uris(new_uri, io.read_manifest(new_uri, schemas.EMBEDDINGS)))
    added = len(new.keys() - old.keys())
    removed = len(old.keys() - new.keys())
    changed = sum(old[u] != new[u] for u in old.keys() & new.keys())
    total = added + removed + changed
    return {"added": added, "removed": removed, "changed": changed, "total": total,
            "fraction": round(total / max(len(old), 1), 6)}


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in OPERATIONAL}


def _embedding_settings(config: dict[str, Any]) -> tuple[Any, ...]:
    return config["backbone"], config["weights"]


def _discard(target: str) -> None:
    """Remove a version folder that will not be published (nothing reads it: the pointer never named it)."""
    fs, path = io.url_to_fs(target)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def summary(result: dict[str, Any]) -> str:
    """What the re-index did, in a few lines."""
    if "rolled_back" in result:
        pointer = result["rolled_back"]
        return f"reindex: rolled back {result['run']} from {pointer['previous']} to {pointer['version']}"
    if not result["published"]:
        return (f"reindex: no image added, changed or removed since version {result['version']}: nothing published; "
                f"{result['run']}/CURRENT still names {result['version']}")
    change = result["change"]
    lines = [f"reindex: published {result['version']}; {result['run']}/{versions.POINTER} now names it",
             f"  graph {result['graph']}, model {result['model']}"]
    if change:
        lines.append(f"  since {result['pointer']['previous']}: {change['added']} added, {change['changed']} changed, "
                     f"{change['removed']} removed ({change['fraction']:.1%})")
    if result["removed"]:
        lines.append(f"  older versions removed (--keep): {', '.join(result['removed'])}")
    return "\n".join(lines)
