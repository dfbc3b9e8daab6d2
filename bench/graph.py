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

With --partitions (e.g. 1,4,16) it measures the graph stage instead, on a published embeddings stage of the
synthetic vectors (written once per N and dim under --workdir, in files of 100,000 rows):

    nice -n 10 python bench/graph.py --sizes 300000 --dim 512 --partitions 1,4,16 --refine 0,1

Each partition count (and, sharded, each --refine count) runs `gatrep.stages.graph.run` in a fresh subprocess
(1: the single build, which reads every vector; more: Ray tasks on a local instance of --cpus CPUs read them).
Reported: wall time of the stage, recall@k of the published graph on the manifest's 1,000-node sample against
exact search (and, sharded, of the merged cells before refinement), the driver's peak RSS (ru_maxrss of the
subprocess, Ray's client included when sharded), and the largest peak RSS of one cell task, one file-split task
and one refinement task (VmHWM of the Ray worker, reset when each task starts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

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


def stage_run(args: argparse.Namespace, n: int) -> Path:
    """The run root that holds the published embeddings stage of n synthetic vectors of --dim."""
    return Path(args.workdir).expanduser() / f"graph-stage-{n}x{args.dim}"


def prepare_stage(args: argparse.Namespace, n: int) -> dict:
    """Publish `<run>/embeddings` of `clustered_features(n, dim)` (ok rows, uris in row order), unless it is."""
    from bench.train import clustered_features
    from gatrep import io, schemas
    from gatrep import vectors as vectors_lib

    run = stage_run(args, n)
    stage = io.join(str(run), schemas.EMBEDDINGS)
    if io.stage_exists(stage):
        return {"prepared": str(run), "reused": True}
    vectors = clustered_features(n, args.dim)
    run_dir = io.new_run_dir(stage)
    files = [io.write_table(embeddings_table(vectors[rows], rows.start), run_dir, f"part-{part:05d}.parquet")
             for part, rows in enumerate(vectors_lib.row_chunks(n, 100_000))]
    with io.stage_lock(stage):
        io.publish(stage, schemas.EMBEDDINGS, files, config={"bench": "graph"}, rows=n)
    return {"prepared": str(run), "reused": False}


def embeddings_table(vectors: np.ndarray, first: int) -> pa.Table:
    """Embeddings rows of `vectors`, all ok, numbered from `first` (uris sort in row order)."""
    from gatrep import schemas
    from gatrep.vectors import to_arrow

    n, ids = len(vectors), range(first, first + len(vectors))
    return pa.table({
        schemas.IMAGE_ID: [f"id-{i}" for i in ids], schemas.URI: [f"mem://bench/img-{i:08d}.png" for i in ids],
        schemas.LISTING: pa.nulls(n, pa.string()), schemas.CATEGORY: pa.nulls(n, pa.string()),
        schemas.WIDTH: pa.array([64] * n, pa.int32()), schemas.HEIGHT: pa.array([64] * n, pa.int32()),
        schemas.STATUS: [schemas.OK] * n, schemas.ERROR: pa.nulls(n, pa.string()),
        schemas.EMBEDDING: to_arrow(vectors), schemas.FINGERPRINT: pa.nulls(n, pa.string()),
    }, schema=schemas.embeddings(vectors.shape[1]))


def measure_stage(args: argparse.Namespace, n: int, partitions: int, refine: int) -> dict:
    """One graph stage build of the prepared stage in this process: wall time, recall, peak memory."""
    from gatrep.config import GraphConfig
    from gatrep.stages import graph as graph_stage

    run = stage_run(args, n)
    shutil.rmtree(run / "graph", ignore_errors=True)
    if partitions != 1:
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    before = resident_bytes()
    start = time.perf_counter()
    manifest = graph_stage.run(GraphConfig(run=str(run), k=args.k, partitions=partitions, overlap=args.overlap,
                                           probe=args.probe, refine=refine,
                                           recall_sample=args.recall_sample, n_jobs=args.n_jobs,
                                           build_k=args.build_k))
    counts, gib = manifest["counts"], 1 << 30
    return {"nodes": n, "dim": args.dim, "partitions": partitions, "overlap": counts.get("overlap", 0),
            "probe": counts.get("probe", 0), "refine": counts.get("refine", 0),
            "wall_s": round(time.perf_counter() - start, 1), "build_s": manifest["timings"]["build"],
            f"recall@{args.k}": round(manifest["recall"]["value"], 4),
            "recall_before_refine": round(counts.get("recall_before_refine") or float("nan"), 4),
            "driver_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib, 2),
            "driver_before_gib": round(before / gib, 2),
            "cell_task_gib": round(counts.get("peak_cell_task_bytes", 0) / gib, 2),
            "split_task_gib": round(counts.get("peak_split_task_bytes", 0) / gib, 2),
            "refine_task_gib": round(counts.get("peak_refine_task_bytes", 0) / gib, 2),
            "largest_cell": counts.get("largest_cell", n)}


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


def print_stage_table(rows: list[dict], k: int) -> None:
    """The graph stage figures, one line per (N, partitions)."""
    print(f"{'nodes':>9} {'dim':>5} {'parts':>5} {'overlap':>7} {'probe':>5} {'refine':>6} {'wall s':>8} "
          f"{'build s':>8} {f'recall@{k}':>10} {'(unrefined)':>11} {'driver GiB':>10} {'(before)':>8} "
          f"{'cell task GiB':>13} {'split task GiB':>14} {'refine task GiB':>15} {'largest cell':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['nodes']:>9} {'':>5} {r['partitions']:>5}  failed: {r['error']}")
            continue
        print(f"{r['nodes']:>9} {r['dim']:>5} {r['partitions']:>5} {r['overlap']:>7} {r['probe']:>5} "
              f"{r['refine']:>6} {r['wall_s']:>8.1f} {r['build_s']:>8.1f} {r[f'recall@{k}']:>10.4f} "
              f"{r['recall_before_refine']:>11.4f} "
              f"{r['driver_gib']:>10.2f} {r['driver_before_gib']:>8.2f} {r['cell_task_gib']:>13.2f} "
              f"{r['split_task_gib']:>14.2f} {r['refine_task_gib']:>15.2f} {r['largest_cell']:>12}")
    print("partitions 1: the single build in the driver (no Ray, no tasks); (unrefined): recall of the merged cells "
          "before the refinement rounds, on the same sample; GiB: peak resident memory; (before): the driver's "
          "resident memory when the stage started (imports, Ray client)")


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
    p.add_argument("--partitions", default="", help="comma-separated partition counts: measure the graph stage "
                                                     "(1 = the single build) instead of pynndescent alone")
    p.add_argument("--overlap", type=int, default=3, help="with --partitions: cells each node is built in")
    p.add_argument("--probe", type=int, default=0, help="with --partitions: cells each node is searched in")
    p.add_argument("--refine", default="2", help="with --partitions: comma-separated refinement rounds to compare "
                                                 "(neighbours of neighbours, exact; each value a run)")
    p.add_argument("--cpus", type=int, default=None, help="with --partitions: CPUs of the local Ray instance")
    p.add_argument("--workdir", default=str(CACHE), help="with --partitions: where the embeddings stages are kept")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.train import run_child

    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.child:
        what, n, *rest = args.child.split(":")
        result = (prepare_stage(args, int(n)) if what == "prepare"
                  else measure_stage(args, int(n), int(rest[0]), int(rest[1]))
                  if what == "stage" else measure(args, what, int(n)))
        print(json.dumps(result), flush=True)
        return 0
    if args.partitions:
        return main_stage(argv, args)
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


def main_stage(argv: list[str], args: argparse.Namespace) -> int:
    """--partitions: prepare each size's embeddings stage, then build its graph stage once per partition count."""
    from bench.train import run_child

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        start = time.perf_counter()
        print(json.dumps(run_child(__file__, argv, f"prepare:{n}", {"nodes": n})),
              f"({time.perf_counter() - start:.0f} s wall)", flush=True)
        for partitions in [int(p) for p in args.partitions.split(",")]:
            for refine in [int(r) for r in args.refine.split(",")] if partitions != 1 else [0]:
                start = time.perf_counter()
                rows.append(run_child(__file__, argv, f"stage:{n}:{partitions}:{refine}",
                                      {"nodes": n, "partitions": partitions}))
                print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f} s wall)", flush=True)
    print_stage_table(rows, args.k)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
