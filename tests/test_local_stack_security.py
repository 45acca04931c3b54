"""The README's local stack (`cluster up`, `broker up`, `serve up`) lets no one in: every
socket it listens on is on the loopback address, the Ray head demands its token, and
`cluster down` leaves no process of the cluster behind (Ray's client server included).
A private Ray (a job run as a plain script, a benchmark) listens on loopback only too."""

from __future__ import annotations

import ipaddress
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import ray
import pytest

from model_zoo.bundle import save_bundle
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Role
from rayjobs import cli
from rayjobs.cluster import auth_headers, cluster_processes, cluster_status, init_private_ray, token_file
from streaming.broker import broker_status, free_port

pytestmark = pytest.mark.slow

SCHEMA = FeatureSchema(
    fields=(
        FieldSpec(name="user", vocab_size=8, role=Role.context),
        FieldSpec(name="item", vocab_size=8, role=Role.item),
    )
)


def listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of the processes."""
    sockets = []
    for process in processes:
        try:
            name = process.name()
            connections = process.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        sockets += [(name, c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
    return sockets


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def serve_grpc_status_without_token(port: int) -> grpc.StatusCode:
    """What a Serve replica's gRPC server answers a request that carries no token
    (UNIMPLEMENTED: no such server there; anything but UNAUTHENTICATED: it is open)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=10)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def dashboard_status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_local_stack_listens_on_loopback_only_and_demands_the_token(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a fresh token file
    monkeypatch.setenv("RANKSTREAM_STATE_DIR", str(tmp_path / "state"))
    bundle = save_bundle(tmp_path / "bundle", build_model(SCHEMA, "dplr_fwfm", 4, rank=1), name="ctr")
    temp_dir = f"/tmp/rs-sec-{free_port()}"
    http_port = free_port()
    stack_args = ["--temp-dir", temp_dir]
    assert cli.main(["cluster", "up", "--num-cpus", "2", "--port", str(free_port()),
                     "--dashboard-port", str(free_port()), *stack_args]) == 0  # fmt: skip
    try:
        assert cli.main(["broker", "up", "--partitions", "2"]) == 0
        broker = broker_status()
        assert broker is not None
        assert cli.main(["serve", "up", "--bundle", str(bundle), "--http-port", str(http_port),
                         "--bootstrap-servers", broker.bootstrap_servers, "--timeout", "300", *stack_args]) == 0  # fmt: skip
        cluster = cluster_status(temp_dir)
        assert cluster is not None

        token = token_file()
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert dashboard_status(f"{cluster.dashboard_url}/api/jobs/", {}) == 401
        assert dashboard_status(f"{cluster.dashboard_url}/api/jobs/", {"Authorization": "Bearer wrong"}) == 403
        assert dashboard_status(f"{cluster.dashboard_url}/api/jobs/", auth_headers()) == 200

        ray_processes = cluster_processes(temp_dir)
        names = {p.name() for p in ray_processes}
        assert {"gcs_server", "raylet"} <= names, names
        assert any("ray.util.client.server" in p.cmdline() for p in ray_processes)  # what `down` used to orphan
        sockets = listening([*ray_processes, psutil.Process(broker.pid)])
        ports = {port for _, _, port in sockets}
        assert http_port in ports and broker.port in ports  # Serve's proxy and the broker are among them
        # Serve's inter-replica gRPC server binds [::] whatever the node address: it must
        # demand the token, like every other socket that is not on the loopback address.
        exposed = {(name, port): serve_grpc_status_without_token(port) for name, address, port in sockets if not is_loopback(address)}
        assert all(code == grpc.StatusCode.UNAUTHENTICATED for code in exposed.values()), exposed
    finally:
        cli.main(["serve", "down", *stack_args])
        cli.main(["broker", "down"])
        cli.main(["cluster", "down", *stack_args])
    assert cluster_processes(temp_dir) == []  # nothing orphaned, Ray's client server included


def test_a_private_ray_listens_on_loopback_only() -> None:
    init_private_ray(num_cpus=1, include_dashboard=False, _temp_dir=f"/tmp/rs-priv-{free_port()}")
    try:
        driver = psutil.Process()
        deadline = time.monotonic() + 60
        while True:  # the raylet starts its agents after ray.init returns
            sockets = listening([driver, *driver.children(recursive=True)])
            names = {name for name, _, _ in sockets}
            if {"gcs_server", "raylet"} <= names and any("RuntimeEnvAgent" in n for n in names) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        ray.shutdown()
    assert any("RuntimeEnvAgent" in name for name in names), names  # the one on the external address before
    assert all(is_loopback(address) for _, address, _ in sockets), sockets
