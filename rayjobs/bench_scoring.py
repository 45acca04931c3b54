"""``rankstream bench scoring``: the paper's Figure 1 grid on one core.

40 fields, k = 16, one auction = encode the context once + score N items (rows of
item features); DPLR ranks 1–3 against the pruned FwFM with the same parameter count,
the full FwFM and FM, and tensorFM of orders {2} and {2, 3} at CP ranks 1–3 (all with
cached contexts), plus DPLR and tensorFM in catalog mode (items precomputed at load
time; per auction: encode the context + one matrix–vector product).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator
from tqdm import tqdm

from model_zoo.batch import FeatureBatch
from model_zoo.catalog import ItemCatalog
from model_zoo.models.base import RankingModel
from model_zoo.models.pruned_fwfm import PrunedFwFM
from model_zoo.registry import build_model
from model_zoo.runtime import retain_freed_memory
from model_zoo.schema import FeatureSchema, FieldSpec, Role
from rayjobs.bench import write_results
from rayjobs.options import FlatCommand, OrderSet, command, order_sets

MODELS = ("dplr_fwfm", "dplr_catalog", "tensorfm", "tensorfm_catalog", "pruned_fwfm", "fwfm", "fm")
RANKED = {"dplr_fwfm", "dplr_catalog", "tensorfm", "tensorfm_catalog", "pruned_fwfm"}
ORDERED = {"tensorfm", "tensorfm_catalog"}
FEATURE_ROW_SERIES = {"dplr_catalog": "dplr_fwfm", "tensorfm_catalog": "tensorfm"}  # each catalog mode's model


class ScoringRecord(BaseModel):
    model: str
    items: int
    context_fields: int
    rank: int | None
    orders: list[int] | None = None  # tensorFM's interaction orders, each at CP rank `rank`
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @property
    def label(self) -> str:
        orders = "" if self.orders is None else f" d={{{','.join(map(str, self.orders))}}}"
        return self.model + orders + ("" if self.rank is None else f" ρ={self.rank}")


def grid_schema(num_fields: int, context_fields: int, vocab_size: int) -> FeatureSchema:
    return FeatureSchema(
        fields=tuple(
            FieldSpec(name=f"f{i}", role=Role.context if i < context_fields else Role.item, vocab_size=vocab_size)
            for i in range(num_fields)
        )
    )


def make_model(
    kind: str, schema: FeatureSchema, dim: int, rank: int | None, seed: int, orders: list[int] | None = None
) -> RankingModel:
    torch.manual_seed(seed)
    if kind in ("dplr_fwfm", "dplr_catalog"):
        model = build_model(schema, "dplr_fwfm", dim, rank=rank)
    elif kind in ORDERED:
        model = build_model(schema, "tensorfm", dim, orders=orders, cp_ranks=[rank] * len(orders))
    elif kind == "pruned_fwfm":
        full = build_model(schema, "fwfm", dim)
        with torch.no_grad():
            full.interaction_weights.normal_()  # a "trained" R with distinct magnitudes
        model = PrunedFwFM.from_fwfm(full, rank)
    else:
        model = build_model(schema, kind, dim)
    return model.eval()


def random_rows(schema: FeatureSchema, names: tuple[str, ...], rows: int, rng: np.random.Generator) -> FeatureBatch:
    columns = {n: rng.integers(0, schema.field(n).vocab_size, size=rows) for n in names}
    return FeatureBatch.from_columns(schema, columns)


def time_auction(run: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def bench_configuration(
    kind: str, items: int, context_fields: int, rank: int | None, orders: list[int] | None, *,
    num_fields: int, dim: int, vocab_size: int, warmup: int, repeats: int, seed: int,
) -> ScoringRecord:
    rng = np.random.default_rng(seed)
    schema = grid_schema(num_fields, context_fields, vocab_size)
    model = make_model(kind, schema, dim, rank, seed, orders)
    context = random_rows(schema, schema.context_fields, 1, rng)
    item_rows = random_rows(schema, schema.item_fields, items, rng)
    with torch.inference_mode():
        if kind.endswith("_catalog"):
            catalog = ItemCatalog(model, list(range(items)), item_rows)

            def run() -> object:
                return catalog.score_all(model.encode_context(context))
        else:

            def run() -> object:
                return model.score_items(model.encode_context(context), item_rows)

        times = time_auction(run, warmup, repeats)
    return ScoringRecord(
        model=kind, items=items, context_fields=context_fields, rank=rank, orders=orders,
        median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), repeats=repeats,
    )


class BenchScoringJob(BaseModel):
    """`rankstream bench scoring`: the grid (items × context fields × models) and its timing."""

    model_config = ConfigDict(extra="forbid")

    json_path: Path = Field(default=Path("bench-results/scoring.json"), description="output JSON (the plot goes beside it)")
    items: list[PositiveInt] = Field(default=[5000, 10000], min_length=1, description="items per auction")
    context_fields: list[PositiveInt] = Field(default=[10, 15, 20, 25, 30], min_length=1, description="of the --fields")
    ranks: list[PositiveInt] = Field(default=[1, 2, 3], min_length=1, description="DPLR ranks, pruned FwFM's matched ranks, tensorFM's CP ranks")
    tensorfm_orders: list[OrderSet] = Field(
        default=["2", "2+3"], min_length=1, description="tensorFM interaction-order sets, orders joined by + (each at every --ranks rank)"
    )
    models: list[Literal[MODELS]] = Field(  # type: ignore[valid-type]
        default=list(MODELS), min_length=1, description="the models timed (a _catalog one: items precomputed at load time)"
    )
    fields: int = Field(default=40, ge=2, description="context and item fields in all")
    dim: int = Field(default=16, ge=1, description="embedding size k")
    vocab_size: int = Field(default=1000, ge=1, description="values per field (the item gather is memory-bound: it matters)")
    warmup: NonNegativeInt = Field(default=5, description="untimed auctions per configuration")
    repeats: PositiveInt = Field(default=30, description="timed auctions per configuration")
    seed: int = Field(default=0, description="of the models' weights and the feature rows")

    @model_validator(mode="after")
    def _items_have_fields(self) -> "BenchScoringJob":
        if max(self.context_fields) >= self.fields:
            raise ValueError("every --context-fields must be below --fields (the rest are the item fields)")
        return self


FLAGS = FlatCommand("BenchScoring", BenchScoringJob, shortcuts={"json-path": "json"})


def run_grid(args: BenchScoringJob) -> list[ScoringRecord]:
    torch.set_num_threads(1)  # the paper's setting: one core per scoring thread
    retain_freed_memory()  # as a serving process would: no page faults on per-auction temporaries
    # Grid point by grid point, every model at a point back to back: the ratios compare
    # timings taken seconds apart, not minutes (the machine's load drifts).
    configurations = [
        (kind, items, context, rank if kind in RANKED else None, orders)
        for items in args.items
        for context in args.context_fields
        for kind in args.models
        for rank in (args.ranks if kind in RANKED else [None])
        for orders in (order_sets(args.tensorfm_orders) if kind in ORDERED else [None])
    ]
    records = []
    for kind, items, context, rank, orders in tqdm(configurations, desc="scoring grid", unit="config"):
        records.append(
            bench_configuration(
                kind, items, context, rank, orders, num_fields=args.fields, dim=args.dim,
                vocab_size=args.vocab_size, warmup=args.warmup, repeats=args.repeats, seed=args.seed,
            )
        )
    return records


def plot(records: list[ScoringRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per model, one line style per rank, one marker per order set: 23 series stay apart.
    colours = {kind: plt.get_cmap("tab10")(i) for i, kind in enumerate(MODELS)}
    styles = {None: "-", 1: "-", 2: "--", 3: ":"}
    item_counts = sorted({r.items for r in records})
    figure, axes = plt.subplots(1, len(item_counts), figsize=(6 * len(item_counts), 4.5), squeeze=False)
    for axis, items in zip(axes[0], item_counts):
        series: dict[str, list[ScoringRecord]] = {}
        for record in records:
            if record.items == items:
                series.setdefault(record.label, []).append(record)
        for label, points in sorted(series.items()):
            points.sort(key=lambda r: r.context_fields)
            x = [p.context_fields for p in points]
            first = points[0]
            colour = colours.get(first.model)
            axis.plot(
                x, [p.median_ms for p in points], label=label, color=colour,
                linestyle=styles.get(first.rank, "-."), marker="s" if first.orders and len(first.orders) > 1 else "o",
            )
            axis.fill_between(x, [p.min_ms for p in points], [p.max_ms for p in points], color=colour, alpha=0.05)
        axis.set_yscale("log")
        axis.set_title(f"{items} items per auction")
        axis.set_xlabel("context fields (of 40)")
        axis.set_ylabel("ms per auction (median, min–max band)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def handle(args: BenchScoringJob) -> int:
    records = run_grid(args)
    for r in records:
        print(
            f"{r.label:30s} items {r.items:6d} context {r.context_fields:3d}: median {r.median_ms:8.3f} ms "
            f"({1000 * r.median_ms / r.items:.3f} µs per item; min {r.min_ms:.3f}, max {r.max_ms:.3f})"
        )
    for line in speed_ratios(records):
        print(line)
    write_results(args.json_path, json.dumps([r.model_dump() for r in records], indent=2) + "\n", lambda path: plot(records, path))
    return 0


def speed_ratios(records: list[ScoringRecord]) -> list[str]:
    """Median-time ratios measured in the same run: each pruned FwFM against the full
    FwFM, and each catalog series against its feature-row series, per grid point."""
    def key(model: str, r: ScoringRecord, rank: int | None) -> tuple:
        return model, rank, None if r.orders is None else tuple(r.orders), r.items, r.context_fields

    by_key = {key(r.model, r, r.rank): r for r in records}
    lines = []
    for r in records:
        if r.model == "pruned_fwfm":
            baseline = by_key.get(key("fwfm", r, None))
        elif r.model in FEATURE_ROW_SERIES:
            baseline = by_key.get(key(FEATURE_ROW_SERIES[r.model], r, r.rank))
        else:
            continue
        if baseline is not None:
            lines.append(
                f"ratio {r.label} / {baseline.label}, items {r.items}, context {r.context_fields}: "
                f"{r.median_ms / baseline.median_ms:.3f}"
            )
    return lines


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("scoring", help="per-auction scoring latency grid (the paper's Figure 1)")
    command(parser, FLAGS, handle)
