"""`python -m jobs.pipeline`: every stage in order on one input; without --input, the digits demo.

embed -> graph -> train -> index (GAT-AE latents) and the paper's baselines (raw backbone features,
HOG) -> embed the held-out queries -> query with every method -> evaluate (one table) -> report.
"""

from __future__ import annotations

import argparse
import importlib
import time

from gatrep import io
from jobs import _cli


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="labelled image tree or manifest to index; default: scikit-learn's digits "
                                        "written as an image tree under <run>/inputs (80%% indexed)")
    parser.add_argument("--queries", help="labelled query images (never indexed); default with the demo: the "
                                          "held-out 20%% of the digits; without it, no query/evaluate stages")
    parser.add_argument("--run", default="runs/demo", help="run root URI (default: runs/demo)")
    parser.add_argument("--backbone", default="mobilenet_v2", help="backbone name (default: mobilenet_v2)")
    parser.add_argument("--weights", default="default", help="'default', 'random' or a weights file")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (see jobs.embed --help)")
    parser.add_argument("--k", type=int, default=10, help="k-NN graph degree and matches per query")
    parser.add_argument("--epochs", type=int, default=200, help="GAT-AE training epochs (the paper: 200)")
    parser.add_argument("--no-hog", action="store_true", help="skip the HOG baseline")
    return parser.parse_args(argv)


def step(job: str, *argv: str) -> None:
    """Run `jobs.<job>` with flags; a failing stage stops the pipeline with its exit status."""
    print(f"\n== {job} {' '.join(argv)}", flush=True)
    code = importlib.import_module(f"jobs.{job}").main(list(argv))
    if code:
        raise SystemExit(code)


def demo_inputs(run: str) -> tuple[str, str]:
    """Write the digits demo (80% indexed, 20% held out as queries); returns (index root, query root)."""
    from gatrep import datasets

    tree = datasets.write_digits(io.join(run, "inputs", "digits"), size=64, holdout=0.2,
                                 query_root=io.join(run, "inputs", "digits-query"))
    assert tree.query is not None
    print(f"demo input: {len(tree.files)} digit images under {tree.root}; "
          f"{len(tree.query.files)} held-out queries under {tree.query.root}")
    return tree.root, tree.query.root


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def job() -> None:
        start = time.perf_counter()
        source, queries = (args.input, args.queries) if args.input else demo_inputs(args.run)
        run = ["--run", args.run]
        embed = ["--backbone", args.backbone, "--weights", args.weights, "--device", args.device]
        step("embed", "--input", source, *run, *embed)
        step("graph", *run, "--k", str(args.k))
        step("train", *run, "--epochs", str(args.epochs))
        step("index", *run)
        step("index", *run, "--source", "embeddings", "--stage", "index-raw")
        # (index, category scoring, query latent): the paper's Approach II and I on the GAT-AE latents, a
        # k-NN vote over them, then the baselines on raw backbone features and on HOG.
        methods = [("index", "single", "category-aware"), ("index", "single", "context-aware"),
                   ("index", "knn", "context-aware"), ("index-raw", "single", ""), ("index-raw", "max", ""),
                   ("index-raw", "knn", "")]
        if not args.no_hog:
            step("embed", "--input", source, *run, "--backbone", "hog", "--stage", "embeddings-hog")
            step("index", *run, "--source", "embeddings", "--input-stage", "embeddings-hog", "--stage", "index-hog")
            methods.append(("index-hog", "single", ""))
        if queries:
            step("embed", "--input", queries, *run, *embed, "--stage", "query-embeddings")
            if not args.no_hog:
                step("embed", "--input", queries, *run, "--backbone", "hog", "--stage", "query-embeddings-hog")
            results = []
            for index, scoring, latent in methods:
                stage = "-".join(["results", index, scoring, *([latent] if latent else [])])
                query_input = io.join(args.run, "query-embeddings-hog" if index == "index-hog" else "query-embeddings")
                step("query", *run, "--input", query_input, "--index", index, "--scoring", scoring,
                     "--k", str(args.k), "--stage", stage, *(["--query-latent", latent] if latent else []))
                results.append(stage)
            step("evaluate", *run, "--results", ",".join(results), "--k", str(args.k))
        step("report", *run)
        print(f"\npipeline finished in {time.perf_counter() - start:.1f} s; stages under {args.run}")

    return _cli.run(job)


if __name__ == "__main__":
    raise SystemExit(main())
