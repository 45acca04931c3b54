"""Embedding tables sharded by row owner across torch.distributed ranks: the
synchronisation of data-parallel training in place of DDP's sparse all-reduce.

Row r of every sparse table (``nn.Embedding(sparse=True)``; all index the schema's
global rows) belongs to rank r mod N, whose copy of it — and of its optimizer state —
is the true one. One step on each rank:
  1. the batch's distinct global rows that other ranks own, grouped by owner, go to
     their owners (``all_to_all_single`` of the ids; first a tiny one of the counts
     and batch sizes); its own rows are true locally and never travel;
  2. the owners send those rows of every table back (one (rows, Σ widths) float
     block), and they are written into the local tables: forward and backward then run
     on the tables as they are, so every model works unchanged;
  3. after backward, each table's sparse gradient is summed per distinct row and the
     sums for others' rows go back to their owners (the reverse ``all_to_all_single``);
     each owner sets what it received plus its own rows' sums as the tables' sparse
     gradients: the optimizer (fused or row-wise Adagrad, SGD, …) updates the owned
     rows only, summing what several ranks sent for one row;
  4. dense parameters' gradients go in one flat all-reduce (sum), in flight while
     the row gradients travel.
Each rank weights its mean loss by its share of the global batch (B_r / B), so the
summed gradients are those of the mean loss over the concatenated batch, L2 on the
looked-up rows included. Bytes per rank and step: ids 4·U, rows and gradients 4·U·W
each way (U the distinct rows of the local batch that others own, about (N−1)/N of
them; W the tables' summed widths) plus the ring all-reduce's ~2·4·D for D dense
values — none of it grows with N.

Rows a rank does not own go stale between steps (they are refreshed before each use);
``consolidate`` makes every rank's tables and optimizer state whole again (before
evaluation and checkpoints), so a checkpoint holds whole tables and resumes on any
number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from model_zoo.batch import FeatureBatch
from model_zoo.models.base import RankingModel
from model_zoo.optim import _distinct_rows, _summed_gradients


class ShardedExchange:
    def __init__(self, model: RankingModel, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.tables: list[Tensor] = list({id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse}.values())
        rows = model.schema.total_vocab
        for table in self.tables:
            if table.shape[0] != rows:
                raise ValueError(f"a sparse table of {table.shape[0]} rows does not index the schema's {rows} global rows")
        table_ids = {id(t) for t in self.tables}
        self.dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
        widths = [t.shape[1] for t in self.tables]
        self.columns = [(sum(widths[:i]), sum(widths[: i + 1])) for i in range(len(widths))]
        self.width = sum(widths)
        self.device = next(model.parameters()).device
        if self.tables and self.device.type != "cpu":
            raise ValueError("sharded tables run on CPU (their row passes are compiled for it)")
        self.offsets = torch.as_tensor(model.schema.offsets, dtype=torch.int64, device=self.device)
        self.index = model.schema.index
        # Running totals: bytes this rank sent to others (it receives as much on average;
        # the all-reduce counted as a ring's) and collectives called.
        self.bytes_sent = 0
        self.collectives = 0
        self.rows = rows
        self._step: _StepRows | None = None
        self._slot = np.empty(0, dtype=np.int32)  # scratch: row → position
        self._scratch = np.empty(0, dtype=np.float32)

    # -- before forward ----------------------------------------------------------------
    def gather(self, batch: FeatureBatch) -> float:
        """Fetch the batch's rows of every table from their owners into the local tables;
        returns this rank's share of the global batch (its loss weight)."""
        # Compiled passes (the fused Adagrad's): torch.unique, searchsorted and indexed
        # copies cost several times the exchange itself on CPU.
        rows = self.batch_rows(batch).cpu().numpy()
        if self._slot.shape[0] < self.rows:
            self._slot = np.empty(self.rows, dtype=np.int32)
        unique, _ = _distinct_rows(np.sort(rows), rows[:0], self._slot)
        # Rows of other owners, grouped by owner, then this rank's own: those are true
        # here already and never travel.
        ordered, counts = _by_owner(unique, self.world, self.rank, self._slot)
        counts[self.rank] = 0
        header = torch.stack([torch.from_numpy(counts), torch.full((self.world,), len(batch))], dim=1).to(self.device)
        received_header = torch.empty_like(header)
        self._all_to_all(received_header, header)
        send_counts, receive_counts = counts.tolist(), received_header[:, 0].tolist()
        travelling = sum(send_counts)
        requested = torch.empty(sum(receive_counts), dtype=torch.int32)
        if self.tables:
            self._all_to_all(requested, torch.from_numpy(ordered[:travelling].astype(np.int32)), receive_counts, send_counts)
            with torch.no_grad():
                owned_rows = torch.empty(len(requested), self.width)
                for table, (lo, hi) in zip(self.tables, self.columns):
                    _read_rows(table.detach().numpy(), requested.numpy(), owned_rows.numpy(), lo)
                fetched = torch.empty(travelling, self.width)
                self._all_to_all(fetched, owned_rows, send_counts, receive_counts, rows=self.width)
                for table, (lo, hi) in zip(self.tables, self.columns):
                    _write_rows(table.detach().numpy(), ordered[:travelling], fetched.numpy(), lo)
                    table.view(-1)[:1].add_(0)  # bump the version counter (derived caches key on it)
        own = torch.from_numpy(ordered[travelling:])
        self._step = _StepRows(len(ordered), torch.cat([requested.to(torch.int64), own]), send_counts, receive_counts)
        return len(batch) / float(received_header[:, 1].sum())

    def batch_rows(self, batch: FeatureBatch) -> Tensor:
        """Every global row the batch looks up (with repeats), flat."""
        parts = [(batch.single + self.offsets[[self.index[n] for n in batch.single_fields]]).reshape(-1)]
        parts += [(bag.values + self.offsets[self.index[name] : self.index[name] + 1]).reshape(-1) for name, bag in zip(batch.bag_fields, batch.bags)]
        return torch.cat(parts)

    # -- after backward ------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        """Owners get the summed row gradients (as the tables' sparse gradients); dense
        gradients are summed over ranks."""
        if self._step is None:
            raise RuntimeError("reduce_gradients without a gather for this step")
        step, self._step = self._step, None
        pending = None
        if self.dense:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense]
            flat = torch.cat([g.reshape(-1) for g in grads])
            # In flight while the row gradients travel (latency-bound for small models).
            pending = dist.all_reduce(flat, group=self.group, async_op=True)
            self.collectives += 1
            self.bytes_sent += 2 * flat.numel() * flat.element_size() * (self.world - 1) // self.world
        if self.tables:
            summed = torch.zeros(step.rows, self.width)  # in the order of the distinct rows (others' first)
            for table, (lo, hi) in zip(self.tables, self.columns):
                if table.grad is None:
                    continue
                if not table.grad.is_sparse:
                    raise ValueError("a sharded table needs sparse gradients")
                positions = self._slot[table.grad._indices()[0].numpy()]
                values = table.grad._values().reshape(-1, hi - lo).contiguous().numpy()
                if self._scratch.shape[0] < step.rows * (hi - lo):
                    self._scratch = np.empty(step.rows * (hi - lo), dtype=np.float32)
                # Summed in a compact block, then copied in: summing straight into the
                # (U, W) block's columns measured 2x slower.
                summed[:, lo:hi] = torch.from_numpy(_summed_gradients(positions, step.rows, values, self._scratch))
            travelling = sum(step.send_counts)
            received = summed.new_empty(len(step.requested) - (step.rows - travelling), self.width)
            self._all_to_all(received, summed[:travelling], step.receive_counts, step.send_counts, rows=self.width)
            # The owner's gradient: the rows others asked for (what they sent), then its own.
            values = torch.cat([received, summed[travelling:]])
            indices = step.requested.unsqueeze(0)
            for table, (lo, hi) in zip(self.tables, self.columns):
                table.grad = torch.sparse_coo_tensor(indices, values[:, lo:hi].contiguous(), table.shape, check_invariants=False)
        if pending is not None:
            pending.wait()
            for parameter, value in zip(self.dense, flat.split([p.numel() for p in self.dense])):
                parameter.grad = value.view_as(parameter)

    # -- whole tables ----------------------------------------------------------------------
    @torch.no_grad()
    def consolidate(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Every rank gets whole tables and whole row optimizer state (each owner's rows)."""
        for table in self.tables:
            not_owned = torch.arange(table.shape[0], device=self.device) % self.world != self.rank
            not_owned = not_owned.nonzero().squeeze(1)
            row_state = [
                value
                for optimizer in optimizers
                for value in optimizer.state.get(table, {}).values()
                if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == table.shape[0]
            ]
            for tensor in [table, *row_state]:
                tensor.index_fill_(0, not_owned, 0.0)
                dist.all_reduce(tensor, group=self.group)

    def _all_to_all(self, output: Tensor, input: Tensor, output_splits: list[int] | None = None,
                    input_splits: list[int] | None = None, rows: int = 1) -> None:
        dist.all_to_all_single(output, input, output_splits, input_splits, group=self.group)
        self.collectives += 1
        sent_to_others = input.numel() - (input_splits[self.rank] * rows if input_splits is not None else input.numel() // self.world)
        self.bytes_sent += sent_to_others * input.element_size()


@dataclass(frozen=True)
class _StepRows:
    """One step's row bookkeeping between ``gather`` and ``reduce_gradients``."""

    rows: int  # distinct rows of the local batch (others' grouped by owner, then own)
    requested: Tensor  # rows other ranks asked of this owner, then its own
    send_counts: list[int]
    receive_counts: list[int]


@numba.njit(cache=True, nogil=True)
def _by_owner(distinct, world, rank, slot):  # pragma: no cover - compiled
    """``distinct`` regrouped: rows of owners 0..N-1 except ``rank``, then ``rank``'s own
    (ascending within each); per-owner counts; slot[row] = the row's new position."""
    counts = np.zeros(world, dtype=np.int64)
    for i in range(distinct.shape[0]):
        counts[distinct[i] % world] += 1
    starts = np.empty(world, dtype=np.int64)
    position = 0
    for owner in range(world):
        if owner != rank:
            starts[owner] = position
            position += counts[owner]
    starts[rank] = position
    ordered = np.empty_like(distinct)
    for i in range(distinct.shape[0]):
        row = distinct[i]
        owner = row % world
        ordered[starts[owner]] = row
        slot[row] = starts[owner]
        starts[owner] += 1
    return ordered, counts


@numba.njit(cache=True, nogil=True)
def _read_rows(table, rows, out, column):  # pragma: no cover - compiled
    """out[i, column:column + width] = table[rows[i]]."""
    count, width = table.shape
    for i in range(rows.shape[0]):
        row = rows[i]
        if row < 0 or row >= count:
            raise IndexError("row outside the table")
        for j in range(width):
            out[i, column + j] = table[row, j]


@numba.njit(cache=True, nogil=True)
def _write_rows(table, rows, values, column):  # pragma: no cover - compiled
    """table[rows[i]] = values[i, column:column + width]."""
    width = table.shape[1]
    for i in range(rows.shape[0]):
        for j in range(width):
            table[rows[i], j] = values[i, column + j]
