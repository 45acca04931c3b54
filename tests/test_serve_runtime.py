"""The scorer's model runtime without Ray or Kafka: replies equal offline scoring of
the bundle, the context cache changes no score, every bad message gets its reason,
and catalog auctions are scored from the catalog parquet."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model_zoo.batch import join_context_items
from model_zoo.bundle import save_bundle
from model_zoo.context_cache import ContextCache
from model_zoo.registry import KINDS, build_model
from model_zoo.runtime import freeze_heap
from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Role
from model_zoo.vocab import FieldVocabulary, Vocabulary
from serve_app.config import ModelConfig, ScorerArgs
from serve_app.runtime import ScoringRuntime
from streaming.encode import AuctionEncoder
from streaming.producer import synthetic_templates
from streaming.protocol import (
    ProtocolLimits,
    decode_error,
    decode_reply,
    encode_auction,
)

SCHEMA = FeatureSchema(
    fields=(
        FieldSpec(name="user", role=Role.context, vocab_size=8),
        FieldSpec(name="hour", role=Role.context, vocab_size=6),
        FieldSpec(name="tags", role=Role.context, kind=Kind.multi, vocab_size=6),
        FieldSpec(name="advertiser", role=Role.item, vocab_size=6),
        FieldSpec(name="genres", role=Role.item, kind=Kind.multi, vocab_size=7),
    )
)
VOCABULARY = Vocabulary(
    [
        FieldVocabulary("user", ["u1", "u2", "u3", "u4", "u5", "u6"]),
        FieldVocabulary("hour", ["12", "13", "14", "15"]),
        FieldVocabulary("tags", ["sport", "news", "tech", "art"]),
        FieldVocabulary("advertiser", ["acme", "globex", "initech", "umbrella"]),
        FieldVocabulary("genres", ["drama", "comedy", "noir", "sf", "doc"]),
    ]
)
ADVERTISERS = ["acme", "globex", "initech", "umbrella", "unseen-co", None]
GENRES = ["drama", "comedy", "noir", "sf", "doc"]


def random_auction(rng: np.random.Generator, auction_id: str, users: int = 6) -> bytes:
    context = {
        "user": f"u{rng.integers(1, users + 1)}",
        "hour": int(rng.integers(12, 16)),
        "tags": {t: float(rng.integers(1, 4)) for t in rng.choice(["sport", "news", "tech"], 2, replace=False)},
    }
    count = int(rng.integers(1, 12))
    items = {
        "item_id": [f"{auction_id}-{i}" for i in range(count)],
        "features": {
            "advertiser": [ADVERTISERS[i] for i in rng.integers(0, len(ADVERTISERS), count)],
            "genres": [list(rng.choice(GENRES, int(rng.integers(0, 3)), replace=False)) for _ in range(count)],
        },
    }
    return encode_auction(auction_id, context, items, sent_at_ms=1_000)


def make_bundle(directory: Path, kind: str = "dplr_fwfm", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    options = {"rank": 2} if "dplr" in kind or "pruned" in kind else {}
    model = build_model(SCHEMA, kind, 4, **options)
    vocab_dir = directory / "vocab-src"
    VOCABULARY.save(vocab_dir)
    return save_bundle(directory / kind, model, vocabulary_dir=vocab_dir)


def offline_scores(runtime: ScoringRuntime, message: bytes) -> np.ndarray:
    """The full forward of the bundle's model on the auction's joined rows."""
    from streaming.protocol import decode_auction

    context, items = AuctionEncoder(SCHEMA, VOCABULARY).encode(decode_auction(message))
    with torch.no_grad():
        return runtime.bundle.model(join_context_items(SCHEMA, context, items)).numpy()


@pytest.mark.parametrize("cache_size", [0, 3, 1000])
def test_replies_equal_the_full_forward_with_and_without_the_context_cache(tmp_path: Path, cache_size: int) -> None:
    runtime = ScoringRuntime(ModelConfig(bundle=str(make_bundle(tmp_path))), context_cache_size=cache_size)
    rng = np.random.default_rng(7)
    messages = [random_auction(rng, f"a{i}", users=3) for i in range(60)]
    replies = []
    for start in range(0, len(messages), 16):  # later batches hit contexts cached by earlier ones
        report = runtime.score_messages(messages[start : start + 16])
        assert report.errors == {}
        replies += report.replies
    assert [r.auction_id for r in replies] == [f"a{i}" for i in range(60)]
    for message, reply in zip(messages, replies):
        decoded = decode_reply(reply.value)
        np.testing.assert_allclose(decoded.scores, offline_scores(runtime, message), rtol=1e-5, atol=1e-5)
        assert decoded.model_version == runtime.model_version
        assert decoded.model == runtime.model_name
    if cache_size >= 1000:
        # 3 users x 4 hours x 3 tag pairs x weights: far fewer distinct contexts than auctions
        assert 0.0 < runtime.context_cache.hit_ratio < 1.0
        assert len(runtime.context_cache) == runtime.context_cache.lookups - runtime.context_cache.hits
    if cache_size == 3:
        assert len(runtime.context_cache) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_cached_context_states_score_like_fresh_ones_for_every_model(kind: str) -> None:
    torch.manual_seed(3)
    options = {"rank": 2} if "dplr" in kind or "pruned" in kind else {}
    model = build_model(SCHEMA, kind, 4, **options).eval()
    encoder = AuctionEncoder(SCHEMA, VOCABULARY)
    rng = np.random.default_rng(11)
    from streaming.protocol import decode_auction

    cache = ContextCache(capacity=50)
    for _ in range(3):
        encoded = encoder.encode_many([decode_auction(random_auction(rng, f"x{i}", users=2)) for i in range(8)])
        with torch.no_grad():
            fresh = model.score_items(model.encode_context(encoded.context), encoded.items, encoded.item_context_index)
            state, row_of_context = cache.encode(model.encode_context, encoded.context, encoded.context_keys())
            reused = model.score_items(state, encoded.items, row_of_context[encoded.item_context_index])
        torch.testing.assert_close(reused, fresh, rtol=1e-5, atol=1e-5)
    assert cache.hits > 0


def test_the_context_cache_evicts_the_least_recently_used_and_never_mixes_rows() -> None:
    """Capacity 2: a hit refreshes an entry, a new context evicts the least recent one
    (also one this batch hit, whose row was taken first), and a batch with more new
    contexts than the capacity keeps its last ones; every state row is its context's."""
    from model_zoo.batch import FeatureBatch
    from model_zoo.models.low_rank import LowRankContext

    encoded_rows: list[list[int]] = []

    def encode_context(context: FeatureBatch) -> LowRankContext:
        values = context.single[:, 0]
        encoded_rows.append(values.tolist())
        return LowRankContext(context.fields, (), torch.stack([values, -values], 1).float(), values.float() / 2)

    cache = ContextCache(capacity=2)

    def encode(*values: int) -> list[int]:
        context = FeatureBatch(("user",), ("user",), torch.tensor([[v] for v in values]), (), ())
        keys = [bytes([v]) for v in values]
        state, row_of_context = cache.encode(encode_context, context, keys)
        for value, row in zip(values, row_of_context.tolist()):
            assert state.query[row].tolist() == [value, -value] and state.scalar[row].item() == value / 2
        return encoded_rows.pop() if encoded_rows else []

    assert encode(1, 2, 1) == [1, 2]
    assert encode(1) == []  # a hit: 1 is now the most recent
    assert encode(3) == [3]  # evicts 2
    assert encode(2, 1) == [2]  # 1 hit, 2 encoded again, evicting 3
    assert encode(1, 4, 5) == [4, 5]  # 4 evicts 2, 5 evicts 1 (already taken for this batch)
    assert len(cache) == 2 and encode(4, 5) == []
    assert encode(6, 7, 8) == [6, 7, 8] and encode(7, 8) == []  # more new than the capacity: the last two stay
    assert (cache.lookups, cache.hits) == (16, 7)


