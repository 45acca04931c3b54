"""``rankstream train`` / ``python -m rayjobs.train``: distributed training on Ray Train.

A ``TorchTrainer`` runs ``train_loop`` on N workers (gloo on CPU, NCCL on GPU). The
embedding tables are sharded by row owner (``model_zoo.sharded``: rows and their
gradients all-to-all, dense gradients in one all-reduce); the tables are made whole
after each epoch, so evaluation and checkpoints see whole tables. Each worker reads its shard of the prepared parquet through Ray Data (the train split
shuffled per epoch: block order and rows within blocks) and steps ``model_zoo.training.Trainer``.
Validation and test predictions of all workers are gathered, so the metrics (AUC
above all) are those of the whole split. Every epoch ends with ``ray.train.report``
and a checkpoint (weights, optimizer state, best weights so far, run state); after a
worker failure the run restarts from the latest one. The best epoch's weights become
the bundle, with metrics, training curves and the embedding-collapse diagnostics.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from model_zoo.bundle import save_bundle
from model_zoo.data.layout import SPLITS, VOCAB_DIR, columns_for, load_schema, split_dir
from model_zoo.data.reader import batch_from_table, check_index_ranges, iter_tables
from model_zoo.diagnostics import (
    embedding_set_information_abundance,
    field_information_abundance,
    plot_information_abundance,
)
from model_zoo.metrics import primary_metric, task_metrics
from model_zoo.models.base import RankingModel
from model_zoo.models.pruned_fwfm import PrunedFwFM
from model_zoo.registry import KINDS, MODELS, build_model
from model_zoo.schema import FeatureSchema, Kind
from model_zoo.sharded import ShardedExchange
from model_zoo.training import OptimizerName, TrainConfig, Trainer, predict, uses_sparse_gradients

# Test hook: "EPOCH:MARKER" makes the last worker exit hard once, in that epoch, and
# record it in the MARKER file (so the restarted attempt trains on).
CRASH_ENV = "RANKSTREAM_TEST_CRASH_WORKER"
MODEL_FILE, BEST_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "best.safetensors", "optimizer.pt", "state.json"


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class TrainJobConfig(BaseModel):
    data: Path
    out: Path
    model: str = "dplr_fwfm"
    dim: int = Field(default=16, ge=1)
    rank: int = Field(default=2, ge=1, description="DPLR rank; for pruned_fwfm the matched rank")
    sets: int = Field(default=2, ge=1, description="embedding sets of me_* models")
    rafm_ranks: list[int] | None = None
    rafm_thresholds: list[int] | None = None
    prune_epoch: int | None = Field(default=None, ge=1, description="pruned_fwfm: prune before this epoch (default epochs // 2)")
    train: TrainConfig = Field(default_factory=TrainConfig)
    workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=0.5, gt=0)
    placement_strategy: PlacementStrategy = Field(
        default="PACK", description="of the workers over the cluster's nodes (Ray placement-group strategy)")
    device: str = Field(default="auto", pattern="^(auto|cpu|gpu)$")
    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local cluster started here")
    ray_temp_dir: str | None = None
    storage_path: Path | None = None
    run_name: str | None = None
    max_failures: int = Field(default=2, ge=0)
    progress: bool = True


class RunState(BaseModel):
    """What a checkpoint carries besides tensors."""

    next_epoch: int = 0
    best_epoch: int = -1
    best_valid: dict[str, float] = Field(default_factory=dict)
    stale_epochs: int = 0
    history: list[dict[str, Any]] = Field(default_factory=list)
    attempt_start_epochs: list[int] = Field(default_factory=list)
    test: dict[str, float] | None = None  # set once training has finished


# -- the model -------------------------------------------------------------------------
def model_options(job: TrainJobConfig, sparse: bool) -> dict[str, Any]:
    """The job's model options that the model's constructor takes (the zoo grows)."""
    kind = job.model
    if kind not in KINDS:
        raise ValueError(f"unknown model {kind!r}; choose one of {list(KINDS)}")
    base = kind[3:] if kind.startswith("me_") else kind
    accepted = inspect.signature(MODELS[base]).parameters
    candidates = {
        "rank": job.rank, "sparse": sparse,
        "ranks": job.rafm_ranks or [job.dim], "thresholds": job.rafm_thresholds or [],
    }  # fmt: skip
    options = {name: value for name, value in candidates.items() if name in accepted}
    if kind.startswith("me_"):
        options["sets"] = job.sets
    return options


def prune_epoch(job: TrainJobConfig) -> int | None:
    if job.model != "pruned_fwfm":
        return None
    epoch = job.prune_epoch if job.prune_epoch is not None else max(1, job.train.epochs // 2)
    if epoch >= job.train.epochs:
        raise ValueError(f"pruned_fwfm prunes before epoch {epoch}, so it needs more than {epoch} epochs")
    return epoch


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
    model = build_model(schema, job.model, job.dim, **model_options(job, sparse))
    if counts is not None:
        model.set_feature_counts(counts)
    return model


def prune_in_place(model: PrunedFwFM, rank: int) -> None:
    """Keep the matched number of largest |R_ij| (PrunedFwFM.from_fwfm's rule)."""
    with torch.no_grad():
        model.kept.copy_(PrunedFwFM.from_fwfm(model, rank).kept)


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


def sum_over_workers(values: list[float]) -> list[float]:
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def evaluate_shard(model: RankingModel, shard: Any, batch_size: int, device: torch.device) -> dict[str, float]:
    """Metrics over the whole split: every worker predicts its shard, all rows are gathered."""
    schema = model.schema
    batches = (batch_from_table(schema, b, checked=True).to(device) for b in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow"))
    labels, outputs = predict(model, batches)
    labels, outputs = gather_rows(labels.astype(np.float32)), gather_rows(outputs.astype(np.float32))
    metrics = task_metrics(schema.task, labels, outputs) if len(labels) else {}
    return {**metrics, "rows": float(len(labels))}


# -- checkpoints -----------------------------------------------------------------------
def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone().contiguous() for key, value in model.state_dict().items()}


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


def write_checkpoint(directory: Path, model: RankingModel, trainer: Trainer, best: dict[str, torch.Tensor], state: RunState) -> None:
    save_file(_cpu_state(model), str(directory / MODEL_FILE))
    save_file(best, str(directory / BEST_FILE))
    torch.save(_optimizer_states(trainer), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(state.model_dump_json(indent=2))


def read_checkpoint(directory: Path, model: RankingModel, trainer: Trainer) -> tuple[dict[str, torch.Tensor], RunState]:
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(directory / MODEL_FILE), device=str(device)))
    for optimizer, state in zip(trainer.optimizers, torch.load(directory / OPTIMIZER_FILE, weights_only=True)):
        optimizer.load_state_dict(state)
    best = load_file(str(directory / BEST_FILE))
    return best, RunState.model_validate_json((directory / STATE_FILE).read_text())


