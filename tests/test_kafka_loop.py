"""The scorer's Kafka loop with in-memory clients (tests/kafka_fakes.py): offsets are
committed only past acknowledged answers, failed sends are retried or turned into dead
letters, reply_to is checked, offset jumps are re-fetched, assignment follows the
replica count. Each test runs the real KafkaLoop thread for well under a second."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest
from confluent_kafka import KafkaError, KafkaException

from serve_app import kafka_loop
from serve_app.kafka_loop import KafkaLoop
from serve_app.runtime import BatchReport, Reply
from streaming.kafka_config import KafkaClientConfig, TopicNames
from streaming.protocol import ProtocolError, Reason, decode_error, encode_error
from tests.kafka_fakes import FakeBroker, FakeConsumer, FakeProducer, Record

TOPICS = TopicNames(reply_to_pattern=r"replies\..+")


def fake_score(values: Sequence[bytes], received_at_ms: int, sources: Sequence[dict[str, object]]) -> BatchReport:
    """A value ``id`` is answered with its source; ``id>topic`` asks for reply_to; ``!id [padding]`` is bad."""
    replies = []
    for value, source in zip(values, sources):
        text = value.decode()
        if text.startswith("!"):
            error = ProtocolError(Reason.invalid_value, "bad", text[1:].split()[0])
            replies.append(Reply(encode_error(error, value, source=source), error.auction_id, reason=Reason.invalid_value))
            continue
        auction_id, _, reply_to = text.partition(">")
        answer = f"{source['topic']}/{source['partition']}/{source['offset']}".encode()
        replies.append(Reply(answer, auction_id, reply_to or None))
    return BatchReport(replies=replies)


def answered_by(record: Record) -> tuple[str, int, int] | None:
    if record.topic() == TOPICS.dlq:
        source = decode_error(record.value()).source
        return source["topic"], source["partition"], source["offset"]
    topic, partition, offset = record.value().decode().split("/")
    return topic, int(partition), int(offset)


def run_loop(
    broker: FakeBroker,
    consumer: FakeConsumer,
    producer: FakeProducer,
    until: Callable[[], bool],
    membership: Callable[[], tuple[int, int]] = lambda: (0, 1),
    timeout_s: float = 5.0,
    score: Callable[[Sequence[bytes], int, Sequence[dict[str, object]]], BatchReport] = fake_score,
    on_dead_letter: Callable[[str], None] = lambda reason: None,
) -> KafkaLoop:
    loop = KafkaLoop(
        KafkaClientConfig(bootstrap_servers="unused:9092"), TOPICS, "group", 8, score, lambda lag: None,
        membership, clients=lambda: (consumer, producer), on_dead_letter=on_dead_letter,
    )
    loop.start()
    deadline = time.monotonic() + timeout_s
    while not until() and loop.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    loop.stop()
    assert loop.error is None
    assert consumer.closed
    return loop


def new_broker(auctions: int = 12, partitions: int = 2) -> FakeBroker:
    broker = FakeBroker({"auctions": partitions, "scores": 2, "auctions.dlq": 1, "replies.mine": 1})
    for n in range(auctions):
        broker.append("auctions", n % partitions, f"a{n}".encode())
    return broker


def answers(broker: FakeBroker) -> dict[tuple[str, int, int], list[Record]]:
    found: dict[tuple[str, int, int], list[Record]] = {}
    for topic in ("scores", "auctions.dlq", "replies.mine"):
        for record in broker.records(topic):
            found.setdefault(answered_by(record), []).append(record)
    return found


def every_auction_answered_once(broker: FakeBroker) -> bool:
    sources = {(r.topic(), r.partition(), r.offset()) for r in broker.records("auctions")}
    found = answers(broker)
    return found.keys() == sources and all(len(v) == 1 for v in found.values())


def test_transient_send_failures_are_retried_and_nothing_is_committed_before_the_acknowledgement() -> None:
    broker = new_broker()
    # what librdkafka reports once its own retries ran out (a broker down), and a full queue
    failures = iter([KafkaError(KafkaError._MSG_TIMED_OUT)] * 4 + [BufferError("queue full")])
    producer = FakeProducer(broker, lambda topic, value: next(failures, None))
    consumer = FakeConsumer(broker, answered_by)
    loop = run_loop(broker, consumer, producer, lambda: every_auction_answered_once(broker) and broker.committed)
    assert every_auction_answered_once(broker)
    assert broker.early_commits == []
    assert loop.retried_sends == 5
    assert broker.committed == {("auctions", 0): 6, ("auctions", 1): 6}


def test_a_stop_during_a_broker_outage_commits_nothing_unacknowledged() -> None:
    broker = new_broker(auctions=4, partitions=1)
    down = threading.Event()
    down.set()
    producer = FakeProducer(broker, lambda topic, value: KafkaError(KafkaError._TRANSPORT) if down.is_set() else None)
    consumer = FakeConsumer(broker, answered_by)
    loop = run_loop(broker, consumer, producer, lambda: producer.sends >= 12, timeout_s=3.0)
    assert loop.retried_sends >= 8 and broker.records("scores") == []
    assert broker.committed == {} and broker.early_commits == []
    down.clear()  # the replacement replica starts from the committed offsets and answers everything
    run_loop(broker, FakeConsumer(broker, answered_by), FakeProducer(broker), lambda: every_auction_answered_once(broker))
    assert every_auction_answered_once(broker)


@pytest.mark.parametrize(
    "error",
    [
        KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)),  # over message.max.bytes: produce raises
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED),
        KafkaError(KafkaError.TOPIC_EXCEPTION),  # the broker's answer to a topic named ".."
    ],
)
def test_a_reply_the_broker_refuses_for_good_becomes_a_dead_letter(error: Exception) -> None:
    broker = new_broker(auctions=6, partitions=1)
    producer = FakeProducer(broker, lambda topic, value: error if topic == "scores" and value.endswith(b"/3") else None)
    consumer = FakeConsumer(broker, answered_by)
    dead_letters: list[str] = []
    run_loop(broker, consumer, producer, lambda: every_auction_answered_once(broker), on_dead_letter=dead_letters.append)
    assert every_auction_answered_once(broker) and broker.early_commits == []
    assert dead_letters == ["reply_rejected"]
    (dead,) = broker.records("auctions.dlq")
    letter = decode_error(dead.value())
    assert (letter.reason, letter.auction_id, letter.original) == ("reply_rejected", "a3", b"a3")
    assert letter.source == {"topic": "auctions", "partition": 0, "offset": 3}
    code = (error.args[0] if isinstance(error, KafkaException) else error).name()
    assert code in letter.message


def test_a_dead_letter_the_broker_refuses_is_sent_without_the_original() -> None:
    broker = new_broker(auctions=3, partitions=1)
    broker.append("auctions", 0, b"!a3 " + b"x" * 5_000)
    refuse_large = lambda topic, value: KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if len(value) > 1_000 else None  # noqa: E731
    run_loop(broker, FakeConsumer(broker, answered_by), FakeProducer(broker, refuse_large), lambda: every_auction_answered_once(broker))
    assert every_auction_answered_once(broker)
    letter = decode_error(broker.records("auctions.dlq")[0].value())
    assert (letter.reason, letter.original, letter.original_bytes) == ("invalid_value", b"", 5_004)
    assert letter.source == {"topic": "auctions", "partition": 0, "offset": 3}


def test_reply_to_may_name_only_the_scores_topic_or_existing_topics_matching_the_pattern() -> None:
    broker = FakeBroker({"auctions": 1, "scores": 1, "auctions.dlq": 1, "replies.mine": 1, "other": 1})
    wanted = {
        "scores": "scores", "replies.mine": "replies.mine", "auctions": None, "auctions.dlq": None,
        "__consumer_offsets": None, "other": None, "replies.missing": None,
    }
    for n, topic in enumerate(wanted):
        broker.append("auctions", 0, f"a{n}>{topic}".encode())
    dead_letters: list[str] = []
    run_loop(
        broker, FakeConsumer(broker, answered_by), FakeProducer(broker), lambda: every_auction_answered_once(broker),
        on_dead_letter=dead_letters.append,
    )
    assert every_auction_answered_once(broker)
    assert dead_letters == ["invalid_reply_to"] * 5  # the metrics count what the loop refused itself
    for n, (topic, destination) in enumerate(wanted.items()):
        (record,) = answers(broker)[("auctions", 0, n)]
        assert record.topic() == (destination or "auctions.dlq"), topic
        if destination is None:
            letter = decode_error(record.value())
            assert letter.reason == "invalid_reply_to" and topic in letter.message
    assert broker.records("other") == []


def test_an_offset_jump_is_fetched_again_and_nothing_is_skipped() -> None:
    broker = new_broker(auctions=10, partitions=1)
    consumer = FakeConsumer(broker, answered_by)
    consumer.skip_once[("auctions", 0)] = (2, 5)  # the broker leaves a batch out once
    loop = run_loop(broker, consumer, FakeProducer(broker), lambda: every_auction_answered_once(broker))
    assert every_auction_answered_once(broker) and broker.early_commits == []
    assert consumer.seeks == [(("auctions", 0), 2)]
    assert (loop.refetches, loop.accepted_gaps) == (1, 0)


def test_a_gap_that_stays_is_accepted_after_bounded_refetches() -> None:
    broker = FakeBroker({"auctions": 1, "scores": 1, "auctions.dlq": 1})
    for offset in (0, 1, 2, 9, 10):  # offsets 3-8 hold no records (as transaction markers or compaction leave)
        broker.append("auctions", 0, f"a{offset}".encode(), offset=offset)
    consumer = FakeConsumer(broker, answered_by)
    loop = run_loop(broker, consumer, FakeProducer(broker), lambda: every_auction_answered_once(broker))
    assert every_auction_answered_once(broker)
    assert (loop.refetches, loop.accepted_gaps) == (3, 1)
    assert broker.committed == {("auctions", 0): 11}


def test_a_new_replica_count_releases_partitions_after_committing_what_was_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_loop, "ASSIGNMENT_REFRESH_S", 0.01)
    broker = new_broker(auctions=8, partitions=2)
    replicas = [1]
    consumer = FakeConsumer(broker, answered_by)
    assigned = lambda: [(p.topic, p.partition) for p in consumer.assignment()]  # noqa: E731

    def membership() -> tuple[int, int]:
        if every_auction_answered_once(broker):
            replicas[0] = 2  # scaled to two replicas once everything was answered
        return 0, replicas[0]

    run_loop(broker, consumer, FakeProducer(broker), lambda: assigned() == [("auctions", 0)], membership)
    assert assigned() == [("auctions", 0)]
    assert every_auction_answered_once(broker) and broker.early_commits == []
    assert broker.committed[("auctions", 1)] == 4  # committed before it was given up
