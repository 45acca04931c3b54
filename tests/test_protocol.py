"""The wire protocol: round trips of the three messages, and every bad-message class
rejected with its exact reason (and the auction id whenever it could be read)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from streaming.protocol import (
    PROTOCOL_VERSION,
    Auction,
    ProtocolError,
    ProtocolLimits,
    Reason,
    decode_auction,
    decode_error,
    decode_reply,
    encode_auction,
    encode_error,
    encode_reply,
    pack_column,
    top_k_ids,
    unpack_column,
)

CONTEXT = {"user": "u1", "hour": 13, "genres": {"drama": 0.5, "comedy": 1.5}}
ROWS = [
    {"item_id": "ad-1", "features": {"advertiser": "acme", "price": 2.5}},
    {"item_id": 7, "features": {"advertiser": None}},
]


def good_message(**overrides: object) -> dict:
    message = {
        "version": PROTOCOL_VERSION,
        "auction_id": "a-1",
        "sent_at_ms": 1_700_000_000_000,
        "context": CONTEXT,
        "items": ROWS,
    }
    message.update(overrides)
    return {k: v for k, v in message.items() if v is not REMOVE}


REMOVE = object()


def pack(message: object) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def test_rows_form_round_trip() -> None:
    data = encode_auction("a-1", CONTEXT, ROWS, sent_at_ms=123, model="ctr", top_k=1, reply_to="my.replies")
    auction = decode_auction(data)
    assert auction == Auction(
        auction_id="a-1",
        sent_at_ms=123,
        context=CONTEXT,
        item_ids=["ad-1", 7],
        item_features=[ROWS[0]["features"], ROWS[1]["features"]],
        item_columns=None,
        model="ctr",
        top_k=1,
        reply_to="my.replies",
        size_bytes=len(data),
    )
    assert not auction.is_catalog and len(auction) == 2


def test_columns_form_round_trip() -> None:
    items = {"item_id": ["x", "y", "z"], "features": {"advertiser": ["a", "b", None], "price": [1, 2.5, 3]}}
    auction = decode_auction(encode_auction("a-2", {}, items, sent_at_ms=5))
    assert auction.item_ids == ["x", "y", "z"]
    assert auction.item_columns == items["features"]
    assert auction.item_features is None and not auction.is_catalog
    assert (auction.model, auction.top_k, auction.reply_to) == (None, None, None)


def test_catalog_form_round_trip() -> None:
    auction = decode_auction(encode_auction("a-3", {"user": "u"}, ["m1", 2, "m3"], sent_at_ms=0))
    assert auction.is_catalog
    assert auction.item_ids == ["m1", 2, "m3"]
    assert auction.item_features is None and auction.item_columns is None


def test_reply_round_trip_with_top_k() -> None:
    auction = decode_auction(encode_auction("a-4", {}, ["p", "q", "r", "s"], sent_at_ms=0, top_k=2))
    scores = np.array([0.25, 2.0, -1.0, 2.0], dtype=np.float32)
    data = encode_reply(
        auction, scores, model="ctr", model_version="abc123", queue_wait_ms=1.5, scoring_ms=0.25, served_at_ms=99
    )
    reply = decode_reply(data)
    assert reply.auction_id == "a-4"
    assert reply.scores == [0.25, 2.0, -1.0, 2.0]
    assert reply.top_k == ["q", "s"]  # ties keep item order
    assert (reply.model, reply.model_version, reply.served_at_ms) == ("ctr", "abc123", 99)
    assert (reply.queue_wait_ms, reply.scoring_ms) == (1.5, 0.25)


def test_reply_without_top_k_and_score_count_checked() -> None:
    auction = decode_auction(encode_auction("a-5", {}, ["p", "q"], sent_at_ms=0))
    reply = decode_reply(
        encode_reply(auction, [1.0, 2.0], model="m", model_version="v", queue_wait_ms=0, scoring_ms=0)
    )
    assert reply.top_k is None
    with pytest.raises(ValueError, match="1 scores for 2 items"):
        encode_reply(auction, [1.0], model="m", model_version="v", queue_wait_ms=0, scoring_ms=0)


def test_error_round_trip_keeps_original_bytes() -> None:
    original = b"\x93\x01\x02"
    error = ProtocolError(Reason.not_a_map, "top level is an array", None)
    data = encode_error(error, original, source={"topic": "auctions", "partition": 2, "offset": 41}, failed_at_ms=7)
    decoded = decode_error(data)
    assert decoded.auction_id is None
    assert decoded.reason == "not_a_map"
    assert decoded.message == "top level is an array"
    assert decoded.original == original
    assert decoded.failed_at_ms == 7
    assert decoded.source == {"topic": "auctions", "partition": 2, "offset": 41}


def test_top_k_ids_clamps_to_item_count() -> None:
    assert top_k_ids(["a", "b"], np.array([1.0, 3.0]), 5) == ["b", "a"]


GOOD = pack(good_message())
LIMITS = ProtocolLimits(max_items=1_000)

BAD = {
    "truncated msgpack": (GOOD[:-7], Reason.malformed_msgpack, None),
    "not msgpack at all": (b"\xc1garbage", Reason.malformed_msgpack, None),
    "trailing bytes": (GOOD + b"\x00", Reason.malformed_msgpack, None),
    "extension type": (pack({"x": msgpack.ExtType(3, b"abc")}), Reason.malformed_msgpack, None),
    "integer map key": (pack({1: "x"}), Reason.malformed_msgpack, None),
    "invalid utf-8": (b"\x81\xa1a\xa2\xff\xfe", Reason.malformed_msgpack, None),
    "an array": (pack([1, 2, 3]), Reason.not_a_map, None),
    "no version": (pack(good_message(version=REMOVE)), Reason.missing_field, "a-1"),
    "version as string": (pack(good_message(version="1")), Reason.wrong_type, "a-1"),
    "version 2": (pack(good_message(version=2)), Reason.unsupported_version, "a-1"),
    "unknown top-level key": (pack(good_message(priority=3)), Reason.unknown_field, "a-1"),
    "missing context": (pack(good_message(context=REMOVE)), Reason.missing_field, "a-1"),
    "missing items": (pack(good_message(items=REMOVE)), Reason.missing_field, "a-1"),
    "missing auction id": (pack(good_message(auction_id=REMOVE)), Reason.missing_field, None),
    "integer auction id": (pack(good_message(auction_id=17)), Reason.wrong_type, None),
    "empty auction id": (pack(good_message(auction_id="")), Reason.invalid_value, None),
    "sent_at_ms as float": (pack(good_message(sent_at_ms=1.5)), Reason.wrong_type, "a-1"),
    "sent_at_ms as bool": (pack(good_message(sent_at_ms=True)), Reason.wrong_type, "a-1"),
    "negative sent_at_ms": (pack(good_message(sent_at_ms=-1)), Reason.invalid_value, "a-1"),
    "context as array": (pack(good_message(context=["u1"])), Reason.wrong_type, "a-1"),
    "items as string": (pack(good_message(items="ad-1")), Reason.wrong_type, "a-1"),
    "empty items": (pack(good_message(items=[])), Reason.empty_items, "a-1"),
    "10k catalog ids": (pack(good_message(items=list(range(10_000)))), Reason.too_many_items, "a-1"),
    "10k item rows": (
        pack(good_message(items=[{"item_id": i, "features": {}} for i in range(10_000)])),
        Reason.too_many_items,
        "a-1",
    ),
    "mixed item forms": (pack(good_message(items=["a", {"item_id": "b", "features": {}}])), Reason.wrong_type, "a-1"),
    "float item id": (pack(good_message(items=[1.5])), Reason.wrong_type, "a-1"),
    "item without features": (pack(good_message(items=[{"item_id": "a"}])), Reason.missing_field, "a-1"),
    "item with extra key": (
        pack(good_message(items=[{"item_id": "a", "features": {}, "bid": 3}])),
        Reason.unknown_field,
        "a-1",
    ),
    "features not a map": (pack(good_message(items=[{"item_id": "a", "features": [1]}])), Reason.wrong_type, "a-1"),
    "map item id": (pack(good_message(items=[{"item_id": {}, "features": {}}])), Reason.wrong_type, "a-1"),
    "top_k zero": (pack(good_message(top_k=0)), Reason.invalid_value, "a-1"),
    "top_k as string": (pack(good_message(top_k="3")), Reason.wrong_type, "a-1"),
    "model as integer": (pack(good_message(model=3)), Reason.wrong_type, "a-1"),
    "illegal reply topic": (pack(good_message(reply_to="my replies!")), Reason.invalid_reply_to, "a-1"),
    "reply topic ..": (pack(good_message(reply_to="..")), Reason.invalid_reply_to, "a-1"),
    "column of wrong length": (
        pack(good_message(items={"item_id": ["a", "b"], "features": {"price": [1]}})),
        Reason.invalid_value,
        "a-1",
    ),
    "column not an array": (
        pack(good_message(items={"item_id": ["a"], "features": {"price": 1}})),
        Reason.wrong_type,
        "a-1",
    ),
    "columns without ids": (pack(good_message(items={"features": {}})), Reason.missing_field, "a-1"),
    "columns with extra key": (
        pack(good_message(items={"item_id": ["a"], "features": {}, "x": 1})),
        Reason.unknown_field,
        "a-1",
    ),
    "empty columns": (pack(good_message(items={"item_id": [], "features": {}})), Reason.empty_items, "a-1"),
    "packed column of wrong length": (
        pack(good_message(items={"item_id": ["a", "b"], "features": {"price": b"\x01\x00\x00\x00\x02\x00"}})),
        Reason.invalid_value,
        "a-1",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_message_gets_its_reason(case: str) -> None:
    data, reason, auction_id = BAD[case]
    with pytest.raises(ProtocolError) as caught:
        decode_auction(data, LIMITS)
    assert caught.value.reason == reason, caught.value.message
    assert caught.value.auction_id == auction_id


def test_oversized_message_rejected_before_decoding() -> None:
    limits = ProtocolLimits(max_message_bytes=len(GOOD) - 1)
    with pytest.raises(ProtocolError) as caught:
        decode_auction(GOOD, limits)
    assert caught.value.reason == Reason.message_too_large
    assert decode_auction(GOOD, ProtocolLimits(max_message_bytes=len(GOOD))).auction_id == "a-1"


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_auction(b"\x91" * 100_000 + b"\x01")
    assert caught.value.reason == Reason.malformed_msgpack


def test_long_ids_rejected() -> None:
    limits = ProtocolLimits(max_id_length=8)
    with pytest.raises(ProtocolError) as caught:
        decode_auction(pack(good_message(items=["x" * 9])), limits)
    assert caught.value.reason == Reason.invalid_value


def test_reason_values_are_their_names() -> None:
    assert all(reason.value == reason.name for reason in Reason)


def test_packed_column_message_names_its_widths() -> None:
    data = pack(good_message(items={"item_id": ["a", "b"], "features": {"price": bytes(12)}}))
    with pytest.raises(ProtocolError) as caught:
        decode_auction(data, LIMITS)
    assert caught.value.message == "packed column 'price' has 12 bytes for 2 items (4 or 8 per item)"


@pytest.mark.parametrize(
    ("values", "width"), [([0, 5, -7, 2**31 - 1, -(2**31)], 4), ([0, 2**31, -(2**40), 2**63 - 1, -(2**63)], 8)]
)
def test_packed_column_round_trip_picks_the_narrowest_width(values: list[int], width: int) -> None:
    packed = pack_column(values)
    assert len(packed) == width * len(values)
    auction = decode_auction(encode_auction("a", {}, {"item_id": list("abcde"), "features": {"f": packed}}))
    assert auction.item_columns["f"] == packed  # carried as bytes; unpacked once per batch by the encoder
    assert unpack_column(packed, len(values)).tolist() == values
