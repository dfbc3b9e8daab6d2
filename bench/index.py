"""The index stage's per-category work in Ray tasks against in process: wall time and the driver's peak RSS.

    nice -n 10 python bench/index.py --n 120000 --dim 128 --categories 24 --cpus 2

Synthetic latents: --categories clusters of equal size (random centres, one offset per listing, isotropic noise),
--listings listings per category, published once under --workdir. Each mode runs `gatrep.stages.index.run` in a
fresh subprocess, so each pays pynndescent's numba compilation (once in process; once per Ray worker with tasks)
and the tasks mode also starts a local Ray instance of --cpus CPUs (reported apart, not in 'stage s'). Reported:
the stage's wall time, its per-category phase, the driver's peak RSS (ru_maxrss of the subprocess: in process it
holds one group's vectors at a time, with tasks none), the task count and how many categories got a pynndescent
index; then whether both modes published the same tables. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `gatrep` importable

MODES = ("in-process", "tasks")


def publish_latents(run: str, n: int, dim: int, categories: int, listings: int, seed: int = 0) -> None:
    """<run>/latents: n clustered vectors, categories x listings, category-major."""
    from gatrep import io, schemas, vectors

    rng = np.random.default_rng(seed)
    per = n // categories
    category = np.repeat(np.arange(categories), per)
    listing = category * listings + rng.integers(0, listings, size=category.size)
    centres = rng.standard_normal((categories, dim)).astype(np.float32) * 2
    offsets = rng.standard_normal((categories * listings, dim)).astype(np.float32) * 0.5
    x = centres[category] + offsets[listing] + rng.standard_normal((category.size, dim)).astype(np.float32)
    table = pa.table({
        schemas.NODE: np.arange(category.size, dtype=np.int64),
        schemas.IMAGE_ID: [f"img-{i}" for i in range(category.size)],
        schemas.LISTING: [f"c{c:03d}/l{v:05d}" for c, v in zip(category, listing, strict=True)],
        schemas.CATEGORY: [f"c{c:03d}" for c in category],
        schemas.LATENT: vectors.to_arrow(x),
    }, schema=schemas.latents(dim))
    stage = io.join(run, schemas.LATENTS)
    io.publish(stage, schemas.LATENTS, [io.write_table(table, io.new_run_dir(stage))], config={}, rows=table.num_rows)


def child(args: argparse.Namespace) -> None:
    """One mode in this process; prints one JSON line."""
    from gatrep import config
    from gatrep.stages import index

    ray_s = 0.0
    if args.child == "tasks":
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False)
        ray_s = time.perf_counter() - start
    cfg = config.IndexConfig(run=args.workdir, stage=f"index-{args.child}", seed=0)
    start = time.perf_counter()
    manifest = index.run(cfg, tasks=args.child == "tasks")
    wall = time.perf_counter() - start
    print(json.dumps({"mode": args.child, "wall_s": wall, "ray_start_s": ray_s,
                      "per_category_s": manifest["timings"]["per_category"], "groups": manifest["category_groups"],
                      "ann": manifest["ann_categories"],
                      "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def same_tables(run: str) -> bool:
    """Whether both modes published equal tables (pickle checksums aside: they differ between any two builds)."""
    from gatrep import io

    for table in ("listings", "categories", "listing_similarity", "merge_suggestions", "ann_vectors", "ann_catalog"):
        a, b = (io.read_table(io.join(run, f"index-{mode}"), "index", table)[0] for mode in MODES)
        if table == "ann_catalog":
            a, b = a.drop(["ann_sha256"]), b.drop(["ann_sha256"])
        if not a.equals(b):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=120_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--categories", type=int, default=24)
    parser.add_argument("--listings", type=int, default=20, help="listings per category")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (tasks mode)")
    parser.add_argument("--workdir", default="/tmp/gatrep-bench-index")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    publish_latents(args.workdir, args.n, args.dim, args.categories, args.listings)
    print(f"{args.n} x {args.dim}-d latents, {args.categories} categories x {args.listings} listings, "
          f"{args.cpus} Ray CPUs")
    print(f"{'mode':<11} {'stage s':>8} {'per-cat s':>9} {'ray start s':>11} {'tasks':>5} {'ann':>4} "
          f"{'driver peak RSS MiB':>19}")
    for mode in MODES:
        argv = [sys.executable, __file__, "--child", mode, "--workdir", args.workdir, "--cpus", str(args.cpus)]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{r['mode']:<11} {r['wall_s']:>8.1f} {r['per_category_s']:>9.1f} {r['ray_start_s']:>11.1f} "
              f"{r['groups'] if mode == 'tasks' else 0:>5} {r['ann']:>4} {r['rss_mib']:>19.0f}", flush=True)
    print("same tables:", same_tables(args.workdir))


if __name__ == "__main__":
    main()
