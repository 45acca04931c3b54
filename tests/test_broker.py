"""The embedded broker: `rankstream broker up|status|down` across processes, topics
with N partitions, a record through it, refusal of a second broker, and a free port
after `down`. Every broker started here is stopped in a finally block."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streaming.admin import create_topics, partition_counts
from streaming.broker import STATE_FILE, broker_status, free_port, port_accepts, start_broker, stop_broker
from rayjobs.cli import build_parser
from rayjobs.produce import FLAGS, ProduceJob
from streaming.kafka_config import BOOTSTRAP_ENV, KafkaClientConfig, TopicNames

REPO = Path(__file__).resolve().parents[1]
RANKSTREAM = Path(sys.executable).parent / "rankstream"
# The broker subcommand alone, in a fresh process (the full CLI imports torch: seconds per call).
BROKER_CLI = (
    "import argparse, sys\n"
    "from rayjobs import broker\n"
    "parser = argparse.ArgumentParser(prog='rankstream')\n"
    "broker.register(parser.add_subparsers())\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def broker_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BROKER_CLI, "broker", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_up_status_down_across_processes(tmp_path: Path) -> None:
    state_dir = str(tmp_path / "state")
    try:
        up = subprocess.run(
            [str(RANKSTREAM), "broker", "up", "--partitions", "3", "--state-dir", state_dir],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert up.returncode == 0, up.stderr
        bootstrap = up.stdout.strip().splitlines()[-1].split("=", 1)[1]
        host, port = bootstrap.split(":")
        assert host == "127.0.0.1"
        assert "auctions (3 partitions, created)" in up.stdout
        assert "auctions.dlq (3 partitions, created)" in up.stdout

        status = broker_cli("status", "--json", "--state-dir", state_dir)
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert state["bootstrap_servers"] == bootstrap and state["port"] == int(port)

        config = KafkaClientConfig(bootstrap_servers=bootstrap)
        assert partition_counts(config, ["auctions", "scores", "auctions.dlq"]) == {
            "auctions": 3, "scores": 3, "auctions.dlq": 3,
        }
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        producer.send("scores", key=b"k", value=b"hello", partition=2).get(timeout=10)
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        consumer.assign([TopicPartition("scores", 2)])
        consumer.seek_to_beginning()
        records = []
        for _ in range(50):
            records += [r for batch in consumer.poll(timeout_ms=200).values() for r in batch]
            if records:
                break
        consumer.close()
        assert [(r.key, r.value) for r in records] == [(b"k", b"hello")]

        again = broker_cli("up", "--partitions", "5", "--state-dir", state_dir)
        assert again.returncode == 0, again.stderr
        assert f"already running at {bootstrap} (pid {state['pid']})" in again.stdout
        assert "auctions (3 partitions, exists)" in again.stdout
        assert broker_status(state_dir).pid == state["pid"]

        down = broker_cli("down", "--state-dir", state_dir)
        assert down.returncode == 0, down.stderr
        assert f"stopped the broker at {bootstrap}" in down.stdout
        assert not port_accepts("127.0.0.1", int(port))
        assert not (Path(state_dir) / STATE_FILE).exists()
        after = broker_cli("status", "--state-dir", state_dir)
        assert after.returncode == 1 and "no broker running" in after.stdout
    finally:
        stop_broker(state_dir)


def test_library_broker_refuses_a_second_one(tmp_path: Path) -> None:
    port = free_port()
    with start_broker(port=port, state_dir=tmp_path) as broker:
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
        assert broker_status(tmp_path) == broker.state
        with pytest.raises(RuntimeError, match="already running"):
            start_broker(state_dir=tmp_path)
    assert broker.process.returncode is not None
    assert not port_accepts("127.0.0.1", port)
    assert broker_status(tmp_path) is None


def test_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="in use"):
            start_broker(port=taken.getsockname()[1], state_dir=tmp_path)
    assert not (tmp_path / STATE_FILE).exists()


def test_create_topics_is_idempotent(tmp_path: Path) -> None:
    with start_broker(state_dir=tmp_path) as broker:
        config = KafkaClientConfig(bootstrap_servers=broker.bootstrap_servers)
        names = TopicNames(auctions="in", scores="out", dlq="in.dlq")
        assert create_topics(config, names, partitions=2) == {"in": "created", "out": "created", "in.dlq": "created"}
        assert create_topics(config, ["in", "extra"], partitions=4) == {"in": "exists", "extra": "created"}
        assert partition_counts(config, ["in", "out", "in.dlq", "extra"]) == {"in": 2, "out": 2, "in.dlq": 2, "extra": 4}


def test_stale_state_file_means_no_broker(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(
        json.dumps({"pid": 2**22 + 1, "host": "127.0.0.1", "port": free_port(), "binary": "/nonexistent",
                    "log_path": "x", "started_at": 0})
    )
    assert broker_status(tmp_path) is None
    assert stop_broker(tmp_path) is None
    assert not (tmp_path / STATE_FILE).exists()


def produce_flags(*argv: str) -> ProduceJob:
    """The typed configuration `rankstream produce ARGV` runs with (a Kafka-facing command's flags)."""
    return FLAGS.parse(build_parser().parse_args(["produce", *argv]))


def test_kafka_flags_pass_through_to_clients() -> None:
    args = produce_flags(
        "--bootstrap-servers", "k1:9093,k2:9093", "--security-protocol", "SASL_SSL",
        "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-plain-username", "scorer", "--sasl-plain-password", "s3cret",
        "--ssl-cafile", "/etc/ca.pem", "--auctions-topic", "bids",
    )  # fmt: skip
    config = args.kafka.client_config()
    assert config.client_kwargs() == {
        "bootstrap_servers": ["k1:9093", "k2:9093"],
        "client_id": "rankstream",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "scorer",
        "sasl_plain_password": "s3cret",
        "ssl_check_hostname": True,
        "ssl_cafile": "/etc/ca.pem",
    }
    assert config.librdkafka(**{"linger.ms": 5}) == {
        "bootstrap.servers": "k1:9093,k2:9093",
        "client.id": "rankstream",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "scorer",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem",
        "linger.ms": 5,
    }
    no_hostname_check = KafkaClientConfig(bootstrap_servers="k:9093", security_protocol="SSL", ssl_check_hostname=False)
    assert no_hostname_check.librdkafka()["ssl.endpoint.identification.algorithm"] == "none"
    assert "s3cret" not in repr(config)
    assert args.topics == TopicNames(auctions="bids")
    assert produce_flags("--bootstrap-servers", "k:9093", "--no-ssl-check-hostname").kafka.client_config().ssl_check_hostname is False


def test_bootstrap_defaults_to_the_variable_then_the_embedded_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BOOTSTRAP_ENV, "from-env:9092")
    args = produce_flags("--state-dir", str(tmp_path))
    assert args.kafka.client_config().bootstrap_servers == "from-env:9092"
    monkeypatch.delenv(BOOTSTRAP_ENV)
    with pytest.raises(ValueError, match="rankstream broker up"):
        args.kafka.client_config()
    with start_broker(state_dir=tmp_path) as broker:
        assert args.kafka.client_config().bootstrap_servers == broker.bootstrap_servers
