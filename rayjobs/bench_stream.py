"""``rankstream bench stream``: the whole streaming path on this machine — embedded
broker, a local Ray with the Serve scorer, and the load generator, all together.

Auctions of 100 items (20 context + 20 item fields; columns form with integer values
packed as binary by default, ``--item-format``), DPLR rank 3, k = 16.
Offered rates step up until the scorer stops keeping up (throughput below 95% of the
offered rate, a missing reply, or a p99 latency over a second: a growing backlog); the
last rate it kept up with is the maximum sustained rate. Then latency is measured at
half that rate (and at any ``--latency-rates``), alternating ``--rounds`` times with the
*floor*: an echo "scorer" that decodes each auction and replies at once with zero
scores, in its own process, through the replica's own Kafka loop (same client library,
settings, commits and reply batching) — what the broker path alone costs. The report
gives both and the scorer's share: its p99 over the floor's and its p50 minus the
floor's (medians over the rounds), and the CPU each process used. Every measurement
runs on a fresh broker and scorer (``measure``), after a short warm-up.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from model_zoo.bundle import save_bundle
from model_zoo.registry import build_model
from rayjobs.bench import write_results
from rayjobs.bench_scoring import grid_schema
from rayjobs.cluster import init_private_ray
from rayjobs.options import FlatCommand, command
from model_zoo.runtime import freeze_heap
from serve_app.config import ModelConfig, ScorerArgs, ServiceConfig
from serve_app.runtime import BatchReport, Reply
from streaming.admin import create_topics
from streaming.broker import start_broker
from streaming.kafka_config import KafkaClientConfig, TopicNames
from streaming.producer import (
    AuctionTemplate,
    ItemFormat,
    LoadConfig,
    LoadReport,
    run_load,
    synthetic_templates,
)
from streaming.protocol import ProtocolError, decode_auction, encode_error, encode_reply, now_ms

BACKLOG_P99_MS = 1000.0
WARM_UP_RATE = 200.0
WARM_UP_SECONDS = 3.0
APP_NAME = "rankstream"
FLOOR_MODEL = "echo"

Scorer = Literal["scorer", "floor"]


class BenchStreamJob(BaseModel):
    """`rankstream bench stream`: the rates offered, the auctions' shape, the scorer and the load generator."""

    model_config = ConfigDict(extra="forbid")

    json_path: Path = Field(default=Path("bench-results/stream.json"), description="output JSON (the plot goes beside it)")
    rates: list[PositiveFloat] = Field(default=[500, 1000, 1500, 2000, 2500, 3000, 4000], min_length=1, description="offered rates, stepped up")
    latency_rates: list[PositiveFloat] = Field(default=[1000], description="also measure latency here")
    seconds: PositiveFloat = Field(default=10.0, description="per rate step")
    rounds: PositiveInt = Field(default=2, description="floor/scorer alternations per latency rate")
    replicas: PositiveInt = Field(default=1, description="scorer replicas")
    partitions: PositiveInt = Field(default=4, description="of each topic")
    items: PositiveInt = Field(default=100, description="items per auction")
    item_format: ItemFormat = Field(default="packed", description="how auctions carry items (docs/protocol.md)")
    context_fields: PositiveInt = 20
    item_fields: PositiveInt = 20
    vocab_size: PositiveInt = Field(default=1000, description="values per field")
    rank: PositiveInt = Field(default=3, description="of the DPLR-FwFM scored")
    dim: PositiveInt = Field(default=16, description="embedding size k")
    distinct: PositiveInt = Field(default=5000, description="distinct auctions built, then cycled")
    # The scorer's and the load generator's own settings, declared there.
    context_cache_size: int = ScorerArgs.model_fields["context_cache_size"]
    linger_ms: int = LoadConfig.model_fields["linger_ms"]
    seed: int = Field(default=0, description="of the model's weights and the auctions")


FLAGS = FlatCommand("BenchStream", BenchStreamJob, shortcuts={"json-path": "json"})


class RatePoint(BaseModel):
    offered: float
    seconds: float
    report: LoadReport
    scorer: Scorer = "scorer"
    cpu_cores: dict[str, float] = {}  # process -> CPU time / wall time over the measured run

    @property
    def kept_up(self) -> bool:
        report = self.report
        return (
            report.missing == 0
            and report.throughput >= 0.95 * self.offered
            and report.latency_ms.p99 <= BACKLOG_P99_MS
        )


