"""The whole pipeline's cost curve: every stage at growing collection sizes, its wall time, the peak memory of its
driver process, and how each grows with N.

    python bench/pipeline.py --sizes 10000,30000,100000

For each N: Fashion-MNIST training images as `--size`-pixel PNGs (past its 60,000 images, hard links to them
under other names: the same pixels, read, hashed and embedded like any file), and N/10 of its test images (at
most 10,000) as queries. Then each job in its own process, as `ray job submit` would run it, joined to one local
Ray head started for the benchmark (its own temporary folder and ports; stopped at the end): embed (a cheap
backbone, `--backbone`), graph, train (`--epochs`), index, embed the queries, query, evaluate, report.

Per stage it prints the wall time, the driver's peak RSS (the job's own process: os.wait4's ru_maxrss; Ray's
workers are not counted), and between consecutive sizes the growth exponent log(t2/t1) / log(N2/N1): 1 is linear.
A stage above `--flag` (1.2) is marked.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

STAGES = ("embed", "graph", "train", "index", "embed-queries", "query", "evaluate", "report")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_head(temp: str) -> tuple[dict[str, str], str]:
    """A Ray head of this machine's CPUs with its own folder and ports and token authentication (as
    tests/test_job_submit.py starts one); returns (the environment a job needs to join it, its address)."""
    import ray

    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    port = free_port()
    ray_command = os.path.join(os.path.dirname(sys.executable), "ray")  # the one beside this Python, venv or not
    subprocess.run([ray_command, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                    f"--num-cpus={os.cpu_count()}", f"--ray-client-server-port={free_port()}",
                    f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, start_new_session=True)
    address = f"{ray.util.get_node_ip_address()}:{port}"  # Ray listens on this machine's IP, not on 127.0.0.1
    return {**env, "RAY_ADDRESS": address}, address


def stop_head(temp: str) -> None:
    """Stop every process of the head (their command lines name its folder): `ray stop` would stop every Ray
    instance of the machine, other people's included. SIGKILL what outlasts SIGTERM by 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        subprocess.run(["pkill", f"-{int(sig)}", "-f", temp], check=False)
        time.sleep(10 if sig == signal.SIGTERM else 1)


def write_inputs(root: str, n: int, size: int) -> tuple[str, str]:
    """(index tree of n images, query tree of n/10), written once."""
    from gatrep import datasets

    index, queries = os.path.join(root, f"index-{n}"), os.path.join(root, f"queries-{n}")
    datasets.write_fashion_mnist_copies(index, n, split="train", size=size, fmt="png")
    if not os.path.isdir(queries):
        datasets.write_fashion_mnist(queries, split="test", size=size, fmt="png", limit=min(max(n // 10, 100), 10_000))
    return index, queries


def job(name: str, args: list[str], env: dict[str, str], log: str) -> tuple[float, float]:
    """(seconds, peak RSS of the job's process in MiB) of `python -m jobs.<name> args`; raises when it fails."""
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n== {name} {' '.join(args)}\n")
        out.flush()
        process = subprocess.Popen([sys.executable, "-m", f"jobs.{name}", *args], env=env, stdout=out, stderr=out)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"jobs.{name} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return seconds, usage.ru_maxrss / 1024


def pipeline(n: int, args: argparse.Namespace, env: dict[str, str]) -> dict[str, tuple[float, float]]:
    """Every stage over n images; {stage: (seconds, peak MiB)}."""
    index, queries = write_inputs(args.data, n, args.size)
    run = os.path.join(args.work, f"run-{n}")
    shutil.rmtree(run, ignore_errors=True)
    log = os.path.join(args.work, f"log-{n}.txt")
    base = ["--run", run]
    steps = {
        "embed": ("embed", ["--input", index, "--backbone", args.backbone, "--weights", "random", *base]),
        "graph": ("graph", [*base, "--k", "10"]),
        "train": ("train", [*base, "--epochs", str(args.epochs), "--workers", "1"]),
        "index": ("index", base),
        "embed-queries": ("embed", ["--input", queries, "--backbone", args.backbone, "--weights", "random",
                                    "--stage", "query-embeddings", *base]),
        "query": ("query", [*base, "--input", os.path.join(run, "query-embeddings"), "--index", "index"]),
        "evaluate": ("evaluate", base),
        "report": ("report", base),
    }
    costs = {}
    for stage in STAGES:
        name, flags = steps[stage]
        costs[stage] = job(name, flags, env, log)
        print(f"  N={n:>7,} {stage:14s} {costs[stage][0]:8.1f} s  peak {costs[stage][1]:8.0f} MiB", flush=True)
    return costs


def exponent(a: float, b: float, n_a: int, n_b: int) -> float:
    return math.log(b / a) / math.log(n_b / n_a) if a > 0 and b > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,30000,100000")
    parser.add_argument("--backbone", default="tiny-random", help="a cheap backbone: the curve is about the system")
    parser.add_argument("--size", type=int, default=32, help="side of the PNGs written")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", default=os.path.expanduser("~/.cache/gatrep/bench-pipeline"))
    parser.add_argument("--flag", type=float, default=1.2, help="growth exponents above this are marked")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    # Ray's socket paths must stay short: its folder goes directly under /tmp.
    with tempfile.TemporaryDirectory() as work, tempfile.TemporaryDirectory(dir="/tmp", prefix="ray-") as temp:
        args.work = work
        env, address = start_head(temp)
        print(f"Ray head at {address}; {os.cpu_count()} CPUs; backbone {args.backbone}, {args.epochs} epochs",
              flush=True)
        try:
            costs = {n: pipeline(n, args, env) for n in sizes}
        finally:
            stop_head(temp)

    print("\n| stage | " + " | ".join(f"N={n:,}" for n in sizes) + " | " +
          " | ".join(f"exponent {a:,}→{b:,}" for a, b in zip(sizes, sizes[1:], strict=False)) + " |")
    print("|---" * (1 + 2 * len(sizes)) + "|")
    for stage in (*STAGES, "total"):
        if stage == "total":
            row = [(sum(costs[n][s][0] for s in STAGES), max(costs[n][s][1] for s in STAGES)) for n in sizes]
        else:
            row = [costs[n][stage] for n in sizes]
        growth = [exponent(row[i][0], row[i + 1][0], sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)]
        print(f"| {stage} | " + " | ".join(f"{s:.1f} s, {m:.0f} MiB" for s, m in row) + " | " +
              " | ".join(f"{g:.2f}{' **above ' + str(args.flag) + '**' if g > args.flag else ''}" for g in growth)
              + " |")


if __name__ == "__main__":
    main()
