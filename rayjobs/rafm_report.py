"""``rankstream experiment rafm --data DIR``: Rank-Aware FM against FMs of fixed rank on a
prepared rating dataset (the MovieLens-1M sample): model size, per-item scoring cost with
a cached context, and test accuracy.

Models: an FM at every rank of ``--ranks`` (the largest is the FM RaFM is compared with)
and RaFM with those ranks and ``--thresholds`` (levels from training counts). Scoring
cost: one context encoded once, then every distinct test item scored against it
(``encode_context`` + ``score_items``, one thread, median of ``--repeats``), divided by
the number of items; and the embedding entries each item's score reads,
k_L · |item features| for an FM, Σ_l k_l · |item features at level ≥ l| for RaFM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from model_zoo.batch import FeatureBatch
from model_zoo.data.layout import load_schema
from model_zoo.data.reader import load_split
from model_zoo.metrics import constant_baseline
from model_zoo.models.base import RankingModel
from model_zoo.models.rafm import RaFM
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema
from model_zoo.training import TrainConfig, evaluate, fit_in_memory, minibatches
from rayjobs.bench import write_results
from rayjobs.options import FlatCommand, command


class RafmRecord(BaseModel):
    model: str
    parameters: int  # in use: RaFM counts k_l per feature at level ≥ l (see RaFM.effective_parameters)
    stored_parameters: int
    test: dict[str, float]
    best_epoch: int
    train_seconds: float
    scoring_us_per_item: float  # median, cached context
    scoring_us_per_item_min: float
    scoring_us_per_item_max: float
    entries_per_item: float  # embedding entries read per item score (mean over the scored items)


def feature_counts(schema: FeatureSchema, batch: FeatureBatch) -> np.ndarray:
    """(total vocabulary,) how often each feature occurs in ``batch`` (bag values included)."""
    counts = np.zeros(schema.total_vocab, dtype=np.int64)
    for column, name in enumerate(batch.single_fields):
        np.add.at(counts, schema.offsets[schema.index[name]] + batch.single[:, column].numpy(), 1)
    for name, bag in zip(batch.bag_fields, batch.bags):
        np.add.at(counts, schema.offsets[schema.index[name]] + bag.values[bag.weights > 0].numpy(), 1)
    return counts


def item_feature_rows(schema: FeatureSchema, items: FeatureBatch) -> list[np.ndarray]:
    """Per item row, the global rows of its features (bag values included)."""
    rows = [schema.offsets[schema.index[n]] + items.single[:, c].numpy() for c, n in enumerate(items.single_fields)]
    per_item = [list(r) for r in zip(*rows)] if rows else [[] for _ in range(len(items))]
    for name, bag in zip(items.bag_fields, items.bags):
        offset = schema.offsets[schema.index[name]]
        for n, (values, weights) in enumerate(zip(bag.values.numpy(), bag.weights.numpy())):
            per_item[n].extend(offset + values[weights > 0])
    return [np.asarray(r, dtype=np.int64) for r in per_item]


def entries_per_item(model: RankingModel, feature_rows: list[np.ndarray]) -> float:
    if isinstance(model, RaFM):
        levels = model.feature_levels.numpy()
        return float(np.mean([sum(k * int((levels[r] >= l + 1).sum()) for l, k in enumerate(model.ranks)) for r in feature_rows]))
    return float(np.mean([model.dim * len(r) for r in feature_rows]))


def distinct_items(schema: FeatureSchema, test: FeatureBatch, limit: int) -> FeatureBatch:
    """The test split's distinct item rows (by the first item field), at most ``limit``."""
    items = test.select(schema, schema.item_fields)
    key = items.single[:, 0] if items.single_fields else items.bags[0].values[:, 0]
    _, first = np.unique(key.numpy(), return_index=True)
    return items.rows(torch.as_tensor(np.sort(first)[:limit]))


def time_scoring(model: RankingModel, context: FeatureBatch, items: FeatureBatch, repeats: int) -> list[float]:
    """µs per item of encode_context + score_items, per repeat (after warm-up)."""
    model.eval()
    times = []
    with torch.inference_mode():
        for repeat in range(repeats + 3):
            started = time.perf_counter()
            model.score_items(model.encode_context(context), items)
            if repeat >= 3:
                times.append((time.perf_counter() - started) * 1e6 / len(items))
    return times