class StreamBenchmark(BaseModel):
    replicas: int
    partitions: int
    items_per_auction: int
    item_format: str
    linger_ms: int
    context_fields: int
    item_fields: int
    rank: int
    dim: int
    steps: list[RatePoint]
    max_sustained_rate: float
    latency: list[RatePoint]
    floor: list[RatePoint]
    comparison: list[FloorComparison]


class FloorComparison(BaseModel):
    """The scorer against the floor at one rate: medians over the rounds."""

    rate: float
    rounds: int
    floor_p50_ms: float
    floor_p99_ms: float
    scorer_p50_ms: float
    scorer_p99_ms: float
    p99_ratio: float = 0.0  # scorer p99 / floor p99
    p50_excess_ms: float = 0.0  # scorer p50 - floor p50

    @classmethod
    def of(cls, rate: float, scorer: Sequence[RatePoint], floor: Sequence[RatePoint]) -> "FloorComparison":
        def median(points: Sequence[RatePoint], quantile: str) -> float:
            return statistics.median(getattr(p.report.latency_ms, quantile) for p in points)

        comparison = cls(
            rate=rate, rounds=len(scorer), floor_p50_ms=median(floor, "p50"), floor_p99_ms=median(floor, "p99"),
            scorer_p50_ms=median(scorer, "p50"), scorer_p99_ms=median(scorer, "p99"),
        )  # fmt: skip
        comparison.p99_ratio = comparison.scorer_p99_ms / comparison.floor_p99_ms
        comparison.p50_excess_ms = comparison.scorer_p50_ms - comparison.floor_p50_ms
        return comparison


StreamBenchmark.model_rebuild()


# -- the floor: an echo scorer ----------------------------------------------------------
def echo_score(messages: Sequence[bytes], received_at_ms: int, sources: Sequence[dict[str, object]]) -> BatchReport:
    """Zero scores for every auction, at once; a message that does not decode gets its
    dead letter (the load generator sends none)."""
    report = BatchReport(replies=[])
    for message, source in zip(messages, sources):
        try:
            auction = decode_auction(message)
        except ProtocolError as error:
            report.replies.append(Reply(encode_error(error, message, source=source), error.auction_id, reason=error.reason))
            continue
        served_at = now_ms()
        value = encode_reply(auction, np.zeros(len(auction.item_ids), dtype=np.float32), model=FLOOR_MODEL,
                             model_version=FLOOR_MODEL, queue_wait_ms=max(0, received_at_ms - auction.sent_at_ms),
                             scoring_ms=0.0, served_at_ms=served_at)  # fmt: skip
        report.replies.append(Reply(value, auction.auction_id, auction.reply_to, items=len(auction.item_ids)))
        report.auctions += 1
        report.items += len(auction.item_ids)
    return report


def run_echo(kafka_json: str, stop: Any) -> None:
    """The echo scorer's process: the replica's Kafka loop with its settings, scoring nothing."""
    from serve_app.kafka_loop import KafkaLoop

    kafka = KafkaClientConfig.model_validate_json(kafka_json)
    service = ServiceConfig(kafka=kafka)
    loop = KafkaLoop(kafka, service.topics, service.group_id, service.max_poll_records, echo_score, lambda lag: None)
    loop.start()
    freeze_heap()  # as a replica does after its model load
    while not stop.wait(0.5) and loop.is_alive():
        pass
    loop.stop()
    if loop.error is not None:
        raise loop.error


