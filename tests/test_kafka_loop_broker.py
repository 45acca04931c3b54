"""The scorer's Kafka loop and model runtime in this process against the real embedded
broker (no Ray): a broker paused mid-stream, and several producers writing one
partition at once (the broker can then let a consumer skip a record batch), lose no
auction."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from serve_app.config import ModelConfig
from serve_app.kafka_loop import KafkaLoop
from serve_app.runtime import ScoringRuntime
from streaming.admin import create_topics
from streaming.broker import EmbeddedBroker, start_broker
from streaming.kafka_config import KafkaClientConfig, TopicNames
from streaming.protocol import decode_error, decode_reply
from tests.test_serve_runtime import make_bundle, random_auction


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    with start_broker(state_dir=tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> ScoringRuntime:
    return ScoringRuntime(ModelConfig(bundle=str(make_bundle(tmp_path_factory.mktemp("bundle")))))


def scorer(broker: EmbeddedBroker, runtime: ScoringRuntime, topics: TopicNames) -> KafkaLoop:
    kafka = KafkaClientConfig(bootstrap_servers=broker.bootstrap_servers)
    create_topics(kafka, topics, partitions=1)
    loop = KafkaLoop(kafka, topics, f"scorer-{topics.auctions}", 64, runtime.score_messages, lambda lag: None)
    loop.start()
    return loop


def answers(broker: EmbeddedBroker, topics: TopicNames, expected: set[str], timeout_s: float) -> dict[str, int]:
    """Auction id -> records answering it (score replies and dead letters), read until
    every expected id has one or the time is up."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=20)
    partitions = [TopicPartition(topic, 0) for topic in (topics.scores, topics.dlq)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    found: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not expected <= found.keys() and time.monotonic() < deadline:
            for partition, records in consumer.poll(timeout_ms=200).items():
                for record in records:
                    if partition.topic == topics.scores:
                        auction_id = decode_reply(record.value).auction_id
                    else:
                        auction_id = decode_error(record.value).auction_id
                    found[auction_id] = found.get(auction_id, 0) + 1
    finally:
        consumer.close()
    return found


def on_topic(broker: EmbeddedBroker, topic: str, loop: KafkaLoop) -> str:
    """For a failure message: how many auctions the topic holds, what the loop saw."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    count = sum(len(records) for records in iter(lambda: consumer.poll(timeout_ms=1000), {}) for records in records.values())
    consumer.close()
    return f"{count} auctions on {topic!r}; loop committed {loop.committed}, re-fetches {loop.refetches}, gaps {loop.accepted_gaps}"


def produce(broker: EmbeddedBroker, topic: str, ids: list[str], rate: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5, acks="all")
    try:
        for n, auction_id in enumerate(ids):
            producer.send(topic, key=auction_id.encode(), value=random_auction(rng, auction_id), partition=0)
            if rng.random() < 0.2:
                producer.flush()  # batches of varied sizes
            time.sleep(1 / rate)
        producer.flush()
    finally:
        producer.close()


def test_a_broker_paused_mid_stream_loses_no_auction(broker: EmbeddedBroker, runtime: ScoringRuntime) -> None:
    topics = TopicNames(auctions="paused", scores="paused.scores", dlq="paused.dlq")
    loop = scorer(broker, runtime, topics)
    ids = [f"p{n}" for n in range(600)]
    sender = threading.Thread(target=produce, args=(broker, topics.auctions, ids, 200.0, 1))
    try:
        sender.start()
        time.sleep(1.0)  # replies flowing
        os.kill(broker.process.pid, signal.SIGSTOP)
        try:
            time.sleep(10.0)
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        sender.join(60)
        found = answers(broker, topics, set(ids), timeout_s=60)
    finally:
        loop.stop()
    assert loop.error is None
    assert set(ids) - found.keys() == set(), on_topic(broker, topics.auctions, loop)


def test_several_producers_on_one_partition_lose_no_auction(broker: EmbeddedBroker, runtime: ScoringRuntime) -> None:
    topics = TopicNames(auctions="shared", scores="shared.scores", dlq="shared.dlq")
    loop = scorer(broker, runtime, topics)
    senders = [
        threading.Thread(target=produce, args=(broker, topics.auctions, [f"s{k}-{n}" for n in range(500)], 250.0, k))
        for k in range(4)
    ]
    try:
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(60)
        ids = {f"s{k}-{n}" for k in range(4) for n in range(500)}
        found = answers(broker, topics, ids, timeout_s=60)
    finally:
        loop.stop()
    assert loop.error is None
    assert ids - found.keys() == set()
    print(f"re-fetches after offset jumps: {loop.refetches}, jumps accepted: {loop.accepted_gaps}")
