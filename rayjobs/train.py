"""``rankstream train`` / ``python -m rayjobs.train``: distributed training on Ray Train.

A ``TorchTrainer`` runs ``train_loop`` on N workers (gloo on CPU, NCCL on GPU). The
embedding tables are sharded by row owner (``model_zoo.sharded``: rows and their
gradients all-to-all, dense gradients in one all-reduce); the tables are made whole
after each epoch, so evaluation and checkpoints see whole tables. Each worker reads
its shard of the prepared train split through Ray Data once, holds it in memory as
int32 columns and steps ``model_zoo.training.Trainer`` on a fresh permutation of it
each epoch.
Validation and test predictions of all workers are gathered, so the metrics (AUC
above all) are those of the whole split. Every epoch ends with ``ray.train.report``
and a checkpoint (weights, optimizer state, best weights so far, run state); after a
worker failure the run restarts from the latest one. The best epoch's weights become
the bundle, with metrics, training curves and the embedding-collapse diagnostics.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from model_zoo.batch import FeatureBatch
from model_zoo.bundle import save_bundle
from model_zoo.data.layout import SPLITS, VOCAB_DIR, columns_for, load_schema, split_dir
from model_zoo.data.reader import batch_from_table, check_index_ranges, iter_tables
from model_zoo.diagnostics import (
    embedding_set_information_abundance,
    field_information_abundance,
    plot_information_abundance,
)
from model_zoo.metrics import primary_metric, task_metrics
from model_zoo.model_config import DEFAULT_KIND, MODEL_CONFIGS, DPLRFwFMConfig, ModelConfig, PrunedFwFMConfig
from model_zoo.models.base import RankingModel
from model_zoo.schema import FeatureSchema, Kind
from model_zoo.sharded import ShardedExchange
from model_zoo.training import (
    EpochHook,
    EpochReport,
    PruneBeforeEpoch,
    TrainConfig,
    Trainer,
    TrainingState,
    cpu_state,
    minibatches,
    predict,
    uses_sparse_gradients,
)
from rayjobs.cluster import init_private_ray
from rayjobs.options import FlatCommand, command

# Test hook: "EPOCH:MARKER" makes the last worker exit hard once, in that epoch, and
# record it in the MARKER file (so the restarted attempt trains on).
CRASH_ENV = "RANKSTREAM_TEST_CRASH_WORKER"
MODEL_FILE, BEST_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "best.safetensors", "optimizer.pt", "state.json"


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class TrainJobConfig(BaseModel):
    """`rankstream train`: its flags are these fields, TrainConfig's and the model kind's."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="a `rankstream prepare` or `rankstream synth` output")
    out: Path = Field(description="the bundle directory")
    model: ModelConfig = Field(default_factory=DPLRFwFMConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=0.5, gt=0, description="fractional leaves CPU for Ray Data (2-core deadlock)")
    placement_strategy: PlacementStrategy = Field(
        default="PACK", description="of the workers over the cluster's nodes (Ray placement-group strategy)")
    device: Literal["auto", "cpu", "gpu"] = Field(default="auto", description="auto: GPU workers when the cluster has GPUs")
    address: str | None = Field(default=None, description="an existing Ray cluster (default: RAY_ADDRESS, else a new local one)")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the local cluster started when there is no --address")
    ray_temp_dir: str | None = Field(default=None, description="temp dir of that local cluster (keep it short)")
    storage_path: Path | None = Field(default=None, description="where Ray Train keeps results and checkpoints (default ~/ray_results)")
    run_name: str | None = Field(default=None, description="Ray Train run name (default: unique; reusing one resumes that run)")
    max_failures: int = Field(default=2, ge=0, description="worker-group restarts from the latest checkpoint")
    progress: bool = Field(default=True, description="a line per epoch")


