"""The load generator against a real broker and a small echo scorer written here (a
consumer thread that validates with streaming.protocol/encode and replies): matching
by auction id, missing and duplicate replies, latency report, dead letters with
their exact reasons, rate control and `rankstream produce --json`."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Role
from model_zoo.vocab import FieldVocabulary, Vocabulary
from streaming.admin import create_topics
from streaming.broker import start_broker
from streaming.encode import AuctionEncoder
from streaming.kafka_config import KafkaClientConfig, TopicNames
from streaming.producer import (
    AuctionTemplate,
    LoadConfig,
    RawMessage,
    dataset_templates,
    run_load,
    synthetic_templates,
    templates_from_dicts,
)
from streaming.protocol import (
    ProtocolError,
    ProtocolLimits,
    Reason,
    decode_auction,
    encode_auction,
    encode_error,
    encode_reply,
    unpack_column,
)

SCHEMA = FeatureSchema(
    fields=(
        FieldSpec(name="user", role=Role.context, vocab_size=50),
        FieldSpec(name="ad", role=Role.item, vocab_size=50),
        FieldSpec(name="tags", role=Role.item, kind=Kind.multi, vocab_size=20),
    )
)
LIMITS = ProtocolLimits(max_items=1_000)
CATALOG = {f"m{i}": i for i in range(10)}


class EchoScorer(threading.Thread):
    """Scores item n of an auction as the sum of its single-field indices, answering
    per polled batch like the real scorer will. Auction ids ending in -3 (mod 10) get
    no reply, ids ending in -5 get two."""

    def __init__(self, config: KafkaClientConfig, topics: TopicNames) -> None:
        super().__init__(daemon=True)
        self.config, self.topics = config, topics
        self.encoder = AuctionEncoder(SCHEMA, limits=LIMITS)
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.partition_of: dict[bytes, int] = {}  # auction key -> partition it arrived on

    def run(self) -> None:
        consumer = KafkaConsumer(**self.config.client_kwargs(), enable_auto_commit=False, group_id=None, fetch_max_wait_ms=10)
        producer = KafkaProducer(**self.config.client_kwargs(), linger_ms=1)
        try:
            partitions = [TopicPartition(self.topics.auctions, p) for p in consumer.partitions_for_topic(self.topics.auctions)]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            while not self.stopping.is_set():
                records = [r for batch in consumer.poll(timeout_ms=50).values() for r in batch]
                if records:
                    self.answer(records, producer)
        except BaseException as error:
            self.error = error
        finally:
            producer.close()
            consumer.close()

    def answer(self, records: list, producer) -> None:
        auctions, originals = [], []
        for record in records:
            self.partition_of[record.key] = record.partition
            try:
                auction = decode_auction(record.value, LIMITS)
                if auction.model not in (None, "echo"):
                    raise ProtocolError(Reason.unknown_model, f"no model {auction.model!r}", auction.auction_id)
                auctions.append(auction)
                originals.append(record.value)
            except ProtocolError as error:
                producer.send(self.topics.dlq, encode_error(error, record.value))
        batch = self.encoder.encode_many(auctions, catalog=CATALOG)
        for position, error in batch.errors:
            producer.send(self.topics.dlq, encode_error(error, originals[position]))
        item_scores = batch.items.single.sum(dim=1).float()
        for auction, scores in zip(batch.auctions, batch.split_scores(item_scores, batch.catalog_positions.float())):
            ordinal = int(auction.auction_id.rsplit("-", 1)[1]) if "-" in auction.auction_id else 0
            if ordinal % 10 == 3:
                continue
            reply = encode_reply(auction, scores.numpy(), model="echo", model_version="v-echo", queue_wait_ms=0, scoring_ms=0)
            for _ in range(2 if ordinal % 10 == 5 else 1):
                producer.send(auction.reply_to or self.topics.scores, key=auction.auction_id.encode(), value=reply)
        producer.flush()


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KafkaClientConfig, TopicNames]]:
    broker = start_broker(state_dir=tmp_path_factory.mktemp("broker"))
    scorer = None
    try:
        config = KafkaClientConfig(bootstrap_servers=broker.bootstrap_servers)
        topics = TopicNames()
        create_topics(config, topics, partitions=2)
        create_topics(config, ["private.replies"], partitions=1)
        scorer = EchoScorer(config, topics)
        scorer.start()
        yield config, topics, scorer
        assert scorer.error is None, scorer.error
    finally:
        if scorer is not None:
            scorer.stopping.set()
            scorer.join(timeout=10)
        broker.stop()


def test_matching_missing_duplicates_and_latency(kafka) -> None:
    config, topics, _ = kafka
    templates = synthetic_templates(SCHEMA, 7, 5, seed=1)
    report = run_load(config, templates, LoadConfig(count=200, reply_timeout_s=2, progress=False), topics)
    assert report.sent == 200 and report.items_sent == 1000
    assert report.scored == 180  # ordinals ending in 3 are never answered
    assert report.missing == 20
    assert report.duplicates == 20  # ordinals ending in 5 are answered twice
    assert (report.dead_lettered, report.unexpected, report.undecodable) == (0, 0, 0)
    assert report.model_versions == {"v-echo": 200}
    latency = report.latency_ms
    assert latency.count == 180
    assert 0 < latency.p50 <= latency.p95 <= latency.p99 <= latency.max
    assert report.throughput > 0 and report.item_scores_per_s == pytest.approx(report.throughput * 5)


def test_bad_auctions_land_in_the_dead_letter_topic(kafka) -> None:
    config, topics, _ = kafka
    good = encode_auction("good-1", {"user": 3}, [{"item_id": "a", "features": {"ad": 4, "tags": [5, 6]}}])
    bad = {
        "truncated": (good[:-4], Reason.malformed_msgpack),
        "array": (msgpack.packb([1, 2]), Reason.not_a_map),
        "nan-context": (encode_auction("nan-context", {"user": float("nan")}, ["m1"]), Reason.non_finite),
        "wrong-type": (encode_auction("wrong-type", {"user": [1, 2]}, ["m1"]), Reason.wrong_type),
        "no-context": (msgpack.packb({"version": 1, "auction_id": "no-context", "sent_at_ms": 0, "items": ["m1"]}),
                       Reason.missing_field),
        "too-many": (encode_auction("too-many", {}, list(range(10_000))), Reason.too_many_items),
        "unknown-field": (encode_auction("unknown-field", {"colour": "red"}, ["m1"]), Reason.unknown_field),
        "unknown-model": (encode_auction("unknown-model", {}, ["m1"], model="gbdt"), Reason.unknown_model),
        "unknown-item": (encode_auction("unknown-item", {}, ["m99"]), Reason.unknown_catalog_item),
        "version-9": (msgpack.packb({"version": 9, "auction_id": "version-9"}), Reason.unsupported_version),
    }
    messages = []
    for label, (payload, _) in bad.items():
        messages += [RawMessage(payload, label), *templates_from_dicts([{"context": {"user": 7}, "items": ["m2", "m4"]}])]
    report = run_load(config, messages, LoadConfig(count=len(messages), reply_timeout_s=2, progress=False), topics)
    assert report.dead_letter_by_id == {label: reason.value for label, (_, reason) in bad.items()}
    assert report.dlq_reasons == {reason.value: 1 for _, reason in bad.values()}
    assert report.dead_lettered == len(bad)
    good_count = len(messages) - len(bad)
    ordinals = [i for i, m in enumerate(messages) if isinstance(m, AuctionTemplate)]
    assert report.scored == sum(1 for i in ordinals if i % 10 != 3)
    assert report.missing == good_count - report.scored
    assert report.unexpected == 0


def test_rate_and_reply_to(kafka) -> None:
    config, topics, _ = kafka
    templates = templates_from_dicts([{"context": {"user": 1}, "items": ["m1"], "reply_to": "private.replies"}])
    load = LoadConfig(count=40, rate=100.0, reply_topic="private.replies", reply_timeout_s=2, progress=False)
    started = time.perf_counter()
    report = run_load(config, templates, load, topics)
    assert report.send_seconds >= 0.38  # 40 auctions at 100/s: the last leaves at 0.39 s
    assert time.perf_counter() - started < 15
    assert report.scored == 36 and report.duplicates == 4 and report.missing == 4


def test_each_linger_window_goes_to_one_partition(kafka) -> None:
    """Sticky partitioning: 40 auctions sent well within one 60-s linger window share a
    partition (hashing their keys over 2 partitions would split them)."""
    config, topics, scorer = kafka
    before = set(scorer.partition_of)
    templates = templates_from_dicts([{"context": {"user": 2}, "items": ["m3"]}])
    report = run_load(config, templates, LoadConfig(count=40, linger_ms=60_000, reply_timeout_s=2, progress=False), topics)
    assert report.scored + report.missing == 40
    partitions = [p for key, p in scorer.partition_of.items() if key not in before]
    assert len(partitions) == 40 and len(set(partitions)) == 1


def test_produce_command_writes_the_report(kafka, tmp_path: Path) -> None:
    from rayjobs import produce

    config, _, _ = kafka
    parser = argparse.ArgumentParser()
    produce.register(parser.add_subparsers())
    out = tmp_path / "report.json"
    args = parser.parse_args([
        "produce", "--bootstrap-servers", config.bootstrap_servers, "--count", "30", "--items", "4",
        "--context-fields", "2", "--item-fields", "1", "--vocab-size", "50", "--item-format", "columns",
        "--reply-timeout", "2", "--no-progress", "--json", str(out),
    ])
    # The planted schema (c0, c1 | i0) is not the echo scorer's: every auction is dead-lettered.
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["sent"] == 30 and report["dead_lettered"] == 30 and report["missing"] == 0
    assert report["dlq_reasons"] == {"unknown_field": 30}


def test_dataset_auctions_map_back_to_the_dataset_indices(tmp_path: Path) -> None:
    """Prepared parquet -> raw tokens on the wire -> the scorer's encoder -> the same indices."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model_zoo.data.layout import arrow_schema, weights_column
    from model_zoo.vocab import FieldVocabulary, Vocabulary

    schema = FeatureSchema(
        fields=(
            FieldSpec(name="user", role=Role.context, vocab_size=5),
            FieldSpec(name="ad", role=Role.item, vocab_size=6),
            FieldSpec(name="tags", role=Role.item, kind=Kind.multi, vocab_size=5),
        )
    )
    vocabulary = Vocabulary([
        FieldVocabulary("user", ["u1", "u2", "u3"]),
        FieldVocabulary("ad", ["a1", "a2", "a3", "a4"]),
        FieldVocabulary("tags", ["t1", "t2", "t3"]),
    ])
    users, ads = [2, 2, 2, 4, 0, 1], [2, 5, 1, 0, 3, 4]
    tags = [[2], [3, 4], [4, 2], [], [3], [2, 3]]
    tag_weights = [[1.0], [0.5, 0.5], [0.25, 0.75], [], [1.0], [0.5, 0.5]]
    table = pa.table(
        {"user": users, "ad": ads, "tags": tags, weights_column("tags"): tag_weights, "label": [0.0] * 6},
        schema=arrow_schema(schema),
    )
    (tmp_path / "test").mkdir()
    pq.write_table(table, tmp_path / "test" / "part-00000.parquet")
    schema.save(tmp_path / "schema.json")
    vocabulary.save(tmp_path / "vocab")

    encoder = AuctionEncoder(schema, vocabulary)
    for item_format in ("rows", "columns"):
        templates = dataset_templates(tmp_path, 5, 3, item_format=item_format)
        assert len(templates) == 2  # 6 rows, 3 items per auction
        for number, template in enumerate(templates):
            context, items = encoder.encode(decode_auction(template.stamp(f"d-{number}", 0)))
            rows = slice(3 * number, 3 * number + 3)
            assert context.single.tolist() == [[users[3 * number]]]
            assert items.single[:, 0].tolist() == ads[rows]
            bag = items.bags[0]
            for row, (values, weights) in enumerate(zip(tags[rows], tag_weights[rows])):
                values, weights = (values, weights) if values else ([0], [1.0])  # an empty bag is missing
                assert bag.values[row, : len(values)].tolist() == values
                got = bag.weights[row, : len(values)].numpy()
                np.testing.assert_allclose(got / got.sum(), np.array(weights) / sum(weights))


