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

Per poll (the confluent-kafka examples' shape: poll, process, send, confirm, then
commit): take each partition's records up to any offset jump (``_take_contiguous``),
score them (``score`` uses one model for a whole batch, so a hot reload swaps models
between batches, never inside one), address each reply (a refused ``reply_to`` becomes
a dead letter), send, ``flush`` and check every send's result (kafka-python's flush
does not raise for failed records): a transient failure is sent again after a backoff,
the batch's offsets not advanced meanwhile; a reply the broker refuses for good (too
large, not authorized, topic gone) becomes a dead letter instead. Only offsets of
batches whose every reply or dead letter the broker acknowledged are committed
(asynchronously, at most every ``COMMIT_INTERVAL_S``, so the next batch is scored
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

from kafka.errors import KafkaError, KafkaTimeoutError, UnknownTopicOrPartitionError
from kafka.structs import OffsetAndMetadata, TopicPartition

from serve_app.runtime import BatchReport, Reply
from streaming.kafka_config import FETCH_MAX_WAIT_MS, KafkaClientConfig, TopicNames
from streaming.protocol import ProtocolError, Reason, decode_error, encode_error, now_ms

logger = logging.getLogger("ray.serve")  # the replica's log file and the dashboard's log view

LAG_REFRESH_S = 1.0
ASSIGNMENT_REFRESH_S = 5.0
TOPICS_REFRESH_S = 1.0  # the broker's topic list, re-read at most this often for an unknown reply_to
REPLY_LINGER_MS = 100
# Each commit is a broker request; committing per poll batch (hundreds a second) costs
# the broker CPU that the fetches need. A crash re-scores at most this much more.
COMMIT_INTERVAL_S = 0.2
REPLY_BATCH_BYTES = 256 * 1024  # well under the broker's default 1 MB message.max.bytes
# A send waits at most this long for topic metadata or buffer space (kafka-python's
# default, 60 s, stalled every partition of the replica on one unknown reply topic).
MAX_BLOCK_MS = 5_000
RETRY_BACKOFF_S = 0.1  # first pause before sending failed records again; doubled up to MAX_RETRY_BACKOFF_S
MAX_RETRY_BACKOFF_S = 5.0
# Re-fetches of a partition whose offsets jumped before the jump is accepted: the
# embedded broker can skip a record batch (docs/protocol.md), while a real Kafka has
# legitimate gaps (transaction markers, compacted topics) that re-fetching cannot fill.
GAP_REFETCHES = 3

Clients = tuple[Any, Any]  # (consumer, producer) with kafka-python's interfaces


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
    ) -> None:
        """``membership()`` gives (this replica's rank, number of replicas); ``clients()``
        the (consumer, producer) to use, by default kafka-python's for ``kafka``."""
        super().__init__(name="kafka-scorer", daemon=True)
        self.kafka = kafka
        self.topics = topics
        self.group_id = group_id
        self.max_poll_records = max_poll_records
        self.score = score
        self.on_lag = on_lag
        self.membership = membership
        self.clients = clients or self._kafka_clients
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.committed = 0  # messages whose offsets were committed (logged at stop)
        self.uncommitted = 0  # answered messages not yet in a commit
        self.reply_partitions: dict[str, list[int]] = {}
        self.rank, self.replicas = 0, 1  # as of the last assignment
        self.batches = 0
        self.retried_sends = 0  # records sent again after a transient failure
        self.refetches = 0  # partitions sought back to the offset before a jump
        self.accepted_gaps = 0  # jumps still there after GAP_REFETCHES re-fetches
        self._gap: dict[TopicPartition, tuple[int, int]] = {}  # partition -> (missing offset, re-fetches)
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
        consumer = self.kafka.consumer(
            group_id=self.group_id,  # where offsets are committed; partitions are assigned below
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_poll_records,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            metrics_enabled=False,  # its own sensors: 12% of an idle consumer's CPU; ours go to Ray
        )
        try:
            # Every batch's replies end with a flush, so they never wait for the linger; a
            # long one lets send() fill one record batch per partition instead of waking
            # the sender thread (a syscall) for each new batch.
            producer = self.kafka.producer(
                linger_ms=REPLY_LINGER_MS,
                batch_size=REPLY_BATCH_BYTES,
                metrics_enabled=False,
                allow_auto_create_topics=False,  # a reply_to never creates a topic
                max_block_ms=MAX_BLOCK_MS,
            )
        except BaseException:
            consumer.close(autocommit=False)
            raise
        return consumer, producer

    def _consume(self) -> None:
        consumer, producer = self.clients()
        flushed: dict[TopicPartition, OffsetAndMetadata] = {}  # next offsets whose replies are acknowledged
        try:
            lag_refreshed = assignment_refreshed = committed_at = 0.0
            while not self.stopping.is_set():
                if time.monotonic() - assignment_refreshed > ASSIGNMENT_REFRESH_S:
                    self._assign(consumer, flushed)
                    assignment_refreshed = time.monotonic()
                polled = consumer.poll(timeout_ms=100) if consumer.assignment() else {}
                polled = self._take_contiguous(consumer, polled, flushed)
                if polled:
                    answered = self._process(consumer, producer, polled)
                    flushed.update(answered)
                    self.uncommitted += sum(len(polled[partition]) for partition in answered)
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

    def _take_contiguous(
        self, consumer: Any, polled: dict[TopicPartition, list[Any]], flushed: dict[TopicPartition, OffsetAndMetadata]
    ) -> dict[TopicPartition, list[Any]]:
        """Each partition's polled records up to its first offset jump (from the offset
        after the last answered record, or within the batch); the partition is sought
        back to the missing offset, up to ``GAP_REFETCHES`` times per jump. Records
        already answered (re-fetched after a seek) are dropped."""
        taken = {}
        for partition, batch in polled.items():
            answered = flushed.get(partition)
            expected = batch[0].offset if answered is None else answered.offset
            if batch[0].offset < expected:
                batch = [record for record in batch if record.offset >= expected]
                if not batch:
                    continue
            if batch[-1].offset - batch[0].offset + 1 != len(batch) or batch[0].offset != expected:  # one check per batch
                batch = self._before_jump(consumer, partition, batch, expected)
            if batch:
                taken[partition] = batch
        return taken

    def _before_jump(self, consumer: Any, partition: TopicPartition, batch: list[Any], expected: int) -> list[Any]:
        cut = next((n for n, record in enumerate(batch) if record.offset != expected + n), len(batch))
        missing = expected + cut
        offset, refetches = self._gap.get(partition, (missing, 0))
        refetches = refetches if offset == missing else 0
        if refetches >= GAP_REFETCHES:
            logger.warning(
                "partition %s: offsets jump from %d to %d after %d re-fetches; accepted (a real Kafka has such gaps)",
                partition.partition, missing, batch[cut].offset, refetches,
            )
            self.accepted_gaps += 1
            del self._gap[partition]
            return batch
        self._gap[partition] = (missing, refetches + 1)
        self.refetches += 1
        logger.warning("partition %s: offset %d skipped (next %d); fetching it again", partition.partition, missing, batch[cut].offset)
        consumer.seek(partition, missing)
        return batch[:cut]

    def _process(
        self, consumer: Any, producer: Any, polled: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """Score a polled batch and reply; returns the offsets now safe to commit (none
        when the loop is stopped before the broker acknowledged every reply)."""
        received_at = now_ms()
        records = [record for batch in polled.values() for record in batch]
        sources = [{"topic": r.topic, "partition": r.partition, "offset": r.offset} for r in records]
        report = self.score([r.value for r in records], received_at, sources)
        if len(report.replies) != len(records):
            raise RuntimeError(f"{len(report.replies)} replies to {len(records)} messages")
        self.batches += 1
        outgoing = [
            self._addressed(consumer, reply, record.value, source)
            for reply, record, source in zip(report.replies, records, sources)
        ]
        if not self._deliver(producer, outgoing):
            return {}
        return {tp: OffsetAndMetadata(batch[-1].offset + 1, "", -1) for tp, batch in polled.items()}

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
        return Outgoing(self.topics.dlq, key, encode_error(error, original, source=source), True, original, source)

    def _topic_exists(self, consumer: Any, topic: str) -> bool:
        if topic not in self._topic_names and time.monotonic() - self._topics_read_at > TOPICS_REFRESH_S:
            self._topic_names = set(consumer.topics())
            self._topics_read_at = time.monotonic()
        return topic in self._topic_names

    def _deliver(self, producer: Any, outgoing: list[Outgoing]) -> bool:
        """Send until the broker acknowledged a record for every one of ``outgoing``;
        False if the loop was stopped first."""
        backoff = RETRY_BACKOFF_S
        while outgoing:
            sent = [(item, self._send(producer, item)) for item in outgoing]
            producer.flush()
            outgoing, transient, last_error = [], 0, None
            for item, result in sent:
                error = _failure(result)
                if error is None:
                    continue
                replacement = self._after_rejection(item, error) if self._is_permanent(item, error) else None
                if replacement is None:
                    transient, last_error = transient + 1, error
                outgoing.append(replacement or item)
            if transient:
                logger.warning("%d records not acknowledged (%s); sending them again in %.1f s", transient, last_error, backoff)
                self.retried_sends += transient
                if self.stopping.wait(backoff):
                    return False
                backoff = min(2 * backoff, MAX_RETRY_BACKOFF_S)
        return True

    def _send(self, producer: Any, item: Outgoing) -> Any:
        """The send's future, or what sending raised at once (kafka-python checks the
        topic name, the record size and the topic's metadata before queueing)."""
        try:
            return producer.send(item.topic, key=item.key, value=item.value, partition=self._reply_partition(producer, item.topic))
        except Exception as error:
            return error

    def _is_permanent(self, item: Outgoing, error: Exception) -> bool:
        """A failure that sending again cannot cure. A reply_to topic that is gone or
        whose metadata never comes is one; the scorer's own topics are waited for."""
        if isinstance(error, (UnknownTopicOrPartitionError, KafkaTimeoutError)):
            return item.topic not in (self.topics.scores, self.topics.dlq)
        if isinstance(error, KafkaError):
            return not error.retriable
        return True  # kafka-python's own checks of the record (AssertionError, ValueError, ...)

    def _after_rejection(self, item: Outgoing, error: Exception) -> Outgoing | None:
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
            every = sorted(producer.partitions_for(topic))
            own = [p for p in every if p % self.replicas == self.rank]
            partitions = self.reply_partitions[topic] = own or every
        return partitions[self.batches % len(partitions)]

    def _on_commit(self, count: int, offsets: object, result: object) -> None:
        if isinstance(result, Exception):
            logger.warning("commit failed (%s); %d messages may be scored again", result, count)
        else:
            self.committed += count


def _failure(result: Any) -> Exception | None:
    """What went wrong with one send (its future after a flush, or what send raised)."""
    if isinstance(result, Exception):
        return result
    if not result.is_done:
        return KafkaTimeoutError("not acknowledged by the end of the flush")
    return result.exception if result.failed() else None


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
