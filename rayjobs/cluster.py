"""``rankstream cluster up|down|status``: a local Ray head for submitting jobs.

The head runs with this Python environment's ``bin`` first on its PATH, so a job's
``python -m rayjobs.…`` entrypoint finds Ray and rankstream; its dashboard (and job
API) binds to 127.0.0.1. Ray's GCS listens on every interface whatever the node
address, so on a shared host keep its port firewalled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from streaming.broker import free_port

DEFAULT_TEMP_DIR = "/tmp/rankstream-ray"  # short: Ray's socket paths must stay under 108 bytes


@dataclass(frozen=True)
class LocalCluster:
    address: str  # GCS address for ray.init / ray start --address
    dashboard_url: str  # also the job-submission address
    temp_dir: str


def ray_environment() -> dict[str, str]:
    """The environment Ray commands run with: this venv first on PATH, and token auth off
    (the dashboard and job API listen on 127.0.0.1 only), so a token left in ~/.ray by an
    earlier local ray.init() cannot switch the head to token auth behind the user's back."""
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    # Forced: an in-process ray.init() sets RAY_AUTH_MODE=token in os.environ, and a head
    # started with it answers the local dashboard and job API with 401 only.
    environment["RAY_AUTH_MODE"] = "disabled"
    return environment


def state_file(temp_dir: str) -> Path:
    return Path(temp_dir) / "rankstream-cluster.json"


def cluster_up(num_cpus: int, port: int, dashboard_port: int, temp_dir: str) -> LocalCluster:
    existing = cluster_status(temp_dir)
    if existing is not None:
        return existing
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head",
        f"--num-cpus={num_cpus}", f"--port={port}",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        # Its default (52365) is fixed: a second cluster on the machine would have no job agent.
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    result = subprocess.run(command, env=ray_environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    cluster = LocalCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", temp_dir)
    _wait_for_dashboard(cluster.dashboard_url, timeout_s=60)
    state_file(temp_dir).write_text(json.dumps(asdict(cluster)))
    return cluster


def cluster_status(temp_dir: str) -> LocalCluster | None:
    """The running cluster recorded in ``temp_dir``, or None (a stale record is removed)."""
    path = state_file(temp_dir)
    if not path.is_file():
        return None
    cluster = LocalCluster(**json.loads(path.read_text()))
    if not _dashboard_answers(cluster.dashboard_url):
        path.unlink()
        return None
    return cluster


def cluster_down(temp_dir: str, timeout_s: float = 15.0) -> None:
    """Stop the head recorded in ``temp_dir`` and its workers — only that one: `ray stop`
    would stop every Ray cluster of the machine. Its processes are the ones whose command
    line names the temp dir (GCS, raylet, dashboard, monitors) and their children."""
    marker = str(Path(temp_dir).resolve())
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}  # e.g. this very `cluster down --temp-dir …`
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        if process.pid not in spared and any(marker in part for part in process.info["cmdline"] or ()):
            roots.append(process)
    victims = {p.pid: p for root in roots for p in [root, *_children(root)]}
    for process in victims.values():
        _signal(process, "terminate")
    _, alive = psutil.wait_procs(list(victims.values()), timeout=timeout_s)
    for process in alive:
        _signal(process, "kill")
    psutil.wait_procs(alive, timeout=5)
    state_file(temp_dir).unlink(missing_ok=True)
    # `ray stop` leaves this behind; a later local ray.init() would try to join it.
    (Path(temp_dir) / "ray_current_cluster").unlink(missing_ok=True)


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(process: psutil.Process, how: str) -> None:
    try:
        getattr(process, how)()
    except psutil.NoSuchProcess:
        pass


def _dashboard_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_for_dashboard(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _dashboard_answers(url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray dashboard did not answer at {url} within {timeout_s:.0f} s")


def handle(args: argparse.Namespace) -> int:
    if args.cluster_command == "up":
        cluster = cluster_up(args.num_cpus, args.port, args.dashboard_port, args.temp_dir)
        print(f"Ray head at {cluster.address}")
        print(f"dashboard: {cluster.dashboard_url}")
        print(f"submit a job: RAY_ADDRESS={cluster.dashboard_url} ray job submit --working-dir . -- python -m rayjobs.train …")
    elif args.cluster_command == "status":
        cluster = cluster_status(args.temp_dir)
        if cluster is None:
            print("no local Ray cluster running")
            return 1
        print(f"running: head {cluster.address}, dashboard {cluster.dashboard_url}")
    elif args.cluster_command == "down":
        cluster_down(args.temp_dir)
        print("local Ray cluster stopped")
    else:
        print("usage: rankstream cluster {up,down,status}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cluster", help="local Ray head: up, down, status")
    parser.add_argument("cluster_command", choices=["up", "down", "status"])
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--port", type=int, default=6379, help="GCS port")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR)
    parser.set_defaults(func=handle)
