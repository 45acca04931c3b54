"""``rankstream tune``: a Ray Tune sweep over rank ρ × embedding size k × learning rate ×
L2 strength with ASHA early stopping, then per trial the measured per-item scoring cost, the Pareto
front of accuracy vs cost (table + PNG) and the best trial exported as a bundle.

Trials are plain function trainables that train in-process with ``model_zoo.training``
on the prepared splits, which are loaded once and shared through the object store (the
platform notes measured Train-in-Tune at ~4× the per-trial cost on 2 cores). Each trial
reports the validation metric every epoch and checkpoints its weights whenever they
improve, so its single kept checkpoint is its best model.

    python -m rayjobs.tune --data DIR --out DIR          # or: rankstream tune …
    ray job submit --working-dir . -- python -m rayjobs.tune --data /abs/DIR --out /abs/OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from model_zoo.batch import FeatureBatch
from model_zoo.bundle import save_bundle
from model_zoo.data.layout import VOCAB_DIR, load_schema
from model_zoo.data.reader import load_split
from model_zoo.metrics import primary_metric
from model_zoo.model_config import CONFIG_BY_KIND, MODEL_CONFIG, FwFMConfig, PrunedFwFMConfig
from model_zoo.models.base import RankingModel
from model_zoo.models.pruned_fwfm import PrunedFwFM
from model_zoo.schema import FeatureSchema, Task
from model_zoo.training import (
    EpochHook,
    EpochReport,
    TrainConfig,
    Trainer,
    TrainingState,
    cpu_state,
    evaluate,
    minibatches,
    uses_sparse_gradients,
)
from rayjobs.bench_scoring import time_auction
from rayjobs.cluster import init_private_ray
from rayjobs.options import FlatCommand, OrderSet, command, order_sets

# pruned_fwfm needs a trained FwFM: see `experiment table1`.
TunableKind = Literal["fm", "fwfm", "dplr_fwfm", "tensorfm"]
WEIGHTS_FILE = "weights.safetensors"


class SweepSettings(BaseModel):
    """What every trial of a sweep shares, and where it runs: the training settings
    (each trial swaps in its own learning rate and L2) and the Ray cluster."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=TrainConfig)
    cpus_per_trial: float = Field(default=1.0, gt=0, description="trials run at once = cluster CPUs / this")
    address: str | None = Field(default=None, description="an existing Ray cluster (default: $RAY_ADDRESS, else a private local Ray)")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the local Ray (default: all)")

    def train_config(self, learning_rate: float, l2: float) -> TrainConfig:
        return self.train.model_copy(update={"learning_rate": learning_rate, "l2": l2})


# The flags of a sweep: learning rate and L2 are searched, not set.
SWEPT = ("learning_rate", "l2")


class TuneJob(SweepSettings):
    """`rankstream tune`: the search space and the sweep settings."""

    data: Path = Field(description="a prepared dataset (rankstream prepare / synth)")
    out: Path = Field(description="output directory")
    kinds: list[TunableKind] = Field(default=["dplr_fwfm"], min_length=1, description="model kinds")
    ranks: list[int] = Field(default=[1, 2, 3, 4, 5], min_length=1, description="DPLR ranks; tensorfm: the CP rank of each order")
    dims: list[int] = Field(default=[8, 16, 32], min_length=1, description="embedding sizes k")
    orders: list[OrderSet] = Field(default=["2", "2+3"], min_length=1, description="tensorfm: interaction-order sets, orders joined by +")
    lr_min: float = Field(default=1e-3, gt=0)
    lr_max: float = Field(default=0.2, gt=0)
    l2_min: float = Field(default=0.01, gt=0, description="L2 on looked-up embedding rows, swept log-uniformly")
    l2_max: float = Field(default=1.0, gt=0)
    samples: int = Field(default=1, ge=1, description="learning rates drawn per architecture")
    items: int = Field(default=1000, ge=1, description="items per auction when timing the scoring cost")

    @property
    def order_sets(self) -> list[list[int]]:
        return order_sets(self.orders)

    @model_validator(mode="after")
    def _ranges(self) -> "TuneJob":
        if self.lr_min > self.lr_max:
            raise ValueError("need --lr-min <= --lr-max")
        if self.l2_min > self.l2_max:
            raise ValueError("need --l2-min <= --l2-max")
        return self


