"""The scorer end to end: a real local Ray head, the real Serve application deployed with
`rankstream serve up` (a config deploy through the dashboard's REST API), the embedded
Kafka-compatible broker, auctions in, replies out.

One deployment (2 replicas, 4 partitions) serves the whole module, in this order:
exact scores for 1,000 auctions; a corpus of bad messages; HTTP; `serve status`;
hot reload under load; a failed reload under load; scaling 2 -> 3 -> 2 under load;
killing a replica mid-stream."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from model_zoo.batch import join_context_items
from model_zoo.bundle import load_bundle, save_bundle
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Role
from model_zoo.vocab import FieldVocabulary, Vocabulary
from rayjobs import cli
from rayjobs.cluster import cluster_down, cluster_up
from rayjobs.serve import deploy, serve_details
from streaming.admin import create_topics
from streaming.broker import free_port, start_broker
from streaming.encode import AuctionEncoder
from streaming.kafka_config import KafkaClientConfig, TopicNames
from streaming.protocol import DEFAULT_LIMITS, decode_auction, decode_error, decode_reply, encode_auction

pytestmark = pytest.mark.slow

SCHEMA = FeatureSchema(
    fields=(
        FieldSpec(name="user", role=Role.context, vocab_size=42),
        FieldSpec(name="hour", role=Role.context, vocab_size=26),
        FieldSpec(name="interests", role=Role.context, kind=Kind.multi, vocab_size=12),
        FieldSpec(name="ad", role=Role.item, vocab_size=62),
        FieldSpec(name="advertiser", role=Role.item, vocab_size=12),
        FieldSpec(name="genres", role=Role.item, kind=Kind.multi, vocab_size=9),
    )
)
TOKENS = {
    "user": [f"u{i}" for i in range(40)],
    "hour": [str(h) for h in range(24)],
    "interests": ["sport", "news", "tech", "art", "food", "travel", "music", "film", "games", "cars"],
    "ad": [f"ad{i}" for i in range(60)],
    "advertiser": [f"adv{i}" for i in range(10)],
    "genres": ["drama", "comedy", "noir", "sf", "doc", "kids", "crime"],
}
VOCABULARY = Vocabulary(FieldVocabulary(name, tokens) for name, tokens in TOKENS.items())
CATALOG_SIZE = 50
PARTITIONS = 4
REPLICAS = 2


def catalog_rows() -> dict[str, list]:
    rng = np.random.default_rng(5)
    return {
        "item_id": [f"cat-{i}" for i in range(CATALOG_SIZE)],
        "ad": [f"ad{i}" for i in range(CATALOG_SIZE)],
        "advertiser": [f"adv{rng.integers(0, 12)}" for _ in range(CATALOG_SIZE)],  # adv10, adv11 unseen
        "genres": [list(rng.choice(TOKENS["genres"], int(rng.integers(0, 3)), replace=False)) for _ in range(CATALOG_SIZE)],
    }


def make_auctions(count: int, seed: int, prefix: str) -> list[tuple[str, bytes]]:
    """Auctions in all three item forms; users repeat, so the context cache gets hits."""
    rng = np.random.default_rng(seed)
    catalog = catalog_rows()
    auctions = []
    for n in range(count):
        auction_id = f"{prefix}-{n}"
        context = {
            "user": f"u{rng.integers(0, 45)}",  # u40..u44 are unseen: the rare index
            "hour": int(rng.integers(0, 24)),
            "interests": {t: float(rng.integers(1, 4)) for t in rng.choice(TOKENS["interests"], 2, replace=False)},
        }
        items = int(rng.integers(1, 30))
        form = n % 3
        if form == 2:
            chosen = rng.choice(CATALOG_SIZE, items, replace=False)
            payload = [catalog["item_id"][i] for i in chosen]
        else:
            rows = {
                "ad": [f"ad{i}" for i in rng.integers(0, 62, items)],
                "advertiser": [f"adv{i}" for i in rng.integers(0, 10, items)],
                "genres": [list(rng.choice(TOKENS["genres"], int(rng.integers(0, 3)), replace=False)) for _ in range(items)],
            }
            ids = [f"{auction_id}-i{j}" for j in range(items)]
            if form == 0:
                payload = {"item_id": ids, "features": rows}
            else:
                payload = [{"item_id": i, "features": {k: v[j] for k, v in rows.items()}} for j, i in enumerate(ids)]
        top_k = 3 if n % 5 == 0 else None
        auctions.append((auction_id, encode_auction(auction_id, context, payload, top_k=top_k)))
    return auctions


def offline_scores(bundle_dir: Path, message: bytes) -> np.ndarray:
    """The full forward of the bundle's model on the auction's rows; catalog items take
    their features from the catalog rows."""
    bundle = load_bundle(bundle_dir)
    auction = decode_auction(message)
    if auction.is_catalog:
        catalog = catalog_rows()
        position = {item_id: i for i, item_id in enumerate(catalog["item_id"])}
        rows = [position[i] for i in auction.item_ids]
        columns = {name: [catalog[name][r] for r in rows] for name in ("ad", "advertiser", "genres")}
        message = encode_auction(auction.auction_id, auction.context, {"item_id": auction.item_ids, "features": columns})
        auction = decode_auction(message)
    context, items = AuctionEncoder(SCHEMA, bundle.vocabulary).encode(auction)
    with torch.no_grad():
        return bundle.model(join_context_items(SCHEMA, context, items)).numpy()


@dataclass
class Stack:
    kafka: KafkaClientConfig
    topics: TopicNames
    address: str
    dashboard_url: str
    http_port: int
    bundles: dict[str, Path]
    catalog: Path
    temp_dir: str
    serving: str = "v1"

    replica_count: int = REPLICAS

    def serve_up_argv(self, bundle: Path, replicas: int = REPLICAS) -> list[str]:
        return ["serve", "up", "--bundle", str(bundle), "--catalog", str(self.catalog),
                "--replicas", str(replicas), "--dashboard-url", self.dashboard_url, "--http-port", str(self.http_port),
                "--bootstrap-servers", self.kafka.bootstrap_servers, "--max-items", "1000", "--timeout", "300"]

    def serve_up(self, version: str, replicas: int = REPLICAS) -> None:
        """Deploy bundle ``version``."""
        assert cli.main(self.serve_up_argv(self.bundles[version], replicas)) == 0
        self.serving = version
        self.replica_count = replicas

    def replicas(self) -> dict[str, int]:
        """Replica id -> pid of the running scorer replicas."""
        deployment = serve_details(self.dashboard_url)["applications"]["rankstream"]["deployments"]["Scorer"]
        return {r["replica_id"]: r["pid"] for r in deployment["replicas"] if r["state"] == "RUNNING"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("serve")
    bundles = {}
    for version, seed in (("v1", 1), ("v2", 2)):
        torch.manual_seed(seed)
        model = build_model(SCHEMA, "dplr_fwfm", 8, rank=2)
        VOCABULARY.save(root / "vocab")
        bundles[version] = save_bundle(root / f"bundle-{version}", model, vocabulary_dir=root / "vocab", name="ctr")
    catalog = root / "catalog.parquet"
    pq.write_table(pa.table(catalog_rows()), catalog)
    temp_dir = f"/tmp/rs-serve-{free_port()}"
    with start_broker(state_dir=root / "broker") as broker:
        kafka = KafkaClientConfig(bootstrap_servers=broker.bootstrap_servers)
        topics = TopicNames()
        create_topics(kafka, topics, partitions=PARTITIONS)
        cluster = cluster_up(num_cpus=2, port=free_port(), dashboard_port=free_port(), temp_dir=temp_dir)
        try:
            stack = Stack(kafka, topics, cluster.address, cluster.dashboard_url, free_port(), bundles, catalog, temp_dir)
            stack.serve_up("v1")
            yield stack
            assert cli.main(["serve", "down", "--dashboard-url", cluster.dashboard_url]) == 0
            assert "rankstream" not in serve_details(cluster.dashboard_url).get("applications", {})
        finally:
            cluster_down(temp_dir)


@dataclass
class Exchange:
    """Requests sent and every record that came back for them."""

    sent: dict[str, tuple[int, int]] = field(default_factory=dict)  # auction id -> (partition, offset)
    replies: dict[str, list] = field(default_factory=lambda: defaultdict(list))  # auction id -> ScoreReply list
    errors: dict[bytes, list] = field(default_factory=lambda: defaultdict(list))  # original bytes -> ErrorReply list
    reply_partitions: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # auction id -> partitions

    def answered(self, keys: list[str | bytes]) -> bool:
        return all(k in self.replies or k in self.errors for k in keys)


def skip_to_end(consumer: Any, partitions: list[TopicPartition], timeout_s: float = 10.0) -> None:
    """Position the consumer at the true end of its partitions (Tansu answers ListOffsets
    "latest" with the last record batch's base offset + 1; fetches carry the real high
    watermark) — the kafka-python twin of the load generator's ``_skip_to_end``."""
    consumer.seek_to_end(*partitions)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        consumer.poll(timeout_ms=50)
        watermarks = [consumer.highwater(p) for p in partitions]
        if all(w is not None and consumer.position(p) >= w for p, w in zip(partitions, watermarks)):
            return
    raise TimeoutError(f"could not reach the end of the reply topics within {timeout_s} s")


