"""Load generator: send auctions to the scorer, read the replies, match them by
auction id and report throughput, end-to-end latency, and missing, duplicate and
dead-lettered auctions.

Auctions come as ``AuctionTemplate``s: everything but the id and the send time is
packed once, so sending costs a few microseconds of packing whatever the auction's
size. Templates come from the planted synthetic generator (``synthetic_templates``),
a prepared dataset's test split (``dataset_templates``) or plain dicts
(``templates_from_dicts``); fewer templates than auctions are cycled.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, Field

from model_zoo.schema import MISSING_INDEX, RESERVED_INDICES, FeatureSchema, Kind
from model_zoo.runtime import freeze_heap
from model_zoo.vocab import Vocabulary
from streaming.kafka_config import FETCH_MAX_WAIT_MS, KafkaClientConfig, TopicNames
from streaming.protocol import PROTOCOL_VERSION, ProtocolError, decode_error, decode_reply, now_ms, pack_column

ItemFormat = Literal["rows", "columns", "packed"]  # packed: columns, with integer columns as packed binary
_RARE_TOKEN = "\x00rare"  # a raw value no vocabulary holds: maps to the rare index


class AuctionTemplate:
    """An auction packed once; ``stamp`` adds a fresh auction id and send time."""

    __slots__ = ("item_count", "_pairs", "_body")

    def __init__(
        self,
        context: Mapping[str, Any],
        items: Sequence[Mapping[str, Any]] | Sequence[Any] | Mapping[str, Any],
        *,
        model: str | None = None,
        top_k: int | None = None,
        reply_to: str | None = None,
    ) -> None:
        body: dict[str, Any] = {"context": dict(context), "items": items}
        for key, value in (("model", model), ("top_k", top_k), ("reply_to", reply_to)):
            if value is not None:
                body[key] = value
        self.item_count = len(items["item_id"]) if isinstance(items, Mapping) else len(items)
        self._pairs = len(body) + 3  # + version, auction_id, sent_at_ms
        packer = msgpack.Packer(use_bin_type=True)
        self._body = b"".join(packer.pack(key) + packer.pack(value) for key, value in body.items())

    def stamp(self, auction_id: str, sent_at_ms: int) -> bytes:
        """The auction request as msgpack: a map header, the stamped keys, the packed body."""
        packer = msgpack.Packer(use_bin_type=True)
        head = packer.pack_map_header(self._pairs) + packer.pack("version") + packer.pack(PROTOCOL_VERSION)
        stamp = packer.pack("auction_id") + packer.pack(auction_id) + packer.pack("sent_at_ms") + packer.pack(sent_at_ms)
        return head + stamp + self._body


class RawMessage:
    """Bytes sent as they are (e.g. deliberately bad auctions), under a label that
    stands for their auction id. A dead-letter record without a readable auction id
    is matched to it by its original bytes."""

    __slots__ = ("payload", "label", "item_count")

    def __init__(self, payload: bytes, label: str, item_count: int = 0) -> None:
        self.payload = payload
        self.label = label
        self.item_count = item_count


# -- sources ----------------------------------------------------------------------
def templates_from_dicts(auctions: Iterable[Mapping[str, Any]]) -> list[AuctionTemplate]:
    """Templates from dicts with ``context``, ``items`` and optional ``model``,
    ``top_k``, ``reply_to`` (the request's fields other than id and time)."""
    return [
        AuctionTemplate(a["context"], a["items"], model=a.get("model"), top_k=a.get("top_k"), reply_to=a.get("reply_to"))
        for a in auctions
    ]


def synthetic_templates(
    schema: FeatureSchema,
    count: int,
    items_per_auction: int,
    *,
    vocabulary: Vocabulary | None = None,
    value_probabilities: np.ndarray | None = None,
    item_format: ItemFormat = "rows",
    max_bag: int = 3,
    seed: int = 0,
    **options: Any,
) -> list[AuctionTemplate]:
    """Random auctions over ``schema``: values drawn per field from ``value_probabilities``
    over the vocabulary proper (the planted model's Zipf law; uniform by default), sent as
    the vocabulary's raw tokens, or as the indices themselves when there is no vocabulary
    (an identity vocabulary on the scorer's side). ``options``: model, top_k, reply_to."""
    rng = np.random.default_rng(seed)

    def draw(name: str, size: int) -> list[Any]:
        proper = schema.field(name).vocab_size - RESERVED_INDICES
        if value_probabilities is not None and len(value_probabilities) == proper:
            indices = rng.choice(proper, size=size, p=value_probabilities)
        else:
            indices = rng.integers(0, proper, size=size)
        if vocabulary is None:
            return (indices + RESERVED_INDICES).tolist()
        tokens = vocabulary[name].tokens
        return [tokens[i] if i < len(tokens) else _RARE_TOKEN for i in indices.tolist()]

    def column(name: str, size: int) -> list[Any]:
        if schema.field(name).kind == Kind.single:
            return draw(name, size)
        lengths = rng.integers(1, max_bag + 1, size=size).tolist()
        values = iter(draw(name, sum(lengths)))
        return [[next(values) for _ in range(length)] for length in lengths]

    templates = []
    for auction in range(count):
        context = {name: column(name, 1)[0] for name in schema.context_fields}
        columns = {name: column(name, items_per_auction) for name in schema.item_fields}
        item_ids = [f"item-{auction}-{j}" for j in range(items_per_auction)]
        templates.append(AuctionTemplate(context, _items(item_ids, columns, item_format), **options))
    return templates


def dataset_templates(
    directory: str | Path,
    count: int,
    items_per_auction: int,
    *,
    split: str = "test",
    item_format: ItemFormat = "rows",
    **options: Any,
) -> list[AuctionTemplate]:
    """Auctions from a prepared dataset (docs/data.md): each auction takes
    ``items_per_auction`` consecutive rows of the split, its context from the first of
    them. Indices go back to raw tokens through the dataset's vocabulary (missing ->
    nil, rare -> a token no vocabulary holds), as a producer would send them."""
    import pyarrow.parquet as pq

    from model_zoo.data.layout import VOCAB_DIR, load_schema, split_files, weights_column

    schema = load_schema(directory)
    vocabulary = Vocabulary.load(Path(directory) / VOCAB_DIR)
    rows_needed = count * items_per_auction
    tables, rows = [], 0
    for path in split_files(directory, split):
        tables.append(pq.read_table(path))
        rows += tables[-1].num_rows
        if rows >= rows_needed:
            break
    columns: dict[str, list[Any]] = {}
    for name in schema.names:
        to_raw = _raw_values(vocabulary[name].tokens)
        values = [v for table in tables for v in table.column(name).to_pylist()][:rows_needed]
        if schema.field(name).kind == Kind.single:
            columns[name] = [to_raw(v) for v in values]
        else:
            weights = [w for table in tables for w in table.column(weights_column(name)).to_pylist()]
            columns[name] = [_raw_bag([to_raw(v) for v in bag], bag_weights) for bag, bag_weights in zip(values, weights)]
    auctions = min(count, rows // items_per_auction)
    if auctions == 0:
        raise ValueError(f"the {split} split of {directory} has fewer than {items_per_auction} rows")
    templates = []
    for auction in range(auctions):
        start, stop = auction * items_per_auction, (auction + 1) * items_per_auction
        context = {name: columns[name][start] for name in schema.context_fields}
        item_columns = {name: columns[name][start:stop] for name in schema.item_fields}
        item_ids = [f"row-{row}" for row in range(start, stop)]
        templates.append(AuctionTemplate(context, _items(item_ids, item_columns, item_format), **options))
    return templates


def _raw_values(tokens: list[str]) -> Any:
    def to_raw(index: int) -> Any:
        if index == MISSING_INDEX:
            return None
        position = index - RESERVED_INDICES
        return tokens[position] if 0 <= position < len(tokens) else _RARE_TOKEN

    return to_raw


def _packed_if_integers(values: list[Any]) -> list[Any] | bytes:
    """A packed column when every value is an integer or the text of one (the same token
    either way), else the values unchanged."""
    try:
        numbers = [v if type(v) is int else int(v) for v in values]
    except (TypeError, ValueError):
        return values
    if [str(n) for n in numbers] != [str(v) for v in values] or not all(-(1 << 63) <= n < 1 << 63 for n in numbers):
        return values
    return pack_column(numbers)


def _raw_bag(tokens: list[Any], weights: list[float]) -> Any:
    """A bag as the protocol takes it: a list when its weights are equal (or a map
    cannot hold it), else {token: weight}."""
    if len(set(weights)) <= 1 or None in tokens or len(set(tokens)) < len(tokens):
        return tokens
    return dict(zip(tokens, weights))


def _items(item_ids: list[str], columns: dict[str, list[Any]], item_format: ItemFormat) -> Any:
    if item_format == "columns":
        return {"item_id": item_ids, "features": columns}
    if item_format == "packed":
        return {"item_id": item_ids, "features": {name: _packed_if_integers(values) for name, values in columns.items()}}
    names = list(columns)
    rows = zip(*(columns[n] for n in names))
    return [{"item_id": item_id, "features": dict(zip(names, row))} for item_id, row in zip(item_ids, rows)]


# -- the run ----------------------------------------------------------------------
class LoadConfig(BaseModel):
    count: int = Field(ge=1, description="auctions to send")
    rate: float | None = Field(default=None, gt=0, description="auctions per second; None: as fast as possible")
    reply_timeout_s: float = Field(default=10.0, gt=0, description="stop waiting after this long without a reply")
    reply_topic: str | None = Field(default=None, description="where replies go (default: the scores topic)")
    progress: bool = True
    linger_ms: int = Field(default=5, ge=0, description="the producer's linger: how long it batches auction messages (an ad server's batching)")


class LatencySummary(BaseModel):
    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, latencies_ms: Sequence[float]) -> "LatencySummary":
        if not latencies_ms:
            return cls(count=0, mean=None, p50=None, p95=None, p99=None, max=None)
        values = np.asarray(latencies_ms, dtype=np.float64)
        p50, p95, p99 = np.percentile(values, [50, 95, 99]).tolist()
        return cls(count=len(values), mean=float(values.mean()), p50=p50, p95=p95, p99=p99, max=float(values.max()))


class LoadReport(BaseModel):
    sent: int
    items_sent: int
    scored: int = Field(description="distinct auctions with a score reply")
    dead_lettered: int = Field(description="distinct auctions answered on the dead-letter topic only")
    missing: int = Field(description="auctions with neither a reply nor a dead-letter record")
    duplicates: int = Field(description="score replies beyond the first for an auction")
    unexpected: int = Field(description="replies for auction ids this run did not send")
    undecodable: int = Field(description="records on the reply topics that are not replies")
    dlq_reasons: dict[str, int]
    dead_letter_by_id: dict[str, str] = Field(description="auction id (or raw message label) -> reason")
    model_versions: dict[str, int]
    target_rate: float | None
    send_seconds: float
    send_rate: float = Field(description="auctions per second offered")
    duration_s: float = Field(description="first send to last reply")
    throughput: float = Field(description="scored auctions per second over duration_s")
    item_scores_per_s: float
    latency_ms: LatencySummary = Field(description="end to end: send to reply received")


class _ReplyCollector(threading.Thread):
    """Reads the reply and dead-letter topics (partitions assigned, no consumer group)
    and matches records to sent auctions. The consumer is used by this thread only."""

    def __init__(self, consumer: Any, dlq_topic: str) -> None:
        super().__init__(name="reply-collector", daemon=True)
        self.consumer = consumer
        self.dlq_topic = dlq_topic
        # Written by the sender before each send, read here: auction id -> (perf_counter, items).
        self.sent: dict[str, tuple[float, int]] = {}
        self.raw_labels: dict[bytes, str] = {}  # payload of a RawMessage -> its label
        self.stopping = threading.Event()
        self.scored: dict[str, float] = {}  # auction id -> latency ms of its first reply
        self.dead: dict[str, str] = {}  # auction id -> reason of its first dead-letter record
        self.duplicates = self.unexpected = self.undecodable = 0
        self.reasons: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.last_reply_at = time.perf_counter()
        self.error: BaseException | None = None

    @property
    def answered(self) -> int:
        return len(self.scored) + len(self.dead.keys() - self.scored.keys())

    def run(self) -> None:
        from confluent_kafka import KafkaException

        try:
            while not self.stopping.is_set():
                first = self.consumer.poll(0.05)  # returns as soon as a record arrives
                if first is None:
                    continue
                records = [first, *self.consumer.consume(num_messages=5000, timeout=0)]
                now = time.perf_counter()
                for record in records:
                    error = record.error()
                    if error is not None:
                        if error.fatal():
                            raise KafkaException(error)
                        continue  # transient (a broker reconnect): librdkafka retries by itself
                    if record.topic() == self.dlq_topic:
                        self._take_error(record.value(), now)
                    else:
                        self._take_reply(record.value(), now)
        except BaseException as error:  # surfaced by run_load
            self.error = error

    def _take_reply(self, value: bytes, now: float) -> None:
        try:
            reply = decode_reply(value)
        except ProtocolError:
            self.undecodable += 1
            return
        sent = self.sent.get(reply.auction_id)
        if sent is None:
            self.unexpected += 1
            return
        self.last_reply_at = now
        self.versions[reply.model_version] += 1
        if reply.auction_id in self.scored:
            self.duplicates += 1
        else:
            self.scored[reply.auction_id] = (now - sent[0]) * 1000.0

    def _take_error(self, value: bytes, now: float) -> None:
        try:
            error = decode_error(value)
        except ProtocolError:
            self.undecodable += 1
            return
        key = error.auction_id if error.auction_id in self.sent else self.raw_labels.get(error.original)
        if key is None:
            self.unexpected += 1
            return
        self.last_reply_at = now
        self.reasons[error.reason] += 1
        self.dead.setdefault(key, error.reason)


def run_load(
    config: KafkaClientConfig,
    messages: Sequence[AuctionTemplate | RawMessage],
    load: LoadConfig,
    topics: TopicNames = TopicNames(),
) -> LoadReport:
    """Send ``load.count`` auctions, cycling the templates, and collect the replies.
    Raw messages are sent once each, so with any of them count may not exceed the list.

    The clients are librdkafka's (confluent-kafka), as an ad server's would be: with
    kafka-python, sending a 9 KB auction cost ~0.36 ms of CPU, a fifth of this 2-core
    machine at 1,000 auctions/s, taken from the scorer being measured."""
    from confluent_kafka import Consumer, Producer
    from tqdm import tqdm

    if not messages:
        raise ValueError("no auctions to send")
    if load.count > len(messages) and any(isinstance(m, RawMessage) for m in messages):
        raise ValueError("raw messages are sent once: count may not exceed the number of messages")
    run_id = uuid.uuid4().hex[:8]
    reply_topic = load.reply_topic or topics.scores
    consumer = Consumer(config.librdkafka(**{
        "group.id": f"rankstream-load-{run_id}",  # librdkafka wants one; partitions are assigned, nothing committed
        "enable.auto.commit": False,
        "fetch.wait.max.ms": FETCH_MAX_WAIT_MS,
    }))  # fmt: skip
    producer = collector = None
    failures: list[str] = []
    try:
        partitions = _partitions(consumer, [reply_topic, topics.dlq])
        auction_partitions = [p.partition for p in _partitions(consumer, [topics.auctions])]
        consumer.assign(partitions)
        _skip_to_end(consumer, partitions)
        collector = _ReplyCollector(consumer, topics.dlq)
        collector.start()
        # Not idempotent: its producer-id handshake held the first sends ~0.5 s; a retried
        # send can only duplicate an auction, which shows as a duplicate reply.
        producer = Producer(config.librdkafka(**{"linger.ms": load.linger_ms, "acks": "all"}))
        producer.list_topics(topics.auctions, timeout=10)  # connected before the clock starts
        freeze_heap()  # a full collection of this process (templates, Ray) would stall the replies being timed

        def on_delivery(error: Any, _record: Any) -> None:
            if error is not None:
                failures.append(str(error))

        bar = tqdm(total=load.count, unit="auction", disable=not load.progress, mininterval=0.5)
        started = time.perf_counter()
        for i in range(load.count):
            if load.rate is not None:
                delay = started + i / load.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            message = messages[i % len(messages)]
            if isinstance(message, RawMessage):
                auction_id, payload = message.label, message.payload
                collector.raw_labels[payload] = auction_id
            else:
                auction_id = f"{run_id}-{i}"
                payload = message.stamp(auction_id, now_ms())
            collector.sent[auction_id] = (time.perf_counter(), message.item_count)
            # Sticky partitioning (what Kafka producers do for unkeyed records): one
            # partition per linger window, so a window is one record batch rather than
            # one per partition the keys hash to — the embedded broker's CPU grows
            # with the record batches it holds.
            window = int(time.perf_counter() * 1000.0 / max(1, load.linger_ms))
            partition = auction_partitions[window % len(auction_partitions)]
            _produce(producer, topics.auctions, auction_id.encode(), payload, partition, on_delivery)
            bar.update()
            if i % 256 == 0:
                bar.set_postfix(answered=collector.answered, refresh=False)
        unsent = producer.flush(30.0)
        send_seconds = time.perf_counter() - started
        bar.close()
        if unsent or failures:
            raise RuntimeError(f"{unsent + len(failures)} auctions could not be sent: {failures[:1] or 'flush timed out'}")
        _wait_for_replies(collector, load.count, load.reply_timeout_s, load.progress)
    finally:
        if collector is not None:
            collector.stopping.set()
            collector.join()
        if producer is not None:
            producer.flush(5.0)
        consumer.close()
    if collector.error is not None:
        raise collector.error
    return _report(collector, started, send_seconds, load.rate)


def _partitions(consumer: Any, topics: list[str]) -> list[Any]:
    """Every partition of the topics, positioned at their end."""
    from confluent_kafka import OFFSET_END, TopicPartition

    metadata = consumer.list_topics(timeout=10)
    partitions = []
    for topic in dict.fromkeys(topics):
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise ValueError(f"topic {topic!r} does not exist (create it with `rankstream broker up` or an admin tool)")
        partitions += [TopicPartition(topic, p, OFFSET_END) for p in sorted(found.partitions)]
    return partitions


def _produce(producer: Any, topic: str, key: bytes, value: bytes, partition: int, on_delivery: Any) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key, partition=partition, on_delivery=on_delivery)
            break
        except BufferError:  # the local queue is full: let deliveries drain
            producer.poll(0.01)
    producer.poll(0)  # serve delivery callbacks


