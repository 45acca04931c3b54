"""The framework-free training loop (the Ray Train job wraps it).

BCE-with-logits for clicks, MSE for ratings; L2 on the embedding rows each batch
looks up (never on the whole table); early stopping on the validation metric,
keeping the best weights. ``Trainer.fit`` is the one epoch loop: in-process, in the
Ray Train worker and in Tune trials.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from model_zoo.batch import FeatureBatch
from model_zoo.metrics import primary_metric, task_metrics
from model_zoo.models.base import CTRModel, RankingModel
from model_zoo.models.pruned_fwfm import PrunedFwFM
from model_zoo.optim import FusedSparseAdagrad
from model_zoo.sharded import ShardedExchange
from model_zoo.schema import Task

OptimizerName = Literal["adagrad", "rowwise_adagrad", "sparse_adam", "adam", "sgd"]


class TrainConfig(BaseModel):
    """The training settings every path shares (declared once: the CLI flags of train,
    tune, table1 and bench train come from these fields)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=50, ge=1, description="most epochs; early stopping usually ends training first")
    # Smaller batches, more steps: at 1024 the DPLR (U and e at a tenth of the rate) stays
    # 0.8% behind the FwFM (MovieLens sample, test RMSE 0.9697 against 0.9620), at 256
    # 0.2% (0.9629 against 0.9608).
    batch_size: int = Field(default=256, ge=1)
    optimizer: OptimizerName = "adagrad"
    learning_rate: float = Field(default=0.05, gt=0)
    # Without L2 the pairwise terms overfit within 2-3 epochs (MovieLens sample, FM k=8:
    # test RMSE 0.990 at l2=0, 0.981 at 0.03, 0.965 at 0.3), but at 0.1 and above the
    # vectors of click data collapse to zero (planted FwFM: AUC 0.795 at 0.03, 0.754 =
    # the linear model at 0.1). The default is the safe middle; tune/table1 sweep it.
    l2: float = Field(default=0.03, ge=0, description="L2 coefficient on looked-up embedding rows")
    interaction_lr_scale: float | None = Field(
        default=None, gt=0,
        description="learning rate of the interaction parameters (R, U and e, W) as a fraction of learning_rate (unset: each model's own)",
    )
    patience: int = Field(default=4, ge=1, description="stop after this many epochs without validation improvement")
    eval_batch_size: int = Field(default=65536, ge=1)
    seed: int = 0


def uses_sparse_gradients(optimizer: OptimizerName) -> bool:
    """Adagrad (both kinds), SparseAdam and SGD take sparse embedding gradients (only looked-up rows)."""
    return optimizer in ("adagrad", "rowwise_adagrad", "sparse_adam", "sgd")


def parameter_groups(parameters: list[nn.Parameter], model: nn.Module, config: TrainConfig) -> list[dict]:
    """``parameters`` as optimizer groups: each interaction module's parameters at its
    learning-rate scale × the learning rate, the rest at the learning rate."""
    scale_of: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, CTRModel):
            scale = config.interaction_lr_scale or module.interaction_lr_scale
            scale_of.update((id(p), scale) for p in module.interaction_parameters())
    scales = sorted({scale_of.get(id(p), 1.0) for p in parameters}, reverse=True)
    return [
        {"params": [p for p in parameters if scale_of.get(id(p), 1.0) == scale], "lr": config.learning_rate * scale}
        for scale in scales
    ]


def build_optimizers(model: nn.Module, config: TrainConfig) -> list[torch.optim.Optimizer]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = parameter_groups(parameters, model, config)
    if config.optimizer == "adagrad":
        # Same update; the fused one is ~2× faster on CPU tables but runs on the CPU only.
        if all(p.device.type == "cpu" for p in parameters):
            return [FusedSparseAdagrad(groups)]
        return [torch.optim.Adagrad(groups)]
    if config.optimizer == "rowwise_adagrad":
        # One accumulator per table row (FBGEMM's row-wise Adagrad); its kernel is CPU-only.
        if any(p.device.type != "cpu" for p in parameters):
            raise ValueError("rowwise_adagrad runs on CPU parameters only")
        return [FusedSparseAdagrad(groups, rowwise=True)]
    if config.optimizer == "sgd":
        return [torch.optim.SGD(groups)]
    if config.optimizer == "adam":
        return [torch.optim.Adam(groups)]
    # SparseAdam takes only sparse-gradient tables; the rest (bias, R, U, e) use Adam.
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    table_ids = {id(t) for t in tables}
    dense = [p for p in parameters if id(p) not in table_ids]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.SparseAdam(tables, lr=config.learning_rate)]
    if dense:
        optimizers.append(torch.optim.Adam(parameter_groups(dense, model, config)))
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


