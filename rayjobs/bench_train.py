"""``rankstream bench train``: training throughput per worker on Criteo-shaped data.

39 fields, k = 16, batch 4,096 per worker, a table of about 1M rows (≈25.6k values per
field, Zipf-distributed like real categorical logs), labels at a 25% click rate.

- 1 worker: the plain in-process loop, ``model_zoo.training.Trainer.step`` (the step
  the Ray worker runs) on pre-built batches, one thread: forward, backward and
  optimizer time per batch.
- N workers (default 2): ``rankstream train`` itself (Ray Train, DDP over gloo, Ray
  Data ingest) on the same distribution written as a prepared dataset; the last
  epoch's samples/s per worker and rank 0's time per batch in data (Ray Data +
  conversion), forward, backward (with DDP's all-reduce) and optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel
from tqdm import tqdm

from model_zoo.batch import FeatureBatch
from model_zoo.data.layout import SCHEMA_FILE, SPLITS, arrow_schema
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Role
from model_zoo.training import (
    OptimizerName,
    TrainConfig,
    Trainer,
    uses_sparse_gradients,
)
from rayjobs.bench import write_results
from rayjobs.train import TrainJobConfig, prune_in_place, run_training

PHASES = ("data", "forward", "backward", "optimizer")


class TrainThroughput(BaseModel):
    model: str
    rank: int | None
    workers: int
    samples_per_second_per_worker: float
    samples_per_second: float
    ms_per_batch: dict[str, float]  # per phase (data only for Ray runs), and "step" = forward + backward + optimizer
    step_samples_per_second_per_worker: float  # batch size / step time: the training step alone
    batches: int


def criteo_shaped_schema(fields: int, table_rows: int) -> FeatureSchema:
    vocab = max(3, table_rows // fields)
    return FeatureSchema(
        fields=tuple(
            FieldSpec(name=f"f{i}", role=Role.context if i < fields // 2 else Role.item, vocab_size=vocab)
            for i in range(fields)
        )
    )


def draw_columns(schema: FeatureSchema, rows: int, zipf: float, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-field indices, Zipf over each vocabulary (exponent 0: uniform), and labels."""
    vocab = schema.fields[0].vocab_size
    weights = np.arange(1, vocab + 1, dtype=np.float64) ** -zipf
    cumulative = np.cumsum(weights / weights.sum())
    columns = {}
    for spec in schema.fields:
        drawn = np.searchsorted(cumulative, rng.random(rows), side="right")
        columns[spec.name] = rng.permutation(vocab)[np.minimum(drawn, vocab - 1)].astype(np.int32)
    labels = (rng.random(rows) < 0.25).astype(np.float32)
    return columns, labels