# -- the worker loop -------------------------------------------------------------------
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
    metric, higher_is_better = primary_metric(schema.task)
    pruned_at = prune_epoch(job)

    best = _cpu_state(model)
    state = RunState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            best, state = read_checkpoint(Path(directory), model, trainer)
    state.attempt_start_epochs.append(state.next_epoch)

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard, test_shard = ray.train.get_dataset_shard("valid"), ray.train.get_dataset_shard("test")
    batch_size = job.train.batch_size
    while state.test is None and state.next_epoch < job.train.epochs and state.stale_epochs < job.train.patience:
        epoch = state.next_epoch
        if pruned_at is not None and epoch == pruned_at:
            prune_in_place(model, job.rank)
        model.train()
        trainer.phase_seconds = dict.fromkeys(trainer.phase_seconds, 0.0)
        started = time.perf_counter()
        loss_sum, samples, data_seconds, steps = 0.0, 0, 0.0, 0
        sent_before = 0 if trainer.exchange is None else trainer.exchange.bytes_sent
        # Arrow tables: list columns convert through their offsets, not row by row.
        batches = train_shard.iter_batches(batch_size=batch_size, batch_format="pyarrow")
        fetched = time.perf_counter()
        for number, data in enumerate(batches):
            batch = batch_from_table(schema, data, checked=True).to(device)  # run_training checked the ranges
            data_seconds += time.perf_counter() - fetched
            loss_sum += float(trainer.step(batch)) * len(batch)
            samples += len(batch)
            steps += 1
            if number == 0:
                _maybe_crash(config.get("crash"), epoch, rank, world)
            fetched = time.perf_counter()
        seconds = time.perf_counter() - started
        trainer.whole_tables()  # for evaluation and the checkpoint
        loss_sum, total = sum_over_workers([loss_sum, float(samples)])
        valid = evaluate_shard(model, valid_shard, job.train.eval_batch_size, device)
        record = {
            "epoch": epoch, "train_loss": loss_sum / max(total, 1.0), "valid": valid, "seconds": seconds,
            "samples": int(total), "samples_per_second": total / max(seconds, 1e-9),
            "samples_per_second_per_worker": total / max(seconds, 1e-9) / world,
            "phase_seconds": {"data": data_seconds, **trainer.phase_seconds}, "steps": steps, "nodes": int(nodes),
            "bytes_sent_per_step": 0.0 if trainer.exchange is None else (trainer.exchange.bytes_sent - sent_before) / max(steps, 1),
        }
        state.history.append(record)
        eligible = pruned_at is None or epoch >= pruned_at
        if eligible and _improves(valid.get(metric, float("nan")), state.best_valid.get(metric), higher_is_better):
            state.best_epoch, state.best_valid, state.stale_epochs = epoch, valid, 0
            best = _cpu_state(model)
        elif eligible:
            state.stale_epochs += 1
        state.next_epoch = epoch + 1
        if rank == 0 and job.progress:
            print(_epoch_line(record, job.train.epochs, metric, world), flush=True)
        _report(rank, {"epoch": epoch, "train_loss": record["train_loss"], **{f"valid_{k}": v for k, v in valid.items()}},
                model, trainer, best, state)

    if state.test is None:
        model.load_state_dict({key: value.to(device) for key, value in best.items()})
        state.test = evaluate_shard(model, test_shard, job.train.eval_batch_size, device)
        _report(rank, {"epoch": state.best_epoch, **{f"test_{k}": v for k, v in state.test.items()}}, model, trainer, best, state)


