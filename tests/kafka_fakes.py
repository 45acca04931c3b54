"""In-memory stand-ins for kafka-python's consumer and producer, for unit tests of
``serve_app.kafka_loop.KafkaLoop``: a log per partition, sends that succeed or fail as a
test says, and a record of every commit checked against what was acknowledged."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kafka.future import Future
from kafka.structs import TopicPartition


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass
class FakeBroker:
    partitions: dict[str, int]  # topic -> partition count
    logs: dict[TopicPartition, list[Record]] = field(default_factory=lambda: defaultdict(list))
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    # Per commit: (partition, offset) pairs committed although some record before the
    # offset had no acknowledged answer; must stay empty.
    early_commits: list[tuple[TopicPartition, int]] = field(default_factory=list)
    answered: dict[tuple[str, int, int], int] = field(default_factory=lambda: defaultdict(int))  # source -> answers

    def append(self, topic: str, partition: int, value: bytes, key: bytes | None = None, offset: int | None = None) -> Record:
        log = self.logs[TopicPartition(topic, partition)]
        offset = (log[-1].offset + 1 if log else 0) if offset is None else offset
        record = Record(topic, partition, offset, key, value)
        log.append(record)
        return record

    def records(self, topic: str) -> list[Record]:
        return [r for tp, log in sorted(self.logs.items()) if tp.topic == topic for r in log]


class FakeConsumer:
    def __init__(self, broker: FakeBroker, answered_by: Callable[[Record], tuple[str, int, int] | None]) -> None:
        """``answered_by(record on a reply topic)``: the (topic, partition, offset) it answers."""
        self.broker = broker
        self.answered_by = answered_by
        self.positions: dict[TopicPartition, int] = {}
        self._assignment: set[TopicPartition] = set()
        self.skip_once: dict[TopicPartition, tuple[int, int]] = {}  # partition -> [start, stop) the next poll leaves out
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.closed = False

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.broker.partitions.get(topic, 0)))

    def topics(self) -> set[str]:
        return set(self.broker.partitions)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._assignment = set(partitions)
        for partition in partitions:
            self.positions[partition] = self.broker.committed.get(partition, 0)

    def poll(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Record]]:
        polled = {}
        for partition in sorted(self._assignment):
            position = self.positions[partition]
            batch = [r for r in self.broker.logs.get(partition, []) if r.offset >= position][:8]
            if partition in self.skip_once and batch:
                start, stop = self.skip_once.pop(partition)
                batch = [r for r in batch if not start <= r.offset < stop]
            if batch:
                polled[partition] = batch
                self.positions[partition] = batch[-1].offset + 1
        if not polled:
            time.sleep(0.002)
        return polled

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))
        self.positions[partition] = offset

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        sources = {source for tp, log in self.broker.logs.items() if tp.topic != "auctions" for r in log
                   if (source := self.answered_by(r)) is not None}
        for partition, meta in offsets.items():
            for record in self.broker.logs.get(partition, []):
                if record.offset < meta.offset and (record.topic, record.partition, record.offset) not in sources:
                    self.broker.early_commits.append((partition, meta.offset))
                    break
            self.broker.committed[partition] = meta.offset

    def commit_async(self, offsets: dict[TopicPartition, Any], callback: Callable[[Any, Any], None]) -> None:
        self.commit(offsets)
        callback(offsets, None)

    def highwater(self, partition: TopicPartition) -> int:
        log = self.broker.logs.get(partition, [])
        return log[-1].offset + 1 if log else 0

    def position(self, partition: TopicPartition, timeout_ms: int = 0) -> int:
        return self.positions[partition]

    def close(self, autocommit: bool = True) -> None:
        self.closed = True


class FakeProducer:
    def __init__(self, broker: FakeBroker, fail: Callable[[str, bytes], Exception | None] = lambda topic, value: None) -> None:
        """``fail(topic, value)``: the error a send gets (raised at once if it is a
        ValueError, else in its future), or None to store the record."""
        self.broker = broker
        self.fail = fail
        self.sends = 0
        self.closed = False

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"", partition: int = 0) -> Future:
        self.sends += 1
        error = self.fail(topic, value)
        if isinstance(error, ValueError):
            raise error
        future = Future()
        if error is not None:
            return future.failure(error)
        return future.success(self.broker.append(topic, partition, value, key))

    def flush(self, timeout: float | None = None) -> None:
        pass

    def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.broker.partitions[topic]))

    def close(self) -> None:
        self.closed = True