class TrialRecord(BaseModel):
    """One finished trial: its configuration and its best validation point."""

    trial_id: str
    kind: str
    dim: int
    rank: int | None
    model: dict[str, Any] = Field(default_factory=dict)  # the trial's model configuration (model_zoo.model_config)
    learning_rate: float
    l2: float
    epochs_run: int
    best_epoch: int
    # The trial ran all its epochs and its last epoch was its best: it may still improve.
    hit_epoch_cap: bool = False
    valid: dict[str, float]
    test: dict[str, float]
    parameters: int
    checkpoint: str | None
    # A pruned FwFM as cut from its FwFM, before fine-tuning (empty for other kinds).
    initial_valid: dict[str, float] = Field(default_factory=dict)
    initial_test: dict[str, float] = Field(default_factory=dict)
    scoring_us_per_item: float | None = None
    pareto: bool = False


@dataclass(frozen=True)
class Splits:
    schema: FeatureSchema
    train: FeatureBatch
    valid: FeatureBatch
    test: FeatureBatch


def load_splits(directory: str | Path) -> Splits:
    return Splits(load_schema(directory), *(load_split(directory, split) for split in ("train", "valid", "test")))


def architectures(kinds: list[str], dims: list[int], ranks: list[int], orders: list[list[int]] = ((2,),)) -> list[dict[str, Any]]:
    """The model configurations of a search space: each kind per dim; a kind with a rank
    (DPLR, pruned FwFM) per rank; tensorFM per order set and CP rank (the same for each order)."""
    configs = []
    for kind in kinds:
        config = CONFIG_BY_KIND[kind]
        if "rank" in config.model_fields:
            variants = [{"rank": rank} for rank in ranks]
        elif "cp_ranks" in config.model_fields:
            variants = [{"orders": list(o), "cp_ranks": [rank] * len(o)} for o in orders for rank in ranks]
        else:
            variants = [{}]
        configs += [config(dim=dim, **variant).model_dump(mode="json") for dim in dims for variant in variants]
    return configs


def interaction_rank(arch: dict[str, Any]) -> int | None:
    """The rank a trial is tabulated by: DPLR's (or the pruned FwFM's) ρ, tensorFM's CP rank
    when every order has the same one (as ``architectures`` builds them)."""
    if "rank" in arch:
        return arch["rank"]
    cp_ranks = set(arch.get("cp_ranks", ()))
    return cp_ranks.pop() if len(cp_ranks) == 1 else None


def describe(arch: dict[str, Any]) -> str:
    """``kind k=… option=…`` of a model configuration."""
    options = " ".join(f"{k}={v}" for k, v in arch.items() if k not in ("model", "dim"))
    return f"{arch['model']} k={arch['dim']} {options}".strip()


def build_trial_model(
    schema: FeatureSchema, arch: dict[str, Any], sparse: bool = False, fwfm_state: dict[str, torch.Tensor] | None = None,
) -> RankingModel:
    """A fresh model; a pruned FwFM prunes the trained FwFM whose weights are given."""
    config = MODEL_CONFIG.validate_python(arch)
    if isinstance(config, PrunedFwFMConfig):
        if fwfm_state is None:
            raise ValueError("pruned_fwfm prunes a trained FwFM: its weights are required")
        fwfm = FwFMConfig(dim=config.dim).build(schema, sparse)
        fwfm.load_state_dict(fwfm_state)
        return PrunedFwFM.from_fwfm(fwfm, config.rank)
    return config.build(schema, sparse)


def load_trial_model(schema: FeatureSchema, record: TrialRecord) -> RankingModel:
    """A trial's best weights (its checkpoint) in an inference model."""
    if record.checkpoint is None:
        raise ValueError(f"trial {record.trial_id} has no checkpoint")
    model = MODEL_CONFIG.validate_python(record.model).build(schema)
    model.load_state_dict(load_file(str(Path(record.checkpoint) / WEIGHTS_FILE)))
    return model.eval()


def parameter_count(model: RankingModel) -> int:
    """Trainable numbers; a pruned FwFM counts only its kept interaction weights."""
    total = sum(p.numel() for p in model.parameters())
    if isinstance(model, PrunedFwFM):
        total -= int((~model.kept).sum())
    return total


