"""`ray job submit` end to end: a head started with `ray start --head`, the nightly re-index submitted as a job."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gatrep import datasets, io, schemas, versions

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`
# One port each, in this order, then the worker ports: every port `ray start --help` lets us choose, so this
# head never meets another Ray on the machine (Ray's defaults: 6379, 8265, 10001, 10002-19999, 52365, ...).
PORT_FLAGS = ("--port", "--object-manager-port", "--node-manager-port", "--ray-client-server-port",
              "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port")
WORKER_PORTS = 64
JOB_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Head:
    """A running head: its root folder (Ray's temp dir and the test's files), addresses and auth token."""

    root: Path
    gcs_port: int  # RAY_ADDRESS inside a job is <this machine's IP>:<gcs_port> (Ray does not use 127.0.0.1)
    dashboard: str  # http://host:port, the job server
    token: str
    env: dict[str, str]  # `ray start`'s environment, a client's too: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN


def _job_server_missing() -> str | None:
    """Why the job server cannot start here (ray[default]'s packages missing), or None."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (Ray's own check before it starts a dashboard)
    except ImportError as e:
        return f"ray[default] is not installed ({e}): pip install -e '.[cluster]'"
    return None


def _bindable(port: int) -> bool:
    """Whether nothing on this machine holds `port` (TCP, any interface)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """`count` consecutive free ports between Ray's default worker ports and the kernel's ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        if all(_bindable(p) for p in range(base, base + count)):
            return list(range(base, base + count))
    raise RuntimeError(f"no {count} consecutive free ports in 20000-32000")


def _processes(session: int, root: Path) -> dict[int, str]:
    """pid -> command line of every live process of the head: those in the session `ray start` began (the
    GCS, raylet, dashboard, agents, workers) and those naming `root` (a job's driver runs in a session of its
    own, with the test's paths on its command line)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        pid, sid, stat, *args = line.split(None, 3)
        command = args[0] if args else ""
        if int(pid) != os.getpid() and not stat.startswith("Z") and (int(sid) == session or str(root) in command):
            found[int(pid)] = command
    return found


def _stop(session: int, root: Path) -> None:
    """SIGTERM every process of the head, SIGKILL what is left after 10 s (the GCS and the autoscaler's monitor
    outlast SIGTERM); fails if any survives. Not `ray stop`: it stops every Ray on the machine, other people's
    included."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        for pid in _processes(session, root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _processes(session, root) and time.monotonic() < deadline:
            time.sleep(0.5)
    left = _processes(session, root)
    assert not left, f"Ray processes left running after the test: {left}"


@pytest.fixture
def head() -> Iterator[Head]:
    """A local head from `ray start --head` with its own temp dir and ports, token authentication on, 2 CPUs
    and the job server; every one of its processes is stopped afterwards, whatever the test did."""
    missing = _job_server_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the job-submit test: {missing}")
        pytest.skip(missing)
    free = _free_ports(len(PORT_FLAGS) + WORKER_PORTS)
    ports, workers = dict(zip(PORT_FLAGS, free, strict=False)), free[len(PORT_FLAGS):]
    # Short: Ray's Unix sockets live under it, and a socket path is limited to ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="gr", dir="/tmp"))
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes, kept out of ~/.ray
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # a job's `python` is the venv's
    command = [str(BIN / "ray"), "start", "--head", "--temp-dir", str(root), "--dashboard-host", "127.0.0.1",
               "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "true",
               "--object-store-memory", str(300 * 1024**2), "--disable-usage-stats",
               *[arg for flag, port in ports.items() for arg in (flag, str(port))],
               "--min-worker-port", str(workers[0]), "--max-worker-port", str(workers[-1])]
    log = root / "ray-start.log"
    with log.open("w") as out:  # a file, not a pipe: Ray's daemons would hold a pipe open
        started = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = started.wait(timeout=180)
        assert code == 0, f"`ray start --head` exited {code}:\n{log.read_text()}"
        yield Head(root, ports["--port"], f"http://127.0.0.1:{ports['--dashboard-port']}", token, env)
    finally:
        if started.poll() is None:
            started.kill()
            started.wait()
        _stop(started.pid, root)
        shutil.rmtree(root, ignore_errors=True)


