"""The evaluate stage: results stages of labelled queries -> the `evaluation` stage, every method side by side."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from gatrep import config, evaluate, io, schemas, versions
from gatrep.config import EvaluateConfig
from gatrep.stages.index import load_searcher

NAME = "evaluate"
CONFIG = EvaluateConfig
DESCRIPTION = "Judge labelled queries' results; print every method side by side."


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Judge every results stage against the index it was searched in (followed through its manifest) and
    publish `evaluation.json` and the text table; returns the manifest, the table under "table"."""
    cfg = dataclasses.replace(cfg, run=versions.resolve(cfg.run, cfg.version), version="")
    with io.stage_lock(io.join(cfg.run, cfg.stage)):
        upstream = {stage: io.upstream_of(io.read_manifest(io.join(cfg.run, stage), schemas.RESULTS),
                                          io.join(cfg.run, stage)) for stage in cfg.results}
        out = io.join(cfg.run, cfg.stage)
        published = io.up_to_date(out, schemas.EVALUATION, config.to_dict(cfg), upstream)
        if published is not None:
            return published
        methods, results = [], []
        for stage in cfg.results:
            table, manifest = io.read_table(io.join(cfg.run, stage), schemas.RESULTS)
            index_uri, _ = io.upstream_stage(cfg.run, manifest, schemas.INDEX, schemas.INDEX)
            result, extras = evaluate.evaluate_results(manifest.get("method", stage), table, load_searcher(index_uri),
                                                       cfg.k)
            results.append(result)
            methods.append({**evaluate.to_json(result, extras), "results_stage": stage})
        text = evaluate.format_table(results)
        run_dir = io.new_run_dir(out)
        fs, path = io.url_to_fs(run_dir)
        fs.makedirs(path, exist_ok=True)
        document = json.dumps({"k": cfg.k, "methods": methods}, indent=2)
        fs.pipe_file(f"{path}/{schemas.EVALUATION_FILE}", document.encode())
        fs.pipe_file(f"{path}/{schemas.TABLE_FILE}", (text + "\n").encode())
        files = [io.join(run_dir, schemas.EVALUATION_FILE), io.join(run_dir, schemas.TABLE_FILE)]
        return io.publish(out, schemas.EVALUATION, files, config.to_dict(cfg), upstream, rows=len(methods), table=text)


def summary(manifest: dict[str, Any]) -> str:
    """The side-by-side table."""
    return str(manifest["table"])
