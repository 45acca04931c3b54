"""``rankstream cluster up|down|status``: a local Ray head for submitting jobs.

Safe by default on a shared host, in two layers:
- every Ray port listens on the loopback address only: the head runs with
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's switch for single-machine clusters,
  under which the node address is 127.0.0.1 (on Linux Ray otherwise replaces a loopback
  ``--node-ip-address`` with the machine's external address, and the GCS, raylets and
  agents listen on every interface);
- Ray token authentication: ``up`` keeps a token in Ray's default token file
  (``~/.ray/auth_token``, readable by the user only) and starts the head with
  ``RAY_AUTH_MODE=token``, so local processes of other users cannot use the GCS or the
  dashboard's job API either. Commands here send the token themselves; ``ray job
  submit`` needs ``RAY_AUTH_MODE=token`` in its environment (``ray_environment()``).

The head runs with this Python environment's ``bin`` first on its PATH, so a job's
``python -m rayjobs.…`` entrypoint finds Ray and rankstream. Every process the head
starts carries ``RANKSTREAM_RAY_CLUSTER=<temp dir>`` in its environment, which is how
``down`` finds them all (Ray's client server, for one, names no temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import CliPositionalArg

from rayjobs.options import FlatCommand, command

from streaming.broker import free_port

DEFAULT_TEMP_DIR = "/tmp/rankstream-ray"  # short: Ray's socket paths must stay under 108 bytes


@dataclass(frozen=True)
class LocalCluster:
    address: str  # GCS address for ray.init / ray start --address
    dashboard_url: str  # also the job-submission address
    temp_dir: str


CLUSTER_ENV = "RANKSTREAM_RAY_CLUSTER"  # marks every process of one local cluster
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a single-machine node on 127.0.0.1
# Ray's own default (15) lets any other work on the machine — the broker, an ad server,
# a build — take the CPU of the scorer replicas and training workers.
WORKER_NICENESS = 0


def token_file() -> Path:
    """Ray's default token file, which `ray job submit` reads with RAY_AUTH_MODE=token."""
    return Path.home() / ".ray" / "auth_token"