def test_each_bad_message_gets_its_reason_and_the_good_ones_are_scored(tmp_path: Path) -> None:
    runtime = ScoringRuntime(
        ModelConfig(bundle=str(make_bundle(tmp_path))), limits=ProtocolLimits(max_items=20)
    )
    rng = np.random.default_rng(1)
    good = [random_auction(rng, f"g{i}") for i in range(4)]
    bad = {
        b"\x85\xa7version": "malformed_msgpack",
        encode_auction("b-type", {"user": ["u1", "u2"]}, [{"item_id": "i", "features": {}}]): "wrong_type",
        encode_auction("b-nan", {"hour": float("nan")}, [{"item_id": "i", "features": {}}]): "non_finite",
        encode_auction("b-field", {"city": "Paris"}, [{"item_id": "i", "features": {}}]): "unknown_field",
        encode_auction("b-many", {}, [{"item_id": str(i), "features": {}} for i in range(21)]): "too_many_items",
        encode_auction("b-model", {}, [{"item_id": "i", "features": {}}], model="other"): "unknown_model",
        encode_auction("b-catalog", {}, ["i1", "i2"]): "catalog_unavailable",
    }
    messages = [good[0], *list(bad)[:4], good[1], good[2], *list(bad)[4:], good[3]]
    sources = [{"topic": "auctions", "partition": 0, "offset": n} for n in range(len(messages))]
    report = runtime.score_messages(messages, sources=sources)
    assert len(report.replies) == len(messages)
    assert report.auctions == 4
    for offset, (message, reply) in enumerate(zip(messages, report.replies)):
        if message in bad:
            error = decode_error(reply.value)
            assert error.reason == bad[message] == reply.reason.value
            assert error.original == message
            assert error.source == sources[offset]
        else:
            np.testing.assert_allclose(decode_reply(reply.value).scores, offline_scores(runtime, message), atol=1e-5)
    assert report.errors == {reason: 1 for reason in bad.values()}