def _skip_to_end(consumer: Any, partitions: list[Any], timeout_s: float = 10.0) -> None:
    """Read up to the end of the reply topics before anything is sent.

    Assigning at the end is not enough: Tansu answers ListOffsets "latest" with the
    last record batch's base offset + 1, so the rest of that batch would be read as
    replies. Fetch responses carry the true high watermark: read up to it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        consumer.consume(num_messages=10_000, timeout=0.05)
        ends = [consumer.get_watermark_offsets(p, cached=True)[1] for p in partitions]
        positions = [p.offset for p in consumer.position(partitions)]
        # a negative position: nothing was read past the assigned offset, so it was the end
        if all(end >= 0 and (position < 0 or position >= end) for end, position in zip(ends, positions)):
            return
    raise TimeoutError(f"could not reach the end of the reply topics within {timeout_s} s")


def _wait_for_replies(collector: _ReplyCollector, count: int, timeout_s: float, progress: bool) -> None:
    from tqdm import tqdm

    waiting_since = time.perf_counter()
    with tqdm(total=count, initial=collector.answered, unit="reply", disable=not progress, mininterval=0.5) as bar:
        while collector.answered < count and collector.is_alive():
            if time.perf_counter() - max(collector.last_reply_at, waiting_since) > timeout_s:
                break
            time.sleep(0.02)
            bar.update(collector.answered - bar.n)


def _report(collector: _ReplyCollector, started: float, send_seconds: float, rate: float | None) -> LoadReport:
    sent = collector.sent
    scored = len(collector.scored)
    dead = {k: v for k, v in collector.dead.items() if k not in collector.scored}
    duration = max(collector.last_reply_at - started, send_seconds, 1e-9)
    return LoadReport(
        sent=len(sent),
        items_sent=sum(items for _, items in sent.values()),
        scored=scored,
        dead_lettered=len(dead),
        missing=len(sent) - scored - len(dead),
        duplicates=collector.duplicates,
        unexpected=collector.unexpected,
        undecodable=collector.undecodable,
        dlq_reasons=dict(collector.reasons),
        dead_letter_by_id=dead,
        model_versions=dict(collector.versions),
        target_rate=rate,
        send_seconds=send_seconds,
        send_rate=len(sent) / max(send_seconds, 1e-9),
        duration_s=duration,
        throughput=scored / duration,
        item_scores_per_s=sum(sent[k][1] for k in collector.scored) / duration,
        latency_ms=LatencySummary.of(list(collector.scored.values())),
    )
