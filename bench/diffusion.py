"""GRAD-Net diffusion against the raw-feature methods of bench/quality.py, on the same seeded splits and judge.

    python bench/diffusion.py --dataset digits --seeds 0,1,2          # 1,437 indexed / 360 held out per seed
    python bench/diffusion.py --dataset fashion-mnist --seeds 0,1,2   # 10,000 indexed / 2,000 test queries

Splits, cached backbone features, the raw-feature rows and their validation tuning are bench/quality.py's own
(`load_pool`, `split`, `cached_features`, `tune`, `raw_rows`, `judge`), so the rows compare like for like. Each method
is judged by a 10-NN vote (accuracy), retrieval inside the chosen category, and retrieval over the whole index (top-10
by cosine, any category; relevant = same category label). GRAD-Net rows: the diffused index features with the queries'
features by QFE, categorized by a 10-NN vote over the diffused index. "raw + QFE" applies the same query expansion
to the raw index features with no training, to show what the network adds beyond the expansion.

GRAD-Net's settings (a --grid of DiffusionConfig overrides, and QFE once or twice) are chosen by whole-index mAP@10
on a validation split carved from the first seed's index (80/20, stratified), never on test queries; every seed
then trains its own model with them. Figures: mean ± half the range over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `gatrep` and `bench` importable

from bench.quality import (  # noqa: E402
    Figures,
    judge,
    markdown,
    pool_features,
    raw_rows,
    searcher,
    split,
    tune,
)
from gatrep.models import diffusion  # noqa: E402
from gatrep.vectors import normalise  # noqa: E402

# Candidate settings tried on validation (JSON overrides of DiffusionConfig; {} = its defaults).
GRID = '[{}, {"anchors": 64}, {"epochs": 20}]'


def knn_figures(index: np.ndarray, labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                k: int) -> Figures:
    """A 10-NN vote and retrieval of `queries` over `index` through the query stage's Searcher (bench/quality)."""
    return judge(searcher(index, labels, "centroid"), lambda s: s.search(queries, k, "knn"), query_labels, k)


def grad_rows(x: np.ndarray, labels: np.ndarray, xq: np.ndarray, q: np.ndarray, cfg: diffusion.DiffusionConfig,
              k: int) -> dict[str, Figures]:
    """GRAD-Net fitted on the index x with `cfg`, judged on the queries by QFE; and raw features + QFE alone."""
    t = time.perf_counter()
    fitted = diffusion.fit(x, cfg)
    print(f"    grad-net fitted in {time.perf_counter() - t:.0f} s, loss {fitted.losses[0]:.3f} -> "
          f"{fitted.losses[-1]:.3f}", flush=True)
    raw_qfe = diffusion.query_feature_expansion(xq, x, normalise(x), cfg.qfe_k, cfg.qfe_rounds)
    return {
        f"raw + QFE (k={cfg.qfe_k} x{cfg.qfe_rounds}, no training), 10-NN vote": knn_figures(x, labels, raw_qfe, q, k),
        f"grad-net + QFE (k={cfg.qfe_k} x{cfg.qfe_rounds}), 10-NN vote": knn_figures(
            fitted.features, labels, fitted.query_features(xq), q, k),
    }