def _improves(value: float, best: float | None, higher_is_better: bool) -> bool:
    if np.isnan(value):
        return best is None
    if best is None or np.isnan(best):
        return True
    return value > best if higher_is_better else value < best


def _report(rank: int, metrics: dict[str, Any], model: RankingModel, trainer: Trainer, best: dict[str, torch.Tensor], state: RunState) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics)  # every worker reports; rank 0's checkpoint holds the shared state
        return
    with tempfile.TemporaryDirectory(prefix="rankstream-ckpt-") as directory:
        write_checkpoint(Path(directory), model, trainer, best, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _maybe_crash(spec: str | None, epoch: int, rank: int, world: int) -> None:
    if not spec or rank != world - 1:
        return
    crash_epoch, marker = spec.split(":", 1)
    if epoch == int(crash_epoch) and not Path(marker).exists():
        Path(marker).write_text(f"worker {rank} exited in epoch {epoch}\n")
        os._exit(1)


def _epoch_line(record: dict[str, Any], epochs: int, metric: str, world: int) -> str:
    valid = record["valid"]
    extra = ", ".join(f"{k} {v:.4f}" for k, v in valid.items() if k not in (metric, "rows"))
    phases = record["phase_seconds"]
    return (
        f"epoch {record['epoch'] + 1}/{epochs}: train loss {record['train_loss']:.4f}, "
        f"valid {metric} {valid.get(metric, float('nan')):.4f} ({extra}), "
        f"{record['samples_per_second']:,.0f} samples/s on {world} worker(s) "
        f"({record['samples_per_second_per_worker']:,.0f} per worker; rank 0 s: "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())
        + f"), {record['seconds']:.1f} s"
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


def permute_rows(block: Any) -> Any:
    return block.take(np.random.default_rng().permutation(block.num_rows))


def connect_ray(job: TrainJobConfig) -> None:
    """Join ``--address`` (or the job's cluster when RAY_ADDRESS is set, as under
    ``ray job submit``); otherwise start a private local one."""
    import ray

    if ray.is_initialized():
        return
    if job.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=job.address)
    else:
        ray.init(address="local", num_cpus=job.num_cpus, include_dashboard=False, _temp_dir=job.ray_temp_dir)