class EpochReport(BaseModel):
    """One epoch: training loss and speed (summed over ranks), the validation metrics,
    and per phase the seconds this rank spent (``data``: waiting for the next batch)."""

    epoch: int
    train_loss: float
    valid: dict[str, float] = Field(default_factory=dict)
    seconds: float
    samples: int
    samples_per_second: float
    samples_per_second_per_worker: float
    phase_seconds: dict[str, float] = Field(default_factory=dict)
    steps: int = 0
    bytes_sent_per_step: float = 0.0


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    """The one model-selection comparison. NaN (e.g. AUC on a one-class split) beats
    nothing but an empty record, and any number beats a NaN record."""
    if np.isnan(value):
        return best is None
    if best is None or np.isnan(best):
        return True
    return value > best if higher_is_better else value < best


class EarlyStopping(BaseModel):
    """Early stopping on the validation metric: serialisable (checkpoints carry it), with
    the best epoch's weights held beside it (``best_weights``, saved as their own file)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    metric: str
    higher_is_better: bool
    patience: int = Field(ge=1)
    # Epochs before this one never become the best nor count as stale (a warm-up phase,
    # e.g. the pruned FwFM's dense epochs).
    first_candidate_epoch: int = 0
    best_epoch: int = -1
    best_valid: dict[str, float] = Field(default_factory=dict)
    stale_epochs: int = 0
    best_weights: dict[str, Tensor] | None = Field(default=None, exclude=True)

    @classmethod
    def for_task(cls, task: Task, patience: int) -> "EarlyStopping":
        metric, higher_is_better = primary_metric(task)
        return cls(metric=metric, higher_is_better=higher_is_better, patience=patience)

    @property
    def stopped(self) -> bool:
        return self.stale_epochs >= self.patience

    def observe(self, epoch: int, valid: dict[str, float], model: nn.Module) -> bool:
        """Record an epoch's validation metrics; True (and the weights kept) when it is the new best."""
        if epoch < self.first_candidate_epoch:
            return False
        if is_better(valid.get(self.metric, float("nan")), self.best_valid.get(self.metric), self.higher_is_better):
            self.best_epoch, self.best_valid, self.stale_epochs = epoch, valid, 0
            self.best_weights = cpu_state(model)
            return True
        self.stale_epochs += 1
        return False


class TrainingState(BaseModel):
    """Where a run stands: what ``Trainer.fit`` resumes from."""

    next_epoch: int = 0
    stopping: EarlyStopping
    history: list[EpochReport] = Field(default_factory=list)

    @property
    def best_epoch(self) -> int:
        return self.stopping.best_epoch

    @property
    def best_valid(self) -> dict[str, float]:
        return self.stopping.best_valid


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().cpu().clone().contiguous() for key, value in model.state_dict().items()}


class EpochHook:
    """Called around every epoch of ``Trainer.fit``; subclasses override what they need."""

    def before_epoch(self, epoch: int, model: RankingModel, state: TrainingState) -> None:
        pass

    def after_epoch(self, report: EpochReport, improved: bool, model: RankingModel, state: TrainingState) -> None:
        pass


class PruneBeforeEpoch(EpochHook):
    """The pruned FwFM's two phases: it trains as a dense FwFM, keeps the ρ(m+1)
    largest |R_ij| before epoch ``epoch`` (``PrunedFwFM.from_fwfm``'s rule) and fine-tunes
    the kept entries; only pruned epochs are candidates for the best."""

    def __init__(self, epoch: int, rank: int):
        self.epoch, self.rank = epoch, rank

    def before_epoch(self, epoch: int, model: RankingModel, state: TrainingState) -> None:
        state.stopping.first_candidate_epoch = self.epoch
        if epoch == self.epoch:
            prune_in_place(model, self.rank)


def prune_in_place(model: RankingModel, rank: int) -> None:
    if not isinstance(model, PrunedFwFM):
        raise ValueError(f"only a pruned_fwfm prunes, not {model.kind}")
    with torch.no_grad():
        model.kept.copy_(PrunedFwFM.from_fwfm(model, rank).kept)