def train_trial(
    config: dict[str, Any], *, splits: Splits, settings: SweepSettings,
    fwfm_states: dict[int, dict[str, torch.Tensor]],
) -> None:
    """The function trainable: one report per epoch, a checkpoint whenever validation improves.

    Each report carries the best point so far (``best_valid_*``, its ``test_*`` and
    ``best_epoch``), so the last report of a trial stopped early by ASHA is complete.
    A pruned FwFM also reports epoch 0, the pruned model before any fine-tuning, and
    carries its metrics in every later report (``initial_valid_*``, ``initial_test_*``).
    """
    import ray.tune

    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    arch = config["arch"]
    train_config = settings.train_config(config["learning_rate"], config["l2"])
    torch.manual_seed(train_config.seed)
    model = build_trial_model(
        splits.schema, arch, sparse=uses_sparse_gradients(train_config.optimizer),
        fwfm_state=fwfm_states.get(arch["dim"]) if arch["model"] == "pruned_fwfm" else None,
    )  # fmt: skip
    parameters = parameter_count(model)
    trainer = Trainer(model, train_config)
    state = trainer.new_state()
    test: dict[str, float] = {}
    initial: dict[str, float] = {}

    def report(epoch: int, valid: dict[str, float], improved: bool, extra: dict[str, float]) -> None:
        metrics = {
            "epoch": epoch, "parameters": parameters, **{f"valid_{k}": v for k, v in valid.items()}, **extra, **initial
        }  # fmt: skip
        if not improved:
            ray.tune.report({**metrics, **_best_columns(state, test)})
            return
        test.clear()
        test.update(evaluate(model, minibatches(splits.test, train_config.eval_batch_size)))
        with tempfile.TemporaryDirectory() as directory:
            save_file(cpu_state(model), str(Path(directory) / WEIGHTS_FILE))
            ray.tune.report({**metrics, **_best_columns(state, test)}, checkpoint=ray.tune.Checkpoint.from_directory(directory))

    def validate() -> dict[str, float]:
        return evaluate(model, minibatches(splits.valid, train_config.eval_batch_size))

    if arch["model"] == "pruned_fwfm":  # the model as cut competes (loop epoch -1, Tune's epoch 0)
        valid = validate()
        state.stopping.first_candidate_epoch = -1
        report(0, valid, state.stopping.observe(-1, valid, model), {})
        initial.update({f"initial_valid_{k}": v for k, v in valid.items()})
        initial.update({f"initial_test_{k}": v for k, v in test.items()})

    class ReportToTune(EpochHook):
        def after_epoch(self, epoch_report: EpochReport, improved: bool, model: RankingModel, state: TrainingState) -> None:
            extra = {"train_loss": epoch_report.train_loss, "samples_per_second": epoch_report.samples_per_second}
            report(epoch_report.epoch + 1, epoch_report.valid, improved, extra)

    trainer.fit(
        lambda epoch: minibatches(splits.train, train_config.batch_size, seed=train_config.seed * 1000 + epoch),
        validate, state, [ReportToTune()],
    )  # fmt: skip


def _best_columns(state: TrainingState, test: dict[str, float]) -> dict[str, float]:
    """Tune's epochs count the model before training (a pruned FwFM as cut) as 0."""
    return {
        "best_epoch": state.best_epoch + 1,
        **{f"best_valid_{k}": v for k, v in state.best_valid.items()},
        **{f"test_{k}": v for k, v in test.items()},
    }


@contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Connect to ``address`` (or $RAY_ADDRESS, as in a Ray job), else start a private
    local Ray; shut down only what this call started. An already initialised Ray is used."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        init_private_ray(num_cpus=num_cpus, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def run_trials(
    splits: Splits, settings: SweepSettings, param_space: dict[str, Any], *, storage: Path, name: str,
    num_samples: int = 1, asha: bool = False, fwfm_states: dict[int, dict[str, torch.Tensor]] | None = None,
) -> list[TrialRecord]:
    """Run one Tune experiment of ``train_trial`` and collect every trial's best point."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    metric, higher_is_better = primary_metric(splits.schema.task)
    mode = "max" if higher_is_better else "min"
    concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // settings.cpus_per_trial))
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, splits=splits, settings=settings, fwfm_states=fwfm_states or {}),
        {"cpu": settings.cpus_per_trial},
    )
    scheduler = ASHAScheduler(max_t=settings.train.epochs, grace_period=1, reduction_factor=2) if asha else None
    # Keeping one checkpoint per trial forces a state snapshot per checkpoint; Tune warns
    # about that on every fast trial, and it is cheap here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=f"valid_{metric}", mode=mode, scheduler=scheduler, num_samples=num_samples,
            max_concurrent_trials=concurrent, reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{name}-{uuid.uuid4().hex[:8]}",  # a reused name would resume an old run
            storage_path=str(storage.resolve()),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
            callbacks=[trial_lines(metric)],
        ),
    )  # fmt: skip
    records = []
    for result in tuner.fit():
        if result.error is not None:
            raise RuntimeError(f"trial {result.config} failed: {result.error}")
        metrics, arch = result.metrics, result.config["arch"]
        epochs_run, best_epoch = int(metrics["epoch"]), int(metrics["best_epoch"])
        records.append(
            TrialRecord(
                trial_id=metrics["trial_id"], kind=arch["model"], dim=arch["dim"], rank=interaction_rank(arch), model=arch,
                learning_rate=result.config["learning_rate"], l2=result.config["l2"], epochs_run=epochs_run,
                best_epoch=best_epoch, hit_epoch_cap=epochs_run >= settings.train.epochs and best_epoch == epochs_run,
                valid=_prefixed(metrics, "best_valid_"), test=_prefixed(metrics, "test_"),
                initial_valid=_prefixed(metrics, "initial_valid_"), initial_test=_prefixed(metrics, "initial_test_"),
                parameters=int(metrics["parameters"]),
                checkpoint=result.checkpoint.path if result.checkpoint else None,
            )
        )  # fmt: skip
    capped = [r for r in records if r.hit_epoch_cap]
    for record in capped:
        print(f"trial {record.trial_id} ({record.kind} k={record.dim} lr={record.learning_rate:.4g} l2={record.l2:.4g}) "
              f"was still improving at the epoch cap ({settings.train.epochs}): raise --epochs")  # fmt: skip
    return records


def trial_lines(metric: str) -> Any:
    """A Tune callback printing one line per finished trial (Tune's own tables are long)."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result = trial.last_result
            print(
                f"trial {trial.trial_id}: {describe(trial.config['arch'])} lr={trial.config['learning_rate']:.4g} "
                f"l2={trial.config['l2']:.4g}: "
                f"best valid {metric} {result.get(f'best_valid_{metric}', float('nan')):.4f} at epoch "
                f"{result.get('best_epoch')} of {result.get('epoch')}",
                flush=True,
            )

    return TrialLines()


def _prefixed(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {key[len(prefix) :]: float(value) for key, value in metrics.items() if key.startswith(prefix)}


def scoring_cost_us(model: RankingModel, splits: Splits, items: int, warmup: int = 3, repeats: int = 15) -> float:
    """Median µs per item to score ``items`` real validation rows against one cached
    context (the first validation row's), on one thread, as ``bench scoring`` times it."""
    schema = splits.schema
    rows = torch.arange(items) % len(splits.valid)
    context = splits.valid.rows(rows[:1]).select(schema, schema.context_fields)
    item_rows = splits.valid.rows(rows).select(schema, schema.item_fields)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            times = time_auction(lambda: model.score_items(model.encode_context(context), item_rows), warmup, repeats)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times) * 1000.0 / items


def pareto_front(costs: list[float], scores: list[float], higher_is_better: bool) -> list[bool]:
    """Which points no other point dominates (cost no higher and score no worse, one of
    them strictly). One sort: walking by cost, a point is on the front when it is the best
    of its cost and beats everything cheaper."""
    signed = [s if higher_is_better else -s for s in scores]
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -signed[i]))
    on_front = [False] * len(costs)
    best_cheaper = -float("inf")
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and costs[order[end]] == costs[order[start]]:
            end += 1
        group_best = signed[order[start]]
        if group_best > best_cheaper:
            for i in order[start:end]:
                on_front[i] = signed[i] == group_best
            best_cheaper = group_best
        start = end
    return on_front


