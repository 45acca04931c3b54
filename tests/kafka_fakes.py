"""In-memory stand-ins for confluent-kafka's consumer and producer, for unit tests of
``serve_app.kafka_loop.KafkaLoop``: a log per partition, sends that succeed or fail as a
test says, and a record of every commit checked against what was acknowledged."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition


@dataclass(frozen=True)
class Record:
    """A stored record, read through confluent-kafka's ``Message`` methods."""

    topic_name: str
    partition_id: int
    offset_value: int
    key_bytes: bytes | None
    payload: bytes

    def topic(self) -> str:
        return self.topic_name

    def partition(self) -> int:
        return self.partition_id

    def offset(self) -> int:
        return self.offset_value

    def key(self) -> bytes | None:
        return self.key_bytes

    def value(self) -> bytes:
        return self.payload

    def error(self) -> None:
        return None


def metadata(partitions: dict[str, int], topic: str | None) -> SimpleNamespace:
    """``list_topics``' answer: every topic, or the one asked for (with an error if missing)."""
    names = partitions if topic is None else {topic: partitions.get(topic, 0)}
    topics = {
        name: SimpleNamespace(
            partitions={p: None for p in range(count)},
            error=None if name in partitions else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART),
        )
        for name, count in names.items()
    }
    return SimpleNamespace(topics=topics)


@dataclass
class FakeBroker:
    partitions: dict[str, int]  # topic -> partition count
    logs: dict[tuple[str, int], list[Record]] = field(default_factory=lambda: defaultdict(list))
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    # Per commit: (partition, offset) pairs committed although some record before the
    # offset had no acknowledged answer; must stay empty.
    early_commits: list[tuple[tuple[str, int], int]] = field(default_factory=list)

    def append(self, topic: str, partition: int, value: bytes, key: bytes | None = None, offset: int | None = None) -> Record:
        log = self.logs[(topic, partition)]
        offset = (log[-1].offset() + 1 if log else 0) if offset is None else offset
        record = Record(topic, partition, offset, key, value)
        log.append(record)
        return record

    def records(self, topic: str) -> list[Record]:
        return [r for tp, log in sorted(self.logs.items()) if tp[0] == topic for r in log]


class FakeConsumer:
    def __init__(self, broker: FakeBroker, answered_by: Callable[[Record], tuple[str, int, int] | None]) -> None:
        """``answered_by(record on a reply topic)``: the (topic, partition, offset) it answers."""
        self.broker = broker
        self.answered_by = answered_by
        self.positions: dict[tuple[str, int], int] = {}  # next offset to fetch
        self.consumed: dict[tuple[str, int], int] = {}  # offset after the last record handed out
        self.fetched: list[Record] = []  # fetched, not yet handed out
        self._assignment: list[tuple[str, int]] = []
        self.skip_once: dict[tuple[str, int], tuple[int, int]] = {}  # partition -> [start, stop) the next fetch leaves out
        self.seeks: list[tuple[tuple[str, int], int]] = []
        self.closed = False

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> SimpleNamespace:
        return metadata(self.broker.partitions, topic)

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(*tp) for tp in self._assignment]

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._assignment = [(p.topic, p.partition) for p in partitions]
        self.fetched = []
        for tp in self._assignment:
            self.positions[tp] = self.consumed[tp] = self.broker.committed.get(tp, 0)

    def _fetch(self) -> None:
        for tp in self._assignment:
            batch = [r for r in self.broker.logs.get(tp, []) if r.offset() >= self.positions[tp]][:8]
            if tp in self.skip_once and batch:
                start, stop = self.skip_once.pop(tp)
                batch = [r for r in batch if not start <= r.offset() < stop]
            if batch:
                self.fetched += batch
                self.positions[tp] = batch[-1].offset() + 1

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Record]:
        if not self.fetched:
            self._fetch()
        taken, self.fetched = self.fetched[:num_messages], self.fetched[num_messages:]
        for record in taken:
            self.consumed[(record.topic(), record.partition())] = record.offset() + 1
        return taken

    def poll(self, timeout: float = -1) -> Record | None:
        taken = self.consume(1)
        if not taken:
            time.sleep(0.002)
        return taken[0] if taken else None

    def seek(self, partition: TopicPartition) -> None:
        tp = (partition.topic, partition.partition)
        self.seeks.append((tp, partition.offset))
        self.positions[tp] = self.consumed[tp] = partition.offset
        self.fetched = [r for r in self.fetched if (r.topic(), r.partition()) != tp]  # as librdkafka drops them

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        sources = {source for tp, log in self.broker.logs.items() if tp[0] != "auctions" for r in log
                   if (source := self.answered_by(r)) is not None}  # fmt: skip
        for partition in offsets:
            tp = (partition.topic, partition.partition)
            for record in self.broker.logs.get(tp, []):
                if record.offset() < partition.offset and (record.topic(), record.partition(), record.offset()) not in sources:
                    self.broker.early_commits.append((tp, partition.offset))
                    break
            self.broker.committed[tp] = partition.offset

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        log = self.broker.logs.get((partition.topic, partition.partition), [])
        return 0, (log[-1].offset() + 1 if log else 0)

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self.consumed[(p.topic, p.partition)]) for p in partitions]

    def close(self) -> None:
        self.closed = True


Failure = KafkaError | KafkaException | BufferError | None


class FakeProducer:
    def __init__(self, broker: FakeBroker, fail: Callable[[str, bytes], Failure] = lambda topic, value: None) -> None:
        """``fail(topic, value)``: what a send gets — a KafkaException or BufferError is
        raised by ``produce`` at once, a KafkaError is the delivery report's error — or
        None to store the record."""
        self.broker = broker
        self.fail = fail
        self.sends = 0
        self.reports: list[Callable[[], None]] = []  # delivery reports not yet served

    def produce(self, topic: str, value: bytes = b"", key: bytes | None = None, partition: int = 0,
                on_delivery: Callable[[Any, Any], None] | None = None) -> None:  # fmt: skip
        self.sends += 1
        error = self.fail(topic, value)
        if isinstance(error, (KafkaException, BufferError)):
            raise error
        if error is None:
            record = self.broker.append(topic, partition, value, key)
            self.reports.append(lambda: on_delivery(None, record))
        else:
            self.reports.append(lambda: on_delivery(error, None))

    def flush(self, timeout: float = -1) -> int:
        reports, self.reports = self.reports, []
        for report in reports:
            report()
        return 0

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> SimpleNamespace:
        return metadata(self.broker.partitions, topic)