def run_training(job: TrainJobConfig) -> Path:
    """Train on Ray and write the bundle to ``job.out``; returns its path."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    schema = load_schema(job.data)
    check_index_ranges(job.data, schema)  # once, from the parquet footers: batches skip the check
    model_options(job, sparse=False)
    pruned_at = prune_epoch(job)
    counts = feature_counts(job.data, schema) if job.model == "rafm" else None
    connect_ray(job)
    use_gpu = job.device == "gpu" or (job.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    # NCCL all-reduces dense gradients only; one GPU worker keeps sparse ones.
    sparse = uses_sparse_gradients(job.train.optimizer) and not (use_gpu and job.workers > 1)
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {split: ray.data.read_parquet(str(split_dir(job.data, split))) for split in SPLITS}
    # Shuffled anew each epoch (each epoch re-executes the plan): blocks in random order,
    # rows permuted within each block (a row group) — Ray Data's local shuffle buffer
    # cost ~7x more per batch here.
    datasets["train"] = datasets["train"].randomize_block_order().map_batches(
        permute_rows, batch_size=None, batch_format="pyarrow"
    )
    run_name = job.run_name or f"rankstream-train-{job.model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
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
        state = RunState.model_validate_json((Path(directory) / STATE_FILE).read_text())
        best = load_file(str(Path(directory) / BEST_FILE))
    model = new_model(job, schema, sparse=False, counts=counts)
    model.load_state_dict(best)
    if pruned_at is not None and state.best_epoch < pruned_at:
        raise RuntimeError("pruned_fwfm kept no epoch after pruning")
    return write_training_bundle(job, model, state, run_name)


def write_training_bundle(job: TrainJobConfig, model: RankingModel, state: RunState, run_name: str) -> Path:
    per_set = embedding_set_information_abundance(model)
    per_field = field_information_abundance(model)
    metrics = {
        "valid": state.best_valid,
        "test": state.test,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "attempt_start_epochs": state.attempt_start_epochs,
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

    epochs = [record["epoch"] + 1 for record in state.history]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [record["train_loss"] for record in state.history], marker="o")
    loss_axis.set_title("training loss")
    metric_axis.plot(epochs, [record["valid"].get(metric, np.nan) for record in state.history], marker="o")
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
def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--data", type=Path, required=True, help="a `rankstream prepare` or `rankstream synth` output")
    parser.add_argument("--out", type=Path, required=True, help="the bundle directory")
    parser.add_argument("--model", choices=KINDS, default="dplr_fwfm")
    parser.add_argument("--dim", type=int, default=16, help="embedding size k")
    parser.add_argument("--rank", type=int, default=2, help="DPLR rank ρ (pruned_fwfm: keep ρ(m+1) entries of R)")
    parser.add_argument("--sets", type=int, default=2, help="embedding sets of me_* models")
    parser.add_argument("--rafm-ranks", type=int, nargs="+", help="rafm: embedding size per frequency level (ends with --dim)")
    parser.add_argument("--rafm-thresholds", type=int, nargs="+", help="rafm: training-count thresholds between levels")
    parser.add_argument("--prune-epoch", type=int, help="pruned_fwfm: train as FwFM, prune before this epoch (default epochs // 2)")
    parser.add_argument("--optimizer", choices=get_args(OptimizerName), default=defaults.optimizer)
    parser.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--l2", type=float, default=defaults.l2, help="L2 coefficient on looked-up embedding rows")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per worker")
    parser.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--patience", type=int, default=defaults.patience, help="early stopping on the validation metric (AUC or MSE)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5, help="fractional leaves CPU for Ray Data (2-core deadlock)")
    parser.add_argument("--placement-strategy", choices=get_args(PlacementStrategy), default=TrainJobConfig.model_fields["placement_strategy"].default,
                        help="workers over nodes: SPREAD puts them on different nodes where it can")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="auto: GPU workers when the cluster has GPUs")
    parser.add_argument("--address", help="an existing Ray cluster (default: RAY_ADDRESS, else a new local one)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local cluster started when there is no --address")
    parser.add_argument("--ray-temp-dir", help="temp dir of that local cluster (keep it short)")
    parser.add_argument("--storage-path", type=Path, help="where Ray Train keeps results and checkpoints (default ~/ray_results)")
    parser.add_argument("--run-name", help="Ray Train run name (default: unique; reusing one resumes that run)")
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the latest checkpoint")
    parser.add_argument("--no-progress", action="store_true")


def job_from_args(args: argparse.Namespace) -> TrainJobConfig:
    train = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, learning_rate=args.learning_rate,
        l2=args.l2, patience=args.patience, eval_batch_size=args.eval_batch_size, seed=args.seed,
    )  # fmt: skip
    return TrainJobConfig(
        data=args.data, out=args.out, model=args.model, dim=args.dim, rank=args.rank, sets=args.sets,
        rafm_ranks=args.rafm_ranks, rafm_thresholds=args.rafm_thresholds, prune_epoch=args.prune_epoch, train=train,
        workers=args.workers, cpus_per_worker=args.cpus_per_worker, placement_strategy=args.placement_strategy, device=args.device, address=args.address,
        num_cpus=args.num_cpus, ray_temp_dir=args.ray_temp_dir, storage_path=args.storage_path,
        run_name=args.run_name, max_failures=args.max_failures, progress=not args.no_progress,
    )  # fmt: skip


def handle(args: argparse.Namespace) -> int:
    path = run_training(job_from_args(args))
    metrics = json.loads((path / "metrics.json").read_text())
    print(f"wrote bundle {path}: best epoch {metrics['best_epoch'] + 1}, valid {_short(metrics['valid'])}, test {_short(metrics['test'])}")
    return 0


def _short(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "rows")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a model on Ray Train and write a bundle")
    add_arguments(parser)
    parser.set_defaults(func=handle)


if __name__ == "__main__":
    from rayjobs.cli import run_module

    run_module(["train"])
