"""``rankstream experiment table1``: the DPLR-FwFM paper's Table 1 protocol on a prepared
dataset.

For each embedding dim: FM, FwFM, DPLR ranks ρ and tensorFM of order 2 at CP rank ρ
(W: 2ρm numbers against DPLR's ρ(m+1); R = M + Mᵀ of rank ≤ 2ρ, plus its diagonal), each with its learning rate chosen
on validation from a grid (one Ray Tune run, its L2 strength too); then the pruned FwFM of each rank — the
validation-best FwFM of that dim keeping its ρ(m+1) largest |R_ij| (the paper's
parameter match), fine-tuned with its own learning rate grid (a second Tune run; the
un-fine-tuned pruned model, epoch 0, competes on validation too). Every number is the
test metric at the best validation point of the selected trial; a second table shows
the pruned models as cut, without fine-tuning. The last column per dim
is the paper's "DPLR vs Pruned (%)": the relative improvement of DPLR over the pruned
model, positive when DPLR is better (higher AUC, lower logloss/MSE/RMSE).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from safetensors.torch import load_file

from model_zoo.data.layout import STATS_FILE
from model_zoo.metrics import primary_metric
from model_zoo.models.pruned_fwfm import kept_entry_count
from model_zoo.schema import Task
from model_zoo.training import TrainConfig, is_better
from rayjobs.options import FlatCommand, command
from rayjobs.tune import (
    SWEPT,
    WEIGHTS_FILE,
    Splits,
    SweepSettings,
    TrialRecord,
    architectures,
    load_splits,
    markdown_table,
    ray_session,
    run_trials,
)

class Table1Job(SweepSettings):
    """`rankstream experiment table1`: the grid and the sweep settings."""

    data: Path = Field(description="a prepared dataset (rankstream prepare / synth)")
    out: Path = Field(description="output directory")
    name: str | None = Field(default=None, description="dataset name in the table (default: stats.json's dataset, else the directory)")
    dims: list[int] = Field(default=[8, 16], min_length=1)
    ranks: list[int] = Field(default=[1, 2, 3, 4, 5], min_length=1)
    lr_grid: list[float] = Field(default=[0.05, 0.1, 0.15], min_length=1, description="learning rates tried per model")
    l2_grid: list[float] = Field(default=[0.01, 0.03, 0.3], min_length=1, description="L2 strengths tried per model")


HIGHER_IS_BETTER = {"auc": True, "logloss": False, "mse": False, "rmse": False}
METRIC_LABELS = {"auc": "AUC", "logloss": "LogLoss", "mse": "MSE", "rmse": "RMSE"}


def task_metric_names(task: Task) -> tuple[str, ...]:
    return ("auc", "logloss") if task == Task.binary else ("mse", "rmse")


def dplr_vs_pruned_pct(metric: str, dplr: float, pruned: float) -> float:
    """The paper's last column: DPLR's relative improvement over the pruned model, in %."""
    change = (dplr - pruned) / pruned * 100.0
    return change if HIGHER_IS_BETTER[metric] else -change


def best_per_model(records: list[TrialRecord], metric: str, higher_is_better: bool) -> dict[tuple, TrialRecord]:
    """The validation-best trial of each (kind, dim, rank): the tuned learning rate."""
    best: dict[tuple, TrialRecord] = {}
    for record in records:
        key = (record.kind, record.dim, record.rank)
        incumbent = best.get(key)
        if is_better(record.valid[metric], None if incumbent is None else incumbent.valid[metric], higher_is_better):
            best[key] = record
    return best


def table_rows(
    selected: dict[tuple, TrialRecord], task: Task, num_fields: int, dims: list[int], ranks: list[int]
) -> list[dict[str, Any]]:
    """One row per (metric, rank), test metrics per dim, in the paper's layout."""
    pairs = num_fields * (num_fields - 1) // 2
    rows = []
    for metric in task_metric_names(task):
        for rank in ranks:
            per_dim = {}
            for dim in dims:
                values = {
                    "fm": selected[("fm", dim, None)].test[metric],
                    "fwfm": selected[("fwfm", dim, None)].test[metric],
                    "dplr": selected[("dplr_fwfm", dim, rank)].test[metric],
                    "tensorfm": selected[("tensorfm", dim, rank)].test[metric],
                    "pruned": selected[("pruned_fwfm", dim, rank)].test[metric],
                }
                values["dplr_vs_pruned_pct"] = dplr_vs_pruned_pct(metric, values["dplr"], values["pruned"])
                as_cut = selected[("pruned_fwfm", dim, rank)].initial_test.get(metric)
                if as_cut is not None:
                    values["pruned_as_cut"] = as_cut
                    values["dplr_vs_pruned_as_cut_pct"] = dplr_vs_pruned_pct(metric, values["dplr"], as_cut)
                per_dim[str(dim)] = values
            kept = kept_entry_count(num_fields, rank)
            rows.append(
                {"metric": metric, "rank": rank, "kept_entries": kept, "pruned_sparsity_pct": 100.0 * kept / pairs,
                 "dims": per_dim}
            )  # fmt: skip
    return rows