@pytest.mark.parametrize("kind", ["dplr_fwfm", "tensorfm"])
def test_catalog_auctions_score_like_feature_auctions(tmp_path: Path, kind: str) -> None:
    catalog_path = tmp_path / "items.parquet"
    item_ids = ["ad-1", "ad-2", "ad-3", 17]
    advertiser = ["acme", "unseen-co", None, "umbrella"]
    genres = [["drama", "sf"], [], ["noir"], ["doc", "comedy"]]
    pq.write_table(
        pa.table({"item_id": [str(i) for i in item_ids], "advertiser": advertiser, "genres": genres}), catalog_path
    )
    runtime = ScoringRuntime(ModelConfig(bundle=str(make_bundle(tmp_path, kind)), catalog=str(catalog_path)))
    context = {"user": "u2", "hour": 14, "tags": ["sport"]}
    by_id = encode_auction("c", context, ["ad-3", "ad-1", "17"], top_k=2)
    with_features = encode_auction(
        "f",
        context,
        {"item_id": ["ad-3", "ad-1", "17"], "features": {"advertiser": [None, "acme", "umbrella"],
                                                         "genres": [["noir"], ["drama", "sf"], ["doc", "comedy"]]}},
    )
    report = runtime.score_messages([by_id, with_features])
    catalog_reply, feature_reply = (decode_reply(r.value) for r in report.replies)
    np.testing.assert_allclose(catalog_reply.scores, feature_reply.scores, rtol=1e-5, atol=1e-6)
    best = np.argsort(-np.asarray(feature_reply.scores))[:2]
    assert catalog_reply.top_k == [["ad-3", "ad-1", "17"][i] for i in best]


def test_a_catalog_with_unknown_columns_is_refused_at_load(tmp_path: Path) -> None:
    catalog_path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["a"], "colour": ["red"]}), catalog_path)
    with pytest.raises(ValueError, match="colour"):
        ScoringRuntime(ModelConfig(bundle=str(make_bundle(tmp_path)), catalog=str(catalog_path)))


