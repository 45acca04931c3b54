"""``rankstream bench …``: benchmarks that write JSON and a plot."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (JSON + PNG)")
    kinds = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    from rayjobs.bench_scoring import register as register_scoring

    register_scoring(kinds)
