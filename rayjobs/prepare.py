"""``rankstream prepare``: raw Criteo / Avazu / MovieLens-1M / any CSV -> parquet splits,
schema.json, vocab/ and stats.json (docs/data.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from model_zoo.data.avazu import AvazuSource
from model_zoo.data.criteo import CriteoSource
from model_zoo.data.csv_generic import CsvConfig, CsvSource, config_from_flags
from model_zoo.data.csv_stream import check_inputs, read_header
from model_zoo.data.movielens import MovieLensSource
from model_zoo.data.prepare import PrepareConfig, prepare_dataset
from model_zoo.data.source import RawSource
from model_zoo.data.splits import DEFAULT_FRACTIONS, parse_fractions
from model_zoo.schema import Task

DATASETS = ("criteo", "avazu", "movielens1m", "csv")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prepare", help="raw data -> parquet splits + schema + vocabulary")
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="input files (movielens1m: its directory or its three .dat files)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--min-count", type=int, default=10, help="rarer training values map to the rare index")
    parser.add_argument("--split", type=parse_fractions, default=DEFAULT_FRACTIONS, help="train,valid,test fractions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context-fields", nargs="+", metavar="FIELD",
                        help="override the default context fields (commas or spaces); every other field is an item field")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no-progress", action="store_true")
    csv = parser.add_argument_group("csv", "for --dataset csv: a YAML config, or flags for a file with a header")
    csv.add_argument("--config", type=Path, help="YAML column config (see docs/data.md)")
    csv.add_argument("--label", help="label column")
    csv.add_argument("--task", choices=[t.value for t in Task], default=Task.binary.value)
    csv.add_argument("--item-fields", nargs="+", metavar="FIELD", help="default: every other column")
    csv.add_argument("--multi-fields", nargs="+", metavar="FIELD", default=[], help="multi-valued columns")
    csv.add_argument("--multi-separator", default="|")
    csv.add_argument("--log-square-fields", nargs="+", metavar="FIELD", default=[],
                     help="integer columns binned as floor(ln(x)^2)")
    csv.add_argument("--delimiter", default=",")
    parser.set_defaults(func=run_prepare)


def names(values: list[str] | None) -> list[str]:
    """Field names given with spaces, commas or both."""
    return [name for value in values or [] for name in value.split(",") if name]


def build_source(args: argparse.Namespace) -> RawSource:
    if args.dataset == "criteo":
        source: RawSource = CriteoSource(args.input)
    elif args.dataset == "avazu":
        source = AvazuSource(args.input)
    elif args.dataset == "movielens1m":
        source = MovieLensSource(args.input)
    else:
        source = CsvSource(args.input, csv_config(args))
    if args.context_fields:
        source.set_context_fields(names(args.context_fields))
    return source


def csv_config(args: argparse.Namespace) -> CsvConfig:
    if args.config is not None:
        return CsvConfig.from_yaml(args.config)
    if not args.label:
        raise ValueError("--dataset csv needs --config or --label and --context-fields")
    first = check_inputs(args.input)[0]
    return config_from_flags(
        header=read_header(first, args.delimiter),
        label=args.label,
        context_fields=names(args.context_fields),
        item_fields=names(args.item_fields),
        multi_fields=names(args.multi_fields),
        multi_separator=args.multi_separator,
        log_square_fields=names(args.log_square_fields),
        delimiter=args.delimiter,
        task=Task(args.task),
    )


def run_prepare(args: argparse.Namespace) -> int:
    source = build_source(args)
    config = PrepareConfig(
        min_count=args.min_count,
        split=args.split,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    stats = prepare_dataset(source, args.out, config)
    print_summary(args.out, stats)
    return 0


def print_summary(out: Path, stats: dict) -> None:
    rows = stats["rows"]
    print(f"wrote {out}: " + ", ".join(f"{split} {count:,}" for split, count in rows.items()) + " rows")
    print(f"  {sum(rows.values()):,} rows at {stats['rows_per_second']:,.0f} rows/s "
          f"(count pass {stats['seconds']['count_pass']:.1f} s, encode pass {stats['seconds']['encode_pass']:.1f} s)")
    print(f"  {len(stats['vocab_size'])} fields, vocabulary sizes {sum(stats['vocab_size'].values()):,} in total; "
          f"label mean (train) {stats['label_mean']['train']}")
    print("  mean rare rate " + ", ".join(f"{s} {r:.4f}" for s, r in stats["mean_rare_rate"].items())
          + "; mean missing rate " + ", ".join(f"{s} {r:.4f}" for s, r in stats["mean_missing_rate"].items()))
    malformed = stats["malformed"]
    print(f"  malformed rows skipped: {malformed['total']:,}"
          + (f" {malformed['by_reason']}" if malformed["total"] else ""))


if __name__ == "__main__":
    from rayjobs.cli import run_module

    run_module(["prepare"])
