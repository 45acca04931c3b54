"""``rankstream bench mf``: training time and test RMSE of dynamically pruned MF
(model_zoo/mf.py) at several pruning rates, against dense training of the same model.

Every configuration is trained ``--repeats`` times, round-robin (dense, rate 0.1, …,
dense, …) so that load from other processes spreads over all of them; the speed-up is
dense / pruned on the median totals and on the "best" totals: the sum over epochs of
each epoch's fastest repeat (the repeats do identical work, so this drops most of the
time other processes took; on a shared machine it is the figure to quote). Training is
seeded, so the RMSE is the same in every repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from tqdm import tqdm

from model_zoo.mf import (
    CutoffRule,
    MFConfig,
    MFResult,
    RatingSplits,
    load_prepared_ratings,
    load_ratings_dat,
    planted_ratings,
    train_mf,
)
from rayjobs.bench import write_results
from rayjobs.options import FlatCommand, command

PAPER_SPEEDUP = (1.2, 1.65)
PAPER_MAX_ERROR_INCREASE = 0.2008


class MFRecord(BaseModel):
    rule: str  # "dense" or the cut-off rule
    pruning_rate: float
    test_rmse: float
    error_increase: float  # test RMSE relative to dense, minus 1
    median_seconds: float
    min_seconds: float
    max_seconds: float
    best_seconds: float  # Σ over epochs of the fastest repeat's epoch time
    speedup_median: float
    speedup_best: float
    work_fraction: float  # dimensions visited / dense
    final_mean_cutoff: float  # average c_ui over the last epoch
    threshold_p: float
    threshold_q: float


class BenchMFJob(BaseModel):
    """`rankstream bench mf`: the ratings (a dataset or planted), the pruning rates and rules
    measured, and the training settings every configuration shares."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(default=None, description="a prepared MovieLens directory, or a directory holding ratings.dat (or the file)")
    planted: bool = Field(default=False, description="use planted low-rank ratings instead of --data")
    planted_shape: list[PositiveInt] = Field(
        default=[4000, 2000, 8, 400_000], min_length=4, max_length=4, description="planted: users, items, rank, ratings"
    )
    planted_noise: float = Field(default=0.3, ge=0, description="planted: rating noise std")
    user_field: str = Field(default="user_id", description="a prepared dataset's user column")
    item_field: str = Field(default="movie_id", description="a prepared dataset's item column")
    json_path: Path = Field(default=Path("bench-results/mf.json"), description="output JSON (the plot goes beside it)")
    rates: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default=[0.1, 0.2, 0.3, 0.4, 0.5], min_length=1, description="pruning rates, each against dense training"
    )
    rules: list[CutoffRule] = Field(default=["count", "first_small"], min_length=1, description="cut-off rules")
    repeats: PositiveInt = Field(default=5, description="runs of each configuration, round-robin")
    # Each configuration sets its own pruning rate and cut-off rule.
    mf: MFConfig = MFConfig()

    @model_validator(mode="after")
    def _one_source(self) -> "BenchMFJob":
        if (self.data is None) == (not self.planted):
            raise ValueError("give exactly one of --data and --planted")
        return self


FLAGS = FlatCommand(
    "BenchMF", BenchMFJob, sections={"mf": MFConfig}, exclude=("pruning_rate", "cutoff_rule"), shortcuts={"json-path": "json"}
)


def load_data(args: BenchMFJob) -> tuple[RatingSplits, str]:
    if args.planted:
        users, items, rank, ratings = args.planted_shape
        splits = planted_ratings(users, items, rank, ratings, noise=args.planted_noise, seed=args.mf.seed)
        return splits, f"planted rank-{rank} MF, {users} users × {items} items, {ratings} ratings, noise {args.planted_noise}"
    path = args.data
    if (path / "schema.json").is_file():
        return load_prepared_ratings(path, args.user_field, args.item_field), f"prepared {path}"
    if path.is_file() or (path / "ratings.dat").is_file():
        return load_ratings_dat(path, seed=args.mf.seed), f"ratings.dat {path}"
    raise FileNotFoundError(f"{path} is neither a prepared dataset (schema.json) nor holds ratings.dat")


