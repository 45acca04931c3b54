"""``rankstream synth``: a dataset drawn from a planted FwFM in the ``prepare`` layout,
with the planted parameters and the oracle's metrics (docs/data.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from model_zoo.data.splits import DEFAULT_FRACTIONS, parse_fractions
from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.schema import Task
from model_zoo.synthetic import PlantedConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synth", help="planted-model data in the prepare layout")
    parser.add_argument("--structure", choices=["dplr", "sparse", "dense"], default="dplr",
                        help="the planted interaction matrix R")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context-fields", type=int, default=6)
    parser.add_argument("--item-fields", type=int, default=6)
    parser.add_argument("--multi-fields", type=int, default=0, help="how many item fields are multi-valued")
    parser.add_argument("--vocab-size", type=int, default=200, help="indices per field, the 2 reserved ones included")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--rank", type=int, default=2, help="rank of R for --structure dplr")
    parser.add_argument("--task", choices=[t.value for t in Task], default=Task.binary.value)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", type=parse_fractions, default=DEFAULT_FRACTIONS)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    if args.multi_fields > args.item_fields:
        raise ValueError("--multi-fields cannot exceed --item-fields")
    planted = PlantedConfig(
        context_fields=args.context_fields,
        item_fields=args.item_fields,
        multi_fields=args.multi_fields,
        vocab_size=args.vocab_size,
        dim=args.dim,
        structure=args.structure,
        rank=args.rank,
        task=Task(args.task),
        seed=args.seed,
    )
    config = SynthConfig(
        planted=planted, rows=args.rows, split=args.split, overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )  # fmt: skip
    stats = write_synthetic(args.out, config)
    rows = stats["rows"]
    print(f"wrote {args.out}: " + ", ".join(f"{split} {count:,}" for split, count in rows.items()) + " rows")
    for split, metrics in stats["oracle"].items():
        print(f"  oracle {split}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return 0
