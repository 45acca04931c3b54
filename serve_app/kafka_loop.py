"""The Kafka side of a scorer replica: one consumer thread, committing to the scorers'
consumer group. The clients are librdkafka's (confluent-kafka), like the load
generator's: for the same traffic kafka-python's consumer and producer cost the
replica several times the CPU (docs/protocol.md has the measurement).

Partitions are assigned statically: replica r of N reads partitions p with p mod N = r
(Serve keeps ranks 0..N-1 stable: a replacement replica takes the rank of the one it
replaces, and resumes from the group's committed offsets). Not the group protocol:
with the embedded broker (Tansu), a group whose members were replaced one by one — a
Serve rolling update — never assigned partitions again (reproduced outside Ray with
two kafka-python members); static assignment also avoids stop-the-world rebalances,
like Kafka's static membership. Replica count and partitions are re-read every few
seconds, so scaling the deployment re-spreads the partitions.

Per poll (the confluent-kafka examples' shape: poll, process, send, confirm, then
commit): take each partition's records up to any offset jump (``_take_contiguous``),
score them (``score`` uses one model for a whole batch, so a hot reload swaps models
between batches, never inside one), address each reply (a refused ``reply_to`` becomes
a dead letter), produce, ``flush`` and check every delivery report: a transient failure
is sent again after a backoff, the batch's offsets not advanced meanwhile; a reply the
broker refuses for good (too large, not authorized, topic gone) becomes a dead letter
instead. Only offsets of batches whose every reply or dead letter the broker
acknowledged are committed (auto-commit and auto offset store are off; commits are
asynchronous, at most every ``COMMIT_INTERVAL_S``, so the next batch is scored
meanwhile) — at-least-once: a crash before the commit makes the replacement score
those batches again, never lose them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from serve_app.runtime import BatchReport, Reply
from streaming.kafka_config import FETCH_MAX_WAIT_MS, KafkaClientConfig, TopicNames
from streaming.protocol import ProtocolError, Reason, decode_error, encode_error, now_ms

logger = logging.getLogger("ray.serve")  # the replica's log file and the dashboard's log view

POLL_TIMEOUT_S = 0.1  # poll returns as soon as a record is there; this only paces an idle loop
LAG_REFRESH_S = 1.0
ASSIGNMENT_REFRESH_S = 5.0
TOPICS_REFRESH_S = 1.0  # the broker's topic list, re-read at most this often for an unknown reply_to
METADATA_TIMEOUT_S = 10.0
# Each commit is a broker request; committing per poll batch (hundreds a second) costs
# the broker CPU that the fetches need. A crash re-scores at most this much more.
COMMIT_INTERVAL_S = 0.2
# librdkafka retries a failed produce by itself until this timeout, then reports the
# failure; the loop then backs off and sends again (an unbounded timeout would hold
# the batch, and the loop's stop, for as long as a broker outage lasts).
DELIVERY_TIMEOUT_MS = 5_000
# A reply_to topic deleted after its existence was checked fails this soon (librdkafka
# waits 30 s by default for a topic to appear).
TOPIC_PROPAGATION_MS = 1_000
FLUSH_SLICE_S = 0.5  # flush in slices, so that a stop is seen while deliveries are pending
RETRY_BACKOFF_S = 0.1  # first pause before sending failed records again; doubled up to MAX_RETRY_BACKOFF_S
MAX_RETRY_BACKOFF_S = 5.0
# Re-fetches of a partition whose offsets jumped before the jump is accepted: the
# embedded broker can skip a record batch (docs/protocol.md), while a real Kafka has
# legitimate gaps (transaction markers, compacted topics) that re-fetching cannot fill.
GAP_REFETCHES = 3

# Delivery failures that sending again can cure: the broker unreachable, moving, slow.
# Any other error (record too large, invalid topic, not authorized...) is for good.
TRANSIENT_ERRORS = frozenset({
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError._QUEUE_FULL, KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT, KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE, KafkaError.REQUEST_TIMED_OUT, KafkaError.NETWORK_EXCEPTION,
    KafkaError.BROKER_NOT_AVAILABLE, KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.KAFKA_STORAGE_ERROR,
})  # fmt: skip
# A missing topic: waited for when it is the scorer's own, for good when a reply_to names it.
MISSING_TOPIC_ERRORS = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION})
PENDING = KafkaError(KafkaError._MSG_TIMED_OUT, "no delivery report by the end of the flush")

Clients = tuple[Any, Any]  # (consumer, producer) with confluent-kafka's interfaces


@dataclass(frozen=True)
class Outgoing:
    """A record to send: the reply or dead letter of one consumed record."""

    topic: str
    key: bytes | None
    value: bytes
    dead_letter: bool
    original: bytes  # the consumed record's value
    source: dict[str, object]  # its topic, partition and offset
    stripped: bool = False  # a dead letter already cut to its envelope (no original, short message)


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
        clients: Callable[[], Clients] | None = None,
        on_dead_letter: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """``membership()`` gives (this replica's rank, number of replicas); ``clients()``
        the (consumer, producer) to use, by default confluent-kafka's for ``kafka``;
        ``on_dead_letter(reason)`` hears of each dead letter the loop itself makes (a
        refused reply_to, a reply the broker refused), which ``score`` never saw."""
        super().__init__(name="kafka-scorer", daemon=True)
        self.kafka = kafka
        self.topics = topics
        self.group_id = group_id
        self.max_poll_records = max_poll_records
        self.score = score
        self.on_lag = on_lag
        self.membership = membership
        self.clients = clients or self._kafka_clients
        self.on_dead_letter = on_dead_letter
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.committed = 0  # messages whose offsets were committed (logged at stop)
        self.uncommitted = 0  # answered messages not yet in a commit
        self.reply_partitions: dict[str, list[int]] = {}
        self.rank, self.replicas = 0, 1  # as of the last assignment
        # The partitions assigned, kept here: librdkafka's assignment() is a round trip to
        # its main thread, too slow to ask before every poll.
        self.assigned: set[int] = set()
        self.batches = 0
        self.retried_sends = 0  # records sent again after a transient failure
        self.refetches = 0  # partitions sought back to the offset before a jump
        self.accepted_gaps = 0  # jumps still there after GAP_REFETCHES re-fetches
        self._gap: dict[int, tuple[int, int]] = {}  # partition -> (missing offset, re-fetches)
        self._topic_names: set[str] = set()
        self._topics_read_at = -TOPICS_REFRESH_S

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

    def _kafka_clients(self) -> Clients:
        consumer = Consumer(self.kafka.librdkafka(**{
            "group.id": self.group_id,  # where offsets are committed; partitions are assigned below
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": FETCH_MAX_WAIT_MS,
            "on_commit": self._on_commit,
            "logger": logger,
        }))  # fmt: skip
        # Every batch's replies end with a flush, which sends at once whatever the linger.
        producer = Producer(self.kafka.librdkafka(**{
            "acks": "all",
            "allow.auto.create.topics": False,  # a reply_to never creates a topic (librdkafka's producer would)
            "message.timeout.ms": DELIVERY_TIMEOUT_MS,
            "topic.metadata.propagation.max.ms": TOPIC_PROPAGATION_MS,
            "logger": logger,
        }))  # fmt: skip
        return consumer, producer

    def _consume(self) -> None:
        consumer, producer = self.clients()
        flushed: dict[int, int] = {}  # partition -> next offset, its replies acknowledged
        try:
            lag_refreshed = assignment_refreshed = committed_at = 0.0
            while not self.stopping.is_set():
                if time.monotonic() - assignment_refreshed > ASSIGNMENT_REFRESH_S:
                    self._assign(consumer, flushed)
                    assignment_refreshed = time.monotonic()
                polled = self._poll(consumer) if self.assigned else {}
                polled = self._take_contiguous(consumer, polled, flushed)
                if polled:
                    answered = self._process(consumer, producer, polled)
                    flushed.update(answered)
                    self.uncommitted += sum(len(polled[partition]) for partition in answered)
                elif not self.assigned:
                    time.sleep(POLL_TIMEOUT_S)  # more replicas than partitions: this one idles
                if self.uncommitted and time.monotonic() - committed_at > COMMIT_INTERVAL_S:
                    # Commits of one partition are in order; one that fails leaves its
                    # batches to be re-scored after a restart (duplicate replies, which
                    # consumers drop by auction id), never lost.
                    consumer.commit(offsets=self._offsets(flushed), asynchronous=True)
                    self.committed += self.uncommitted
                    self.uncommitted, committed_at = 0, time.monotonic()
                if time.monotonic() - lag_refreshed > LAG_REFRESH_S:
                    self.on_lag(_lag(consumer))
                    lag_refreshed = time.monotonic()
            self._commit(consumer, flushed)  # the asynchronous commits may still be in flight
        finally:
            consumer.close()

    def _offsets(self, flushed: dict[int, int]) -> list[TopicPartition]:
        return [TopicPartition(self.topics.auctions, partition, offset) for partition, offset in flushed.items()]

    def _commit(self, consumer: Any, flushed: dict[int, int]) -> None:
        if flushed:
            consumer.commit(offsets=self._offsets(flushed), asynchronous=False)
            self.committed += self.uncommitted
            self.uncommitted = 0

    def _assign(self, consumer: Any, flushed: dict[int, int]) -> None:
        auctions = self.topics.auctions
        metadata = consumer.list_topics(auctions, timeout=METADATA_TIMEOUT_S).topics.get(auctions)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise RuntimeError(f"topic {auctions!r} does not exist")
        self.reply_partitions.clear()  # re-read: topics may have grown
        self.rank, self.replicas = self.membership()
        wanted = {p for p in metadata.partitions if p % self.replicas == self.rank}
        if wanted != self.assigned:
            self._commit(consumer, flushed)  # what this replica answered is not scored again by the next owner
            for partition in flushed.keys() - wanted:
                del flushed[partition]  # never commit over the next owner's offsets
            # Without an offset, each partition starts at the group's committed offset.
            consumer.assign([TopicPartition(auctions, p) for p in sorted(wanted)])
            self.assigned = wanted
            logger.info("replica %d of %d reads partitions %s", self.rank, self.replicas, sorted(wanted))

    def _poll(self, consumer: Any) -> dict[int, list[Any]]:
        """The records at hand, per partition: waits for the first one only (librdkafka's
        ``consume`` waits its whole timeout unless the batch is full)."""
        first = consumer.poll(POLL_TIMEOUT_S)
        if first is None:
            return {}
        records = [first, *consumer.consume(num_messages=self.max_poll_records - 1, timeout=0)] if self.max_poll_records > 1 else [first]
        polled: dict[int, list[Any]] = {}
        for record in records:
            error = record.error()
            if error is None:
                polled.setdefault(record.partition(), []).append(record)
            elif error.fatal():
                raise KafkaException(error)
            else:  # a broker reconnect, say: librdkafka fetches again by itself
                logger.warning("consumer: %s", error)
        return polled

    def _take_contiguous(
        self, consumer: Any, polled: dict[int, list[Any]], flushed: dict[int, int]
    ) -> dict[int, list[Any]]:
        """Each partition's polled records up to its first offset jump (from the offset
        after the last answered record, or within the batch); the partition is sought
        back to the missing offset, up to ``GAP_REFETCHES`` times per jump. Records
        already answered (re-fetched after a seek) are dropped."""
        taken = {}
        for partition, batch in polled.items():
            first = batch[0].offset()
            expected = flushed.get(partition, first)
            if first < expected:
                batch = [record for record in batch if record.offset() >= expected]
                if not batch:
                    continue
                first = batch[0].offset()
            if batch[-1].offset() - first + 1 != len(batch) or first != expected:  # one check per batch
                batch = self._before_jump(consumer, partition, batch, expected)
            if batch:
                taken[partition] = batch
        return taken

    def _before_jump(self, consumer: Any, partition: int, batch: list[Any], expected: int) -> list[Any]:
        cut = next((n for n, record in enumerate(batch) if record.offset() != expected + n), len(batch))
        missing = expected + cut
        offset, refetches = self._gap.get(partition, (missing, 0))
        refetches = refetches if offset == missing else 0
        if refetches >= GAP_REFETCHES:
            logger.warning(
                "partition %s: offsets jump from %d to %d after %d re-fetches; accepted (a real Kafka has such gaps)",
                partition, missing, batch[cut].offset(), refetches,
            )
            self.accepted_gaps += 1
            del self._gap[partition]
            return batch
        self._gap[partition] = (missing, refetches + 1)
        self.refetches += 1
        logger.warning("partition %s: offset %d skipped (next %d); fetching it again", partition, missing, batch[cut].offset())
        # librdkafka drops the records it fetched for the partition before the seek.
        consumer.seek(TopicPartition(self.topics.auctions, partition, missing))
        return batch[:cut]

    def _process(self, consumer: Any, producer: Any, polled: dict[int, list[Any]]) -> dict[int, int]:
        """Score a polled batch and reply; returns the offsets now safe to commit (none
        when the loop is stopped before the broker acknowledged every reply)."""
        received_at = now_ms()
        records = [record for batch in polled.values() for record in batch]
        values = [record.value() for record in records]
        sources = [{"topic": r.topic(), "partition": r.partition(), "offset": r.offset()} for r in records]
        report = self.score(values, received_at, sources)
        if len(report.replies) != len(records):
            raise RuntimeError(f"{len(report.replies)} replies to {len(records)} messages")
        self.batches += 1
        outgoing = [
            self._addressed(consumer, reply, value, source)
            for reply, value, source in zip(report.replies, values, sources)
        ]
        if not self._deliver(producer, outgoing):
            return {}
        return {partition: batch[-1].offset() + 1 for partition, batch in polled.items()}

    def _addressed(self, consumer: Any, reply: Reply, original: bytes, source: dict[str, object]) -> Outgoing:
        key = reply.auction_id.encode() if reply.auction_id is not None else None
        if reply.reason is not None:
            return Outgoing(self.topics.dlq, key, reply.value, True, original, source)
        if reply.reply_to is None:
            return Outgoing(self.topics.scores, key, reply.value, False, original, source)
        refusal = self.topics.reply_to_refusal(reply.reply_to)
        if refusal is None and not self._topic_exists(consumer, reply.reply_to):
            refusal = "no such topic (the scorer creates none)"
        if refusal is None:
            return Outgoing(reply.reply_to, key, reply.value, False, original, source)
        error = ProtocolError(Reason.invalid_reply_to, f"'reply_to' {reply.reply_to!r}: {refusal}", reply.auction_id)
        self.on_dead_letter(Reason.invalid_reply_to.value)
        return Outgoing(self.topics.dlq, key, encode_error(error, original, source=source), True, original, source)

    def _topic_exists(self, consumer: Any, topic: str) -> bool:
        if topic not in self._topic_names and time.monotonic() - self._topics_read_at > TOPICS_REFRESH_S:
            listed = consumer.list_topics(timeout=METADATA_TIMEOUT_S).topics
            self._topic_names = {name for name, metadata in listed.items() if metadata.error is None}
            self._topics_read_at = time.monotonic()
        return topic in self._topic_names

    def _deliver(self, producer: Any, outgoing: list[Outgoing]) -> bool:
        """Send until the broker acknowledged a record for every one of ``outgoing``;
        False if the loop was stopped first."""
        backoff = RETRY_BACKOFF_S
        while outgoing:
            results: list[Exception | KafkaError | None] = [PENDING] * len(outgoing)
            for n, item in enumerate(outgoing):
                self._send(producer, item, partial(_report, results, n))
            while producer.flush(FLUSH_SLICE_S):
                if self.stopping.is_set():
                    return False
            retry, transient, last_error = [], 0, None
            for item, error in zip(outgoing, results):
                if error is None:
                    continue
                replacement = self._after_rejection(item, error) if self._is_permanent(item, error) else None
                if replacement is None:
                    transient, last_error = transient + 1, error
                retry.append(replacement or item)
            outgoing = retry
            if transient:
                logger.warning("%d records not acknowledged (%s); sending them again in %.1f s", transient, last_error, backoff)
                self.retried_sends += transient
                if self.stopping.wait(backoff):
                    return False
                backoff = min(2 * backoff, MAX_RETRY_BACKOFF_S)
        return True

    def _send(self, producer: Any, item: Outgoing, on_delivery: Callable[[Any, Any], None]) -> None:
        """Produce ``item``; what librdkafka refuses at once (a record over
        message.max.bytes, a full queue) is its delivery report."""
        try:
            partition = self._reply_partition(producer, item.topic)
            producer.produce(item.topic, value=item.value, key=item.key, partition=partition, on_delivery=on_delivery)
        except KafkaException as error:
            on_delivery(error.args[0], None)
        except Exception as error:
            on_delivery(error, None)

    def _is_permanent(self, item: Outgoing, error: Exception | KafkaError) -> bool:
        """A failure that sending again cannot cure. A reply_to topic that is gone is
        one; the scorer's own topics are waited for."""
        if isinstance(error, KafkaError):
            if error.code() in MISSING_TOPIC_ERRORS:
                return item.topic not in (self.topics.scores, self.topics.dlq)
            return error.code() not in TRANSIENT_ERRORS
        return not isinstance(error, BufferError)  # librdkafka's queue is full: wait; anything else is for good

    def _after_rejection(self, item: Outgoing, error: Exception | KafkaError) -> Outgoing | None:
        """What to send instead of a record the broker refused for good: a reply's dead
        letter, a dead letter's envelope; None when even that was refused (it is sent
        again: nothing is committed past a message without an acknowledged answer)."""
        if item.stripped:
            logger.error("the dead-letter topic %r refuses even a stripped dead letter: %s", item.topic, error)
            return None
        if not item.dead_letter:
            failure = ProtocolError(Reason.reply_rejected, f"the broker refused the reply to {item.topic!r}: {error!r}")
            failure.auction_id = item.key.decode() if item.key is not None else None
            value = encode_error(failure, item.original, source=item.source)
            self.on_dead_letter(Reason.reply_rejected.value)
            return Outgoing(self.topics.dlq, item.key, value, True, item.original, item.source)
        rejected = decode_error(item.value)
        failure = ProtocolError(
            Reason(rejected.reason), f"{rejected.message[:200]} (the full dead letter was refused: {error!r})", rejected.auction_id
        )
        value = encode_error(failure, item.original, source=item.source, max_original_bytes=0)
        return Outgoing(item.topic, item.key, value, True, item.original, item.source, stripped=True)

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
            metadata = producer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics[topic]
            if metadata.error is not None:
                raise KafkaException(metadata.error)
            every = sorted(metadata.partitions)
            own = [p for p in every if p % self.replicas == self.rank]
            partitions = self.reply_partitions[topic] = own or every
        return partitions[self.batches % len(partitions)]

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None:
            logger.warning("commit failed (%s); messages answered since the last commit may be scored again", error)


def _report(results: list[Exception | KafkaError | None], n: int, error: KafkaError | None, _record: Any) -> None:
    """A delivery report: ``results[n]`` becomes None (acknowledged) or the error."""
    results[n] = error


def _lag(consumer: Any) -> dict[int, int]:
    """Messages behind the high watermark per assigned partition (the watermark from
    fetch responses: Tansu's ListOffsets answers are not exact)."""
    lag = {}
    assigned = consumer.assignment()
    for partition, position in zip(assigned, consumer.position(assigned)):
        _low, high = consumer.get_watermark_offsets(partition, cached=True)
        if high >= 0 and position.offset >= 0:
            lag[partition.partition] = max(0, high - position.offset)
    return lag