class RunState(TrainingState):
    """What a checkpoint carries besides tensors."""

    attempt_start_epochs: list[int] = Field(default_factory=list)
    nodes: int = 1  # Ray nodes the latest attempt's workers ran on
    test: dict[str, float] | None = None  # set once training has finished


# -- the model -------------------------------------------------------------------------
def epoch_hooks(job: TrainJobConfig) -> list[EpochHook]:
    """The model's own phases: the pruned FwFM prunes before its prune epoch."""
    if not isinstance(job.model, PrunedFwFMConfig):
        return []
    epochs = job.train.epochs
    epoch = job.model.prune_epoch if job.model.prune_epoch is not None else max(1, epochs // 2)
    if epoch >= epochs:
        raise ValueError(f"pruned_fwfm prunes before epoch {epoch}, so it needs more than {epoch} epochs")
    return [PruneBeforeEpoch(epoch, job.model.rank)]


def feature_counts(directory: Path, schema: FeatureSchema) -> np.ndarray:
    """Training-split count of every feature (global index), for RaFM's levels."""
    counts = np.zeros(schema.total_vocab, dtype=np.int64)
    for table in iter_tables(directory, "train", 1 << 17, columns=columns_for(schema, schema.names)):
        for position, spec in enumerate(schema.fields):
            column = table.column(spec.name).combine_chunks()
            if spec.kind == Kind.multi:
                column = column.flatten()
            offset = int(schema.offsets[position])
            counts[offset : offset + spec.vocab_size] += np.bincount(column.to_numpy(), minlength=spec.vocab_size)
    return counts


def new_model(job: TrainJobConfig, schema: FeatureSchema, sparse: bool, counts: np.ndarray | None) -> RankingModel:
    torch.manual_seed(job.train.seed)  # every worker starts from the same weights
    model = job.model.build(schema, sparse)
    if counts is not None:
        model.set_feature_counts(counts)
    return model


# -- distributed helpers ---------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(values: np.ndarray) -> np.ndarray:
    """Every worker's ``values`` concatenated in rank order (shards may differ in length)."""
    if not _distributed():
        return values
    device = _collective_device()
    local = torch.as_tensor(values).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(local)], dtype=torch.int64, device=device))
    longest = int(max(size.item() for size in sizes))
    padded = torch.zeros(longest, dtype=local.dtype, device=device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)]).cpu().numpy()


def read_shard(shard: Any, schema: FeatureSchema) -> FeatureBatch:
    """A worker's whole Ray Data shard as one batch (int32 columns as read; run_training
    checked the index ranges). Arrow tables: list columns convert through their offsets."""
    tables = list(shard.iter_batches(batch_size=None, batch_format="pyarrow"))
    if not tables:
        raise ValueError("this worker's shard of the train split is empty (more workers than training rows?)")
    return batch_from_table(schema, pa.concat_tables(tables).combine_chunks(), checked=True)


