"""`python -m jobs.evaluate`: judge results stages of labelled queries; print and store one table."""

from __future__ import annotations

import json

from gatrep import config, evaluate, io, query
from gatrep.config import EvaluateConfig
from jobs import _cli


def run(cfg: EvaluateConfig) -> tuple[str, dict]:
    """(table text, manifest): every results stage judged against the index it was searched in."""
    methods, upstream, results = [], {}, []
    for stage in cfg.results:
        stage_uri = io.join(cfg.run, stage)
        table, manifest = io.read_stage(stage_uri, "results")
        searcher = query.load_searcher(io.join(cfg.run, manifest["config"]["index"]))
        result, extras = evaluate.evaluate_results(manifest.get("method", stage), table, searcher, cfg.k)
        results.append(result)
        methods.append({**evaluate.to_json(result, extras), "results_stage": stage})
        upstream[stage] = io.upstream_summary(manifest, stage_uri)
    text = evaluate.format_table(results)
    out = io.join(cfg.run, cfg.stage)
    run_dir = io.new_run_dir(out)
    fs, path = io.url_to_fs(run_dir)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/evaluation.json", json.dumps({"k": cfg.k, "methods": methods}, indent=2).encode())
    fs.pipe_file(f"{path}/table.txt", (text + "\n").encode())
    manifest = io.publish(out, "evaluation", [io.join(run_dir, "evaluation.json"), io.join(run_dir, "table.txt")],
                          config.to_dict(cfg), upstream, rows=len(methods))
    return text, manifest


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(EvaluateConfig, argv, "Judge labelled queries' results; print every method side by side.")
    return _cli.run(lambda: print(run(cfg)[0]))


if __name__ == "__main__":
    raise SystemExit(main())
