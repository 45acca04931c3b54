"""The sharded embedding exchange on 2 gloo ranks (torch.multiprocessing, no Ray) equals
one process stepping on the concatenated batches: weights and optimizer state."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_zoo.batch import FeatureBatch, concat_batches
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Role
from model_zoo.sharded import ShardedExchange
from model_zoo.training import TrainConfig, Trainer

MODELS = ("dplr_fwfm", "me_fm", "me_dnn")
OPTIMIZERS = ("adagrad", "rowwise_adagrad")
# Rows per rank at each step, unequal: the loss is the mean over the global batch. The
# second step asks for many more rows than the first, past the id capacity the first
# one set: its ids travel partly in the second all-to-all.
STEP_ROWS = ((6, 4), (40, 24), (40, 24))


def schema() -> FeatureSchema:
    return FeatureSchema(fields=(
        FieldSpec(name="user", role=Role.context, vocab_size=30),
        FieldSpec(name="genres", role=Role.item, kind=Kind.multi, vocab_size=12),
        FieldSpec(name="movie", role=Role.item, vocab_size=50),
    ))  # fmt: skip


def batches(seed: int) -> list[list[FeatureBatch]]:
    """Per step, one batch per rank (bags of different widths)."""
    rng = np.random.default_rng(seed)
    spec = schema()
    steps = []
    for step_rows in STEP_ROWS:
        per_rank = []
        for rows in step_rows:
            length = int(rng.integers(1, 4))
            weights = rng.uniform(0.5, 2.0, size=(rows, length)).astype(np.float32)
            weights[rng.random((rows, length)) < 0.3] = 0.0
            columns = {  # int32, as the prepared parquet holds them
                "user": rng.integers(0, 30, rows, dtype=np.int32), "movie": rng.integers(0, 50, rows, dtype=np.int32),
                "genres": (rng.integers(0, 12, (rows, length), dtype=np.int32), weights),
            }  # fmt: skip
            per_rank.append(FeatureBatch.from_columns(spec, columns, (rng.random(rows) < 0.4).astype(np.float32)))
        steps.append(per_rank)
    return steps


def trained(kind: str, optimizer: str, exchange_rank: int | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    model = build_model(schema(), kind, 4, sparse=True)
    config = TrainConfig(optimizer=optimizer, learning_rate=0.1, l2=0.05)
    trainer = Trainer(model, config, exchange=None if exchange_rank is None else ShardedExchange(model))
    for per_rank in batches(seed=11):
        trainer.step(concat_batches(per_rank) if exchange_rank is None else per_rank[exchange_rank])
    trainer.whole_tables()
    state = {f"weight.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for optimizer_ in trainer.optimizers:
        for number, parameter in enumerate(p for group in optimizer_.param_groups for p in group["params"]):
            state[f"sum.{number}"] = optimizer_.state[parameter]["sum"].clone()
    return state


def _rank_main(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2)
    try:
        results = {(kind, optimizer): trained(kind, optimizer, rank) for kind in MODELS for optimizer in OPTIMIZERS}
        torch.save(results, f"{directory}/rank{rank}.pt")
        dist.barrier()  # as bench train: both ranks past their last collective before teardown
    finally:
        dist.destroy_process_group()


def test_two_sharded_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    # One pair of processes for every case: spawning them costs more than the steps.
    mp.start_processes(_rank_main, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for kind, optimizer in per_rank[0]:
        single = trained(kind, optimizer, None)
        for rank in (0, 1):
            sharded = per_rank[rank][kind, optimizer]
            assert sharded.keys() == single.keys()
            for name, value in single.items():
                torch.testing.assert_close(sharded[name], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{kind} {optimizer} {name} on rank {rank}: {m}")