def evaluate_shard(model: RankingModel, shard: Any, batch_size: int, device: torch.device) -> dict[str, float]:
    """Metrics over the whole split: every worker predicts its shard, all rows are gathered."""
    schema = model.schema
    batches = (batch_from_table(schema, b, checked=True).to(device) for b in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow"))
    labels, outputs = predict(model, batches)
    labels, outputs = gather_rows(labels.astype(np.float32)), gather_rows(outputs.astype(np.float32))
    metrics = task_metrics(schema.task, labels, outputs) if len(labels) else {}
    return {**metrics, "rows": float(len(labels))}


# -- checkpoints -----------------------------------------------------------------------
def _optimizer_states(trainer: Trainer) -> list[dict[str, Any]]:
    """Optimizer state dicts without scratch buffers that are not tensors (the fused
    Adagrad rebuilds its numpy slot table on the next step)."""
    states = []
    for optimizer in trainer.optimizers:
        state = optimizer.state_dict()
        per_parameter = {
            key: {name: value for name, value in entry.items() if isinstance(value, (torch.Tensor, int, float))}
            for key, entry in state["state"].items()
        }
        states.append({**state, "state": per_parameter})
    return states


def write_checkpoint(directory: Path, trainer: Trainer, state: RunState) -> None:
    save_file(cpu_state(trainer.model), str(directory / MODEL_FILE))
    if state.stopping.best_weights is not None:
        save_file(state.stopping.best_weights, str(directory / BEST_FILE))
    torch.save(_optimizer_states(trainer), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(state.model_dump_json(indent=2))


def read_state(directory: Path) -> RunState:
    state = RunState.model_validate_json((directory / STATE_FILE).read_text())
    if (directory / BEST_FILE).is_file():
        state.stopping.best_weights = load_file(str(directory / BEST_FILE))
    return state


def read_checkpoint(directory: Path, trainer: Trainer) -> RunState:
    device = next(trainer.model.parameters()).device
    trainer.model.load_state_dict(load_file(str(directory / MODEL_FILE), device=str(device)))
    for optimizer, state in zip(trainer.optimizers, torch.load(directory / OPTIMIZER_FILE, weights_only=True)):
        optimizer.load_state_dict(state)
    return read_state(directory)


# -- the worker loop -------------------------------------------------------------------
class ReportToRayTrain(EpochHook):
    """After each epoch: a progress line (rank 0), ``ray.train.report`` and a checkpoint."""

    def __init__(self, trainer: Trainer, rank: int, world: int, progress: bool):
        self.trainer, self.rank, self.world, self.progress = trainer, rank, world, progress

    def after_epoch(self, report: EpochReport, improved: bool, model: RankingModel, state: TrainingState) -> None:
        if self.rank == 0 and self.progress:
            print(_epoch_line(report, self.trainer.config.epochs, state.stopping.metric, self.world), flush=True)
        metrics = {"epoch": report.epoch, "train_loss": report.train_loss, **{f"valid_{k}": v for k, v in report.valid.items()}}
        _report(self.rank, metrics, self.trainer, state)


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    job = TrainJobConfig.model_validate(config["job"])
    schema = FeatureSchema.from_json(config["schema"])
    counts = None if config["feature_counts"] is None else np.asarray(config["feature_counts"], dtype=np.int64)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Ray nodes the workers run on (by node id: nodes of one machine share an address).
    node = np.frombuffer(bytes.fromhex(ray.get_runtime_context().get_node_id()), dtype=np.uint8).copy()
    nodes = len(np.unique(gather_rows(node).reshape(world, -1), axis=0))
    device = ray.train.torch.get_device()
    model = new_model(job, schema, config["sparse"], counts).to(device)
    trainer = Trainer(model, job.train, exchange=ShardedExchange(model) if world > 1 else None)

    state = RunState(stopping=trainer.new_state().stopping)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_checkpoint(Path(directory), trainer)
    state.attempt_start_epochs.append(state.next_epoch)
    state.nodes = nodes

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard, test_shard = ray.train.get_dataset_shard("valid"), ray.train.get_dataset_shard("test")

    shard: list[FeatureBatch] = []  # this worker's training rows, read in its first epoch

    def train_batches(epoch: int) -> Iterator[FeatureBatch]:
        if not shard:
            shard.append(read_shard(train_shard, schema))
        # A fresh permutation of the in-memory rows each epoch: every batch is one
        # vectorised gather, with no Ray Data tasks competing for the workers' CPUs.
        seed = (job.train.seed * 1000 + epoch) * world + rank
        for number, batch in enumerate(minibatches(shard[0], job.train.batch_size, seed=seed)):
            yield batch.to(device)
            if number == 0:
                _maybe_crash(config.get("crash"), epoch, rank, world)

    if state.test is None:
        hooks = [*epoch_hooks(job), ReportToRayTrain(trainer, rank, world, job.progress)]
        trainer.fit(train_batches, lambda: evaluate_shard(model, valid_shard, job.train.eval_batch_size, device), state, hooks)
        state.test = evaluate_shard(model, test_shard, job.train.eval_batch_size, device)
        _report(rank, {"epoch": state.best_epoch, **{f"test_{k}": v for k, v in state.test.items()}}, trainer, state)


def _report(rank: int, metrics: dict[str, Any], trainer: Trainer, state: RunState) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics)  # every worker reports; rank 0's checkpoint holds the shared state
        return
    with tempfile.TemporaryDirectory(prefix="rankstream-ckpt-") as directory:
        write_checkpoint(Path(directory), trainer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _maybe_crash(spec: str | None, epoch: int, rank: int, world: int) -> None:
    if not spec or rank != world - 1:
        return
    crash_epoch, marker = spec.split(":", 1)
    if epoch == int(crash_epoch) and not Path(marker).exists():
        Path(marker).write_text(f"worker {rank} exited in epoch {epoch}\n")
        # Ray Train's controller collects the reports when it polls the workers: exiting
        # before its next poll would lose the last epoch's checkpoint (a real crash then
        # resumes one checkpoint earlier; the test wants the latest).
        time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
        os._exit(1)


def _epoch_line(report: EpochReport, epochs: int, metric: str, world: int) -> str:
    valid = report.valid
    extra = ", ".join(f"{k} {v:.4f}" for k, v in valid.items() if k not in (metric, "rows"))
    return (
        f"epoch {report.epoch + 1}/{epochs}: train loss {report.train_loss:.4f}, "
        f"valid {metric} {valid.get(metric, float('nan')):.4f} ({extra}), "
        f"{report.samples_per_second:,.0f} samples/s on {world} worker(s) "
        f"({report.samples_per_second_per_worker:,.0f} per worker; rank 0 s: "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in report.phase_seconds.items())
        + f"), {report.seconds:.1f} s"
    )


# -- the driver ------------------------------------------------------------------------
def _eval_data_config() -> Any:
    """Train shards of equal length (every step is a collective of all workers);
    valid/test split without dropping rows, so their metrics cover the whole split."""
    from ray.train import DataConfig

    class WholeSplitEvaluation(DataConfig):
        # Ray Train v2 configures one dataset per call, when the workers first ask for it.
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # type: ignore[no-untyped-def]
            evaluation = {name: dataset for name, dataset in datasets.items() if name != "train"}
            training = {name: dataset for name, dataset in datasets.items() if name == "train"}
            output = super().configure(training, world_size, worker_handles, worker_node_ids, **kwargs)
            for name, dataset in evaluation.items():
                dataset = dataset.copy(dataset)
                dataset.context.execution_options = self._resolve_execution_options(name)
                for shard, split in zip(output, dataset.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    shard[name] = split
            return output

    return WholeSplitEvaluation()


def connect_ray(job: TrainJobConfig) -> None:
    """Join ``--address`` (or the job's cluster when RAY_ADDRESS is set, as under
    ``ray job submit``); otherwise start a private local one."""
    import ray

    if ray.is_initialized():
        return
    if job.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=job.address)
    else:
        init_private_ray(num_cpus=job.num_cpus, include_dashboard=False, _temp_dir=job.ray_temp_dir)


def run_training(job: TrainJobConfig) -> Path:
    """Train on Ray and write the bundle to ``job.out``; returns its path."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    schema = load_schema(job.data)
    check_index_ranges(job.data, schema)  # once, from the parquet footers: batches skip the check
    epoch_hooks(job)
    counts = feature_counts(job.data, schema) if job.model.kind == "rafm" else None
    connect_ray(job)
    use_gpu = job.device == "gpu" or (job.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    # NCCL all-reduces dense gradients only; one GPU worker keeps sparse ones.
    sparse = uses_sparse_gradients(job.train.optimizer) and not (use_gpu and job.workers > 1)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # The train split is read once per attempt, each worker holding its shard in memory
    # (4 bytes per field and row) and permuting it per epoch (train_loop).
    datasets = {split: ray.data.read_parquet(str(split_dir(job.data, split))) for split in SPLITS}
    run_name = job.run_name or f"rankstream-train-{job.model.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    resources = {"GPU": 1.0, "CPU": job.cpus_per_worker} if use_gpu else {"CPU": job.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "job": job.model_dump(mode="json"), "schema": schema.to_json(), "sparse": sparse,
            "feature_counts": None if counts is None else counts.tolist(), "crash": os.environ.get(CRASH_ENV),
        },
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=job.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            storage_path=None if job.storage_path is None else str(job.storage_path.resolve()),
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=_eval_data_config(),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {run_name} failed: {result.error}")
    with result.checkpoint.as_directory() as directory:
        state = read_state(Path(directory))
    if state.stopping.best_weights is None:
        raise RuntimeError(f"training run {run_name} kept no best epoch (epochs before {state.stopping.first_candidate_epoch} are warm-up)")
    model = new_model(job, schema, sparse=False, counts=counts)
    model.load_state_dict(state.stopping.best_weights)
    return write_training_bundle(job, model, state, run_name)


def write_training_bundle(job: TrainJobConfig, model: RankingModel, state: RunState, run_name: str) -> Path:
    per_set = embedding_set_information_abundance(model)
    per_field = field_information_abundance(model)
    metrics = {
        "valid": state.best_valid,
        "test": state.test,
        "best_epoch": state.best_epoch,
        "history": [report.model_dump() for report in state.history],
        "attempt_start_epochs": state.attempt_start_epochs,
        "nodes": state.nodes,
        "information_abundance": {"per_field": per_field, "mean": float(np.mean(list(per_field.values()))), "per_set": per_set},
        "ray_train_run": run_name,
    }
    config = job.model_copy(update={"run_name": run_name}).model_dump(mode="json", exclude={"out", "address", "ray_temp_dir", "progress"})
    path = save_bundle(job.out, model, vocabulary_dir=job.data / VOCAB_DIR if (job.data / VOCAB_DIR).is_dir() else None,
                       metrics=metrics, train_config=config)
    plot_curves(state, primary_metric(model.schema.task)[0], path / "training_curves.png")
    vocab_sizes = {spec.name: spec.vocab_size for spec in model.schema.fields}
    series = {model.kind: per_field} if len(per_set) == 1 else {f"{model.kind} set {i}": s for i, s in enumerate(per_set)}
    plot_information_abundance(series, vocab_sizes, path / "information_abundance.png")
    return path


def plot_curves(state: RunState, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [report.epoch + 1 for report in state.history]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [report.train_loss for report in state.history], marker="o")
    loss_axis.set_title("training loss")
    metric_axis.plot(epochs, [report.valid.get(metric, np.nan) for report in state.history], marker="o")
    metric_axis.axvline(state.best_epoch + 1, color="gray", linestyle="--", label="best epoch (the bundle)")
    metric_axis.set_title(f"validation {metric} (whole split)")
    metric_axis.legend()
    for axis in (loss_axis, metric_axis):
        axis.set_xlabel("epoch")
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- command line ----------------------------------------------------------------------
FLAGS = FlatCommand(
    "Train", TrainJobConfig, sections={"train": TrainConfig}, kinds=("model", MODEL_CONFIGS, DEFAULT_KIND),
)  # fmt: skip


def handle(job: TrainJobConfig) -> int:
    path = run_training(job)
    metrics = json.loads((path / "metrics.json").read_text())
    print(f"wrote bundle {path}: best epoch {metrics['best_epoch'] + 1}, valid {_short(metrics['valid'])}, test {_short(metrics['test'])}")
    return 0


def _short(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "rows")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a model on Ray Train and write a bundle")
    command(parser, FLAGS, handle)


if __name__ == "__main__":
    from rayjobs.cli import run_module

    run_module(["train"])