class Trainer:
    def __init__(self, model: RankingModel, config: TrainConfig, exchange: ShardedExchange | None = None):
        """``exchange``: data-parallel training over torch.distributed ranks, the sparse
        tables sharded by row owner (see sharded.py); each rank steps on its own batches."""
        self.model = model
        self.config = config
        self.exchange = exchange
        self.optimizers = build_optimizers(model, config)
        self.loss = loss_function(model.schema.task)
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

    def train_epoch(self, epoch: int, batches: Iterable[FeatureBatch]) -> EpochReport:
        """Step through one epoch's batches; the tables end whole. Loss and samples are
        summed over the ranks; the phase times are this rank's."""
        self.model.train()
        self.phase_seconds = dict.fromkeys(self.phase_seconds, 0.0)
        sent_before = 0 if self.exchange is None else self.exchange.bytes_sent
        started = fetched = time.perf_counter()
        loss_sum, samples, steps, data_seconds = 0.0, 0, 0, 0.0
        for batch in batches:
            data_seconds += time.perf_counter() - fetched
            loss_sum += float(self.step(batch)) * len(batch)
            samples += len(batch)
            steps += 1
            fetched = time.perf_counter()
        seconds = time.perf_counter() - started
        self.whole_tables()
        workers = 1
        if self.exchange is not None:
            workers = self.exchange.world
            # On the exchange's device: NCCL reduces GPU tensors only.
            totals = torch.tensor([loss_sum, float(samples)], dtype=torch.float64, device=self.exchange.device)
            dist.all_reduce(totals, group=self.exchange.group)
            loss_sum, samples = totals[0].item(), int(totals[1].item())
        rate = samples / max(seconds, 1e-9)
        sent = 0 if self.exchange is None else self.exchange.bytes_sent - sent_before
        return EpochReport(
            epoch=epoch, train_loss=loss_sum / max(samples, 1), seconds=seconds, samples=samples,
            samples_per_second=rate, samples_per_second_per_worker=rate / workers,
            phase_seconds={"data": data_seconds, **self.phase_seconds}, steps=steps, bytes_sent_per_step=sent / max(steps, 1),
        )  # fmt: skip

    def new_state(self) -> TrainingState:
        return TrainingState(stopping=EarlyStopping.for_task(self.model.schema.task, self.config.patience))

    def fit(
        self,
        train_batches: Callable[[int], Iterable[FeatureBatch]],
        validate: Callable[[], dict[str, float]],
        state: TrainingState | None = None,
        hooks: Sequence[EpochHook] = (),
    ) -> TrainingState:
        """The epoch loop: train with early stopping, from ``state`` when resuming; the
        model ends holding the best epoch's weights.

        ``train_batches(epoch)`` yields that epoch's (shuffled) batches; ``validate()``
        gives the validation metrics of the model as it is.
        """
        state = state or self.new_state()
        if state.next_epoch == 0:
            torch.manual_seed(self.config.seed)
        while state.next_epoch < self.config.epochs and not state.stopping.stopped:
            epoch = state.next_epoch
            for hook in hooks:
                hook.before_epoch(epoch, self.model, state)
            report = self.train_epoch(epoch, train_batches(epoch))
            report.valid = validate()
            improved = state.stopping.observe(epoch, report.valid, self.model)
            state.history.append(report)
            state.next_epoch = epoch + 1
            for hook in hooks:
                hook.after_epoch(report, improved, self.model, state)
        if state.stopping.best_weights is not None:
            device = next(self.model.parameters()).device
            self.model.load_state_dict({key: value.to(device) for key, value in state.stopping.best_weights.items()})
        return state


def fit_in_memory(
    model: RankingModel, config: TrainConfig, train: FeatureBatch, valid: FeatureBatch,
    state: TrainingState | None = None, hooks: Sequence[EpochHook] = (),
) -> TrainingState:
    """``Trainer.fit`` on data that fits in memory (tests, Tune trials, experiments on samples)."""
    return Trainer(model, config).fit(
        lambda epoch: minibatches(train, config.batch_size, seed=config.seed * 1000 + epoch),
        lambda: evaluate(model, minibatches(valid, config.eval_batch_size)),
        state, hooks,
    )
