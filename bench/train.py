"""Training cost of the GAT-AE: seconds per epoch and peak memory, sampled mini-batches vs PyG full-batch.

    python bench/train.py --nodes 10000,100000,1000000            # CPU, this machine
    python3 bench/train.py --device cuda --nodes 1000000          # on a GPU machine (torch + torch-geometric only)

Each (N, mode) runs in a fresh subprocess so that its peak memory (max RSS on the CPU, max allocated
on a GPU) is its own. Features are clustered unit vectors [N, 512] (float32) and the neighbour table
is a random k-NN table [N, k] (k distinct random other nodes, int64) generated directly, so neither
Ray nor pynndescent is needed. Sampled mode: one epoch = every node a seed once, in batches of
--batch-size with --num-neighbors per hop (the training job's loop, `gatrep.models.epoch`); above
--full-epoch-max nodes only --max-batches batches run and the epoch time is extrapolated from them.
Full-batch mode: one Adam step of the same model over the whole graph (PyG's usual full-graph
training: one step = one epoch), only up to --full-batch-max nodes. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `gatrep` importable

from gatrep import sampling  # noqa: E402
from gatrep.config import ModelConfig  # noqa: E402
from gatrep.models import build_model  # noqa: E402
from gatrep.models.epoch import train_epoch  # noqa: E402


def clustered_features(n: int, dim: int, clusters: int = 1000, rank: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors: a cluster centre plus a rank-`rank` spread plus small isotropic noise, float32 throughout."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    basis = rng.standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        block = centres[rng.integers(0, clusters, m)]
        block += rng.standard_normal((m, rank), dtype=np.float32) @ basis
        block += 0.05 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def random_knn_table(n: int, k: int, seed: int = 0) -> np.ndarray:
    """[n, k] int64: k distinct random neighbours per node, never the node itself (a stand-in k-NN graph)."""
    rng = np.random.default_rng(seed)
    table = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        # k draws from the n - 1 other ids: offsets 1..n-1 added modulo n can never give the node itself;
        # rows with a repeated draw are redrawn until distinct (rare when k << n).
        offsets = rng.integers(1, n, (m, k))
        while True:
            srt = np.sort(offsets, axis=1)
            dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
            if not dup.any():
                break
            offsets[dup] = rng.integers(1, n, (int(dup.sum()), k))
        table[start:start + m] = (np.arange(start, start + m)[:, None] + offsets) % n
    return table


def peak_memory_gib(device: str) -> float:
    """Peak memory of this process: max allocated on the GPU, else max resident set size."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def sync(device: str) -> None:
    """Wait for queued device work, so wall-clock times are complete."""
    if device == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace, n: int, mode: str) -> dict:
    """One measurement in this process: data, model, warm-up, timed batches or full-batch steps."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = args.device
    interpreter = peak_memory_gib("cpu")  # Python, torch and PyG loaded, before any data
    features = torch.from_numpy(clustered_features(n, args.dim))
    neighbours = torch.from_numpy(random_knn_table(n, args.k))
    data_gib = (features.numel() * 4 + neighbours.numel() * 8) / 2**30
    if device == "cuda":
        features, neighbours = features.to(device), neighbours.to(device)
        torch.cuda.reset_peak_memory_stats()
    base = peak_memory_gib(device)
    paper = ModelConfig(in_dim=args.dim, standardise=False)
    model_cfg = paper if not args.small_model else ModelConfig(in_dim=args.dim, hidden=64, heads=2)
    model = build_model(model_cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    result = {"nodes": n, "mode": mode, "device": device, "data_gib": round(data_gib, 3),
              "rss_interpreter_gib": round(interpreter, 3), "after_data_gib": round(base, 3)}
    if mode == "sampled":
        result.update(_sampled(args, model, optimizer, features, neighbours))
    else:
        result.update(_full_batch(args, model, optimizer, features, neighbours))
    result["peak_gib"] = round(peak_memory_gib(device), 3)
    result["peak_over_data"] = round(result["peak_gib"] / data_gib, 2)
    if device == "cpu":  # the same ratio without the fixed cost of the interpreter and its libraries
        result["peak_less_interpreter_over_data"] = round((result["peak_gib"] - interpreter) / data_gib, 2)
    return result


def _sampled(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             features: torch.Tensor, neighbours: torch.Tensor) -> dict:
    n = len(features)
    seeds = torch.randperm(n, device=features.device)
    loader = sampling.make_loader(features, neighbours, seeds, args.num_neighbors, args.batch_size, seed=0,
                                  use_pyg_lib=False)
    batches_per_epoch = -(-n // args.batch_size)
    full = n <= args.full_epoch_max
    train_epoch(model, optimizer, loader, args.device, max_batches=2)  # warm-up: allocator, kernels
    sync(args.device)
    stats = train_epoch(model, optimizer, loader, args.device, max_batches=0 if full else args.max_batches)
    per_batch = stats.seconds / stats.batches
    return {"batches_timed": stats.batches, "batches_per_epoch": batches_per_epoch,
            "seconds_per_batch": round(per_batch, 4), "epoch_seconds": round(per_batch * batches_per_epoch, 2),
            "extrapolated": not full, "loss": round(stats.loss, 5)}


def _full_batch(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                features: torch.Tensor, neighbours: torch.Tensor) -> dict:
    from torch_geometric.data import Data

    batch = Data(x=features, edge_index=sampling.edge_index_of(neighbours))
    batch.batch_size = len(features)
    train_epoch(model, optimizer, [batch], args.device)  # warm-up step
    sync(args.device)
    steps = [train_epoch(model, optimizer, [batch], args.device) for _ in range(args.full_batch_steps)]
    seconds = sum(s.seconds for s in steps) / len(steps)
    return {"batches_per_epoch": 1, "epoch_seconds": round(seconds, 2), "extrapolated": False,
            "loss": round(steps[-1].loss, 5)}


def run_child(script: str, argv: list[str], child: str, identity: dict) -> dict:
    """Run `script argv --child child` in a fresh interpreter (its own peak memory, its own JIT); its last
    JSON line, or `identity` with the error it died with. Shared by the benchmarks in bench/."""
    done = subprocess.run([sys.executable, script, *argv, "--child", child], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**identity, "error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def print_table(rows: list[dict]) -> None:
    """The figures, one line per (N, mode), and the epoch-time growth between consecutive N."""
    print(f"{'nodes':>9} {'mode':>8} {'device':>6} {'epoch s':>10} {'s/batch':>8} {'batches':>8} "
          f"{'peak GiB':>9} {'data GiB':>9} {'peak/data':>9} {'(-interp)':>9}  note")
    for r in rows:
        if "error" in r:
            print(f"{r['nodes']:>9} {r['mode']:>8}  failed: {r['error']}")
            continue
        note = f"extrapolated from {r['batches_timed']} batches" if r.get("extrapolated") else ""
        print(f"{r['nodes']:>9} {r['mode']:>8} {r['device']:>6} {r['epoch_seconds']:>10.2f} "
              f"{r.get('seconds_per_batch', float('nan')):>8.4f} {r['batches_per_epoch']:>8} {r['peak_gib']:>9.2f} "
              f"{r['data_gib']:>9.3f} {r['peak_over_data']:>9.2f} "
              f"{r.get('peak_less_interpreter_over_data', float('nan')):>9.2f}  {note}")
    sampled = [r for r in rows if r.get("mode") == "sampled" and "error" not in r]
    for a, b in zip(sampled, sampled[1:], strict=False):
        exponent = np.log(b["epoch_seconds"] / a["epoch_seconds"]) / np.log(b["nodes"] / a["nodes"])
        print(f"sampled epoch time {a['nodes']} -> {b['nodes']} nodes grows as N^{exponent:.2f}")


def parse(argv: list[str]) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="10000,100000,1000000", help="comma-separated graph sizes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--num-neighbors", default="10,10", help="neighbours sampled per hop")
    p.add_argument("--max-batches", type=int, default=20, help="batches timed above --full-epoch-max nodes")
    p.add_argument("--full-epoch-max", type=int, default=10000, help="largest N whose whole epoch is timed")
    p.add_argument("--full-batch-max", type=int, default=100000, help="largest N for the PyG full-batch run")
    p.add_argument("--full-batch-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    p.add_argument("--small-model", action="store_true", help="hidden 64, 2 heads instead of the paper's model")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.num_neighbors = [int(x) for x in args.num_neighbors.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.child:
        n, mode = args.child.split(":")
        print(json.dumps(measure(args, int(n), mode)), flush=True)
        return 0
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", {os.cpu_count()} CPUs"))
    rows = []
    for n in (int(x) for x in args.nodes.split(",")):
        modes = ["sampled"] + (["full-batch"] if n <= args.full_batch_max else [])
        for mode in modes:
            start = time.perf_counter()
            rows.append(run_child(__file__, argv, f"{n}:{mode}", {"nodes": n, "mode": mode}))
            print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f} s wall)", flush=True)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
