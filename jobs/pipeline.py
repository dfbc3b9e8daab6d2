"""`python -m jobs.pipeline`: every stage in order on one input; without --input, the digits demo."""

from __future__ import annotations

import argparse
import time

from gatrep import io
from jobs import _cli


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", help="image tree or manifest; default: scikit-learn's digits written "
                                        "as an image tree under <run>/inputs")
    parser.add_argument("--run", default="runs/demo", help="run root URI (default: runs/demo)")
    parser.add_argument("--backbone", default="mobilenet_v2", help="backbone name (default: mobilenet_v2)")
    parser.add_argument("--weights", default="default", help="'default', 'random' or a weights file")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (see jobs.embed --help)")
    return parser.parse_args(argv)


def demo_input(run: str) -> str:
    """Write the digits demo tree (80% indexed; 20% held out as queries) and return the index root."""
    from gatrep import datasets

    tree = datasets.write_digits(io.join(run, "inputs", "digits"), size=64, holdout=0.2,
                                 query_root=io.join(run, "inputs", "digits-query"))
    queries = tree.query.files if tree.query else ()
    print(f"demo input: {len(tree.files)} digit images under {tree.root}; {len(queries)} held-out queries")
    return tree.root


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def job() -> None:
        from jobs import embed

        start = time.perf_counter()
        source = args.input or demo_input(args.run)
        code = embed.main(["--input", source, "--run", args.run, "--backbone", args.backbone,
                           "--weights", args.weights, "--device", args.device])
        if code:
            raise SystemExit(code)
        print(f"pipeline finished in {time.perf_counter() - start:.1f} s; stages under {args.run}")

    return _cli.run(job)


if __name__ == "__main__":
    raise SystemExit(main())
