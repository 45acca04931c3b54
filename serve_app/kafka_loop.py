"""The Kafka side of a scorer replica: one consumer thread, committing to the scorers'
consumer group.

Partitions are assigned statically: replica r of N reads partitions p with p mod N = r
(Serve keeps ranks 0..N-1 stable: a replacement replica takes the rank of the one it
replaces, and resumes from the group's committed offsets). Not the group protocol:
with the embedded broker (Tansu), a group whose members were replaced one by one — a
Serve rolling update — never assigned partitions again (reproduced outside Ray with
two kafka-python members); static assignment also avoids stop-the-world rebalances,
like Kafka's static membership. Replica count and partitions are re-read every few
seconds, so scaling the deployment re-spreads the partitions.

Per poll: score the batch (``score`` uses one model for a whole batch, so a hot reload
swaps models between batches, never inside one), send every reply, ``flush`` until
the broker acknowledged them all; only offsets of acknowledged batches are committed
(asynchronously, at most every ``COMMIT_INTERVAL_S``, so the next batch is scored
meanwhile) — at-least-once: a crash before the commit makes the replacement score
those batches again, never lose them.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from collections.abc import Callable, Sequence
from typing import Any

from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from serve_app.runtime import BatchReport
from streaming.kafka_config import FETCH_MAX_WAIT_MS, KafkaClientConfig, TopicNames
from streaming.protocol import now_ms

logger = logging.getLogger("ray.serve")  # the replica's log file and the dashboard's log view

LAG_REFRESH_S = 1.0
ASSIGNMENT_REFRESH_S = 5.0
REPLY_LINGER_MS = 100
# Each commit is a broker request; committing per poll batch (hundreds a second) costs
# the broker CPU that the fetches need. A crash re-scores at most this much more.
COMMIT_INTERVAL_S = 0.2
REPLY_BATCH_BYTES = 256 * 1024  # well under the broker's default 1 MB message.max.bytes


class KafkaLoop(threading.Thread):
    def __init__(
        self,
        kafka: KafkaClientConfig,
        topics: TopicNames,
        group_id: str,
        max_poll_records: int,
        score: Callable[[Sequence[bytes], int, Sequence[dict[str, object]]], BatchReport],
        on_lag: Callable[[dict[int, int]], None],
        membership: Callable[[], tuple[int, int]] = lambda: (0, 1),
    ) -> None:
        """``membership()`` gives (this replica's rank, number of replicas)."""
        super().__init__(name="kafka-scorer", daemon=True)
        self.kafka = kafka
        self.topics = topics
        self.group_id = group_id
        self.max_poll_records = max_poll_records
        self.score = score
        self.on_lag = on_lag
        self.membership = membership
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.committed = 0  # messages whose offsets were committed (logged at stop)
        self.uncommitted = 0  # answered messages not yet in a commit
        self.reply_partitions: dict[str, list[int]] = {}
        self.rank, self.replicas = 0, 1  # as of the last assignment
        self.batches = 0

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the batch in hand, commit what was answered, close the clients."""
        self.stopping.set()
        self.join(timeout_s)
        logger.info("Kafka loop stopped after committing %d messages", self.committed)

    def run(self) -> None:
        try:
            self._consume()
        except BaseException as error:  # check_health reports it; Serve then replaces the replica
            logger.exception("Kafka loop died")
            self.error = error

    def _consume(self) -> None:
        consumer = self.kafka.consumer(
            group_id=self.group_id,  # where offsets are committed; partitions are assigned below
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_poll_records,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            metrics_enabled=False,  # its own sensors: 12% of an idle consumer's CPU; ours go to Ray
        )
        # Every batch's replies end with a flush, so they never wait for the linger; a long
        # one lets send() fill one record batch per partition instead of waking the
        # sender thread (a syscall) for each new batch.
        producer = self.kafka.producer(linger_ms=REPLY_LINGER_MS, batch_size=REPLY_BATCH_BYTES, metrics_enabled=False)
        flushed: dict[TopicPartition, OffsetAndMetadata] = {}  # next offsets whose replies are acknowledged
        try:
            lag_refreshed = assignment_refreshed = committed_at = 0.0
            while not self.stopping.is_set():
                if time.monotonic() - assignment_refreshed > ASSIGNMENT_REFRESH_S:
                    self._assign(consumer, flushed)
                    assignment_refreshed = time.monotonic()
                polled = consumer.poll(timeout_ms=100) if consumer.assignment() else {}
                if polled:
                    flushed.update(self._process(producer, polled))
                    self.uncommitted += sum(len(batch) for batch in polled.values())
                elif not consumer.assignment():
                    time.sleep(0.1)  # more replicas than partitions: this one idles
                if self.uncommitted and time.monotonic() - committed_at > COMMIT_INTERVAL_S:
                    # Commits of one partition are in order; one that fails leaves its
                    # batches to be re-scored after a restart (duplicate replies, which
                    # consumers drop by auction id), never lost.
                    consumer.commit_async(dict(flushed), callback=partial(self._on_commit, self.uncommitted))
                    self.uncommitted, committed_at = 0, time.monotonic()
                if time.monotonic() - lag_refreshed > LAG_REFRESH_S:
                    self.on_lag(_lag(consumer))
                    lag_refreshed = time.monotonic()
            self._commit(consumer, flushed)  # the asynchronous commits may still be in flight
        finally:
            try:
                consumer.close(autocommit=False)
            finally:
                producer.close()

    def _commit(self, consumer: Any, flushed: dict[TopicPartition, OffsetAndMetadata]) -> None:
        if flushed:
            consumer.commit(dict(flushed))
            self.committed += self.uncommitted
            self.uncommitted = 0

    def _assign(self, consumer: Any, flushed: dict[TopicPartition, OffsetAndMetadata]) -> None:
        partitions = consumer.partitions_for_topic(self.topics.auctions)
        if not partitions:
            raise RuntimeError(f"topic {self.topics.auctions!r} does not exist")
        self.reply_partitions.clear()  # re-read: topics may have grown
        self.rank, self.replicas = self.membership()
        wanted = {TopicPartition(self.topics.auctions, p) for p in partitions if p % self.replicas == self.rank}
        if wanted != consumer.assignment():
            self._commit(consumer, flushed)  # what this replica answered is not scored again by the next owner
            for partition in flushed.keys() - wanted:
                del flushed[partition]  # never commit over the next owner's offsets
            consumer.assign(sorted(wanted))
            logger.info("replica %d of %d reads partitions %s", self.rank, self.replicas, sorted(p.partition for p in wanted))

    def _process(self, producer: Any, polled: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, OffsetAndMetadata]:
        """Score a polled batch and reply; returns the offsets now safe to commit."""
        received_at = now_ms()
        records = [record for batch in polled.values() for record in batch]
        report = self.score(
            [r.value for r in records],
            received_at,
            [{"topic": r.topic, "partition": r.partition, "offset": r.offset} for r in records],
        )
        self.batches += 1
        for reply in report.replies:
            topic = self.topics.dlq if reply.reason is not None else reply.reply_to or self.topics.scores
            key = reply.auction_id.encode() if reply.auction_id is not None else None
            producer.send(topic, key=key, value=reply.value, partition=self._reply_partition(producer, topic))
        producer.flush()  # raises if a reply could not be written: nothing is committed then
        return {tp: OffsetAndMetadata(batch[-1].offset + 1, "", -1) for tp, batch in polled.items()}

    def _reply_partition(self, producer: Any, topic: str) -> int:
        """One partition per topic for a whole poll batch, rotating between batches: one
        record batch per flush instead of one per partition the keys hash to (the
        embedded broker's cost grows with the number of record batches it holds).
        Only this replica's share of the partitions (p mod N = rank, as for auctions),
        unless the topic has fewer partitions than replicas: the embedded broker can let
        a consumer skip a record batch that another producer was writing to the same
        partition at the same time (docs/protocol.md)."""
        partitions = self.reply_partitions.get(topic)
        if partitions is None:
            every = sorted(producer.partitions_for(topic))
            own = [p for p in every if p % self.replicas == self.rank]
            partitions = self.reply_partitions[topic] = own or every
        return partitions[self.batches % len(partitions)]

    def _on_commit(self, count: int, offsets: object, result: object) -> None:
        if isinstance(result, Exception):
            logger.warning("commit failed (%s); %d messages may be scored again", result, count)
        else:
            self.committed += count


def _lag(consumer: Any) -> dict[int, int]:
    """Messages behind the high watermark per assigned partition (from fetch responses:
    Tansu's ListOffsets answers are not exact)."""
    lag = {}
    for partition in consumer.assignment():
        try:
            highwater = consumer.highwater(partition)
            if highwater is not None:
                lag[partition.partition] = max(0, highwater - consumer.position(partition, timeout_ms=1000))
        except KafkaError:
            continue
    return lag