def test_packed_format_packs_integer_columns_only() -> None:
    schema = FeatureSchema(
        fields=(
            FieldSpec(name="user", role=Role.context, vocab_size=5),
            FieldSpec(name="movie", role=Role.item, vocab_size=6),
            FieldSpec(name="zip", role=Role.item, vocab_size=5),
            FieldSpec(name="genres", role=Role.item, kind=Kind.multi, vocab_size=5),
        )
    )
    vocabulary = Vocabulary(
        [
            FieldVocabulary("user", ["u1", "u2", "u3"]),
            FieldVocabulary("movie", ["1193", "661", "914", "3408"]),  # integer tokens: packed
            FieldVocabulary("zip", ["02138", "10001", "x"]),  # "02138" is not an integer's token: kept
            FieldVocabulary("genres", ["1", "2", "3"]),  # bags: kept
        ]
    )
    (template,) = synthetic_templates(schema, 1, 6, vocabulary=vocabulary, item_format="packed", seed=1)
    auction = decode_auction(template.stamp("a", 1))
    columns = auction.item_columns
    assert type(columns["movie"]) is bytes and type(columns["zip"]) is list and type(columns["genres"]) is list
    (listed,) = synthetic_templates(schema, 1, 6, vocabulary=vocabulary, item_format="columns", seed=1)
    listed_columns = decode_auction(listed.stamp("a", 1)).item_columns
    assert unpack_column(columns["movie"], 6).tolist() == [int(v) for v in listed_columns["movie"]]
    assert columns["zip"] == listed_columns["zip"] and columns["genres"] == listed_columns["genres"]
