"""k-NN graph build: pynndescent time and recall@k against exact search, and exact brute-force time.

    nice -n 10 python bench/graph.py --sizes 50000,200000,1000000 --data synthetic,fashion-mnist

Each (data, N) runs in a fresh subprocess, so the numba JIT compilation that pynndescent pays once
per process is measured every time (reported apart, and added in 'total'). Synthetic data: clustered
unit vectors [N, 512] (1000 centres, a rank-32 spread, small isotropic noise; see bench/train.py).
Fashion-MNIST: the 70,000 images of Debian's dataset-fashion-mnist through torchvision's ImageNet
MobileNetV2 (the gatrep `mobilenet_v2` backbone, weights from an installed package) at 64x64 pixels,
PCA to 512 dimensions, L2-normalised; cached under ~/.cache/gatrep/bench. The real set has 70,000
images, so larger sizes are capped there. recall@k: `gatrep.knn.recall_at_k` on --recall-sample
random nodes. Exact time: the full brute-force k-NN (chunked matrix products, torch) where N is at
most --exact-max; above it, extrapolated from the recall sample's exact search (time x N / sample).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `gatrep` importable

CACHE = Path(os.path.expanduser("~/.cache/gatrep/bench"))
FASHION_SIZE = 70_000


def fashion_mnist_embeddings(dim: int = 512, pixels: int = 64) -> np.ndarray:
    """[70000, dim] unit vectors: MobileNetV2 features of Fashion-MNIST (train + test), PCA to `dim`; cached."""
    path = CACHE / f"fashion_mnist_mobilenet_v2_{pixels}px_pca{dim}.npy"
    if path.exists():
        return np.load(path)
    import torch
    import torch.nn.functional as F
    from sklearn.decomposition import PCA

    from gatrep import backbones, datasets

    images = np.concatenate([datasets.load_fashion_mnist(split)[0] for split in ("train", "test")])
    encoder = backbones.get("mobilenet_v2").load("default", "cpu")
    features = []
    for start in range(0, len(images), 500):
        batch = torch.from_numpy(images[start:start + 500]).float().unsqueeze(1)
        batch = F.interpolate(batch, size=(pixels, pixels), mode="bilinear", align_corners=False)
        rgb = batch.clamp(0, 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
        features.append(encoder(rgb))
    reduced = PCA(n_components=dim, random_state=0).fit_transform(np.concatenate(features)).astype(np.float32)
    reduced /= np.linalg.norm(reduced, axis=1, keepdims=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, reduced)
    return reduced


def vectors_for(data: str, n: int, dim: int) -> np.ndarray:
    """The benchmark's vectors: synthetic clusters of size n, or the Fashion-MNIST embeddings (first n)."""
    if data == "synthetic":
        from bench.train import clustered_features

        return clustered_features(n, dim)
    return fashion_mnist_embeddings(dim)[:n]


def measure(args: argparse.Namespace, data: str, n: int) -> dict:
    """One (data, N) measurement in this process: JIT warm-up, build, recall, exact search time."""
    import torch

    from gatrep import knn
    from gatrep import vectors as vectors_lib

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    start = time.perf_counter()
    tiny = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    vectors_lib.approximate_knn(vectors_lib.normalise(tiny), 5, metric=args.metric, n_jobs=args.n_jobs)
    jit = time.perf_counter() - start
    vectors = vectors_for(data, n, args.dim)
    start = time.perf_counter()
    neighbours, _ = vectors_lib.approximate_knn(vectors, args.k, metric=args.metric, n_jobs=args.n_jobs, seed=0,
                                        build_k=args.build_k)
    build = time.perf_counter() - start
    groups = np.zeros(len(vectors), dtype=object)
    start = time.perf_counter()
    recall = knn.recall_at_k(vectors, neighbours, groups, args.recall_sample, seed=1)
    sample_exact = time.perf_counter() - start
    result = {"data": data, "nodes": len(vectors), "k": args.k, "jit_s": round(jit, 1), "build_s": round(build, 1),
              "total_s": round(jit + build, 1), f"recall@{args.k}": round(recall or 0.0, 4)}
    if len(vectors) <= args.exact_max:
        start = time.perf_counter()
        vectors_lib.exact_knn(vectors, args.k)
        result.update(exact_s=round(time.perf_counter() - start, 1), exact_extrapolated=False)
    else:
        result.update(exact_s=round(sample_exact * len(vectors) / min(args.recall_sample, len(vectors)), 1),
                      exact_extrapolated=True)
    return result


def print_table(rows: list[dict], k: int) -> None:
    """The figures, one line per (data, N), then the growth of build time between consecutive sizes."""
    print(f"{'data':>13} {'nodes':>9} {'jit s':>7} {'build s':>8} {'total s':>8} {f'recall@{k}':>10} {'exact s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['data']:>13} {r['nodes']:>9}  failed: {r['error']}")
            continue
        exact = f"{r['exact_s']:.1f}" + ("*" if r["exact_extrapolated"] else "")
        print(f"{r['data']:>13} {r['nodes']:>9} {r['jit_s']:>7.1f} {r['build_s']:>8.1f} {r['total_s']:>8.1f} "
              f"{r[f'recall@{k}']:>10.4f} {exact:>9}")
    print("* extrapolated from the exact search of the recall sample")
    ok = [r for r in rows if "error" not in r]
    for data in sorted({r["data"] for r in ok}):
        series = [r for r in ok if r["data"] == data]
        for a, b in zip(series, series[1:], strict=False):
            if b["nodes"] > a["nodes"]:
                exponent = np.log(b["build_s"] / a["build_s"]) / np.log(b["nodes"] / a["nodes"])
                print(f"{data}: build time {a['nodes']} -> {b['nodes']} grows as N^{exponent:.2f}")


def parse(argv: list[str]) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="50000,200000,1000000", help="comma-separated numbers of vectors")
    p.add_argument("--data", default="synthetic,fashion-mnist", help="synthetic and/or fashion-mnist")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--metric", default="cosine")
    p.add_argument("--build-k", type=int, default=0, help="pynndescent n_neighbors; 0 = gatrep's default")
    p.add_argument("--n-jobs", type=int, default=-1, help="pynndescent threads; -1 = all cores")
    p.add_argument("--threads", type=int, default=0, help="torch threads for exact search; 0 = all cores")
    p.add_argument("--recall-sample", type=int, default=1000)
    p.add_argument("--exact-max", type=int, default=200000, help="largest N whose full exact k-NN is timed")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.train import run_child

    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.child:
        data, n = args.child.split(":")
        print(json.dumps(measure(args, data, int(n))), flush=True)
        return 0
    rows = []
    for data in args.data.split(","):
        sizes = [int(s) for s in args.sizes.split(",")]
        if data == "fashion-mnist":  # the real set has 70,000 images: smaller sizes, then all of it
            sizes = sorted({min(s, FASHION_SIZE) for s in sizes})
        for n in sizes:
            start = time.perf_counter()
            rows.append(run_child(__file__, argv, f"{data}:{n}", {"data": data, "nodes": n}))
            print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f} s wall)", flush=True)
    print_table(rows, args.k)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
