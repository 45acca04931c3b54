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
from typing import Any

from streaming.kafka_config import add_kafka_arguments, kafka_config_from_args, topic_names_from_args
from streaming.producer import (
    AuctionTemplate,
    LoadConfig,
    LoadReport,
    dataset_templates,
    run_load,
    synthetic_templates,
)


def build_templates(args: argparse.Namespace) -> list[AuctionTemplate]:
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


def handle(args: argparse.Namespace) -> int:
    config = kafka_config_from_args(args)
    templates = build_templates(args)
    load = LoadConfig(
        count=args.count,
        rate=args.rate or None,
        reply_timeout_s=args.reply_timeout,
        reply_topic=args.reply_to,
        progress=not args.no_progress,
    )
    report = run_load(config, templates, load, topic_names_from_args(args))
    print_report(report)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.model_dump(), indent=2) + "\n")
        print(f"wrote {path}")
    return 0 if report.missing == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("produce", help="send auctions through Kafka, report latency and throughput")
    source = parser.add_argument_group("auctions")
    source.add_argument("--dataset", default=None, help="prepared dataset directory (its test split)")
    source.add_argument("--bundle", default=None, help="model bundle: random auctions over its schema and vocabulary")
    source.add_argument("--count", type=int, default=1000, help="auctions to send")
    source.add_argument("--items", type=int, default=100, help="items per auction")
    source.add_argument("--distinct", type=int, default=1000, help="distinct auctions built, then cycled")
    source.add_argument("--item-format", choices=["rows", "columns", "packed"], default="rows",
                        help="items as a list of {item_id, features} maps, as columns (cheaper to decode), or as "
                             "columns with integer columns packed as binary (cheapest)")
    source.add_argument("--context-fields", type=int, default=20, help="synthetic: context fields")
    source.add_argument("--item-fields", type=int, default=20, help="synthetic: item fields")
    source.add_argument("--multi-fields", type=int, default=0, help="synthetic: multi-valued item fields")
    source.add_argument("--vocab-size", type=int, default=1000, help="synthetic: vocabulary per field")
    source.add_argument("--seed", type=int, default=0)
    source.add_argument("--model", default=None, help="bundle name to ask for (default: the scorer's)")
    source.add_argument("--top-k", type=int, default=None, help="ask for the top-K item ids")
    source.add_argument("--reply-to", default=None, help="reply topic (default: the scores topic; the scorer must allow it: serve up --reply-to-pattern)")
    run = parser.add_argument_group("run")
    run.add_argument("--rate", type=float, default=0.0, help="auctions per second (0: as fast as possible)")
    run.add_argument("--reply-timeout", type=float, default=10.0, help="seconds without a reply before giving up")
    run.add_argument("--json", default=None, help="write the report here")
    run.add_argument("--no-progress", action="store_true")
    add_kafka_arguments(parser)
    parser.set_defaults(func=handle)
