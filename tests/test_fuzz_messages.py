"""Property tests: arbitrary bytes, arbitrary msgpack structures and mutated valid
auctions, through ScoringRuntime.score_messages and through the Kafka loop (in-memory
clients): nothing raises, and every message gets exactly one reply or dead letter."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from serve_app.config import ModelConfig
from serve_app.runtime import ScoringRuntime
from streaming.protocol import decode_auction, decode_error, decode_reply
from tests.kafka_fakes import FakeBroker, FakeConsumer, FakeProducer, Record
from tests.test_kafka_loop import TOPICS, run_loop
from tests.test_serve_runtime import make_bundle, random_auction

VALID = [random_auction(np.random.default_rng(n), f"v{n}") for n in range(4)]
VALID_MAPS = [msgpack.unpackb(m) for m in VALID]
# Known triggers, always tried: str and binary keys together, a weight beyond float32.
KNOWN = [
    msgpack.packb({**VALID_MAPS[0], "context": {"x": 1, b"y": 2}}, use_bin_type=True),
    msgpack.packb({**VALID_MAPS[1], "context": {"tags": {"sport": 1e300}}}, use_bin_type=True),
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(width=64),
    st.text(max_size=12), st.binary(max_size=12),
)
structures = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=5),
    max_leaves=25,
)


@st.composite
def mutated_auction(draw: st.DrawFn) -> bytes:
    """A valid auction with one key set to an arbitrary value (or its bytes damaged)."""
    message = dict(draw(st.sampled_from(VALID_MAPS)))
    if draw(st.booleans()):
        path = draw(st.sampled_from(["version", "auction_id", "sent_at_ms", "context", "items", "top_k", "reply_to", "model", "extra"]))
        message[path] = draw(structures)
        if draw(st.booleans()) and isinstance(message.get("context"), dict):
            message["context"] = {**message["context"], draw(st.sampled_from(["user", "hour", "tags"])): draw(structures)}
        return msgpack.packb(message, use_bin_type=True)
    data = bytearray(msgpack.packb(message, use_bin_type=True))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


messages = st.one_of(
    st.binary(max_size=64),
    structures.map(lambda value: msgpack.packb(value, use_bin_type=True)),
    mutated_auction(),
    st.sampled_from(VALID),
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> ScoringRuntime:
    return ScoringRuntime(ModelConfig(bundle=str(make_bundle(tmp_path_factory.mktemp("bundle")))))


def check_answer(value: bytes, reason: object, message: bytes) -> None:
    if reason is None:
        reply = decode_reply(value)
        assert reply.auction_id == decode_auction(message).auction_id
        assert np.isfinite(reply.scores).all()
    else:
        error = decode_error(value)
        assert error.reason == reason.value and error.original == message[:65_536]


@FUZZ
@given(st.lists(messages, min_size=1, max_size=8))
@example(KNOWN)
def test_score_messages_answers_every_message_once(runtime: ScoringRuntime, batch: list[bytes]) -> None:
    report = runtime.score_messages([*batch, VALID[0]])
    assert len(report.replies) == len(batch) + 1
    for message, reply in zip([*batch, VALID[0]], report.replies):
        check_answer(reply.value, reply.reason, message)
    assert report.replies[-1].reason is None  # a valid auction beside any others is scored


@settings(FUZZ, max_examples=25)
@given(st.lists(messages, min_size=1, max_size=12))
@example(KNOWN)
def test_the_kafka_loop_answers_every_message_once(runtime: ScoringRuntime, batch: list[bytes]) -> None:
    broker = FakeBroker({"auctions": 2, "scores": 1, "auctions.dlq": 1, "replies.mine": 1})
    sent = [broker.append("auctions", n % 2, message) for n, message in enumerate(batch)]

    def answered_by(record: Record) -> tuple[str, int, int] | None:
        source = decode_error(record.value()).source if record.topic() == TOPICS.dlq else None
        return None if source is None else (source["topic"], source["partition"], source["offset"])

    def answers() -> list[Record]:
        return [r for topic in ("scores", "auctions.dlq", "replies.mine") for r in broker.records(topic)]

    consumer = FakeConsumer(broker, answered_by)
    run_loop(broker, consumer, FakeProducer(broker), lambda: len(answers()) >= len(batch), score=runtime.score_messages)
    assert len(answers()) == len(batch)
    dead = [answered_by(r) for r in broker.records("auctions.dlq")]
    assert len(set(dead)) == len(dead)
    by_source = {(r.topic(), r.partition(), r.offset()): r.value() for r in sent}
    scored = [r for r in sent if (r.topic(), r.partition(), r.offset()) not in set(dead)]
    assert sorted(decode_reply(r.value()).auction_id for r in answers() if r.topic() != TOPICS.dlq) == sorted(
        decode_auction(r.value()).auction_id for r in scored
    )
    for source in dead:
        assert by_source[source][:65_536] == decode_error(
            next(r.value() for r in broker.records("auctions.dlq") if answered_by(r) == source)
        ).original
