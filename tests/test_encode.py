"""Auctions -> FeatureBatch: equal to batches built by hand through the vocabulary,
the same for every item form, batched with the right context pairing, and every bad
value rejected with its exact reason."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from model_zoo.batch import FeatureBatch, join_context_items
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Role
from model_zoo.vocab import FieldVocabulary, Vocabulary
from streaming.encode import AuctionEncoder, _IntegerIndex, identity_vocabulary
from streaming.protocol import (
    ProtocolError,
    ProtocolLimits,
    Reason,
    decode_auction,
    encode_auction,
    pack_column,
)

SCHEMA = FeatureSchema(
    fields=(
        FieldSpec(name="user", role=Role.context, vocab_size=6),
        FieldSpec(name="hour", role=Role.context, vocab_size=5),
        FieldSpec(name="tags", role=Role.context, kind=Kind.multi, vocab_size=5),
        FieldSpec(name="advertiser", role=Role.item, vocab_size=5),
        FieldSpec(name="genres", role=Role.item, kind=Kind.multi, vocab_size=6),
        FieldSpec(name="price", role=Role.item, vocab_size=6),
    )
)
VOCABULARY = Vocabulary(
    [
        FieldVocabulary("user", ["u1", "u2", "u3", "u4"]),
        FieldVocabulary("hour", ["12", "13", "14"]),
        FieldVocabulary("tags", ["sport", "news", "tech"]),
        FieldVocabulary("advertiser", ["acme", "globex", "initech"]),
        FieldVocabulary("genres", ["drama", "comedy", "noir", "sf"]),
        FieldVocabulary("price", ["v1", "b2", "b4"], transform="log_square"),
    ]
)
CONTEXT = {"user": "u3", "hour": 13, "tags": {"sport": 1.0, "tech": 3.0}}
ITEMS = [
    {"item_id": "ad-1", "features": {"advertiser": "acme", "genres": ["drama", "sf"], "price": 1}},
    {"item_id": "ad-2", "features": {"advertiser": "unseen-co", "genres": "noir", "price": 8}},
    {"item_id": "ad-3", "features": {"advertiser": None, "genres": [], "price": 30.0}},
    {"item_id": "ad-4", "features": {"genres": {"comedy": 2, "drama": 0.5}}},  # advertiser, price absent
]


def as_columns(items: list[dict]) -> dict:
    names = sorted({name for item in items for name in item["features"]})
    return {
        "item_id": [item["item_id"] for item in items],
        "features": {n: [item["features"].get(n) for item in items] for n in names},
    }


def decoded(auction_id: str, context: dict, items: object, **options: object):
    return decode_auction(encode_auction(auction_id, context, items, sent_at_ms=1, **options))


def expected_context() -> FeatureBatch:
    # user u3 -> 4; hour "13" -> 3; tags sport -> 2 (weight 1), tech -> 4 (weight 3)
    return FeatureBatch.from_columns(
        SCHEMA,
        {
            "user": VOCABULARY["user"].lookup(["u3"]),
            "hour": VOCABULARY["hour"].lookup([13]),
            "tags": (np.array([[2, 4]]), np.array([[1.0, 3.0]], dtype=np.float32)),
        },
    )


def expected_items() -> FeatureBatch:
    # price: 1 -> "v1" -> 2; 8 -> ln(8)^2 = 4.3 -> "b4" -> 4; 30 -> ln(30)^2 = 11.6 -> "b11" unseen -> 1; absent -> 0
    return FeatureBatch.from_columns(
        SCHEMA,
        {
            "advertiser": VOCABULARY["advertiser"].lookup(["acme", "unseen-co", None, None]),
            "genres": (
                np.array([[2, 5], [4, 0], [0, 0], [3, 2]]),
                np.array([[1, 1], [1, 0], [1, 0], [2, 0.5]], dtype=np.float32),
            ),
            "price": np.array([2, 4, 1, 0]),
        },
    )


def assert_batches_equal(actual: FeatureBatch, expected: FeatureBatch) -> None:
    assert actual.fields == expected.fields
    assert actual.single_fields == expected.single_fields
    assert actual.bag_fields == expected.bag_fields
    assert actual.single.dtype == torch.int64
    assert torch.equal(actual.single, expected.single)
    for got, want in zip(actual.bags, expected.bags):
        assert torch.equal(got.values, want.values)
        assert torch.equal(got.weights, want.weights)


@pytest.fixture
def encoder() -> AuctionEncoder:
    return AuctionEncoder(SCHEMA, VOCABULARY)


def test_encode_matches_hand_built_batches(encoder: AuctionEncoder) -> None:
    context, items = encoder.encode(decoded("a", CONTEXT, ITEMS))
    assert_batches_equal(context, expected_context())
    assert_batches_equal(items, expected_items())
    context.check(SCHEMA)
    items.check(SCHEMA)


def test_columns_form_encodes_identically(encoder: AuctionEncoder) -> None:
    context, items = encoder.encode(decoded("a", CONTEXT, as_columns(ITEMS)))
    assert_batches_equal(context, expected_context())
    assert_batches_equal(items, expected_items())


def test_second_encoding_uses_the_cache_and_agrees(encoder: AuctionEncoder) -> None:
    auction = decoded("a", CONTEXT, ITEMS)
    first = encoder.encode(auction)
    assert len(encoder.item_side.mappers["advertiser"].cache) == 3  # acme, unseen-co, None
    second = encoder.encode(auction)
    assert_batches_equal(second[1], first[1])


def test_missing_context_fields_are_missing_index(encoder: AuctionEncoder) -> None:
    context, _ = encoder.encode(decoded("a", {"hour": ""}, ITEMS))
    assert context.single.tolist() == [[0, 0]]
    assert context.bags[0].values.tolist() == [[0]] and context.bags[0].weights.tolist() == [[1.0]]


def test_missing_policy_error() -> None:
    strict = AuctionEncoder(SCHEMA, VOCABULARY, missing="error")
    with pytest.raises(ProtocolError) as caught:
        strict.encode(decoded("a", {"user": "u1", "hour": 12}, ITEMS))
    assert caught.value.reason == Reason.missing_field
    assert "tags" in caught.value.message


def test_booleans_are_integers() -> None:
    schema = FeatureSchema(
        fields=(FieldSpec(name="c", role=Role.context, vocab_size=4), FieldSpec(name="i", role=Role.item, vocab_size=4))
    )
    vocabulary = Vocabulary([FieldVocabulary("c", ["1", "True"]), FieldVocabulary("i", ["0", "False"])])
    encoder = AuctionEncoder(schema, vocabulary)
    for context_value, item_value in ((True, False), (1, 0), (1.0, 0.0)):
        context, items = encoder.encode(decoded("a", {"c": context_value}, [{"item_id": 1, "features": {"i": item_value}}]))
        assert (context.single.tolist(), items.single.tolist()) == ([[2]], [[2]])


def test_identity_vocabulary_maps_indices_to_themselves() -> None:
    vocabulary = identity_vocabulary(SCHEMA)
    assert vocabulary["price"].lookup([2, 5, 6, 0, None]).tolist() == [2, 5, 1, 1, 0]


def test_encode_many_pairs_items_with_their_contexts(encoder: AuctionEncoder) -> None:
    catalog = {"m1": 0, "m2": 1, "m3": 2}
    auctions = [
        decoded("rows", CONTEXT, ITEMS),
        decoded("catalog", {"user": "u1"}, ["m3", "m1"]),
        decoded("bad", {"user": "u1", "colour": "red"}, ITEMS),
        decoded("columns", {"user": "u2", "hour": 14}, as_columns(ITEMS[:2])),
    ]
    batch = encoder.encode_many(auctions, catalog=catalog)
    assert [a.auction_id for a in batch.auctions] == ["rows", "catalog", "columns"]
    assert [(position, error.reason, error.auction_id) for position, error in batch.errors] == [
        (2, Reason.unknown_field, "bad")
    ]
    assert len(batch.context) == 3
    assert batch.context.single.tolist() == [[4, 3], [2, 0], [3, 4]]
    assert batch.item_context_index.tolist() == [0, 0, 0, 0, 2, 2]
    assert batch.catalog_positions.tolist() == [2, 0]
    assert batch.catalog_context_index.tolist() == [1, 1]
    assert batch.spans == [(0, 4), (0, 2), (4, 6)]
    assert_batches_equal(batch.items.rows(torch.arange(4)), expected_items())
    assert_batches_equal(batch.items.rows(torch.arange(4, 6)), expected_items().rows(torch.arange(2)))
    parts = batch.split_scores(torch.arange(6.0), torch.tensor([10.0, 20.0]))
    assert [p.tolist() for p in parts] == [[0.0, 1.0, 2.0, 3.0], [10.0, 20.0], [4.0, 5.0]]


def test_batched_scoring_equals_one_auction_at_a_time(encoder: AuctionEncoder) -> None:
    torch.manual_seed(0)
    model = build_model(SCHEMA, "dplr_fwfm", 4, rank=2).eval()
    auctions = [
        decoded("x", CONTEXT, ITEMS),
        decoded("y", {"user": "u2", "tags": ["news"]}, ITEMS[1:]),
        decoded("z", {"hour": 12}, as_columns(ITEMS[:3])),
    ]
    batch = encoder.encode_many(auctions)
    with torch.inference_mode():
        batched = model.score_items(model.encode_context(batch.context), batch.items, batch.item_context_index)
        for auction, scores in zip(auctions, batch.split_scores(batched, None)):
            context, items = encoder.encode(auction)
            alone = model.score_items(model.encode_context(context), items)
            full = model(join_context_items(SCHEMA, context, items))
            torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(scores, full, rtol=1e-5, atol=1e-5)


def test_catalog_auction_needs_a_catalog(encoder: AuctionEncoder) -> None:
    auction = decoded("c", {}, ["m1"])
    batch = encoder.encode_many([auction])
    assert [(p, e.reason) for p, e in batch.errors] == [(0, Reason.catalog_unavailable)]
    batch = encoder.encode_many([auction], catalog={"m2": 0})
    assert [(p, e.reason) for p, e in batch.errors] == [(0, Reason.unknown_catalog_item)]
    with pytest.raises(ValueError, match="catalog"):
        encoder.encode(auction)


BAD_VALUES = {
    "unknown context field": ({"colour": "red"}, ITEMS[:1], Reason.unknown_field),
    "item field in the context": ({"advertiser": "acme"}, ITEMS[:1], Reason.unknown_field),
    "unknown item field": ({}, [{"item_id": 1, "features": {"colour": "red"}}], Reason.unknown_field),
    "context field in an item": ({}, [{"item_id": 1, "features": {"user": "u1"}}], Reason.unknown_field),
    "NaN context value": ({"hour": float("nan")}, ITEMS[:1], Reason.non_finite),
    "infinite item value": ({}, [{"item_id": 1, "features": {"advertiser": float("inf")}}], Reason.non_finite),
    "NaN weight": ({"tags": {"sport": float("nan")}}, ITEMS[:1], Reason.non_finite),
    "infinite weight": ({}, [{"item_id": 1, "features": {"genres": {"noir": float("-inf")}}}], Reason.non_finite),
    "negative weight": ({"tags": {"sport": -1.0}}, ITEMS[:1], Reason.invalid_value),
    "zero weight": ({"tags": {"sport": 0}}, ITEMS[:1], Reason.invalid_value),
    "string weight": ({"tags": {"sport": "1"}}, ITEMS[:1], Reason.wrong_type),
    "array for a single field": ({"user": ["u1", "u2"]}, ITEMS[:1], Reason.wrong_type),
    "map for a single field": ({}, [{"item_id": 1, "features": {"advertiser": {"acme": 1}}}], Reason.wrong_type),
    "binary value": ({"user": b"u1"}, ITEMS[:1], Reason.wrong_type),
    "nested array in a bag": ({"tags": [["sport"]]}, ITEMS[:1], Reason.wrong_type),
    "bag over the limit": ({"tags": [f"t{i}" for i in range(9)]}, ITEMS[:1], Reason.too_many_values),
    "overlong value": ({"user": "u" * 65}, ITEMS[:1], Reason.invalid_value),
    "text for a log-binned field": ({}, [{"item_id": 1, "features": {"price": "cheap"}}], Reason.invalid_value),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
@pytest.mark.parametrize("form", ["rows", "columns"])
def test_bad_value_gets_its_reason(case: str, form: str) -> None:
    encoder = AuctionEncoder(SCHEMA, VOCABULARY, limits=ProtocolLimits(max_bag_values=8, max_value_length=64))
    context, items, reason = BAD_VALUES[case]
    auction = decoded("bad", context, items if form == "rows" else as_columns(items))
    good = decoded("good", CONTEXT, ITEMS)
    batch = encoder.encode_many([good, auction, good])
    assert [(p, e.reason, e.auction_id) for p, e in batch.errors] == [(1, reason, "bad")]
    assert [a.auction_id for a in batch.auctions] == ["good", "good"]
    assert len(batch.items) == 2 * len(ITEMS)


def test_vocabulary_must_cover_the_schema() -> None:
    with pytest.raises(ValueError, match="no entries"):
        AuctionEncoder(SCHEMA, Vocabulary([FieldVocabulary("user", ["u1"])]))
    too_big = Vocabulary([*(VOCABULARY[n] for n in SCHEMA.names if n != "hour"), FieldVocabulary("hour", list("abcd"))])
    with pytest.raises(ValueError, match="larger"):
        AuctionEncoder(SCHEMA, too_big)


def test_context_keys_equal_exactly_for_equal_encodings(encoder: AuctionEncoder) -> None:
    short_bags = encoder.encode_many([decoded("a", CONTEXT, ITEMS), decoded("b", {"user": "u1"}, ITEMS)])
    long_bags = encoder.encode_many([
        decoded("c", {"tags": ["sport", "news", "tech", "news"]}, ITEMS),
        decoded("d", {"user": "u3", "hour": "13", "tags": {"sport": 1.0, "tech": 3.0}}, ITEMS),  # encodes as CONTEXT
        decoded("e", {"user": "u3", "hour": 13, "tags": {"sport": 3.0, "tech": 1.0}}, ITEMS),  # other weights
    ])
    assert long_bags.context.bags[0].values.shape[1] == 4 > short_bags.context.bags[0].values.shape[1]
    a, b = short_bags.context_keys()
    c, d, e = long_bags.context_keys()
    assert d == a
    assert len({a, b, c, e}) == 4


PACKED_SCHEMA = FeatureSchema(
    fields=(
        FieldSpec(name="user", role=Role.context, vocab_size=4),
        FieldSpec(name="campaign", role=Role.item, vocab_size=9),
        FieldSpec(name="price", role=Role.item, vocab_size=5),
        FieldSpec(name="genres", role=Role.item, kind=Kind.multi, vocab_size=5),
    )
)
PACKED_VOCABULARY = Vocabulary(
    [
        FieldVocabulary("user", ["u1", "u2"]),
        # only canonical integer tokens can match an integer: not "05", " 6", "+8" or "x"
        FieldVocabulary("campaign", ["7", "05", "-3", "x", " 6", "+8", str(2**63 - 1)]),
        FieldVocabulary("price", ["v1", "b4", "b11"], transform="log_square"),  # the token path
        FieldVocabulary("genres", ["1", "2", "3"]),
    ]
)
PACKED_VALUES = {
    "campaign": [[7, 5, -3, 6, 8, 2**63 - 1, 99, -(2**63)], [7, -3, 0, 1, 2, 3, 4, 5]],  # int64, then int32
    "price": [[1, 8, 30, 2, 0, 100, 9, 10], [3, 3, 3, 3, 1, 1, 1, 1]],
    "genres": [[1, 2, 3, 4, 1, 2, 3, 4], [3, 2, 1, 0, 3, 2, 1, 0]],  # one value per item
}


def packed_auction(auction_id: str, part: int, packed: bool) -> object:
    columns = {name: values[part] for name, values in PACKED_VALUES.items()}
    if packed:
        columns = {name: pack_column(values) for name, values in columns.items()}
    return decoded(auction_id, {"user": "u2"}, {"item_id": list(range(8)), "features": columns})


def test_packed_columns_encode_like_their_values_sent_one_by_one() -> None:
    packed_encoder = AuctionEncoder(PACKED_SCHEMA, PACKED_VOCABULARY)
    list_encoder = AuctionEncoder(PACKED_SCHEMA, PACKED_VOCABULARY)
    assert len(pack_column(PACKED_VALUES["campaign"][0])) == 64 and len(pack_column(PACKED_VALUES["campaign"][1])) == 32
    for part in (0, 1):
        packed = packed_encoder.encode(packed_auction("p", part, packed=True))
        listed = list_encoder.encode(packed_auction("l", part, packed=False))
        assert_batches_equal(packed[1], listed[1])
    # 7 -> 2, 5 -> rare ("05" is not the token of 5), -3 -> 4, 6 and 8 rare, 2^63-1 -> 8, 99 and -2^63 rare
    campaign = packed_encoder.encode(packed_auction("p", 0, packed=True))[1].single[:, 0]
    assert campaign.tolist() == [2, 1, 4, 1, 1, 8, 1, 1]


def test_a_batch_mixing_packed_widths_and_lists_encodes_like_each_auction_alone() -> None:
    encoder = AuctionEncoder(PACKED_SCHEMA, PACKED_VOCABULARY)
    auctions = [packed_auction("a", 0, True), packed_auction("b", 1, True), packed_auction("c", 1, False)]
    for chosen in (auctions[:2], auctions):  # all packed (two widths); packed and lists together
        together = encoder.encode_many(chosen)
        alone = [encoder.encode(auction)[1] for auction in chosen]
        assert not together.errors
        assert torch.equal(together.items.single, torch.cat([batch.single for batch in alone]))
        assert together.items.bags[0].values[:, 0].tolist() == torch.cat([b.bags[0].values[:, 0] for b in alone]).tolist()


def test_integer_index_equals_a_dictionary_on_colliding_keys() -> None:
    rng = np.random.default_rng(3)
    keys = np.unique(np.concatenate([rng.integers(-(2**62), 2**62, 3000), np.arange(-50, 50), 1024 * np.arange(100)]))
    vocabulary = FieldVocabulary("f", [str(k) for k in rng.permutation(keys)])
    index = _IntegerIndex(vocabulary)
    queries = np.concatenate([keys, rng.integers(-(2**62), 2**62, 3000), 1024 * np.arange(100, 200)])
    expected = [vocabulary.lookup_one(int(q)) for q in queries]
    assert index.lookup(queries).tolist() == expected
    assert index.keys.shape[0] >= 2 * len(keys)  # at most half full


def test_the_value_cache_is_bounded_by_bytes_under_a_flood_of_long_unseen_values(encoder: AuctionEncoder) -> None:
    mapper = encoder.item_side.mappers["advertiser"]
    long_values = [f"{n:08d}" + "x" * 1_000 for n in range(20_000)]  # 20 MB of distinct values
    indices = mapper.column(long_values)
    assert set(indices.tolist()) == {1}  # all rare
    assert mapper.cache_bytes <= 8 << 20
    assert mapper.cache_bytes == sum(map(sys.getsizeof, mapper.cache))
    assert len(mapper.cache) < 10_000


INTEGER_SCHEMA = FeatureSchema(
    fields=(
        FieldSpec(name="user", role=Role.context, vocab_size=4),
        FieldSpec(name="campaign", role=Role.item, vocab_size=9),
        FieldSpec(name="slot", role=Role.item, vocab_size=5),
    )
)
INTEGER_VOCABULARY = Vocabulary(
    [
        FieldVocabulary("user", ["u1", "u2"]),
        FieldVocabulary("campaign", ["7", "05", "-3", "x", " 6", "+8", str(2**63 - 1)]),
        FieldVocabulary("slot", ["1", "2", "3"]),
    ]
)


def test_all_packed_batches_take_one_lookup_and_encode_like_lists() -> None:
    """The all-packed path (every field packed, one width: one buffer, one compiled
    lookup) gives the indices the per-field path gives the same values as lists."""
    values = [
        {"campaign": [7, 5, -3, 6, 8, 2**63 - 1, 99, -(2**63)], "slot": [1, 2, 3, 4, 0, 1, 2, 3]},  # int64
        {"campaign": [7, -3, 0, 1, 2, 3, 4, 5], "slot": [3, 3, 2, 2, 1, 1, 0, 0]},  # int32
        {"campaign": [-3, 7, 7, 7, 9, 9, 9, 9], "slot": [2, 2, 2, 2, 5, 5, 5, 5]},  # int32
    ]

    def auctions(packed: bool) -> list:
        return [
            decoded(f"a{n}", {"user": "u2"}, {"item_id": list(range(8)),
                    "features": {k: pack_column(v) if packed else v for k, v in columns.items()}})
            for n, columns in enumerate(values)
        ]  # fmt: skip

    encoder = AuctionEncoder(INTEGER_SCHEMA, INTEGER_VOCABULARY)
    side = encoder.item_side
    packed, listed = auctions(packed=True), auctions(packed=False)
    assert side.packed_batch([a.item_columns for a in packed[1:]], [8, 8]) is not None  # one width
    assert side.packed_batch([a.item_columns for a in packed], [8, 8, 8]) is None  # two widths
    assert side.packed_batch([a.item_columns for a in listed[1:]], [8, 8]) is None
    for chosen in ([1, 2], [0], [0, 1, 2]):
        fast = encoder.encode_many([packed[n] for n in chosen]).items
        general = encoder.encode_many([listed[n] for n in chosen]).items
        assert fast.fields == general.fields and fast.single_fields == general.single_fields
        assert torch.equal(fast.single, general.single)
    assert encoder.encode_many(packed[:1]).items.single[:, 0].tolist() == [2, 1, 4, 1, 1, 8, 1, 1]
    # An unknown or a missing field leaves the all-packed path: rejected as before.
    stray = decoded("s", {"user": "u2"}, {"item_id": [1], "features": {"slot": pack_column([1]), "colour": pack_column([1])}})
    assert encoder.encode_many([stray]).errors[0][1].reason == Reason.unknown_field
    strict = AuctionEncoder(INTEGER_SCHEMA, INTEGER_VOCABULARY, missing="error")
    lacking = decoded("m", {"user": "u2"}, {"item_id": [1], "features": {"slot": pack_column([1])}})
    assert strict.encode_many([lacking]).errors[0][1].reason == Reason.missing_field


def test_integer_columns_take_one_lookup_and_encode_like_the_per_field_path() -> None:
    """Columns of plain integers (contexts as maps of integers, items as lists) map in
    one compiled lookup to the indices each field's mapper gives the same values;
    booleans, missing values, strings and integers beyond int64 take the per-field path."""
    vocabulary = Vocabulary(
        [
            FieldVocabulary("user", ["3", str(2**64 - 1)]),
            FieldVocabulary("campaign", ["7", "05", "-3", "x", " 6", "+8", str(2**63 - 1)]),
            FieldVocabulary("slot", ["1", "2", "3"]),
        ]
    )
    encoder = AuctionEncoder(INTEGER_SCHEMA, vocabulary)

    def per_field(side, columns: list) -> list[list[int]]:
        return [[side.mappers[name].index(v) for v in column] for name, column in zip(side.names, columns)]

    items = [[7, 5, -3, 6, 8, 2**63 - 1, 99, -(2**63)], [1, 2, 3, 4, 0, 1, 2, 3]]
    assert encoder.item_side.integer_batch(items, 8) is not None
    assert encoder.item_side.batch(items, 8).single.T.tolist() == per_field(encoder.item_side, items)
    assert encoder.item_side.batch(items, 8).single[:, 0].tolist() == [2, 1, 4, 1, 1, 8, 1, 1]
    side = encoder.context_side
    for users, fast in (([3, 5, -3], True), ([3, 2**64 - 1], False), ([3, True], False), ([3, None], False), (["3", 3], False)):
        assert (side.integer_batch([users], len(users)) is not None) == fast
        assert side.batch([users], len(users)).single.T.tolist() == per_field(side, [users])
    assert side.batch([[3, 5, 2**64 - 1, True, None]], 5).single[:, 0].tolist() == [2, 1, 3, 1, 0]
    contexts = [decoded(f"c{n}", {"user": user}, [{"item_id": 1, "features": {}}]) for n, user in enumerate([3, 5, 3])]
    assert encoder.encode_many(contexts).context.single[:, 0].tolist() == [2, 1, 2]
