"""The framework-free training loop (the Ray Train job wraps it).

BCE-with-logits for clicks, MSE for ratings; L2 on the embedding rows each batch
looks up (never on the whole table); early stopping on the validation metric,
keeping the best weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from model_zoo.batch import FeatureBatch
from model_zoo.metrics import primary_metric, task_metrics
from model_zoo.models.base import RankingModel, TrainingOutputs
from model_zoo.optim import FusedSparseAdagrad
from model_zoo.sharded import ShardedExchange
from model_zoo.schema import Task

OptimizerName = Literal["adagrad", "rowwise_adagrad", "sparse_adam", "adam", "sgd"]


class TrainConfig(BaseModel):
    epochs: int = Field(default=50, ge=1, description="most epochs; early stopping usually ends training first")
    batch_size: int = Field(default=1024, ge=1)
    optimizer: OptimizerName = "adagrad"
    learning_rate: float = Field(default=0.05, gt=0)
    # Without L2 the pairwise terms overfit within 2-3 epochs (MovieLens sample, FM k=8:
    # test RMSE 0.990 at l2=0, 0.981 at 0.03, 0.965 at 0.3), but at 0.1 and above the
    # vectors of click data collapse to zero (planted FwFM: AUC 0.795 at 0.03, 0.754 =
    # the linear model at 0.1). The default is the safe middle; tune/table1 sweep it.
    l2: float = Field(default=0.03, ge=0, description="L2 coefficient on looked-up embedding rows")
    patience: int = Field(default=4, ge=1, description="stop after this many epochs without validation improvement")
    eval_batch_size: int = Field(default=65536, ge=1)
    seed: int = 0


def uses_sparse_gradients(optimizer: OptimizerName) -> bool:
    """Adagrad (both kinds), SparseAdam and SGD take sparse embedding gradients (only looked-up rows)."""
    return optimizer in ("adagrad", "rowwise_adagrad", "sparse_adam", "sgd")


def build_optimizers(model: nn.Module, config: TrainConfig) -> list[torch.optim.Optimizer]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    lr = config.learning_rate
    if config.optimizer == "adagrad":
        # Same update; the fused one is ~2× faster on CPU tables but runs on the CPU only.
        if all(p.device.type == "cpu" for p in parameters):
            return [FusedSparseAdagrad(parameters, lr=lr)]
        return [torch.optim.Adagrad(parameters, lr=lr)]
    if config.optimizer == "rowwise_adagrad":
        # One accumulator per table row (FBGEMM's row-wise Adagrad); its kernel is CPU-only.
        if any(p.device.type != "cpu" for p in parameters):
            raise ValueError("rowwise_adagrad runs on CPU parameters only")
        return [FusedSparseAdagrad(parameters, lr=lr, rowwise=True)]
    if config.optimizer == "sgd":
        return [torch.optim.SGD(parameters, lr=lr)]
    if config.optimizer == "adam":
        return [torch.optim.Adam(parameters, lr=lr)]
    # SparseAdam takes only sparse-gradient tables; the rest (bias, R, U, e) use Adam.
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    table_ids = {id(t) for t in tables}
    dense = [p for p in parameters if id(p) not in table_ids]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.SparseAdam(tables, lr=lr)]
    if dense:
        optimizers.append(torch.optim.Adam(dense, lr=lr))
    return optimizers


def loss_function(task: Task) -> nn.Module:
    return nn.BCEWithLogitsLoss() if task == Task.binary else nn.MSELoss()


def minibatches(batch: FeatureBatch, size: int, seed: int | None = None) -> Iterator[FeatureBatch]:
    """Slices of an in-memory batch, shuffled when a seed is given."""
    order = torch.arange(len(batch))
    if seed is not None:
        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(batch), size):
        yield batch.rows(order[start : start + size])


@torch.inference_mode()
def predict(model: RankingModel, batches: Iterable[FeatureBatch]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, outputs) over all batches."""
    was_training = model.training
    model.eval()
    labels, outputs = [], []
    for batch in batches:
        outputs.append(model(batch).cpu().numpy())
        labels.append(batch.label.cpu().numpy())
    model.train(was_training)
    if not labels:  # e.g. a worker's empty shard of a small split
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate(labels), np.concatenate(outputs)


def evaluate(model: RankingModel, batches: Iterable[FeatureBatch]) -> dict[str, float]:
    labels, outputs = predict(model, batches)
    return task_metrics(model.schema.task, labels, outputs)


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    valid: dict[str, float]
    seconds: float
    samples_per_second: float


