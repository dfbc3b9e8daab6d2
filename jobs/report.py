"""`python -m jobs.report`: write a run's self-contained static HTML report (categories, queries, metrics, plots)."""

from __future__ import annotations

import sys

from gatrep import config, io, report
from gatrep.config import ReportConfig
from jobs import _cli


def out_uri(cfg: ReportConfig) -> str:
    """Where the page goes: --out, else <run>/report/index.html."""
    return cfg.out or io.join(cfg.run, "report", "index.html")


def run(cfg: ReportConfig) -> dict:
    """Build and write the report; returns its summary with the output URI under "out". Refuses (StageError)
    a run root that does not exist, since every section would only say "not run"."""
    fs, path = io.url_to_fs(cfg.run)
    if not fs.exists(path):
        raise io.StageError(f"run root {cfg.run!r} does not exist; pass the --run of a pipeline run")
    text, summary = report.build(cfg)
    summary["out"] = report.write_html(text, out_uri(cfg))
    return summary


def _print(summary: dict) -> None:
    states = ", ".join(f"{name} {state}" for name, state in summary["sections"].items())
    thumbs = summary["thumbnails"]
    print(f"report: {summary['out']} ({summary['bytes'] / 1e6:.2f} MB, {summary['seconds']:.1f}s; "
          f"{thumbs['embedded']} thumbnails, {thumbs['placeholders']} placeholders)")
    print(f"stages: {states}")
    for name, error in summary["errors"].items():
        print(f"warning: {name}: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(ReportConfig, argv, "Write a run's self-contained HTML report from its published stages.")
    return _cli.run(lambda: _print(run(cfg)))


if __name__ == "__main__":
    raise SystemExit(main())
