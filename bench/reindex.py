"""What a nightly re-index costs against a full build, and what fine-tuning does to accuracy.

Per seed: write scikit-learn's digits (80% indexed, 20% held-out queries) and keep --new of the indexed images
aside; `jobs.reindex` builds the first version from the rest (the full pipeline: embed, graph, train, index);
the kept images are added and `jobs.reindex` runs again (embed the new ones, update the graph, fine-tune,
re-index). Prints both wall times and their ratio (target: the re-index at most 15% of the full run) and the
categorization accuracy of the same held-out queries before and after, for the GAT-AE k-NN vote and the
raw-feature k-NN vote (target: the fine-tuned version at most 1 point worse). Both runs share one Ray instance
started beforehand, as the jobs of one cluster do; a job's own Ray start-up is not counted.

    python bench/reindex.py                          # seeds 0,1,2, the paper's 200 epochs, 20 of fine-tuning
    python bench/reindex.py --epochs 50 --fine-tune-epochs 5 --seeds 0
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow.compute as pc

from gatrep import datasets, io, reindex, schemas, versions
from gatrep.config import QueryConfig, ReindexConfig
from gatrep.stages import query

METHODS = {"GAT-AE k-NN vote": ("index", "knn"), "raw k-NN vote": ("index-raw", "knn")}


def accuracy(run: str, queries: str, index: str, scoring: str) -> float:
    """Share of the ok queries whose category is their label, queried against the current version."""
    stage = f"bench-{index}"
    query.run(QueryConfig(run=run, input=queries, index=index, scoring=scoring, stage=stage))
    table, _ = io.read_table(io.join(versions.resolve(run), stage), schemas.RESULTS)
    ok = table.filter(pc.equal(table[schemas.STATUS], schemas.OK))
    return float(np.mean(np.asarray(ok[schemas.CATEGORY].to_pylist()) == np.asarray(ok[schemas.LABEL].to_pylist())))


def one_seed(args: argparse.Namespace, seed: int, workdir: str) -> dict[str, float]:
    tree = datasets.write_digits(os.path.join(workdir, "images"), size=args.size, holdout=0.2, seed=seed,
                                 query_root=os.path.join(workdir, "queries"))
    assert tree.query is not None
    rng = np.random.default_rng(seed)
    later = rng.choice(len(tree.files), size=max(1, round(args.new * len(tree.files))), replace=False)
    aside = os.path.join(workdir, "later")
    for i in later:  # kept aside: the uploads of the next day
        os.makedirs(os.path.dirname(os.path.join(aside, tree.files[i])), exist_ok=True)
        shutil.move(os.path.join(tree.root, tree.files[i]), os.path.join(aside, tree.files[i]))
    run = os.path.join(workdir, "run")
    cfg = ReindexConfig(input=tree.root, run=run, backbone=args.backbone, epochs=args.epochs,
                        fine_tune_epochs=args.fine_tune_epochs, seed=seed)
    start = time.perf_counter()
    print(reindex.summary(reindex.run(cfg)), flush=True)
    full = time.perf_counter() - start
    before = {name: accuracy(run, tree.query.root, *method) for name, method in METHODS.items()}
    for i in later:
        shutil.move(os.path.join(aside, tree.files[i]), os.path.join(tree.root, tree.files[i]))
    start = time.perf_counter()
    print(reindex.summary(reindex.run(cfg)), flush=True)
    again = time.perf_counter() - start
    after = {name: accuracy(run, tree.query.root, *method) for name, method in METHODS.items()}
    row = {"images": len(tree.files), "new": len(later), "full_s": full, "reindex_s": again, "ratio": again / full}
    for name in METHODS:
        row[f"{name} before"], row[f"{name} after"] = before[name], after[name]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma separated; figures are mean ± half the range")
    parser.add_argument("--new", type=float, default=0.01, help="share of the indexed images added for the re-index")
    parser.add_argument("--epochs", type=int, default=200, help="training epochs of the first version")
    parser.add_argument("--fine-tune-epochs", type=int, default=20, help="fine-tuning epochs of the re-index")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args()

    import ray

    ray.init(include_dashboard=False)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory(prefix="gatrep-bench-reindex-") as workdir:
            rows.append(one_seed(args, seed, workdir))
        row = rows[-1]
        print(f"seed {seed}: {row['images']} images + {row['new']} new; full {row['full_s']:.1f} s, re-index "
              f"{row['reindex_s']:.1f} s ({row['ratio']:.1%}); "
              + "; ".join(f"{name} {row[f'{name} before']:.1%} -> {row[f'{name} after']:.1%}" for name in METHODS),
              flush=True)
    print(f"\n{args.epochs} epochs, {args.fine_tune_epochs} of fine-tuning, {args.backbone}, seeds {args.seeds}:")
    for key in ("full_s", "reindex_s", "ratio", *(f"{n} {w}" for n in METHODS for w in ("before", "after"))):
        values = np.array([row[key] for row in rows])
        scale, unit = (1, " s") if key.endswith("_s") else (100, "%")
        print(f"  {key:28s} {values.mean() * scale:8.1f} ± {np.ptp(values) / 2 * scale:.1f}{unit}")


if __name__ == "__main__":
    main()