def markdown(name: str, rows: list[dict[str, Any]], dims: list[int], pruned: str = "pruned") -> str:
    """The paper's layout; ``pruned="pruned_as_cut"`` shows the pruned models before fine-tuning."""
    header = ["Dataset (Metric)", "Rank", "Pruned sparsity"]
    for dim in dims:
        header += [f"FM k={dim}", f"FwFM k={dim}", f"DPLR k={dim}", f"tensorFM k={dim}", f"Pruned k={dim}",
                   f"DPLR vs Pruned (%) k={dim}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = None
    for row in rows:
        title = f"{name} ({METRIC_LABELS[row['metric']]})" if row["metric"] != previous else ""
        previous = row["metric"]
        cells = [title, str(row["rank"]), f"{row['pruned_sparsity_pct']:.1f}%"]
        for dim in dims:
            values = row["dims"][str(dim)]
            numbers = [values["fm"], values["fwfm"], values["dplr"], values["tensorfm"], values[pruned]]
            cells += [f"{v:.4f}" for v in numbers] + [f"{values[f'dplr_vs_{pruned}_pct']:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def selection_markdown(selected: dict[tuple, TrialRecord]) -> str:
    """Each cell's chosen learning rate and L2, and how long it trained (epoch 0 of a
    pruned model is the model as cut)."""
    order = {"fm": 0, "fwfm": 1, "dplr_fwfm": 2, "tensorfm": 3, "pruned_fwfm": 4}
    records = sorted(selected.values(), key=lambda r: (r.dim, order[r.kind], r.rank or 0))
    return markdown_table([
        {"model": r.kind, "k": r.dim, "rank": r.rank, "lr": r.learning_rate, "l2": r.l2, "epochs trained": r.epochs_run,
         "best epoch": r.best_epoch, "stopped at the epoch cap": "yes" if r.hit_epoch_cap else "no"}
        for r in records
    ])  # fmt: skip


def fwfm_states(selected: dict[tuple, TrialRecord], dims: list[int]) -> dict[int, dict[str, Any]]:
    """The validation-best FwFM weights of each dim: what the pruned models prune."""
    return {dim: load_file(str(Path(selected[("fwfm", dim, None)].checkpoint) / WEIGHTS_FILE)) for dim in dims}


def run_table1(job: Table1Job) -> int:
    started = time.perf_counter()
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    splits: Splits = load_splits(job.data)
    metric, higher_is_better = primary_metric(splits.schema.task)
    from ray import tune

    storage = out / "ray_results"
    with ray_session(job.address, job.num_cpus):
        full = run_trials(
            splits, job,
            {"arch": tune.grid_search(architectures(["fm", "fwfm", "dplr_fwfm", "tensorfm"], job.dims, job.ranks)),
             "learning_rate": tune.grid_search(job.lr_grid), "l2": tune.grid_search(job.l2_grid)},
            storage=storage, name="table1-full",
        )  # fmt: skip
        selected = best_per_model(full, metric, higher_is_better)
        pruned = run_trials(
            splits, job,
            {"arch": tune.grid_search(architectures(["pruned_fwfm"], job.dims, job.ranks)),
             "learning_rate": tune.grid_search(job.lr_grid), "l2": tune.grid_search(job.l2_grid)},
            storage=storage, name="table1-pruned", fwfm_states=fwfm_states(selected, job.dims),
        )  # fmt: skip
    selected.update(best_per_model(pruned, metric, higher_is_better))
    name = job.name or _dataset_name(job.data)
    rows = table_rows(selected, splits.schema.task, splits.schema.num_fields, job.dims, job.ranks)
    table = (
        markdown(name, rows, job.dims)
        + "\nThe same with the pruned FwFM as cut from the FwFM, before fine-tuning:\n\n"
        + markdown(name, rows, job.dims, pruned="pruned_as_cut")
        + "\nThe selected trial of each cell:\n\n"
        + selection_markdown(selected)
    )
    seconds = time.perf_counter() - started
    report = {
        "dataset": name, "data": str(job.data.resolve()), "task": splits.schema.task.value,
        "num_fields": splits.schema.num_fields, "selection_metric": metric,
        "rows_per_split": {"train": len(splits.train), "valid": len(splits.valid), "test": len(splits.test)},
        "settings": job.model_dump(mode="json", exclude={"data", "out", "name", "address"}),
        "seconds": seconds, "rows": rows,
        "selected": [record.model_dump() for record in selected.values()],
        "trials": [record.model_dump() for record in full + pruned],
    }  # fmt: skip
    (out / "table1.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table1.md").write_text(table)
    print(table)
    print(f"{len(full) + len(pruned)} trials in {seconds:.0f} s; wrote {out}/table1.md and {out}/table1.json")
    return 0


def _dataset_name(directory: Path) -> str:
    stats = directory / STATS_FILE
    dataset = json.loads(stats.read_text()).get("dataset") if stats.is_file() else None
    return str(dataset or directory.name)


FLAGS = FlatCommand("Table1", Table1Job, sections={"train": TrainConfig}, exclude=SWEPT)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("table1", help="the DPLR-FwFM paper's Table 1: FM, FwFM, DPLR, pruned FwFM")
    command(parser, FLAGS, run_table1)


if __name__ == "__main__":
    from rayjobs.cli import run_module

    run_module(["experiment", "table1"])
