"""``rankstream train-gibbs``: a Bayesian FM by Gibbs sampling (``model_zoo.bayes_fm``),
written as an ordinary FM bundle that ``serve up`` serves.

The sampler sweeps the whole training split in one process: a Markov chain does not
split over workers the way SGD steps do, and a sweep over the MovieLens sample takes
a fraction of a second. Validation and test metrics are those of the exported FM.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from model_zoo.bayes_fm import GibbsConfig, gibbs_fm, to_fm
from model_zoo.bundle import save_bundle
from model_zoo.data.layout import VOCAB_DIR
from model_zoo.models.fm import FM
from model_zoo.training import evaluate, minibatches
from rayjobs.options import FlatCommand, command
from rayjobs.tune import Splits, load_splits


class GibbsTrainJob(BaseModel):
    """`rankstream train-gibbs`: its flags are these fields and GibbsConfig's."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="a `rankstream prepare` or `rankstream synth` output")
    out: Path = Field(description="the bundle directory")
    gibbs: GibbsConfig = Field(default_factory=GibbsConfig)
    progress: bool = Field(default=True, description="a progress bar over the sweeps")


FLAGS = FlatCommand("TrainGibbs", GibbsTrainJob, sections={"gibbs": GibbsConfig})


def fit_gibbs_fm(splits: Splits, config: GibbsConfig, progress: bool = False) -> tuple[FM, dict[str, Any]]:
    """The exported FM and its metrics: valid and test, samples kept, dim, seconds."""
    started = time.perf_counter()
    with tqdm(total=config.iterations, desc="gibbs sweeps", disable=not progress) as bar:
        posterior = gibbs_fm(splits.schema, splits.train, config, progress=lambda _: bar.update())
    model = to_fm(splits.schema, posterior, config.export_dim)
    metrics = {
        split: evaluate(model, minibatches(getattr(splits, split), 8192)) for split in ("valid", "test")
    } | {"samples": int(posterior.samples.shape[0]), "dim": model.dim, "seconds": time.perf_counter() - started}
    return model, metrics


def train_gibbs(job: GibbsTrainJob) -> Path:
    config = job.gibbs
    model, metrics = fit_gibbs_fm(load_splits(job.data), config, job.progress)
    vocabulary = job.data / VOCAB_DIR
    return save_bundle(
        job.out, model, vocabulary_dir=vocabulary if vocabulary.is_dir() else None, metrics=metrics,
        train_config={"data": str(job.data), "fit": "gibbs", "gibbs": config.model_dump()},
    )  # fmt: skip


def handle(job: GibbsTrainJob) -> int:
    path = train_gibbs(job)
    metrics = json.loads((path / "metrics.json").read_text())
    short = {split: ", ".join(f"{k} {v:.4f}" for k, v in metrics[split].items()) for split in ("valid", "test")}
    print(f"wrote bundle {path} (an FM of dim {metrics['dim']}, {metrics['samples']} samples): valid {short['valid']}, test {short['test']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train-gibbs", help="a Bayesian FM by Gibbs sampling, written as an FM bundle")
    command(parser, FLAGS, handle)


if __name__ == "__main__":
    from rayjobs.cli import run_module

    run_module(["train-gibbs"])
