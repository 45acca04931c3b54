"""``rankstream broker up|down|status``: the embedded Kafka-compatible broker (Tansu,
memory-only) on 127.0.0.1, with the scorer's topics.

``up`` returns once the broker accepts connections and the topics exist; the broker
keeps running in the background until ``down``. A second ``up`` reports the running
broker (and creates any missing topic) instead of starting another.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import CliPositionalArg

from streaming.admin import create_topics, partition_counts
from streaming.broker import broker_status, default_state_dir, start_broker, stop_broker
from rayjobs.options import FlatCommand, command
from streaming.kafka_config import BOOTSTRAP_ENV, TOPIC_FLAGS, KafkaClientConfig, TopicNames


class BrokerCommand(BaseModel):
    """`rankstream broker up|down|status`: where the broker listens and the topics ``up`` creates."""

    model_config = ConfigDict(extra="forbid")

    broker_command: CliPositionalArg[Literal["up", "down", "status"]] = Field(description="up, down or status")
    port: int | None = Field(default=None, ge=1, le=65535, description="listen port (default: a free one)")
    host: str = Field(default="127.0.0.1", description="listen address (default: loopback only)")
    partitions: int = Field(default=4, ge=1, description="partitions of each topic created by up")
    state_dir: Path | None = Field(default=None, description="where the pid and address are kept (default: ~/.rankstream)")
    json_status: bool = Field(default=False, description="status as JSON")
    topics: TopicNames = TopicNames()


FLAGS = FlatCommand(
    "Broker", BrokerCommand, sections={"topics": TopicNames}, exclude=("reply_to_pattern",), renames=TOPIC_FLAGS,
    shortcuts={"json-status": "json"},
)  # fmt: skip


def handle(args: BrokerCommand) -> int:
    state_dir = args.state_dir or default_state_dir()
    topics = args.topics
    if args.broker_command == "up":
        state = broker_status(state_dir)
        if state is not None:
            print(f"a broker is already running at {state.bootstrap_servers} (pid {state.pid}); not starting another")
        else:
            try:
                state = start_broker(port=args.port, host=args.host, state_dir=state_dir, detach=True).state
            except RuntimeError as error:
                print(f"rankstream broker: error: {error}", file=sys.stderr)
                return 1
            print(f"broker running at {state.bootstrap_servers} (pid {state.pid}, log {state.log_path})")
        config = KafkaClientConfig(bootstrap_servers=state.bootstrap_servers)
        created = create_topics(config, topics, partitions=args.partitions)
        counts = partition_counts(config, topics.all())
        print("topics: " + ", ".join(f"{name} ({counts[name]} partitions, {how})" for name, how in created.items()))
        print(f"export {BOOTSTRAP_ENV}={state.bootstrap_servers}")
        return 0
    if args.broker_command == "status":
        state = broker_status(state_dir)
        if args.json_status:
            print(json.dumps(None if state is None else {**state.model_dump(), "bootstrap_servers": state.bootstrap_servers}))
        elif state is None:
            print(f"no broker running (state dir {state_dir})")
        else:
            print(f"running at {state.bootstrap_servers} (pid {state.pid}, log {state.log_path})")
        return 0 if state is not None else 1
    state = stop_broker(state_dir)
    print("no broker running" if state is None else f"stopped the broker at {state.bootstrap_servers} (pid {state.pid})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("broker", help="embedded Kafka-compatible broker: up, down, status")
    command(parser, FLAGS, handle)