def test_serve_config_file_is_what_serve_up_deploys() -> None:
    """cluster/serve_config.yaml stays in sync with `rankstream serve up`'s config."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rayjobs.serve import serve_config
    from serve_app.app import Scorer

    path = Path(__file__).resolve().parents[1] / "cluster" / "serve_config.yaml"
    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    args = ScorerArgs.model_validate(application["args"])
    (deployment,) = application["deployments"]
    model = ModelConfig.model_validate(deployment["user_config"])
    generated = serve_config(args, model, config["http_options"]["host"], config["http_options"]["port"])
    (generated_application,) = generated["applications"]
    # the file may omit defaults; serve up sets num_replicas on the deployment only (a lightweight update)
    generated_args = {**generated_application.pop("args"), "num_replicas": deployment["num_replicas"]}
    assert ScorerArgs.model_validate(generated_args) == args
    assert generated == {**config, "applications": [{k: v for k, v in application.items() if k != "args"}]}
    assert deployment["name"] == Scorer.name and deployment["num_replicas"] == args.num_replicas


def test_packed_auctions_score_like_the_same_auctions_as_value_lists(tmp_path: Path) -> None:
    """The benchmark's path: integer raw values through a bundle without a vocabulary
    (identity), 20 auctions scored together, once packed and once as value lists."""
    schema = FeatureSchema(
        fields=tuple(FieldSpec(name=f"f{i}", role=Role.context if i < 3 else Role.item, vocab_size=50) for i in range(7))
    )
    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "identity", build_model(schema, "dplr_fwfm", 4, rank=2))
    runtime = ScoringRuntime(ModelConfig(bundle=str(bundle)))
    replies = {}
    for item_format in ("columns", "packed"):
        templates = synthetic_templates(schema, 20, 30, item_format=item_format, seed=5)
        report = runtime.score_messages([t.stamp(f"a{i}", 1) for i, t in enumerate(templates)])
        assert report.errors == {} and report.auctions == 20
        replies[item_format] = [decode_reply(r.value).scores for r in report.replies]
    packed_template = synthetic_templates(schema, 1, 30, item_format="packed", seed=5)[0]
    assert len(packed_template.stamp("a", 1)) < len(synthetic_templates(schema, 1, 30, item_format="rows", seed=5)[0].stamp("a", 1))
    np.testing.assert_array_equal(np.array(replies["packed"]), np.array(replies["columns"]))


def test_freeze_heap_hides_the_heap_from_the_collector_until_the_next_load() -> None:
    class Node:
        pass

    node = Node()
    node.cycle = node  # only the cycle collector can free it
    alive = weakref.ref(node)
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert alive() is not None  # frozen: a full collection does not walk it
        freeze_heap()  # the next load: what was frozen is collected first
        assert alive() is None
    finally:
        gc.unfreeze()


def test_hostile_messages_are_bounded_dead_letters_and_the_batch_is_still_scored(tmp_path: Path) -> None:
    """Each of these once failed the whole batch or made an unsendable dead letter."""
    runtime = ScoringRuntime(ModelConfig(bundle=str(make_bundle(tmp_path))))
    rng = np.random.default_rng(2)
    item = [{"item_id": "i", "features": {}}]
    mixed_keys = msgpack.packb(
        {"version": 1, "auction_id": "b-mixed", "sent_at_ms": 0, "context": {"user": "u1", b"raw": 1, "x": 2}, "items": item},
        use_bin_type=True,
    )
    many_keys = encode_auction("b-keys", {f"field-{n:05d}": n for n in range(40_000)}, item)
    deep_value = encode_auction("b-deep", {"user": _nested(900)}, item)
    too_deep = encode_auction("b-too-deep", {}, item)[:-1] + b"\x91" * 2_000 + b"\xc0"
    bad = {
        mixed_keys: "unknown_field",
        many_keys: "unknown_field",
        deep_value: "wrong_type",
        too_deep: "malformed_msgpack",
        encode_auction("b-huge-weight", {"tags": {"sport": 1e300}}, item): "invalid_value",
        encode_auction("b-uint64", {"user": (1 << 64) - 1}, item, top_k=(1 << 64) - 1): None,  # legal: a rare value
        encode_auction("b-dot", {}, item, reply_to=".."): "invalid_reply_to",
    }
    good = [random_auction(rng, f"g{i}") for i in range(3)]
    messages = [good[0], *bad, good[1], good[2]]
    report = runtime.score_messages(messages)
    assert len(report.replies) == len(messages)
    for message, reply in zip(messages, report.replies):
        if bad.get(message) is None:
            assert reply.reason is None
            assert np.isfinite(decode_reply(reply.value).scores).all()
        else:
            assert reply.reason is not None and reply.reason.value == bad[message]
            error = decode_error(reply.value)
            assert len(reply.value) <= 70_000 and len(error.message) <= 1_000
            assert error.original == message[:65_536]
    assert decode_error(report.replies[2].value).original_bytes == len(many_keys) > 65_536


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_an_auction_the_model_fails_on_or_scores_nan_is_a_dead_letter_and_the_others_are_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = ScoringRuntime(ModelConfig(bundle=str(make_bundle(tmp_path))))
    model = runtime.bundle.model
    score_items = model.score_items
    user_index = VOCABULARY["user"].lookup_one("u5")
    hour_index = VOCABULARY["hour"].lookup_one(13)

    def failing(state, items, rows):
        # the model breaks on any batch with user u5, and gives NaN for hour 13
        contexts = runtime.encoder.context_side.names
        single = last_context.single
        users = single[:, contexts.index("user")]
        if (users == user_index).any():
            raise RuntimeError("model bug")
        scores = score_items(state, items, rows)
        hours = single[:, contexts.index("hour")][rows]
        return torch.where(hours == hour_index, torch.tensor(float("nan")), scores)

    encode_context = model.encode_context
    last_context = None

    def remember(context):
        nonlocal last_context
        last_context = context
        return encode_context(context)

    monkeypatch.setattr(model, "score_items", failing)
    monkeypatch.setattr(model, "encode_context", remember)
    runtime.context_cache = ContextCache(0)
    item = {"item_id": ["i1", "i2"], "features": {"advertiser": ["acme", "globex"]}}
    messages = [
        encode_auction("ok-1", {"user": "u1", "hour": 12}, item),
        encode_auction("fails", {"user": "u5", "hour": 12}, item),
        encode_auction("nan", {"user": "u2", "hour": 13}, item),
        encode_auction("ok-2", {"user": "u3", "hour": 14}, item),
    ]
    report = runtime.score_messages(messages)
    reasons = [None if r.reason is None else r.reason.value for r in report.replies]
    assert reasons == [None, "scoring_failed", "non_finite_score", None]
    assert "model bug" in decode_error(report.replies[1].value).message
    assert report.auctions == 2 and report.errors == {"scoring_failed": 1, "non_finite_score": 1}
    for message, reply in zip(messages[::3], report.replies[::3]):
        assert decode_reply(reply.value).auction_id == msgpack.unpackb(message)["auction_id"]