def choose(x: np.ndarray, labels: np.ndarray, grid: list[dict[str, Any]], base: dict[str, Any],
           k: int) -> diffusion.DiffusionConfig:
    """The grid entry and QFE rounds with the best whole-index mAP@k on an 80/20 validation split of the index."""
    from sklearn.model_selection import train_test_split

    fit, val = train_test_split(np.arange(len(x)), test_size=0.2, stratify=labels, random_state=0)
    xi, yi, xv, yv = x[fit], labels[fit], x[val], labels[val]
    print(f"  validation ({len(fit)} indexed, {len(val)} queries): raw mAP@{k} whole index "
          f"{knn_figures(xi, yi, xv, yv, k).map_all:.3f}", flush=True)
    best, best_map = None, -1.0
    for overrides in grid:
        cfg = diffusion.DiffusionConfig(**{**base, **overrides})
        t = time.perf_counter()
        fitted = diffusion.fit(xi, cfg)
        for rounds in (1, 2):
            hq = diffusion.query_feature_expansion(xv, fitted.raw, fitted.features, cfg.qfe_k, rounds)
            m = knn_figures(fitted.features, yi, hq, yv, k).map_all
            print(f"    {json.dumps(overrides):24s} QFE x{rounds}: mAP@{k} {m:.3f}  "
                  f"(fit {time.perf_counter() - t:.0f} s, loss {fitted.losses[0]:.3f} -> {fitted.losses[-1]:.3f})",
                  flush=True)
            if m > best_map:
                best, best_map = dataclasses.replace(cfg, qfe_rounds=rounds), m
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
    parser.add_argument("--index-limit", type=int, default=10_000, help="Fashion-MNIST images indexed (0 = all)")
    parser.add_argument("--query-limit", type=int, default=2_000, help="Fashion-MNIST test images queried (0 = all)")
    parser.add_argument("--index-pool", type=int, default=12_000, help="Fashion-MNIST training images drawn from")
    parser.add_argument("--query-pool", type=int, default=3_000, help="Fashion-MNIST test images drawn from")
    parser.add_argument("--fashion-dir", default="/usr/share/datasets/fashion-mnist", help="the IDX .gz files")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--device", default="cpu", help="backbone device (GRAD-Net trains on the CPU)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/gatrep/bench"),
                        help="folder of cached backbone features ('' = none), shared with bench/quality.py")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2", help="comma separated: each draws its split and trains")
    parser.add_argument("--grid", default=GRID, help="JSON list of DiffusionConfig overrides tried on validation")
    parser.add_argument("--base", default="{}", help="JSON DiffusionConfig overrides under every grid entry")
    parser.add_argument("--no-tune", action="store_true", help="use --base as it is (no validation runs)")
    parser.add_argument("--procs", type=int, default=multiprocessing.cpu_count(), help="processes cropping images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; GRAD-Net's small sparse steps ran 7x "
                                                                 "faster on 1 than on 2 on a busy 2-core machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    pool, x_pool, xq_pool = pool_features(args)
    print(f"{args.dataset}: features {x_pool.shape}; {time.perf_counter() - start:.1f} s", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = json.loads(args.base)
    cfg = diffusion.DiffusionConfig(**base)
    runs = []
    for seed in seeds:
        rows, qrows = split(pool, seed, args.index_limit, args.query_limit)
        x, labels, xq, q = x_pool[rows], pool.index_labels[rows], xq_pool[qrows], pool.query_labels[qrows]
        if seed == seeds[0] and not args.no_tune:
            cfg = choose(x, labels, json.loads(args.grid), base, args.k)
        print(f"  seed {seed}: {len(x)} indexed, {len(xq)} queries; grad-net {cfg}", flush=True)
        tuned = tune(x, labels, seed, args.k)
        run = {name: figures for name, figures in raw_rows(x, labels, xq, q, tuned, seed, args.k).items()
               if "vote" in name}  # the k-NN rows: the strongest raw methods (bench/quality.py prints them all)
        run.update(grad_rows(x, labels, xq, q, dataclasses.replace(cfg, seed=seed), args.k))
        runs.append(run)
        print(f"    {time.perf_counter() - start:.1f} s", flush=True)
    print(f"\n{args.dataset}, {len(runs)} seeds (mean ± half the range), {args.backbone}; grad-net {cfg}:\n")
    print(markdown(runs, args.k))
    grad = [name for name in runs[0] if name.startswith("grad-net")][0]
    gain = np.mean([r[grad].map_all - r["raw 10-NN vote"].map_all for r in runs])
    print(f"\nwhole-index mAP@{args.k}: grad-net - raw = {100 * gain:+.1f} points (target +3.0); "
          f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