def build_for_training(schema: FeatureSchema, kind: str, dim: int, rank: int | None, optimizer: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = {} if rank is None else {"rank": rank}
    model = build_model(schema, kind, dim, sparse=uses_sparse_gradients(optimizer), **options)
    if kind == "pruned_fwfm":
        with torch.no_grad():
            model.interaction_weights.normal_()  # a "trained" R with distinct magnitudes
        prune_in_place(model, rank)
    return model


def bench_one_worker(schema: FeatureSchema, kind: str, rank: int | None, args: argparse.Namespace) -> TrainThroughput:
    rng = np.random.default_rng(args.seed)
    batches = []
    for _ in range(args.batches):
        columns, labels = draw_columns(schema, args.batch_size, args.zipf, rng)
        batches.append(FeatureBatch.from_columns(schema, columns, labels))
    model = build_for_training(schema, kind, args.dim, rank, args.optimizer, args.seed)
    trainer = Trainer(model, TrainConfig(batch_size=args.batch_size, optimizer=args.optimizer, learning_rate=args.lr))
    for batch in batches[: args.warmup]:
        trainer.step(batch)
    trainer.phase_seconds = dict.fromkeys(trainer.phase_seconds, 0.0)
    started = time.perf_counter()
    for batch in batches[args.warmup :]:
        trainer.step(batch)
    seconds = time.perf_counter() - started
    timed = len(batches) - args.warmup
    per_batch = {name: 1000 * value / timed for name, value in trainer.phase_seconds.items()}
    step_ms = sum(per_batch.values())
    rate = timed * args.batch_size / seconds
    return TrainThroughput(
        model=kind, rank=rank, workers=1, samples_per_second_per_worker=rate, samples_per_second=rate,
        ms_per_batch={**per_batch, "step": step_ms}, step_samples_per_second_per_worker=args.batch_size / step_ms * 1000,
        batches=timed,
    )  # fmt: skip


def write_dataset(directory: Path, schema: FeatureSchema, rows: dict[str, int], args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    table_schema = arrow_schema(schema)
    for split in SPLITS:
        (directory / split).mkdir(parents=True)
        columns, labels = draw_columns(schema, rows[split], args.zipf, rng)
        arrays = [pa.array(columns[name]) for name in schema.names] + [pa.array(labels)]
        pq.write_table(pa.Table.from_arrays(arrays, schema=table_schema), directory / split / "part-00000.parquet", row_group_size=1 << 15)
    schema.save(directory / SCHEMA_FILE)


def bench_ray(data: Path, kind: str, rank: int | None, workers: int, args: argparse.Namespace, scratch: Path) -> TrainThroughput:
    job = TrainJobConfig(
        data=data, out=scratch / f"bundle-{kind}-{rank}-{workers}", model=kind, dim=args.dim, rank=rank or 1,
        train=TrainConfig(epochs=args.ray_epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                          learning_rate=args.lr, patience=args.ray_epochs, seed=args.seed),
        workers=workers, cpus_per_worker=args.cpus_per_worker, storage_path=scratch / "runs", max_failures=0,
        progress=False,
    )  # fmt: skip
    path = run_training(job)
    last = json.loads((path / "metrics.json").read_text())["history"][-1]  # the first epoch pays the warm-up
    batches = -(-last["samples"] // (workers * args.batch_size))
    per_batch = {name: 1000 * last["phase_seconds"][name] / batches for name in PHASES}
    step_ms = per_batch["forward"] + per_batch["backward"] + per_batch["optimizer"]
    return TrainThroughput(
        model=kind, rank=rank, workers=workers, samples_per_second_per_worker=last["samples_per_second_per_worker"],
        samples_per_second=last["samples_per_second"], ms_per_batch={**per_batch, "step": step_ms},
        step_samples_per_second_per_worker=args.batch_size / step_ms * 1000, batches=batches,
    )  # fmt: skip


def configurations(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    ranked = {"pruned_fwfm", "dplr_fwfm"}
    return [(kind, rank) for kind in args.models for rank in (args.ranks if kind in ranked else [None])]


def run_bench(args: argparse.Namespace) -> list[TrainThroughput]:
    torch.set_num_threads(1)  # one core per worker, as each Ray worker gets
    schema = criteo_shaped_schema(args.fields, args.table_rows)
    records = [bench_one_worker(schema, kind, rank, args) for kind, rank in tqdm(configurations(args), desc="1 worker", unit="model")]
    ray_workers = [w for w in args.workers if w > 1]
    if not ray_workers:
        return records
    import ray

    with tempfile.TemporaryDirectory(prefix="rs-bench-train-", dir="/tmp") as scratch:
        scratch_path = Path(scratch)
        rows = {"train": args.ray_rows, "valid": args.batch_size, "test": args.batch_size}
        write_dataset(scratch_path / "data", schema, rows, args)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            temp_dir = f"/tmp/rs-bt-{sock.getsockname()[1]}"  # short: Ray's socket paths
        ray.init(address="local", num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir)
        try:
            for workers in ray_workers:
                for kind, rank in tqdm(configurations(args), desc=f"{workers} workers", unit="model"):
                    records.append(bench_ray(scratch_path / "data", kind, rank, workers, args, scratch_path))
        finally:
            ray.shutdown()
    return records


def label(record: TrainThroughput) -> str:
    return record.model if record.rank is None else f"{record.model} ρ={record.rank}"


def plot(records: list[TrainThroughput], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(label(r) for r in records))
    worker_counts = sorted({r.workers for r in records})
    figure, axes = plt.subplots(1, 1 + len(worker_counts), figsize=(6 + 5 * len(worker_counts), 4.5))
    width = 0.8 / len(worker_counts)
    for offset, workers in enumerate(worker_counts):
        values = {label(r): r.samples_per_second_per_worker for r in records if r.workers == workers}
        axes[0].bar(np.arange(len(names)) + offset * width, [values.get(n, 0) for n in names], width, label=f"{workers} worker(s)")
    axes[0].set_xticks(np.arange(len(names)) + width * (len(worker_counts) - 1) / 2, names, rotation=45, ha="right")
    axes[0].set_ylabel("samples/s per worker")
    axes[0].legend()
    for axis, workers in zip(axes[1:], worker_counts):
        chosen = {label(r): r for r in records if r.workers == workers}
        bottom = np.zeros(len(names))
        for phase in PHASES:
            heights = np.array([chosen[n].ms_per_batch.get(phase, 0.0) if n in chosen else 0.0 for n in names])
            axis.bar(names, heights, bottom=bottom, label=phase)
            bottom += heights
        axis.set_title(f"{workers} worker(s): ms per batch by phase")
        axis.tick_params(axis="x", rotation=45)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def handle(args: argparse.Namespace) -> int:
    records = run_bench(args)
    for r in records:
        phases = ", ".join(f"{name} {value:.1f}" for name, value in r.ms_per_batch.items())
        print(
            f"{label(r):16s} {r.workers} worker(s): {r.samples_per_second_per_worker:9,.0f} samples/s per worker "
            f"(step alone {r.step_samples_per_second_per_worker:9,.0f}); ms per batch: {phases}"
        )
    setup = {key: getattr(args, key) for key in ("fields", "dim", "batch_size", "table_rows", "zipf", "optimizer", "lr", "ray_rows", "cpus_per_worker")}
    report = {"setup": setup, "records": [r.model_dump() for r in records]}
    write_results(args.json, json.dumps(report, indent=2) + "\n", lambda path: plot(records, path))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="training samples/s per worker, 1 worker and Ray Train DDP")
    parser.add_argument("--json", default="bench-results/train.json", help="output JSON (the plot goes beside it)")
    parser.add_argument("--models", nargs="+", default=["fm", "fwfm", "pruned_fwfm", "dplr_fwfm"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3], help="for dplr_fwfm and pruned_fwfm")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="1 = the in-process loop; more = Ray Train")
    parser.add_argument("--fields", type=int, default=39)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4096, help="per worker")
    parser.add_argument("--table-rows", type=int, default=1_000_000, help="embedding-table rows over all fields")
    parser.add_argument("--zipf", type=float, default=1.05, help="exponent of the value distribution (0: uniform)")
    parser.add_argument("--optimizer", choices=get_args(OptimizerName), default="adagrad")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batches", type=int, default=25, help="1 worker: batches stepped (warm-up included)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ray-rows", type=int, default=245_760, help="Ray runs: training rows per epoch (all workers)")
    parser.add_argument("--ray-epochs", type=int, default=2, help="Ray runs: the last epoch is measured")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started for the Ray runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=handle)