def run(args: RafmReportJob) -> dict:
    torch.set_num_threads(1)
    schema = load_schema(args.data)
    train, valid, test = (load_split(args.data, split) for split in ("train", "valid", "test"))
    counts = feature_counts(schema, train)
    config = args.train
    items = distinct_items(schema, test, args.items)
    context = test.rows(slice(0, 1)).select(schema, schema.context_fields)
    feature_rows = item_feature_rows(schema, items)
    candidates: list[tuple[str, RankingModel]] = []
    for rank in args.ranks:
        torch.manual_seed(args.train.seed)
        candidates.append((f"fm k={rank}", build_model(schema, "fm", rank, sparse=True)))
    torch.manual_seed(args.train.seed)
    rafm = build_model(schema, "rafm", args.ranks[-1], ranks=args.ranks, thresholds=args.thresholds, sparse=True)
    rafm.set_feature_counts(counts)
    candidates.append((f"rafm k={'/'.join(map(str, args.ranks))}", rafm))
    records = []
    for name, model in candidates:
        started = time.perf_counter()
        result = fit_in_memory(model, config, train, valid)
        train_seconds = time.perf_counter() - started
        times = time_scoring(model, context, items, args.repeats)
        stored = sum(p.numel() for p in model.parameters())
        used = model.effective_parameters() + 1 if isinstance(model, RaFM) else stored
        records.append(
            RafmRecord(
                model=name, parameters=used, stored_parameters=stored,
                test=evaluate(model, minibatches(test, config.eval_batch_size)), best_epoch=result.best_epoch,
                train_seconds=train_seconds, scoring_us_per_item=statistics.median(times),
                scoring_us_per_item_min=min(times), scoring_us_per_item_max=max(times),
                entries_per_item=entries_per_item(model, feature_rows),
            )  # fmt: skip
        )
    levels = rafm.feature_levels.numpy()
    return {
        "data": str(args.data), "rows": {"train": len(train), "valid": len(valid), "test": len(test)},
        "ranks": args.ranks, "thresholds": args.thresholds, "train": config.model_dump(),
        "features_per_level": [int((levels == l + 1).sum()) for l in range(len(args.ranks))],
        "scored_items": len(items), "repeats": args.repeats,
        "constant_baseline": constant_baseline(schema.task, train.label.numpy(), test.label.numpy()),
        "records": [r.model_dump() for r in records],
    }  # fmt: skip


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [RafmRecord(**r) for r in report["records"]]
    metric = "rmse" if "rmse" in records[0].test else "auc"
    names = [r.model for r in records]
    panels = [
        ("parameters in use", [r.parameters for r in records]),
        ("µs per item (cached context, median)", [r.scoring_us_per_item for r in records]),
        ("embedding entries read per item", [r.entries_per_item for r in records]),
        (f"test {metric}", [r.test[metric] for r in records]),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for axis, (title, values) in zip(axes, panels):
        axis.bar(range(len(names)), values, color=["tab:blue"] * (len(names) - 1) + ["tab:orange"])
        axis.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        axis.set_title(title, fontsize=9)
        axis.grid(True, axis="y", alpha=0.3)
    if metric == "rmse":
        axes[-1].axhline(report["constant_baseline"]["rmse"], color="grey", linestyle="--", label="mean predictor")
        axes[-1].set_ylim(0.8 * min(panels[-1][1]), 1.05 * report["constant_baseline"]["rmse"])
        axes[-1].legend(fontsize=8)
    figure.suptitle(f"RaFM vs FM on {report['data']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def handle(args: RafmReportJob) -> int:
    if args.ranks != sorted(set(args.ranks)) or len(args.thresholds) != len(args.ranks) - 1:
        raise ValueError(f"--ranks must increase strictly and --thresholds give one count per rank boundary, got {args.ranks} / {args.thresholds}")
    if not (Path(args.data) / "schema.json").is_file():
        raise FileNotFoundError(f"no prepared dataset at {args.data} (schema.json missing); run `rankstream prepare` first")
    report = run(args)
    print(f"{report['data']}: features per level {report['features_per_level']}, {report['scored_items']} items scored; "
          f"mean predictor {report['constant_baseline']}")  # fmt: skip
    for r in report["records"]:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in r["test"].items())
        print(
            f"{r['model']:16s} parameters {r['parameters']:>9,d} (stored {r['stored_parameters']:,d}); "
            f"{r['scoring_us_per_item']:.2f} µs/item median (min {r['scoring_us_per_item_min']:.2f}, max {r['scoring_us_per_item_max']:.2f}); "
            f"{r['entries_per_item']:.1f} entries/item; test {metrics}; best epoch {r['best_epoch']}, trained in {r['train_seconds']:.1f} s"
        )
    write_results(args.json_path, json.dumps(report, indent=2) + "\n", lambda path: plot(report, path))
    return 0


class RafmReportJob(BaseModel):
    """`rankstream experiment rafm`: the levels compared and the training settings."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="a prepared dataset (rankstream prepare)")
    json_path: Path = Field(default=Path("bench-results/rafm.json"), description="output JSON (the plot goes beside it)")
    ranks: list[int] = Field(default=[4, 32], min_length=1, description="embedding size per level; each also an FM")
    thresholds: list[int] = Field(default=[100], description="training-count thresholds between levels")
    items: int = Field(default=2000, ge=1, description="distinct test items scored per timing")
    repeats: int = Field(default=30, ge=1)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=10, l2=0.0))


FLAGS = FlatCommand("Rafm", RafmReportJob, sections={"train": TrainConfig}, shortcuts={"json-path": "json"})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rafm", help="Rank-Aware FM vs FM: model size, per-item scoring cost, accuracy")
    command(parser, FLAGS, handle)
