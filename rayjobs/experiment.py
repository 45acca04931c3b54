"""``rankstream experiment NAME``: reproducible experiment protocols. Each experiment
lives in its own module exposing ``register(subparsers)``, like the CLI's commands."""

from __future__ import annotations

import argparse
import importlib

# One module per experiment; the order is the order of `rankstream experiment --help`.
EXPERIMENT_MODULES: list[str] = [
    "rayjobs.scaling",
    "rayjobs.table1",
    "rayjobs.baselines",
    "rayjobs.analyze",
    "rayjobs.rafm_report",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="reproduce the papers' tables on a prepared dataset")
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for module_name in EXPERIMENT_MODULES:
        importlib.import_module(module_name).register(experiments)