def run(args: BenchMFJob) -> dict:
    splits, description = load_data(args)
    base = args.mf
    configurations = [("dense", 0.0)] + [(rule, rate) for rule in args.rules for rate in args.rates if rate > 0]
    for rule in args.rules:  # compile the kernels outside the timings
        train_mf(splits, base.model_copy(update={"epochs": base.prune_after_epoch + 1, "pruning_rate": 0.1, "cutoff_rule": rule}))
    runs: dict[tuple[str, float], list[MFResult]] = {c: [] for c in configurations}
    with tqdm(total=args.repeats * len(configurations), desc="bench mf", unit="run") as progress:
        for _ in range(args.repeats):
            for rule, rate in configurations:
                update = {"pruning_rate": rate} if rule == "dense" else {"pruning_rate": rate, "cutoff_rule": rule}
                runs[(rule, rate)].append(train_mf(splits, base.model_copy(update=update)))
                progress.update()
    dense_runs = runs[("dense", 0.0)]
    dense_seconds = [r.train_seconds for r in dense_runs]
    dense_best = best_seconds(dense_runs)
    dense_rmse = dense_runs[0].model.rmse(splits.test)
    dense_work = dense_runs[0].work
    records = []
    for (rule, rate), results in runs.items():
        seconds = [r.train_seconds for r in results]
        rmse = results[0].model.rmse(splits.test)
        records.append(
            MFRecord(
                rule=rule, pruning_rate=rate, test_rmse=rmse, error_increase=rmse / dense_rmse - 1,
                median_seconds=statistics.median(seconds), min_seconds=min(seconds), max_seconds=max(seconds),
                speedup_median=statistics.median(dense_seconds) / statistics.median(seconds),
                best_seconds=best_seconds(results), speedup_best=dense_best / best_seconds(results),
                work_fraction=results[0].work / dense_work,
                final_mean_cutoff=results[0].history[-1].mean_cutoff,
                threshold_p=results[0].model.threshold_p, threshold_q=results[0].model.threshold_q,
            )  # fmt: skip
        )
    mean = float(splits.train.ratings.mean())
    mean_rmse = float(np.sqrt(np.mean((splits.test.ratings.astype(np.float64) - mean) ** 2)))
    return {
        "data": description,
        "ratings": {"train": len(splits.train), "valid": len(splits.valid), "test": len(splits.test)},
        "users": splits.num_users, "items": splits.num_items,
        "config": base.model_dump(), "repeats": args.repeats,
        "mean_predictor_test_rmse": mean_rmse,
        "paper": {"speedup": list(PAPER_SPEEDUP), "max_error_increase": PAPER_MAX_ERROR_INCREASE},
        "records": [r.model_dump() for r in records],
    }  # fmt: skip


def best_seconds(results: list[MFResult]) -> float:
    return float(sum(min(epochs) for epochs in zip(*([e.seconds for e in r.history] for r in results))))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [MFRecord(**r) for r in report["records"]]
    dense = next(r for r in records if r.rule == "dense")
    figure, (speed_axis, error_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    speed_axis.axhspan(*PAPER_SPEEDUP, color="green", alpha=0.12, label="paper: 1.2–1.65×")
    error_axis.axhline(dense.test_rmse * (1 + PAPER_MAX_ERROR_INCREASE), color="green", linestyle=":", label="dense +20.08% (paper's worst)")
    error_axis.axhline(report["mean_predictor_test_rmse"], color="grey", linestyle="--", label="mean predictor")
    for rule in sorted({r.rule for r in records} - {"dense"}):
        points = [dense] + sorted((r for r in records if r.rule == rule), key=lambda r: r.pruning_rate)
        rates = [p.pruning_rate for p in points]
        speed_axis.plot(rates, [p.speedup_median for p in points], marker="o", label=f"{rule} (median)")
        speed_axis.plot(rates, [p.speedup_best for p in points], marker="x", linestyle="--", label=f"{rule} (best epochs)")
        speed_axis.plot(rates, [1 / p.work_fraction for p in points], linestyle=":", label=f"{rule}: 1 / work fraction")
        error_axis.plot(rates, [p.test_rmse for p in points], marker="o", label=rule)
    speed_axis.set_yscale("log")
    speed_axis.set_xlabel("pruning rate")
    speed_axis.set_ylabel("training speed-up over dense")
    error_axis.set_xlabel("pruning rate")
    error_axis.set_ylabel("test RMSE")
    for axis in (speed_axis, error_axis):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{report['data']}; k = {report['config']['dim']}, {report['config']['epochs']} epochs", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def handle(args: BenchMFJob) -> int:
    report = run(args)
    print(f"{report['data']}: mean predictor test RMSE {report['mean_predictor_test_rmse']:.4f}")
    for r in report["records"]:
        print(
            f"{r['rule']:12s} rate {r['pruning_rate']:.2f}: test RMSE {r['test_rmse']:.4f} ({100 * r['error_increase']:+.2f}%), "
            f"{r['median_seconds']:.3f} s median (min {r['min_seconds']:.3f}, max {r['max_seconds']:.3f}, best {r['best_seconds']:.3f}), "
            f"speed-up {r['speedup_median']:.2f}× median / {r['speedup_best']:.2f}× best, "
            f"work {r['work_fraction']:.3f}, final cut-off {r['final_mean_cutoff']:.1f}"
        )
    write_results(args.json_path, json.dumps(report, indent=2) + "\n", lambda path: plot(report, path))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mf", help="dynamic-pruning MF: training time and test RMSE per pruning rate")
    command(parser, FLAGS, handle)
