"""``rankstream produce``: send auctions to the scorer through Kafka and report
throughput, end-to-end latency percentiles, missing/duplicate replies and dead letters.

Sources: ``--dataset DIR`` (a prepared dataset's test split, raw values from its
vocabulary), ``--bundle DIR`` (random auctions over a model bundle's schema and
vocabulary), or the planted synthetic generator (default; flags as ``rankstream
synth``; raw values are the indices, for bundles trained without a vocabulary).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rayjobs.options import FlatCommand, command
from streaming.kafka_config import KAFKA_SECTIONS, TOPIC_FLAGS, KafkaFlags, TopicNames
from streaming.producer import (
    AuctionTemplate,
    LoadConfig,
    LoadReport,
    dataset_templates,
    run_load,
    synthetic_templates,
)


class ProduceJob(BaseModel):
    """`rankstream produce`: where the auctions come from, how fast they go, and the Kafka client."""

    model_config = ConfigDict(extra="forbid")

    dataset: Path | None = Field(default=None, description="prepared dataset directory (its test split)")
    bundle: Path | None = Field(default=None, description="model bundle: random auctions over its schema and vocabulary")
    count: int = Field(default=1000, ge=1, description="auctions to send")
    items: int = Field(default=100, ge=1, description="items per auction")
    distinct: int = Field(default=1000, ge=1, description="distinct auctions built, then cycled")
    item_format: Literal["rows", "columns", "packed"] = Field(
        default="rows",
        description="items as a list of {item_id, features} maps, as columns (cheaper to decode), or as "
        "columns with integer columns packed as binary (cheapest)",
    )
    context_fields: int = Field(default=20, ge=1, description="synthetic: context fields")
    item_fields: int = Field(default=20, ge=1, description="synthetic: item fields")
    multi_fields: int = Field(default=0, ge=0, description="synthetic: multi-valued item fields")
    vocab_size: int = Field(default=1000, description="synthetic: vocabulary per field")
    seed: int = 0
    model: str | None = Field(default=None, description="bundle name to ask for (default: the scorer's)")
    top_k: int | None = Field(default=None, ge=1, description="ask for the top-K item ids")
    reply_to: str | None = Field(
        default=None,
        description="reply topic (default: the scores topic; the scorer must allow it: serve up --reply-to-pattern)",
    )
    rate: float = Field(default=0.0, ge=0, description="auctions per second (0: as fast as possible)")
    reply_timeout: float = Field(default=10.0, gt=0, description="seconds without a reply before giving up")
    json_path: Path | None = Field(default=None, description="write the report here")
    progress: bool = True
    kafka: KafkaFlags = KafkaFlags()
    topics: TopicNames = TopicNames()


FLAGS = FlatCommand("Produce", ProduceJob, sections=KAFKA_SECTIONS, renames=TOPIC_FLAGS, shortcuts={"json-path": "json"})


def build_templates(args: ProduceJob) -> list[AuctionTemplate]:
    options: dict[str, Any] = {"model": args.model, "top_k": args.top_k, "reply_to": args.reply_to}
    distinct = min(args.count, args.distinct)
    if args.dataset is not None:
        return dataset_templates(args.dataset, distinct, args.items, item_format=args.item_format, **options)
    if args.bundle is not None:
        from model_zoo.schema import FeatureSchema
        from model_zoo.vocab import Vocabulary

        schema = FeatureSchema.load(Path(args.bundle) / "schema.json")
        vocab_dir = Path(args.bundle) / "vocab"
        vocabulary = Vocabulary.load(vocab_dir) if vocab_dir.is_dir() else None
        return synthetic_templates(
            schema, distinct, args.items, vocabulary=vocabulary, item_format=args.item_format, seed=args.seed, **options
        )
    from model_zoo.synthetic import PlantedConfig, planted_model

    planted = planted_model(
        PlantedConfig(
            context_fields=args.context_fields,
            item_fields=args.item_fields,
            multi_fields=args.multi_fields,
            vocab_size=args.vocab_size,
            seed=args.seed,
        )
    )
    return synthetic_templates(
        planted.schema,
        distinct,
        args.items,
        value_probabilities=planted.value_probabilities,
        item_format=args.item_format,
        seed=args.seed,
        **options,
    )


def print_report(report: LoadReport) -> None:
    latency = report.latency_ms
    rate = "as fast as possible" if report.target_rate is None else f"target {report.target_rate:,.0f}/s"
    print(f"sent {report.sent:,} auctions ({report.items_sent:,} items) in {report.send_seconds:.2f} s "
          f"= {report.send_rate:,.0f}/s ({rate})")
    print(f"scored {report.scored:,}, dead-lettered {report.dead_lettered:,}, missing {report.missing:,}, "
          f"duplicate replies {report.duplicates:,}, unexpected {report.unexpected:,}")
    print(f"throughput {report.throughput:,.0f} auctions/s, {report.item_scores_per_s:,.0f} item scores/s "
          f"over {report.duration_s:.2f} s")
    if latency.count:
        print(f"end-to-end latency ms: p50 {latency.p50:.2f}  p95 {latency.p95:.2f}  p99 {latency.p99:.2f}  "
              f"max {latency.max:.2f}  mean {latency.mean:.2f}")
    if report.dlq_reasons:
        print("dead-letter reasons: " + ", ".join(f"{r} {n}" for r, n in sorted(report.dlq_reasons.items())))
    if report.model_versions:
        print("model versions: " + ", ".join(f"{v} {n}" for v, n in report.model_versions.items()))


def handle(args: ProduceJob) -> int:
    config = args.kafka.client_config()
    templates = build_templates(args)
    load = LoadConfig(
        count=args.count,
        rate=args.rate or None,
        reply_timeout_s=args.reply_timeout,
        reply_topic=args.reply_to,
        progress=args.progress,
    )
    report = run_load(config, templates, load, args.topics)
    print_report(report)
    if args.json_path is not None:
        path = args.json_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.model_dump(), indent=2) + "\n")
        print(f"wrote {path}")
    return 0 if report.missing == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("produce", help="send auctions through Kafka, report latency and throughput")
    command(parser, FLAGS, handle)
