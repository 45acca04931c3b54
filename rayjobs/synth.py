"""``rankstream synth``: a dataset drawn from a planted FwFM in the ``prepare`` layout,
with the planted parameters and the oracle's metrics (docs/data.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ConfigDict, Field, model_validator

from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.synthetic import PlantedConfig
from rayjobs.options import FlatCommand, command


class SynthJob(SynthConfig):
    """`rankstream synth`: the dataset's size and splits, its planted model, where it goes."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="output directory")

    @model_validator(mode="after")
    def _multi_within_items(self) -> "SynthJob":
        if self.planted.multi_fields > self.planted.item_fields:
            raise ValueError("--multi-fields cannot exceed --item-fields")
        return self


# The write sizes (chunk, row group, file) are the writer's, not the dataset's.
FLAGS = FlatCommand(
    "Synth", SynthJob, sections={"planted": PlantedConfig}, exclude=("chunk_rows", "row_group_rows", "file_rows")
)


def run_synth(args: SynthJob) -> int:
    stats = write_synthetic(args.out, args)
    rows = stats["rows"]
    print(f"wrote {args.out}: " + ", ".join(f"{split} {count:,}" for split, count in rows.items()) + " rows")
    for split, metrics in stats["oracle"].items():
        print(f"  oracle {split}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synth", help="planted-model data in the prepare layout")
    command(parser, FLAGS, run_synth)