@contextmanager
def echo_scorer(kafka: KafkaClientConfig) -> Iterator[int]:
    """The echo scorer running in its own process; yields its pid."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    process = context.Process(target=run_echo, args=(kafka.model_dump_json(), stop), name="echo-scorer")
    process.start()
    try:
        yield process.pid
    finally:
        stop.set()
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()


def replica_pids() -> list[int]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployment = details["applications"][APP_NAME]["deployments"]["Scorer"]
    return [r["pid"] for r in deployment["replicas"] if r.get("pid")]


@contextmanager
def cpu_meter(processes: dict[str, list[int]]) -> Iterator[dict[str, float]]:
    """CPU cores each named group of processes used while the block ran."""
    def cpu_seconds(pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    before = {name: cpu_seconds(pids) for name, pids in processes.items()}
    started = time.perf_counter()
    cores: dict[str, float] = {}
    yield cores
    wall = time.perf_counter() - started
    cores.update({name: round((cpu_seconds(pids) - before[name]) / wall, 3) for name, pids in processes.items()})


def deploy_scorer(bundle: Path, kafka: KafkaClientConfig, replicas: int, cache_size: int) -> None:
    from ray import serve

    from serve_app.app import build_app

    args = ScorerArgs(
        model=ModelConfig(bundle=str(bundle)), kafka=kafka, num_replicas=replicas, context_cache_size=cache_size
    )
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")


def offer(
    kafka: KafkaClientConfig, templates: list[AuctionTemplate], rate: float, seconds: float, linger_ms: int,
    label: str = "offered", processes: dict[str, list[int]] | None = None,
) -> RatePoint:
    count = max(1, int(rate * seconds))
    load = LoadConfig(count=count, rate=rate, reply_timeout_s=15.0, progress=False, linger_ms=linger_ms)
    with cpu_meter(processes or {}) as cores:
        report = run_load(kafka, templates, load)
    point = RatePoint(offered=rate, seconds=seconds, report=report, cpu_cores=cores)
    latency = report.latency_ms
    cpu = ", ".join(f"{name} {used:.2f}" for name, used in cores.items())
    print(
        f"  {label} {rate:6.0f}/s: throughput {report.throughput:7.0f}/s, missing {report.missing}, "
        f"latency ms p50 {latency.p50:7.2f} p99 {latency.p99:8.2f} max {latency.max:8.2f}"
        + (f"; CPU cores: {cpu}" if cpu else "")
        + ("" if point.kept_up else "  <- not kept up")
    )
    return point


def measure(
    args: BenchStreamJob, work: Path, bundle: Path, templates: list[AuctionTemplate], rate: float,
    scorer: Scorer = "scorer",
) -> RatePoint:
    """One rate on a fresh broker and a fresh scorer deployment (or echo process): the
    embedded broker's in-memory log costs more CPU per request as it grows (see
    docs/protocol.md), so a step on a long-running broker would measure the previous
    steps too."""
    from ray import serve

    with start_broker(state_dir=Path(tempfile.mkdtemp(prefix="broker-", dir=work))) as broker:
        kafka = KafkaClientConfig(bootstrap_servers=broker.bootstrap_servers)
        create_topics(kafka, TopicNames(), partitions=args.partitions)
        processes = {"broker": [broker.process.pid], "load generator": [os.getpid()]}
        if scorer == "floor":
            with echo_scorer(kafka) as pid:
                processes["echo"] = [pid]
                offer(kafka, templates, WARM_UP_RATE, WARM_UP_SECONDS, args.linger_ms, label="floor warm-up")
                point = offer(kafka, templates, rate, args.seconds, args.linger_ms, "floor  ", processes)
            return point.model_copy(update={"scorer": "floor"})
        deploy_scorer(bundle, kafka, args.replicas, args.context_cache_size)
        try:
            # replicas assigned, caches filled; also shows the latency of an unloaded stack
            offer(kafka, templates, WARM_UP_RATE, WARM_UP_SECONDS, args.linger_ms, label="warm-up")
            processes["scorer replicas"] = replica_pids()
            return offer(kafka, templates, rate, args.seconds, args.linger_ms, "offered", processes)
        finally:
            serve.delete(APP_NAME)  # the Kafka loops commit and close while their broker is up


def run(args: BenchStreamJob) -> StreamBenchmark:
    import ray
    from ray import serve

    torch.manual_seed(args.seed)
    schema = grid_schema(args.context_fields + args.item_fields, args.context_fields, args.vocab_size)
    work = Path(tempfile.mkdtemp(prefix="rankstream-bench-stream-"))
    bundle = save_bundle(work / "bundle", build_model(schema, "dplr_fwfm", args.dim, rank=args.rank))
    templates = synthetic_templates(schema, args.distinct, args.items, item_format=args.item_format, seed=args.seed)
    print(f"{args.replicas} scorer replica(s) on a local Ray; each rate on a fresh broker and deployment")
    # The floor runs at this process's niceness: replicas at Ray's default (15 nicer) would
    # lose the CPU the floor wins on a shared machine, and the ratio would measure the scheduler.
    init_private_ray(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False, worker_niceness=0)
    try:
        print("rate steps:")
        steps, sustained = [], 0.0
        for rate in args.rates:
            point = measure(args, work, bundle, templates, rate)
            steps.append(point)
            if not point.kept_up:
                break
            sustained = rate
        latency_rates = sorted({*args.latency_rates, *([sustained / 2] if sustained else [])})
        print(f"latency, alternating with the floor (echo scorer), {args.rounds} round(s):")
        latency, floor, comparison = [], [], []
        for rate in latency_rates:
            rounds = [(measure(args, work, bundle, templates, rate, "floor"), measure(args, work, bundle, templates, rate))
                      for _ in range(args.rounds)]  # fmt: skip
            floor += [f for f, _ in rounds]
            latency += [s for _, s in rounds]
            comparison.append(FloorComparison.of(rate, [s for _, s in rounds], [f for f, _ in rounds]))
    finally:
        serve.shutdown()
        ray.shutdown()
    return StreamBenchmark(
        replicas=args.replicas, partitions=args.partitions, items_per_auction=args.items, item_format=args.item_format,
        linger_ms=args.linger_ms, context_fields=args.context_fields, item_fields=args.item_fields, rank=args.rank,
        dim=args.dim, steps=steps, max_sustained_rate=sustained, latency=latency, floor=floor, comparison=comparison,
    )  # fmt: skip


def print_comparison(result: StreamBenchmark) -> None:
    print("scorer against the floor (medians over rounds; end-to-end ms):")
    print(f"  {'rate/s':>7} {'floor p50':>10} {'floor p99':>10} {'scorer p50':>11} {'scorer p99':>11} "
          f"{'p99 ratio':>10} {'p50 +ms':>8}")  # fmt: skip
    for c in result.comparison:
        print(f"  {c.rate:7.0f} {c.floor_p50_ms:10.2f} {c.floor_p99_ms:10.2f} {c.scorer_p50_ms:11.2f} "
              f"{c.scorer_p99_ms:11.2f} {c.p99_ratio:10.2f} {c.p50_excess_ms:8.2f}")  # fmt: skip


def plot(result: StreamBenchmark, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(result.steps + result.latency, key=lambda p: p.offered)
    offered = [p.offered for p in points]
    figure, (throughput_axis, latency_axis, floor_axis) = plt.subplots(1, 3, figsize=(16, 4.2))
    throughput_axis.plot(offered, [p.report.throughput for p in points], marker="o", label="scored")
    throughput_axis.plot(offered, offered, linestyle="--", color="grey", label="offered")
    throughput_axis.set_xlabel("offered auctions/s")
    throughput_axis.set_ylabel("scored auctions/s")
    throughput_axis.set_title(f"max sustained {result.max_sustained_rate:.0f} auctions/s")
    throughput_axis.legend()
    for quantile in ("p50", "p95", "p99"):
        latency_axis.plot(offered, [getattr(p.report.latency_ms, quantile) for p in points], marker="o", label=quantile)
    latency_axis.set_yscale("log")
    latency_axis.set_xlabel("offered auctions/s")
    latency_axis.set_ylabel("end-to-end latency, ms")
    latency_axis.set_title(f"{result.items_per_auction} items, DPLR ρ={result.rank}, {result.replicas} replica(s)")
    latency_axis.legend()
    width = 0.2
    for n, (label, quantile) in enumerate([("floor p50", "floor_p50_ms"), ("scorer p50", "scorer_p50_ms"),
                                           ("floor p99", "floor_p99_ms"), ("scorer p99", "scorer_p99_ms")]):
        positions = [i + (n - 1.5) * width for i in range(len(result.comparison))]
        floor_axis.bar(positions, [getattr(c, quantile) for c in result.comparison], width, label=label)
    floor_axis.set_xticks(range(len(result.comparison)),
                          [f"{c.rate:.0f}/s\np99 ×{c.p99_ratio:.2f}, p50 {c.p50_excess_ms:+.1f} ms" for c in result.comparison])
    floor_axis.set_ylabel("end-to-end latency, ms")
    floor_axis.set_title("scorer against the floor (echo scorer, same broker path)")
    floor_axis.legend()
    for axis in (throughput_axis, latency_axis, floor_axis):
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def handle(args: BenchStreamJob) -> int:
    result = run(args)
    print_comparison(result)
    print(f"max sustained rate {result.max_sustained_rate:.0f} auctions/s "
          f"({result.max_sustained_rate * args.items:,.0f} item scores/s)")
    write_results(args.json_path, result.model_dump_json(indent=2) + "\n", lambda path: plot(result, path))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("stream", help="Kafka -> Serve -> Kafka: max sustained rate and latency")
    command(parser, FLAGS, handle)
