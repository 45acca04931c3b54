"""``rankstream bench stream``: the whole streaming path on this machine — embedded
broker, a local Ray with the Serve scorer, and the load generator, all together.

Auctions of 100 items (20 context + 20 item fields; columns form with integer values
packed as binary by default, ``--item-format``), DPLR rank 3, k = 16.
Offered rates step up until the scorer stops keeping up (throughput below 95% of the
offered rate, a missing reply, or a p99 latency over a second: a growing backlog); the
last rate it kept up with is the maximum sustained rate. Then latency is measured at
half that rate (and at any ``--latency-rates``). Every rate runs on a fresh broker and
scorer deployment (``measure``), after a short warm-up.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel

from model_zoo.bundle import save_bundle
from model_zoo.registry import build_model
from rayjobs.bench import write_results
from rayjobs.bench_scoring import grid_schema
from serve_app.config import ModelConfig, ScorerArgs
from streaming.admin import create_topics
from streaming.broker import start_broker
from streaming.kafka_config import KafkaClientConfig, TopicNames
from streaming.producer import (
    AuctionTemplate,
    LoadConfig,
    LoadReport,
    run_load,
    synthetic_templates,
)

BACKLOG_P99_MS = 1000.0
WARM_UP_RATE = 200.0
WARM_UP_SECONDS = 3.0
APP_NAME = "rankstream"


class RatePoint(BaseModel):
    offered: float
    seconds: float
    report: LoadReport

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


def deploy_scorer(bundle: Path, kafka: KafkaClientConfig, replicas: int, cache_size: int) -> None:
    from ray import serve

    from serve_app.app import build_app

    args = ScorerArgs(
        model=ModelConfig(bundle=str(bundle)), kafka=kafka, num_replicas=replicas, context_cache_size=cache_size
    )
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")


def offer(
    kafka: KafkaClientConfig, templates: list[AuctionTemplate], rate: float, seconds: float, linger_ms: int,
    label: str = "offered",
) -> RatePoint:
    count = max(1, int(rate * seconds))
    load = LoadConfig(count=count, rate=rate, reply_timeout_s=15.0, progress=False, linger_ms=linger_ms)
    report = run_load(kafka, templates, load)
    point = RatePoint(offered=rate, seconds=seconds, report=report)
    latency = report.latency_ms
    print(
        f"  {label} {rate:6.0f}/s: throughput {report.throughput:7.0f}/s, missing {report.missing}, "
        f"latency ms p50 {latency.p50:7.2f} p99 {latency.p99:8.2f} max {latency.max:8.2f}"
        + ("" if point.kept_up else "  <- not kept up")
    )
    return point


def measure(args: argparse.Namespace, work: Path, bundle: Path, templates: list[AuctionTemplate], rate: float) -> RatePoint:
    """One rate on a fresh broker and a fresh scorer deployment: the embedded broker's
    in-memory log costs more CPU per request as it grows (see docs/protocol.md), so a
    step on a long-running broker would measure the previous steps too."""
    from ray import serve

    with start_broker(state_dir=Path(tempfile.mkdtemp(prefix="broker-", dir=work))) as broker:
        kafka = KafkaClientConfig(bootstrap_servers=broker.bootstrap_servers)
        create_topics(kafka, TopicNames(), partitions=args.partitions)
        deploy_scorer(bundle, kafka, args.replicas, args.context_cache_size)
        try:
            # replicas assigned, caches filled; also shows the latency floor of an unloaded stack
            offer(kafka, templates, WARM_UP_RATE, WARM_UP_SECONDS, args.linger_ms, label="warm-up")
            return offer(kafka, templates, rate, args.seconds, args.linger_ms)
        finally:
            serve.delete(APP_NAME)  # the Kafka loops commit and close while their broker is up


def run(args: argparse.Namespace) -> StreamBenchmark:
    import ray
    from ray import serve

    torch.manual_seed(args.seed)
    schema = grid_schema(args.context_fields + args.item_fields, args.context_fields, args.vocab_size)
    work = Path(tempfile.mkdtemp(prefix="rankstream-bench-stream-"))
    bundle = save_bundle(work / "bundle", build_model(schema, "dplr_fwfm", args.dim, rank=args.rank))
    templates = synthetic_templates(schema, args.distinct, args.items, item_format=args.item_format, seed=args.seed)
    print(f"{args.replicas} scorer replica(s) on a local Ray; each rate on a fresh broker and deployment")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
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
        print("latency:")
        latency = [measure(args, work, bundle, templates, rate) for rate in latency_rates]
    finally:
        serve.shutdown()
        ray.shutdown()
    return StreamBenchmark(
        replicas=args.replicas, partitions=args.partitions, items_per_auction=args.items, item_format=args.item_format,
        linger_ms=args.linger_ms, context_fields=args.context_fields, item_fields=args.item_fields, rank=args.rank,
        dim=args.dim, steps=steps, max_sustained_rate=sustained, latency=latency,
    )  # fmt: skip


def plot(result: StreamBenchmark, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(result.steps + result.latency, key=lambda p: p.offered)
    offered = [p.offered for p in points]
    figure, (throughput_axis, latency_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
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
    for axis in (throughput_axis, latency_axis):
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def handle(args: argparse.Namespace) -> int:
    result = run(args)
    print(f"max sustained rate {result.max_sustained_rate:.0f} auctions/s "
          f"({result.max_sustained_rate * args.items:,.0f} item scores/s)")
    write_results(args.json, result.model_dump_json(indent=2) + "\n", lambda path: plot(result, path))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("stream", help="Kafka -> Serve -> Kafka: max sustained rate and latency")
    parser.add_argument("--json", default="bench-results/stream.json", help="output JSON (the plot goes beside it)")
    parser.add_argument("--rates", type=float, nargs="+", default=[500, 1000, 1500, 2000, 2500, 3000, 4000])
    parser.add_argument("--latency-rates", type=float, nargs="*", default=[1000], help="also measure latency here")
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate step")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--item-format", choices=["rows", "columns", "packed"], default="packed",
                        help="how auctions carry items (docs/protocol.md)")
    parser.add_argument("--context-fields", type=int, default=20)
    parser.add_argument("--item-fields", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=3)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--distinct", type=int, default=5000, help="distinct auctions built, then cycled")
    parser.add_argument("--context-cache-size", type=int, default=10_000)
    parser.add_argument("--linger-ms", type=int, default=5,
                        help="the load generator's producer linger: the ad server's batching of auction messages")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=handle)
