"""``rankstream bench train``: training throughput on 1 and N workers, Criteo-shaped data.

39 fields, k = 16, batch 4,096 per worker, a table of about 1M rows (≈25.6k values per
field, Zipf-distributed like real categorical logs), labels at a 25% click rate.
Two variants for each worker count (aggregate samples/s, ms per batch by phase on
rank 0, bytes each worker sent per step):

- ``ray``: ``rankstream train`` itself (Ray Train, the sharded embedding exchange over
  gloo, Ray Data ingest) on the distribution written as a prepared dataset; the last
  epoch is measured (the first pays the warm-up).
- ``ingest-free``: N processes on gloo stepping ``Trainer.step`` (the step the Ray
  worker runs) on pre-built batches: the step and its synchronisation alone.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from model_zoo.batch import FeatureBatch
from model_zoo.data.layout import SCHEMA_FILE, SPLITS, arrow_schema
from model_zoo.model_config import CONFIG_BY_KIND, ModelOptions
from model_zoo.schema import FeatureSchema, FieldSpec, Role
from model_zoo.training import (
    TrainConfig,
    Trainer,
    prune_in_place,
    uses_sparse_gradients,
)
from model_zoo.sharded import ShardedExchange
from rayjobs.bench import write_results
from rayjobs.cluster import init_private_ray
from rayjobs.options import FlatCommand, command
from rayjobs.train import TrainJobConfig, run_training

PHASES = ("data", "rows", "forward", "backward", "gradients", "optimizer")
STEP_PHASES = PHASES[1:]


class TrainThroughput(BaseModel):
    model: str
    rank: int | None
    workers: int
    variant: str  # "ray" or "ingest-free"
    samples_per_second_per_worker: float
    samples_per_second: float
    ms_per_batch: dict[str, float]  # per phase (data only for Ray runs), and "step" = every phase but data
    step_samples_per_second_per_worker: float  # batch size / step time: the training step alone
    batches: int
    bytes_sent_per_step: float  # by each worker: rows, gradients and its part of the all-reduce


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


def model_config(kind: str, dim: int, rank: int | None) -> ModelOptions:
    return CONFIG_BY_KIND[kind](dim=dim, **({} if rank is None else {"rank": rank}))


def build_for_training(schema: FeatureSchema, kind: str, dim: int, rank: int | None, optimizer: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_config(kind, dim, rank).build(schema, sparse=uses_sparse_gradients(optimizer))
    if kind == "pruned_fwfm":
        with torch.no_grad():
            model.interaction_weights.normal_()  # a "trained" R with distinct magnitudes
        prune_in_place(model, rank)
    return model


def _ingest_free_rank(rank: int, workers: int, directory: str, kind: str, rank_option: int | None, args: BenchTrainJob) -> None:
    torch.set_num_threads(1)
    if workers > 1:
        dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=workers)
    schema = criteo_shaped_schema(args.fields, args.table_rows)
    rng = np.random.default_rng(args.train.seed + rank)
    batches = []
    for _ in range(args.batches):
        columns, labels = draw_columns(schema, args.train.batch_size, args.zipf, rng)
        batches.append(FeatureBatch.from_columns(schema, columns, labels))
    model = build_for_training(schema, kind, args.dim, rank_option, args.train.optimizer, args.train.seed)
    exchange = ShardedExchange(model) if workers > 1 else None
    trainer = Trainer(model, args.train, exchange=exchange)
    for batch in batches[: args.warmup]:
        trainer.step(batch)
    trainer.phase_seconds = dict.fromkeys(trainer.phase_seconds, 0.0)
    sent_before = 0 if exchange is None else exchange.bytes_sent
    if workers > 1:
        dist.barrier()
    started = time.perf_counter()
    for batch in batches[args.warmup :]:
        trainer.step(batch)
    seconds = time.perf_counter() - started
    timed = len(batches) - args.warmup
    result = {
        "seconds": seconds, "timed": timed, "phase_seconds": trainer.phase_seconds,
        "bytes_sent_per_step": 0.0 if exchange is None else (exchange.bytes_sent - sent_before) / timed,
    }  # fmt: skip
    Path(directory, f"rank{rank}.json").write_text(json.dumps(result))
    if workers > 1:
        # Both ranks past their last collective before either tears gloo down: a rank that
        # closed its pairs while the other still sent aborted ("terminate called …") at exit.
        dist.barrier()
        dist.destroy_process_group()


def bench_ingest_free(kind: str, rank: int | None, workers: int, args: BenchTrainJob) -> TrainThroughput:
    """N processes (gloo, one thread each) stepping ``Trainer.step`` on pre-built batches:
    the step and its synchronisation without any ingest."""
    with tempfile.TemporaryDirectory(prefix="rs-bench-sync-", dir="/tmp") as directory:
        mp.start_processes(_ingest_free_rank, args=(workers, directory, kind, rank, args), nprocs=workers, start_method="spawn")
        results = [json.loads(Path(directory, f"rank{r}.json").read_text()) for r in range(workers)]
    timed = results[0]["timed"]
    seconds = max(r["seconds"] for r in results)
    per_batch = {name: 1000 * value / timed for name, value in results[0]["phase_seconds"].items()}
    step_ms = sum(per_batch.get(name, 0.0) for name in STEP_PHASES)
    rate = timed * args.train.batch_size / seconds
    return TrainThroughput(
        model=kind, rank=rank, workers=workers, variant="ingest-free", samples_per_second_per_worker=rate,
        samples_per_second=rate * workers, ms_per_batch={**per_batch, "step": step_ms},
        step_samples_per_second_per_worker=args.train.batch_size / step_ms * 1000, batches=timed,
        bytes_sent_per_step=results[0]["bytes_sent_per_step"],
    )  # fmt: skip


def write_dataset(directory: Path, schema: FeatureSchema, rows: dict[str, int], args: BenchTrainJob) -> None:
    rng = np.random.default_rng(args.train.seed)
    table_schema = arrow_schema(schema)
    for split in SPLITS:
        (directory / split).mkdir(parents=True)
        columns, labels = draw_columns(schema, rows[split], args.zipf, rng)
        arrays = [pa.array(columns[name]) for name in schema.names] + [pa.array(labels)]
        pq.write_table(pa.Table.from_arrays(arrays, schema=table_schema), directory / split / "part-00000.parquet", row_group_size=1 << 15)
    schema.save(directory / SCHEMA_FILE)


def bench_ray(data: Path, kind: str, rank: int | None, workers: int, args: BenchTrainJob, scratch: Path) -> TrainThroughput:
    job = TrainJobConfig(
        data=data, out=scratch / f"bundle-{kind}-{rank}-{workers}", model=model_config(kind, args.dim, rank),
        train=args.train.model_copy(update={"patience": args.train.epochs}),
        workers=workers, cpus_per_worker=args.cpus_per_worker, storage_path=scratch / "runs", max_failures=0,
        progress=False,
    )  # fmt: skip
    path = run_training(job)
    last = json.loads((path / "metrics.json").read_text())["history"][-1]  # the first epoch pays the warm-up
    batches = last["steps"]
    per_batch = {name: 1000 * last["phase_seconds"].get(name, 0.0) / batches for name in PHASES}
    step_ms = sum(per_batch[name] for name in STEP_PHASES)
    return TrainThroughput(
        model=kind, rank=rank, workers=workers, variant="ray", samples_per_second_per_worker=last["samples_per_second_per_worker"],
        samples_per_second=last["samples_per_second"], ms_per_batch={**per_batch, "step": step_ms},
        step_samples_per_second_per_worker=args.train.batch_size / step_ms * 1000, batches=batches,
        bytes_sent_per_step=last["bytes_sent_per_step"],
    )  # fmt: skip


def configurations(args: BenchTrainJob) -> list[tuple[str, int | None]]:
    return [
        (kind, rank) for kind in args.models for rank in (args.ranks if "rank" in CONFIG_BY_KIND[kind].model_fields else [None])
    ]


def run_bench(args: BenchTrainJob) -> list[TrainThroughput]:
    import ray

    records = [
        bench_ingest_free(kind, rank, workers, args)
        for workers in args.workers
        for kind, rank in tqdm(configurations(args), desc=f"ingest-free, {workers} worker(s)", unit="model")
        if "ingest-free" in args.variants
    ]
    if "ray" not in args.variants:
        return records
    schema = criteo_shaped_schema(args.fields, args.table_rows)
    with tempfile.TemporaryDirectory(prefix="rs-bench-train-", dir="/tmp") as scratch:
        scratch_path = Path(scratch)
        rows = {"train": args.ray_rows, "valid": args.train.batch_size, "test": args.train.batch_size}
        write_dataset(scratch_path / "data", schema, rows, args)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            temp_dir = f"/tmp/rs-bt-{sock.getsockname()[1]}"  # short: Ray's socket paths
        # Workers at the driver's niceness: Ray's default 15 yields to any niced work on the machine.
        init_private_ray(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir, worker_niceness=0)
        try:
            for workers in args.workers:
                for kind, rank in tqdm(configurations(args), desc=f"ray, {workers} worker(s)", unit="model"):
                    records.append(bench_ray(scratch_path / "data", kind, rank, workers, args, scratch_path))
        finally:
            ray.shutdown()
    return records


def label(record: TrainThroughput) -> str:
    name = record.model if record.rank is None else f"{record.model} ρ={record.rank}"
    return f"{name} ({record.variant})"


def speedups(records: list[TrainThroughput]) -> dict[str, float]:
    """Aggregate samples/s on N workers over 1 worker, per configuration and variant."""
    one = {label(r): r.samples_per_second for r in records if r.workers == 1}
    return {f"{label(r)} {r.workers} workers": r.samples_per_second / one[label(r)] for r in records if r.workers > 1 and label(r) in one}


def plot(records: list[TrainThroughput], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(label(r) for r in records))
    worker_counts = sorted({r.workers for r in records})
    figure, axes = plt.subplots(1, 1 + len(worker_counts), figsize=(6 + 5 * len(worker_counts), 4.5))
    width = 0.8 / len(worker_counts)
    for offset, workers in enumerate(worker_counts):
        values = {label(r): r.samples_per_second for r in records if r.workers == workers}
        axes[0].bar(np.arange(len(names)) + offset * width, [values.get(n, 0) for n in names], width, label=f"{workers} worker(s)")
    axes[0].set_xticks(np.arange(len(names)) + width * (len(worker_counts) - 1) / 2, names, rotation=45, ha="right")
    axes[0].set_ylabel("samples/s, all workers")
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


def handle(args: BenchTrainJob) -> int:
    records = run_bench(args)
    for r in records:
        phases = ", ".join(f"{name} {value:.1f}" for name, value in r.ms_per_batch.items())
        print(
            f"{label(r):28s} {r.workers} worker(s): {r.samples_per_second:9,.0f} samples/s "
            f"({r.samples_per_second_per_worker:9,.0f} per worker); {r.bytes_sent_per_step / 1e6:.2f} MB sent per worker and step; "
            f"ms per batch: {phases}"
        )
    ratios = speedups(records)
    for name, ratio in ratios.items():
        print(f"speed-up {name}: {ratio:.2f}x one worker")
    setup = args.model_dump(mode="json", include={"fields", "dim", "table_rows", "zipf", "ray_rows", "cpus_per_worker", "train"})
    report = {"setup": setup, "records": [r.model_dump() for r in records], "speedups": ratios}
    write_results(args.json_path, json.dumps(report, indent=2) + "\n", lambda path: plot(records, path))
    return 0


class BenchTrainJob(BaseModel):
    """`rankstream bench train`: the configurations measured and the data's shape."""

    model_config = ConfigDict(extra="forbid")

    json_path: Path = Field(default=Path("bench-results/train.json"), description="output JSON (the plot goes beside it)")
    models: list[Literal[tuple(CONFIG_BY_KIND)]] = Field(default=["fm", "fwfm", "pruned_fwfm", "dplr_fwfm"], min_length=1)  # type: ignore[valid-type]
    ranks: list[int] = Field(default=[1, 2, 3], min_length=1, description="for the models with a rank")
    workers: list[int] = Field(default=[1, 2], min_length=1, description="worker counts, each run both ways")
    variants: list[Literal["ray", "ingest-free"]] = Field(default=["ray", "ingest-free"], min_length=1)
    fields: int = Field(default=39, ge=2)
    dim: int = Field(default=16, ge=1)
    table_rows: int = Field(default=1_000_000, ge=1, description="embedding-table rows over all fields")
    zipf: float = Field(default=1.05, ge=0, description="exponent of the value distribution (0: uniform)")
    batches: int = Field(default=25, ge=2, description="ingest-free: batches stepped per worker (warm-up included)")
    warmup: int = Field(default=5, ge=1)
    ray_rows: int = Field(default=245_760, ge=1, description="Ray runs: training rows per epoch (all workers)")
    cpus_per_worker: float = Field(default=0.5, gt=0)
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the local Ray started for the Ray runs")
    # Per worker; the Ray runs measure their last epoch (the first pays the warm-up).
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(batch_size=4096, epochs=2))


# No --patience: the Ray runs never stop early (patience = epochs).
FLAGS = FlatCommand("BenchTrain", BenchTrainJob, sections={"train": TrainConfig}, exclude=("patience",), shortcuts={"json-path": "json"})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="training samples/s on 1 and N workers, through Ray Train and ingest-free")
    command(parser, FLAGS, handle)