@dataclass
class TrainResult:
    history: list[EpochReport] = field(default_factory=list)
    best_epoch: int = -1
    best_valid: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(self, model: RankingModel, config: TrainConfig, exchange: ShardedExchange | None = None):
        """``exchange``: data-parallel training over torch.distributed ranks, the sparse
        tables sharded by row owner (see sharded.py); each rank steps on its own batches."""
        self.model = model
        self.config = config
        self.exchange = exchange
        self.optimizers = build_optimizers(model, config)
        self.loss = loss_function(model.schema.task)
        self.metric, self.higher_is_better = primary_metric(model.schema.task)
        # Wall time of each phase of ``step`` (on CPU; GPU kernels run asynchronously);
        # with an exchange also its two halves: fetching rows, sending gradients.
        phases = ("forward", "backward", "optimizer") + (() if exchange is None else ("rows", "gradients"))
        self.phase_seconds = dict.fromkeys(phases, 0.0)

    def batch_loss(self, batch: FeatureBatch) -> Tensor:
        """The forward half of a step: the training loss of one batch."""
        step = self.model.training_outputs(batch)
        loss = self.loss(step.outputs, batch.label) + step.auxiliary_loss
        if self.config.l2 > 0:
            loss = loss + self.config.l2 * step.row_sq_norm / len(batch)
        return loss

    def step(self, batch: FeatureBatch) -> Tensor:
        """One optimizer step; returns the batch's mean loss."""
        phases = self.phase_seconds
        started = time.perf_counter()
        share = 1.0
        if self.exchange is not None:
            share = self.exchange.gather(batch)  # this rank's part of the global batch's mean loss
            phases["rows"] += time.perf_counter() - started
        forward_started = time.perf_counter()
        loss = self.batch_loss(batch)
        forward_done = time.perf_counter()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        (loss * share).backward()
        backward_done = time.perf_counter()
        if self.exchange is not None:
            self.exchange.reduce_gradients()
            phases["gradients"] += time.perf_counter() - backward_done
        optimizer_started = time.perf_counter()
        for optimizer in self.optimizers:
            optimizer.step()
        phases["forward"] += forward_done - forward_started
        phases["backward"] += backward_done - forward_done
        phases["optimizer"] += time.perf_counter() - optimizer_started
        return loss.detach()

    def whole_tables(self) -> None:
        """After sharded steps: every rank's model and optimizer state whole again."""
        if self.exchange is not None:
            self.exchange.consolidate(self.optimizers)

    def fit(
        self,
        train_batches: Callable[[int], Iterable[FeatureBatch]],
        valid_batches: Callable[[], Iterable[FeatureBatch]],
        on_epoch: Callable[[EpochReport], None] | None = None,
    ) -> TrainResult:
        """Train with early stopping; the model ends holding the best epoch's weights.

        ``train_batches(epoch)`` yields that epoch's (shuffled) batches.
        """
        torch.manual_seed(self.config.seed)
        result = TrainResult()
        best_state = None
        stale_epochs = 0
        for epoch in range(self.config.epochs):
            self.model.train()
            started = time.perf_counter()
            total_loss, samples = 0.0, 0
            for batch in train_batches(epoch):
                total_loss += float(self.step(batch)) * len(batch)
                samples += len(batch)
            seconds = time.perf_counter() - started
            valid = evaluate(self.model, valid_batches())
            report = EpochReport(epoch, total_loss / max(samples, 1), valid, seconds, samples / max(seconds, 1e-9))
            result.history.append(report)
            if on_epoch is not None:
                on_epoch(report)
            if self._improves(valid, result.best_valid):
                result.best_epoch, result.best_valid = epoch, valid
                best_state = copy.deepcopy(self.model.state_dict())
                stale_epochs = 0
            else:
                stale_epochs += 1
                if stale_epochs >= self.config.patience:
                    break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return result

    def _improves(self, valid: dict[str, float], best: dict[str, float]) -> bool:
        value = valid[self.metric]
        if np.isnan(value):
            return not best
        if not best:
            return True
        return value > best[self.metric] if self.higher_is_better else value < best[self.metric]


def fit_in_memory(
    model: RankingModel, config: TrainConfig, train: FeatureBatch, valid: FeatureBatch,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> TrainResult:
    """Convenience for data that fits in memory (tests, experiments on samples)."""
    trainer = Trainer(model, config)
    return trainer.fit(
        lambda epoch: minibatches(train, config.batch_size, seed=config.seed * 1000 + epoch),
        lambda: minibatches(valid, config.eval_batch_size),
        on_epoch,
    )