def _excludes() -> list[str]:
    """The runtime env's excludes, as `ray job submit --runtime-env cluster/runtime_env.yaml` uploads them."""
    return yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["excludes"]


def _wait(client, job_id: str, timeout_s: float):
    """The job's status once it is terminal, or its status at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
    return status


def test_reindex_job_runs_on_the_submitted_cluster(head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    # The head checks tokens: a request without one is refused (what `ray job submit` meets without
    # RAY_AUTH_MODE=token in its environment).
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{head.dashboard}/api/jobs/", timeout=30)
    assert refused.value.code == 401

    # The nightly job, as the RayCronJob submits it: embed -> graph -> train -> both indexes -> CURRENT; with
    # style vectors, which both indexes then search by too.
    tree = datasets.write_digits(str(head.root / "data" / "index"), size=16, limit=100)
    run = head.root / "run"
    entrypoint = (f"python -m jobs.reindex --input {tree.root} --run {run} --backbone tiny-random --k 5 "
                  "--epochs 2 --style true")
    # The SDK sends the token itself only when RAY_AUTH_MODE=token was in this process's environment when Ray
    # read its config; an explicit header works whatever ran before in this process.
    client = JobSubmissionClient(head.dashboard, headers={"Authorization": f"Bearer {head.token}"})
    job_id = client.submit_job(entrypoint=entrypoint,
                               runtime_env={"working_dir": str(REPO), "excludes": _excludes()})
    status = _wait(client, job_id, JOB_TIMEOUT_S)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} is {status} after up to {JOB_TIMEOUT_S} s:\n{logs[-6000:]}"

    # It joined this cluster (RAY_ADDRESS, set by the job server) rather than starting a Ray of its own: its
    # driver registered with this head's GCS, and said so.
    info = client.get_job_info(job_id)
    assert info.driver_info is not None, f"no driver registered with the head:\n{logs[-3000:]}"
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{head.gcs_port}\b", logs), logs[-3000:]
    assert "Started a local Ray instance" not in logs
    assert info.runtime_env["working_dir"].startswith("gcs://")  # the checkout was uploaded, not read in place
    assert "reindex: published v0001" in logs

    # What it published: a complete version, named by the pointer, with every image embedded and both indexes.
    assert versions.current(str(run))["version"] == "v0001"
    root = versions.resolve(str(run))
    embeddings, manifest = io.read_table(io.join(root, schemas.EMBEDDINGS), schemas.EMBEDDINGS)
    assert sorted(embeddings[schemas.URI].to_pylist()) == sorted(tree.uris()) and manifest["counts"] == {"ok": 100}
    assert manifest["style_dim"] == 48 and embeddings[schemas.STYLE].null_count == 0
    for index in (schemas.INDEX, "index-raw"):
        index_manifest = io.read_manifest(io.join(root, index), schemas.INDEX)
        assert index_manifest["rows"] == 100 and index_manifest["style_dim"] == 48

    # The README's client setup: `ray job ...` sends the token in its environment only with RAY_AUTH_MODE=token.
    status_cli = [str(BIN / "ray"), "job", "status", "--address", head.dashboard, job_id]
    shown = subprocess.run(status_cli, env=head.env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and f"Job '{job_id}' succeeded" in shown.stdout, shown.stdout + shown.stderr
    no_mode = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
    refused_cli = subprocess.run(status_cli, env=no_mode, capture_output=True, text=True, timeout=120)
    said = refused_cli.stdout + refused_cli.stderr
    assert refused_cli.returncode != 0 and "Authentication required" in said, said[-2000:]  # Ray's text for a 401
