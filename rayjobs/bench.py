"""``rankstream bench …``: benchmarks that write JSON and a plot."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (JSON + PNG)")
    kinds = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    from rayjobs.bench_scoring import register as register_scoring

    register_scoring(kinds)
    from rayjobs.bench_stream import register as register_stream

    register_stream(kinds)
    from rayjobs.bench_train import register as register_train

    register_train(kinds)
    from rayjobs.bench_mf import register as register_mf

    register_mf(kinds)


def write_results(json_path: str | Path, text: str, plot: Callable[[Path], None]) -> Path:
    """Write a benchmark's JSON and its plot beside it (same name, .png); returns the JSON path."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    plot_path = path.with_suffix(".png")
    plot(plot_path)
    print(f"wrote {path} and {plot_path}")
    return path