def ensure_token() -> Path:
    """The token file, created if absent, readable by the user only (Ray's own
    ``ray.init()`` writes it with the default umask)."""
    path = token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.is_file() or not path.read_text().strip():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
            handle.write(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def auth_headers() -> dict[str, str]:
    """The HTTP header that authenticates to the dashboard (and job API) of a local head."""
    path = token_file()
    return {"Authorization": f"Bearer {path.read_text().strip()}"} if path.is_file() else {}


def ray_environment() -> dict[str, str]:
    """The environment of Ray commands that talk to (or are) a local head: this venv first
    on PATH, token authentication with the token file, and the loopback node address."""
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    environment["RAY_AUTH_MODE"] = "token"
    environment["RAY_AUTH_TOKEN_PATH"] = str(token_file())
    environment.pop("RAY_AUTH_TOKEN", None)  # e.g. a remote cluster's token (docs/deploy.md)
    environment[LOOPBACK_SWITCH] = "0"
    return environment


def init_private_ray(worker_niceness: int | None = None, **options) -> None:
    """``ray.init`` of a private Ray for this process (a job run as a plain script, a
    benchmark, a test) with every port on the loopback address, like ``cluster up``'s head.
    Only for a private Ray: a driver joining a multi-machine cluster needs its real address.

    ``worker_niceness``: Ray starts its workers 15 nicer than the driver by default; a
    benchmark that compares them with work in the driver's process, or that shares the
    machine with niced work, sets 0."""
    import ray
    from ray._private import ray_constants

    # Ray reads the switch once, at import; the processes it starts read the environment.
    os.environ[LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    if worker_niceness is not None:
        options["_system_config"] = {**options.get("_system_config", {}), "worker_niceness": worker_niceness}
    ray.init(address="local", **options)


def state_file(temp_dir: str) -> Path:
    return Path(temp_dir) / "rankstream-cluster.json"


def cluster_up(num_cpus: int, port: int, dashboard_port: int, temp_dir: str, worker_niceness: int = WORKER_NICENESS) -> LocalCluster:
    existing = cluster_status(temp_dir)
    if existing is not None:
        return existing
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    ensure_token()
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head",
        f"--num-cpus={num_cpus}", f"--port={port}",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        # Their defaults (52365, 10001) are fixed: a second cluster on the machine would lack them.
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--system-config={json.dumps({'worker_niceness': worker_niceness})}",
    ]
    environment = {**ray_environment(), CLUSTER_ENV: _marker(temp_dir)}
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
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
    """Stop the head recorded in ``temp_dir`` and everything it started — only that one:
    `ray stop` would stop every Ray cluster of the machine. Its processes are those whose
    environment carries this cluster's ``RANKSTREAM_RAY_CLUSTER`` (GCS, raylet, agents,
    monitors, the Ray client server, workers, job drivers)."""
    victims = cluster_processes(temp_dir)
    for process in victims:
        _signal(process, "terminate")
    _, alive = psutil.wait_procs(victims, timeout=timeout_s)
    for process in alive:
        _signal(process, "kill")
    psutil.wait_procs(alive, timeout=5)
    state_file(temp_dir).unlink(missing_ok=True)
    # `ray stop` leaves this behind; a later local ray.init() would try to join it.
    (Path(temp_dir) / "ray_current_cluster").unlink(missing_ok=True)


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The running processes of the local cluster of ``temp_dir``, except this process and
    its parents (e.g. a `rankstream cluster down` run as a job)."""
    marker = _marker(temp_dir)
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    return [
        process
        for process in psutil.process_iter(["environ"])
        if process.pid not in spared and (process.info["environ"] or {}).get(CLUSTER_ENV) == marker
    ]


def _marker(temp_dir: str) -> str:
    return str(Path(temp_dir).resolve())


def _signal(process: psutil.Process, how: str) -> None:
    try:
        getattr(process, how)()
    except psutil.NoSuchProcess:
        pass


def _dashboard_answers(url: str) -> bool:
    try:
        request = urllib.request.Request(f"{url}/api/version", headers=auth_headers())
        with urllib.request.urlopen(request, timeout=2) as response:
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


class ClusterCommand(BaseModel):
    """`rankstream cluster up|down|status`: the local Ray head."""

    model_config = ConfigDict(extra="forbid")

    cluster_command: CliPositionalArg[Literal["up", "down", "status"]] = Field(description="up, down or status")
    num_cpus: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1, description="CPUs of the head (default: this machine's)")
    port: int = Field(default=6379, ge=1, le=65535, description="GCS port")
    dashboard_port: int = Field(default=8265, ge=1, le=65535)
    temp_dir: str = Field(default=DEFAULT_TEMP_DIR, description="the Ray head's temp dir")
    worker_niceness: int = Field(default=WORKER_NICENESS, ge=0, le=19, description="niceness of the head's Ray workers (Ray's default: 15)")


FLAGS = FlatCommand("Cluster", ClusterCommand)


def handle(args: ClusterCommand) -> int:
    if args.cluster_command == "up":
        cluster = cluster_up(args.num_cpus, args.port, args.dashboard_port, args.temp_dir, args.worker_niceness)
        print(f"Ray head at {cluster.address}")
        print(f"dashboard: {cluster.dashboard_url} (it asks for the token in {token_file()})")
        print(
            f"submit a job: RAY_AUTH_MODE=token RAY_ADDRESS={cluster.dashboard_url} "
            "ray job submit --working-dir . -- python -m rayjobs.train …"
        )
    elif args.cluster_command == "status":
        cluster = cluster_status(args.temp_dir)
        if cluster is None:
            print("no local Ray cluster running")
            return 1
        print(f"running: head {cluster.address}, dashboard {cluster.dashboard_url}")
    else:
        cluster_down(args.temp_dir)
        print("local Ray cluster stopped")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cluster", help="local Ray head: up, down, status")
    command(parser, FLAGS, handle)