def write_table(records: list[TrialRecord], task: Task, path_stem: Path) -> None:
    """``<stem>.parquet`` and ``<stem>.md`` with one row per trial."""
    metric_names = ("auc", "logloss") if task == Task.binary else ("mse", "rmse")
    rows = [
        {
            "trial_id": r.trial_id, "kind": r.kind, "dim": r.dim, "rank": r.rank,
            "options": ", ".join(f"{k}={v}" for k, v in r.model.items() if k not in ("model", "dim", "rank")),
            "learning_rate": r.learning_rate,
            "l2": r.l2, "epochs_run": r.epochs_run, "best_epoch": r.best_epoch, "hit_epoch_cap": r.hit_epoch_cap,
            **{f"valid_{m}": r.valid.get(m) for m in metric_names}, **{f"test_{m}": r.test.get(m) for m in metric_names},
            "parameters": r.parameters, "scoring_us_per_item": r.scoring_us_per_item, "pareto": r.pareto,
        }
        for r in records
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path_stem.with_suffix(".parquet"))
    path_stem.with_suffix(".md").write_text(markdown_table(rows))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0]) if rows else []

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_front(records: list[TrialRecord], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for kind in sorted({r.kind for r in records}):
        points = [r for r in records if r.kind == kind]
        axis.scatter([r.scoring_us_per_item for r in points], [r.valid[metric] for r in points], alpha=0.5, label=kind)
    front = sorted((r for r in records if r.pareto), key=lambda r: r.scoring_us_per_item or 0.0)
    axis.plot([r.scoring_us_per_item for r in front], [r.valid[metric] for r in front], "k-o", drawstyle="steps-post",
              label="Pareto front")
    for r in front:
        label = f"k={r.dim}" if r.rank is None else f"ρ={r.rank} k={r.dim}"
        axis.annotate(label, (r.scoring_us_per_item, r.valid[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel("scoring cost (µs per item, cached context, one thread)")
    axis.set_ylabel(f"validation {metric}")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_tune(job: TuneJob) -> int:
    started = time.perf_counter()
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(job.data)
    from ray import tune

    param_space = {
        "arch": tune.grid_search(architectures(job.kinds, job.dims, job.ranks, job.order_sets)),
        "learning_rate": tune.loguniform(job.lr_min, job.lr_max),
        "l2": tune.loguniform(job.l2_min, job.l2_max),
    }
    with ray_session(job.address, job.num_cpus):
        records = run_trials(
            splits, job, param_space, storage=out / "ray_results", name="tune", num_samples=job.samples, asha=True
        )
    metric, higher_is_better = primary_metric(splits.schema.task)
    for record in records:
        record.scoring_us_per_item = scoring_cost_us(load_trial_model(splits.schema, record), splits, job.items)
    front = pareto_front([r.scoring_us_per_item for r in records], [r.valid[metric] for r in records], higher_is_better)
    for record, on_front in zip(records, front):
        record.pareto = on_front
    records.sort(key=lambda r: r.valid[metric], reverse=higher_is_better)
    write_table(records, splits.schema.task, out / "trials")
    write_table(sorted((r for r in records if r.pareto), key=lambda r: r.scoring_us_per_item), splits.schema.task, out / "pareto")
    plot_front(records, metric, out / "pareto.png")
    best = records[0]
    vocabulary = job.data / VOCAB_DIR
    save_bundle(
        out / "best_bundle", load_trial_model(splits.schema, best), name=f"tune-{best.trial_id}",
        vocabulary_dir=vocabulary if vocabulary.is_dir() else None,
        metrics={"valid": best.valid, "test": best.test, "best_epoch": best.best_epoch},
        train_config={**job.train_config(best.learning_rate, best.l2).model_dump(), "trial_id": best.trial_id},
    )  # fmt: skip
    (out / "summary.json").write_text(
        json.dumps({"best": best.model_dump(), "trials": len(records), "seconds": time.perf_counter() - started}, indent=2)
        + "\n"
    )
    print(markdown_table([{"kind": r.kind, "dim": r.dim, "rank": r.rank, "lr": r.learning_rate, "l2": r.l2,
                           f"valid_{metric}": r.valid[metric], "µs/item": r.scoring_us_per_item}
                          for r in records if r.pareto]))  # fmt: skip
    print(f"best: {best.kind} k={best.dim} rank={best.rank} lr={best.learning_rate:.4g} l2={best.l2:.4g} valid {metric} "
          f"{best.valid[metric]:.4f}; {len(records)} trials in {time.perf_counter() - started:.0f} s")  # fmt: skip
    print(f"wrote {out}/trials.{{parquet,md}}, pareto.{{parquet,md,png}}, best_bundle/, summary.json")
    return 0


FLAGS = FlatCommand("Tune", TuneJob, sections={"train": TrainConfig}, exclude=SWEPT)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="Ray Tune sweep: rank × dim × lr × L2, ASHA, Pareto front, best bundle")
    command(parser, FLAGS, run_tune)


if __name__ == "__main__":
    from rayjobs.cli import run_module

    run_module(["tune"])