def exchange(
    stack: Stack, messages: list[tuple[str | None, bytes]], rate: float | None = None, timeout_s: float = 120.0,
    during: tuple[float, callable] | None = None,
) -> Exchange:
    """Send ``messages`` (key, value) and collect replies until each has one (auction id
    for keyed messages, original bytes for unkeyed ones); ``during`` = (seconds, action)
    runs the action that long after sending started."""
    result = Exchange()
    consumer = KafkaConsumer(**stack.kafka.client_kwargs(), group_id=None, enable_auto_commit=False, fetch_max_wait_ms=20)
    partitions = [TopicPartition(t, p) for t in (stack.topics.scores, stack.topics.dlq) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    skip_to_end(consumer, partitions)
    producer = KafkaProducer(**stack.kafka.client_kwargs(), linger_ms=2)
    stopping = threading.Event()

    def collect() -> None:
        while not stopping.is_set():
            for partition, records in consumer.poll(timeout_ms=50).items():
                for record in records:
                    if partition.topic == stack.topics.dlq:
                        error = decode_error(record.value)
                        result.errors[error.original].append(error)
                    else:
                        reply = decode_reply(record.value)
                        result.replies[reply.auction_id].append(reply)
                        result.reply_partitions[reply.auction_id].append(partition.partition)

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    action_errors: list[BaseException] = []

    def act() -> None:
        try:
            during[1]()
        except BaseException as error:  # raised in the test's thread after the exchange
            action_errors.append(error)

    action = threading.Thread(target=act, daemon=True)  # sending goes on while it runs
    try:
        futures = []
        started = time.monotonic()
        for n, (key, value) in enumerate(messages):
            if rate is not None:
                time.sleep(max(0.0, started + n / rate - time.monotonic()))
            if during is not None and not action.ident and time.monotonic() - started >= during[0]:
                action.start()
            futures.append((key, producer.send(stack.topics.auctions, key=key and key.encode(), value=value)))
        producer.flush()
        if during is not None:
            if not action.ident:
                action.start()
            action.join()
            if action_errors:
                raise action_errors[0]
        for key, future in futures:
            if key is not None:
                metadata = future.get(timeout=30)
                result.sent[key] = (metadata.partition, metadata.offset)
        expected = [key if key is not None else value for key, value in messages]
        deadline = time.monotonic() + timeout_s
        while not result.answered(expected) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # late duplicates, if any, arrive now
    finally:
        stopping.set()
        collector.join()
        producer.close()
        consumer.close()
    return result


def unanswered(stack: Stack, result: Exchange, auctions: list[tuple[str, bytes]]) -> str:
    """Where each unanswered auction went, for the failure message: the partition and
    offset it was sent to, and any record for it on the reply topics read from the start
    (one there means the collector missed it; none, that no replica answered it)."""
    missing = {a for a, _ in auctions if a not in result.replies}
    consumer = KafkaConsumer(**stack.kafka.client_kwargs(), group_id=None, enable_auto_commit=False, fetch_max_wait_ms=20)
    partitions = [TopicPartition(t, p) for t in (stack.topics.scores, stack.topics.dlq) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    on_reply_topics: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    idle_polls = 0
    while idle_polls < 20:
        polled = consumer.poll(timeout_ms=100)
        idle_polls = 0 if polled else idle_polls + 1
        for partition, records in polled.items():
            for record in records:
                if record.key is not None and record.key.decode() in missing:
                    on_reply_topics[record.key.decode()].append((partition.topic, partition.partition, record.offset))
    consumer.close()
    return "; ".join(
        f"{a} sent to (partition, offset) {result.sent.get(a)}, on the reply topics: {on_reply_topics.get(a, [])}"
        for a in sorted(missing)
    )


def test_a_thousand_auctions_each_scored_once_exactly_as_offline(stack: Stack) -> None:
    auctions = make_auctions(1000, seed=0, prefix="exact")
    result = exchange(stack, auctions)
    assert not result.errors
    assert [a for a, _ in auctions if a not in result.replies] == [], unanswered(stack, result, auctions)
    assert {a: len(r) for a, r in result.replies.items() if len(r) != 1} == {}  # no duplicates
    bundle = stack.bundles[stack.serving]
    version = load_bundle(bundle).model_version
    for auction_id, message in auctions:
        reply = result.replies[auction_id][0]
        expected = offline_scores(bundle, message)
        np.testing.assert_allclose(reply.scores, expected, rtol=1e-5, atol=1e-5, err_msg=auction_id)
        assert reply.model_version == version and reply.model == "ctr"
        auction = decode_auction(message)
        if auction.top_k is not None:
            best = np.argsort(-expected, kind="stable")[: auction.top_k]
            assert reply.top_k == [auction.item_ids[i] for i in best]
    # The replies of one poll batch (same served_at_ms and scoring_ms) share one
    # partition, and the partition rotates between a replica's batches (1,000 auctions
    # are at least 4 poll batches of at most 256).
    batches: dict[tuple[int, float], list[int]] = defaultdict(list)
    for auction_id, replies in result.replies.items():
        batches[replies[0].served_at_ms, replies[0].scoring_ms] += result.reply_partitions[auction_id]
    assert max(len(partitions) for partitions in batches.values()) > 1  # batches of several auctions
    assert all(len(set(partitions)) == 1 for partitions in batches.values())
    assert len({p for partitions in batches.values() for p in partitions}) >= 2
    # Each replica replies only on its own share of the partitions (p mod N = rank, as it
    # reads the auctions): no two replicas write one reply partition at the same time.
    assert {a: (result.sent[a][0], p) for a, p in result.reply_partitions.items()
            if p[0] % REPLICAS != result.sent[a][0] % REPLICAS} == {}


def bad_corpus() -> dict[bytes, str]:
    context = {"user": "u1", "hour": 3, "interests": ["art"]}
    items = {"item_id": ["x"], "features": {"ad": ["ad1"]}}
    good = encode_auction("bad-source", context, items)
    return {
        good[: len(good) // 2]: "malformed_msgpack",  # truncated
        msgpack.packb([1, 2, 3]): "not_a_map",
        encode_auction("bad-type", {"hour": [1, 2]}, items): "wrong_type",
        encode_auction("bad-nan", {"user": "u1", "hour": float("nan")}, items): "non_finite",
        msgpack.packb({"version": 1, "auction_id": "bad-noctx", "sent_at_ms": 1, "items": ["cat-1"]}): "missing_field",
        encode_auction("bad-field", {"city": "Paris"}, items): "unknown_field",
        encode_auction("bad-many", context, [f"cat-{i % CATALOG_SIZE}" for i in range(10_000)]): "too_many_items",
        encode_auction("bad-model", context, items, model="no-such-model"): "unknown_model",
        encode_auction("bad-catalog", context, ["cat-1", "not-in-catalog"]): "unknown_catalog_item",
        encode_auction("bad-weight", {"interests": {"art": -1.0}}, items): "invalid_value",
    }


def test_every_bad_message_gets_its_reason_and_every_good_one_is_scored(stack: Stack) -> None:
    replicas_before = stack.replicas()
    bad = bad_corpus()
    good = make_auctions(60, seed=1, prefix="mixed")
    messages: list[tuple[str | None, bytes]] = []
    for n, (auction_id, message) in enumerate(good):
        messages.append((auction_id, message))
        if n % 6 == 0 and n // 6 < len(bad):
            messages.append((None, list(bad)[n // 6]))
    result = exchange(stack, messages)
    kept = DEFAULT_LIMITS.max_dead_letter_original_bytes  # a dead letter keeps the original's start
    assert {original: [e.reason for e in errors] for original, errors in result.errors.items()} == {
        original[:kept]: [reason] for original, reason in bad.items()
    }
    assert {e[0].original_bytes for o, e in result.errors.items() if len(o) == kept} == {
        len(o) for o in bad if len(o) > kept
    }
    ids = {"bad-type", "bad-nan", "bad-noctx", "bad-field", "bad-many", "bad-model", "bad-catalog", "bad-weight"}
    assert {e[0].auction_id for e in result.errors.values()} - {None} == ids
    assert sorted(result.replies) == sorted(a for a, _ in good)
    bundle = stack.bundles[stack.serving]
    for auction_id, message in good:
        np.testing.assert_allclose(result.replies[auction_id][0].scores, offline_scores(bundle, message), atol=1e-5)
    assert stack.replicas() == replicas_before  # no replica restarted


def http(stack: Stack, path: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.http_port}{path}", data=body, method="POST" if body is not None else "GET",
        headers={"Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_http_scores_json_and_msgpack_and_answers_errors_exactly(stack: Stack) -> None:
    bundle = stack.bundles[stack.serving]
    auction_id, message = make_auctions(1, seed=7, prefix="http")[0]
    as_json = json.dumps(msgpack.unpackb(message)).encode()
    status, body = http(stack, "/score", as_json)
    assert status == 200
    reply = json.loads(body)
    assert reply["auction_id"] == auction_id
    np.testing.assert_allclose(reply["scores"], offline_scores(bundle, message), rtol=1e-5, atol=1e-5)
    status, body = http(stack, "/score", message, "application/msgpack")
    assert status == 200
    np.testing.assert_allclose(decode_reply(body).scores, reply["scores"], rtol=1e-6)
    assert http(stack, "/score", b"{not json") == (
        400,
        json.dumps({"auction_id": None, "reason": "malformed_json",
                    "message": "cannot parse the JSON body: JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"},
                   separators=(",", ":")).encode(),
    )
    status, body = http(stack, "/score", json.dumps({"version": 1, "auction_id": "h", "sent_at_ms": 1, "context": {"city": 1},
                                                      "items": ["cat-1"]}).encode())
    assert status == 400 and json.loads(body)["reason"] == "unknown_field"
    healths = healthz_until(stack, reads_each_partition_once)
    assert sorted(h["partitions"] for h in healths.values()) == ["p mod 2 = 0", "p mod 2 = 1"]
    for replica, health in healths.items():
        assert health == {
            "status": "ok", "model": "ctr", "model_version": load_bundle(bundle).model_version, "consumer": "running",
            "replica": replica, "partitions": health["partitions"], "last_reload_error": None,
        }


SCORED_SO_FAR = 1000 + 60 + 2  # by the tests above: exact, bad corpus, HTTP


def test_serve_status_reports_the_scorer_metrics(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    final_counts = {"auctions_scored_total": SCORED_SO_FAR, "end_to_end_latency_ms_count": SCORED_SO_FAR,
                    "errors_total{reason=unknown_model}": 1}
    deadline = time.monotonic() + 60
    while True:  # Ray exports metrics every few seconds; one snapshot may hold a metric an export behind another
        code = cli.main(["serve", "status", "--json", "--dashboard-url", stack.dashboard_url])
        assert code == 0
        status = json.loads(capsys.readouterr().out)
        reached = all(status["metrics"].get(name, 0) >= count for name, count in final_counts.items())
        if reached or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert status["status"] == "RUNNING"
    assert status["deployments"]["Scorer"]["replicas"] == ["RUNNING"] * REPLICAS
    metrics = status["metrics"]
    assert {name: metrics.get(name) for name in final_counts} == final_counts
    assert 0 < metrics["context_cache_hit_ratio"] <= 1


def test_hot_reload_under_load_loses_nothing_and_switches_version_once(stack: Stack) -> None:
    replicas_before = stack.replicas()
    versions = {v: load_bundle(path).model_version for v, path in stack.bundles.items()}
    auctions = make_auctions(1500, seed=2, prefix="reload")
    result = exchange(stack, auctions, rate=150, during=(2.0, lambda: stack.serve_up("v2")))
    assert [a for a, _ in auctions if a not in result.replies] == [], unanswered(stack, result, auctions)
    assert not result.errors
    by_partition: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for auction_id, _ in auctions:
        partition, offset = result.sent[auction_id]
        by_partition[partition].extend((offset, r.model_version) for r in result.replies[auction_id])
    for partition, scored in by_partition.items():
        sequence = [version for _, version in sorted(scored)]
        switches = sum(1 for a, b in zip(sequence, sequence[1:]) if a != b)
        assert switches <= 1 and sequence[-1] == versions["v2"], partition
    assert {r.model_version for replies in result.replies.values() for r in replies} == set(versions.values())
    for auction_id, message in auctions[::50]:  # each reply equals offline scoring by the model it names
        reply = result.replies[auction_id][0]
        bundle = stack.bundles["v1" if reply.model_version == versions["v1"] else "v2"]
        np.testing.assert_allclose(reply.scores, offline_scores(bundle, message), rtol=1e-5, atol=1e-5)
    assert stack.replicas() == replicas_before  # reloaded in place


def healthz_until(stack: Stack, done: callable, timeout_s: float = 90.0) -> dict[str, dict]:
    """GET /healthz (answered by any replica) until ``done(latest body per running
    replica)`` holds; returns those bodies."""
    latest: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = http(stack, "/healthz")
        assert status == 200, body
        health = json.loads(body)
        latest[health["replica"]] = health
        running = stack.replicas()
        latest = {replica: h for replica, h in latest.items() if replica in running}
        if latest.keys() == running.keys() and done(latest):
            return latest
        assert time.monotonic() < deadline, f"healthz of the running replicas {sorted(running)}: {latest}"
        time.sleep(0.2)


def reads_each_partition_once(healths: dict[str, dict]) -> bool:
    shares = [h["partitions"] for h in healths.values()]
    read = [p for share in shares for p in range(PARTITIONS) if share == f"p mod {len(shares)} = {p % len(shares)}"]
    return sorted(read) == list(range(PARTITIONS))


def assert_all_answered_once(stack: Stack, result: Exchange, auctions: list[tuple[str, bytes]]) -> None:
    assert [a for a, _ in auctions if a not in result.replies] == [], unanswered(stack, result, auctions)
    assert not result.errors
    assert {a: len(r) for a, r in result.replies.items() if len(r) != 1} == {}  # no partition read twice


def deploy_bundle(stack: Stack, bundle: str) -> None:
    """Reload to ``bundle`` by a config deploy, as `serve deploy` would: past `serve up`'s check."""
    application = serve_details(stack.dashboard_url)["applications"]["rankstream"]["deployed_app_config"]
    application["deployments"][0]["user_config"]["bundle"] = bundle
    deploy(stack.dashboard_url, {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": stack.http_port},
                                 "applications": [application]})


def test_a_failed_reload_keeps_the_old_model_reports_it_and_a_good_reload_recovers(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replicas_before = stack.replicas()
    serving = load_bundle(stack.bundles[stack.serving]).model_version
    corrupt = tmp_path / "bundle-corrupt"
    shutil.copytree(stack.bundles["v1"], corrupt)
    (corrupt / "weights.safetensors").write_bytes(b"not safetensors")
    # `serve up` loads the bundle first and refuses it, deploying nothing.
    capsys.readouterr()
    assert cli.main(stack.serve_up_argv(corrupt, replicas=REPLICAS + 1)) == 2
    assert capsys.readouterr().err.startswith(
        f"rankstream serve: error: {corrupt} does not load (SafetensorError: "
    )
    assert serve_details(stack.dashboard_url)["applications"]["rankstream"]["deployed_app_config"]["deployments"][0][
        "user_config"]["bundle"] == str(stack.bundles[stack.serving])
    # Deployed past that check, under load: the replicas keep their model and say so.
    auctions = make_auctions(900, seed=4, prefix="badreload")
    result = exchange(stack, auctions, rate=150, during=(2.0, lambda: deploy_bundle(stack, str(corrupt))))
    assert_all_answered_once(stack, result, auctions)
    assert {r.model_version for replies in result.replies.values() for r in replies} == {serving}
    healths = healthz_until(stack, lambda h: all(x["last_reload_error"] for x in h.values()))
    for health in healths.values():
        assert health["model_version"] == serving and health["last_reload_error"]["bundle"] == str(corrupt)
    capsys.readouterr()
    deadline = time.monotonic() + 60
    while True:  # each replica's failure reaches the metrics with its next export
        assert cli.main(["serve", "status", "--json", "--dashboard-url", stack.dashboard_url]) == 0
        status = json.loads(capsys.readouterr().out)
        if sum(e["replicas"] for e in status["reload_errors"]) >= REPLICAS or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert [(e["bundle"], e["replicas"]) for e in status["reload_errors"]] == [(str(corrupt), REPLICAS)]
    assert status["status"] == "RUNNING"
    assert cli.main(["serve", "status", "--dashboard-url", stack.dashboard_url]) == 0
    assert f"RELOAD FAILED on {REPLICAS} replica(s), still serving their old model: {corrupt}" in capsys.readouterr().out
    # A missing bundle fails the same way.
    missing = str(tmp_path / "no-such-bundle")
    deploy_bundle(stack, missing)
    healths = healthz_until(stack, lambda h: all((x["last_reload_error"] or {}).get("bundle") == missing for x in h.values()))
    assert {h["last_reload_error"]["error"] for h in healths.values()} == {
        f"FileNotFoundError: no model bundle at {missing} (config.json missing)"
    }
    stack.serve_up("v1")  # a good reload recovers
    healths = healthz_until(stack, lambda h: all(x["last_reload_error"] is None for x in h.values()))
    assert {h["model_version"] for h in healths.values()} == {load_bundle(stack.bundles["v1"]).model_version}
    assert stack.replicas() == replicas_before  # no replica restarted, none crash-looped


def test_scaling_2_3_2_under_load_reads_every_partition_exactly_once(stack: Stack) -> None:
    for replicas, seed in ((3, 5), (2, 6)):

        def scale() -> None:
            stack.serve_up(stack.serving, replicas=replicas)
            healthz_until(stack, lambda h: len(h) == replicas and reads_each_partition_once(h))

        auctions = make_auctions(2400, seed=seed, prefix=f"scale{replicas}")
        result = exchange(stack, auctions, rate=100, during=(2.0, scale), timeout_s=180)
        assert_all_answered_once(stack, result, auctions)
        assert len(stack.replicas()) == replicas


def test_killing_a_replica_mid_stream_loses_no_auction(stack: Stack) -> None:
    victim = next(iter(stack.replicas().values()))
    auctions = make_auctions(1500, seed=3, prefix="kill")
    result = exchange(stack, auctions, rate=150, during=(2.0, lambda: os.kill(victim, signal.SIGKILL)), timeout_s=240)
    assert [a for a, _ in auctions if a not in result.replies] == [], unanswered(stack, result, auctions)
    duplicates = sum(len(r) - 1 for r in result.replies.values())
    print(f"replica {victim} killed: 1500 auctions answered, {duplicates} duplicate replies")
    assert victim not in stack.replicas().values()
    assert len(stack.replicas()) == REPLICAS  # Serve replaced it
