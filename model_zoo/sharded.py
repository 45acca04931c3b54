"""Embedding tables sharded by row owner across torch.distributed ranks: the
synchronisation of data-parallel training in place of DDP's sparse all-reduce.

Row r of every sparse table (``nn.Embedding(sparse=True)``; all index the schema's
global rows) belongs to rank r mod N, whose copy of it — and of its optimizer state —
is the true one. One step on each rank:
  1. the batch's distinct global rows that other ranks own, grouped by owner, go to
     their owners in one ``all_to_all_single`` of equal chunks (a header of counts and
     batch size, then the ids up to a capacity all ranks agree on from the last step's
     headers; the rare ids past it follow in a second one); its own rows are true
     locally and never travel;
  2. the owners send those rows of every table back (one (rows, Σ widths) float
     block), and they are written into the local tables: forward and backward then run
     on the tables as they are, so every model works unchanged;
  3. after backward, each table's sparse gradient is summed per distinct row and the
     sums for others' rows go back to their owners (the reverse ``all_to_all_single``);
     each owner adds what it received to its own rows' sums, per distinct row, and sets
     them as the tables' coalesced sparse gradients: the optimizer (fused or row-wise
     Adagrad, SGD, …) updates the owned rows only;
  4. dense parameters' gradients go in one flat all-reduce (sum), in flight while
     the row gradients travel.
Each rank weights its mean loss by its share of the global batch (B_r / B), so the
summed gradients are those of the mean loss over the concatenated batch, L2 on the
looked-up rows included. Bytes per rank and step: ids 4·U (a quarter more with the
chunks' headroom), rows and gradients 4·U·W each way (U the distinct rows of the local
batch that others own, about (N−1)/N of them; W the tables' summed widths) plus the ring
all-reduce's ~2·4·D for D dense values — none of it grows with N.

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
from model_zoo.embedding import _gather_rows, prefetch
from model_zoo.optim import _PREFETCH_AHEAD, _check_rows, _distinct_rows, _summed_gradients


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
        self._slot = np.empty(0, dtype=np.int32)  # scratch: row → position among the batch's distinct rows
        self._owner_slot = np.empty(0, dtype=np.int32)  # and among the rows this owner gets gradients for
        self._scratch = np.empty(0, dtype=np.float32)
        self._capacity = 0  # ids per owner in the first all-to-all (agreed by all ranks)

    # -- before forward ----------------------------------------------------------------
    def gather(self, batch: FeatureBatch) -> float:
        """Fetch the batch's rows of every table from their owners into the local tables;
        returns this rank's share of the global batch (its loss weight)."""
        # Compiled passes (the fused Adagrad's): torch.unique, searchsorted and indexed
        # copies cost several times the exchange itself on CPU.
        rows = self.batch_rows(batch).cpu().numpy()
        if self._slot.shape[0] < self.rows:
            self._slot = np.empty(self.rows, dtype=np.int32)
            self._owner_slot = np.empty(self.rows, dtype=np.int32)
        # Rows of other owners, grouped by owner, then this rank's own: those are true
        # here already and never travel.
        sorted_rows = np.sort(rows)
        _check_rows(sorted_rows, self.rows)  # the compiled passes index without bounds checks
        ordered, counts = _grouped_distinct(sorted_rows, self.world, self.rank, self._slot)
        counts[self.rank] = 0
        if not self.tables:
            counts[:] = 0  # nothing to fetch: only the batch sizes travel
        requested, receive_counts, batch_rows = self._send_ids(ordered, counts, len(batch))
        send_counts = counts.tolist()
        travelling = sum(send_counts)
        requested = torch.from_numpy(requested)
        owner_rows, owner_positions = ordered[:0], np.empty(0, dtype=np.int32)
        if self.tables:
            # numpy blocks: torch's allocator returns blocks this large to the OS, and each
            # fresh one page-faults in again every step.
            with torch.no_grad():
                owned_rows = np.empty((len(requested), self.width), dtype=np.float32)
                for table, (lo, hi) in zip(self.tables, self.columns):
                    _gather_rows(table.detach().numpy(), requested.numpy(), owned_rows[:, lo:hi])
                fetched = np.empty((travelling, self.width), dtype=np.float32)
                rows_sent = self._all_to_all(torch.from_numpy(fetched), torch.from_numpy(owned_rows), send_counts, receive_counts, rows=self.width, async_op=True)
                # While the rows travel: the rows whose gradients this owner will hold (those
                # asked of it, then its own), their distinct ascending set and each one's
                # place in it (the gradients arrive coalesced there, so the optimizer neither
                # sorts nor sums them again).
                owner_lookups = np.concatenate([requested.numpy(), ordered[travelling:]])
                owner_rows, owner_positions = _distinct_rows(np.sort(owner_lookups), owner_lookups, self._owner_slot)
                rows_sent.wait()
                for table, (lo, hi) in zip(self.tables, self.columns):
                    _write_rows(table.detach().numpy(), ordered[:travelling], fetched, lo)
                    table.view(-1)[:1].add_(0)  # bump the version counter (derived caches key on it)
        self._step = _StepRows(len(ordered), travelling, owner_rows, owner_positions, send_counts, receive_counts)
        return len(batch) / batch_rows

    def _send_ids(self, ordered: np.ndarray, counts: np.ndarray, batch_size: int) -> tuple[np.ndarray, list[int], int]:
        """Each owner gets the ids asked of it (``ordered``'s first rows, ``counts`` per
        owner) in one all-to-all of equal chunks: a header (count, batch size, the sender's
        largest count) and up to ``_capacity`` ids. Ids past the capacity follow in a
        second all-to-all, which every rank calls alike because every rank reads every
        sender's largest count. Returns the ids asked of this rank (ascending per asker,
        askers in rank order), how many each asked, and the global batch's rows."""
        capacity = self._capacity
        starts = np.cumsum(counts) - counts
        outgoing = np.zeros((self.world, _HEADER + capacity), dtype=np.int32)
        outgoing[:, 0], outgoing[:, 1], outgoing[:, 2] = counts, batch_size, counts.max()
        for owner in range(self.world):
            ids = ordered[starts[owner] : starts[owner] + min(counts[owner], capacity)]
            outgoing[owner, _HEADER : _HEADER + len(ids)] = ids
        incoming = torch.empty(outgoing.shape, dtype=torch.int32, device=self.device)
        self._all_to_all(incoming, torch.from_numpy(outgoing).to(self.device))
        incoming = incoming.cpu().numpy()
        asked = incoming[:, 0].astype(np.int64)
        placed = np.cumsum(asked) - asked
        requested = np.empty(int(asked.sum()), dtype=np.int32)
        for asker in range(self.world):
            fits = min(asked[asker], capacity)
            requested[placed[asker] : placed[asker] + fits] = incoming[asker, _HEADER : _HEADER + fits]
        largest = int(incoming[:, 2].max())
        if largest > capacity:
            beyond_sent = np.maximum(counts - capacity, 0)
            beyond_asked = np.maximum(asked - capacity, 0)
            sent = np.concatenate([ordered[starts[o] + capacity : starts[o] + counts[o]] for o in range(self.world)]).astype(np.int32)
            beyond = torch.empty(int(beyond_asked.sum()), dtype=torch.int32)
            self._all_to_all(beyond, torch.from_numpy(sent), beyond_asked.tolist(), beyond_sent.tolist())
            for asker, chunk in enumerate(beyond.split(beyond_asked.tolist())):
                requested[placed[asker] + capacity : placed[asker] + asked[asker]] = chunk.numpy()
        # The same on every rank (from the same headers): room for the next step's ids
        # with some headroom, so the second all-to-all stays rare.
        self._capacity = largest + largest // 4
        return requested, asked.tolist(), int(incoming[:, 1].sum())

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
            summed = np.empty((step.rows, self.width), dtype=np.float32)  # in the order of the distinct rows (others' first)
            last: tuple[np.ndarray, np.ndarray] | None = None  # tables looked up with the same rows share their positions
            for table, (lo, hi) in zip(self.tables, self.columns):
                if table.grad is None:
                    summed[:, lo:hi] = 0.0
                    continue
                if not table.grad.is_sparse:
                    raise ValueError("a sharded table needs sparse gradients")
                lookups = table.grad._indices()[0].numpy()
                if last is None or not np.array_equal(last[0], lookups):
                    last = (lookups, _positions(lookups, self._slot))
                positions = last[1]
                values = table.grad._values().reshape(-1, hi - lo).contiguous().numpy()
                if self._scratch.shape[0] < step.rows * (hi - lo):
                    self._scratch = np.empty(step.rows * (hi - lo), dtype=np.float32)
                # Summed in a compact block, then copied in: summing straight into the
                # (U, W) block's columns measured 2x slower.
                summed[:, lo:hi] = _summed_gradients(positions, step.rows, values, self._scratch)
            received = np.empty((len(step.owner_positions) - (step.rows - step.travelling), self.width), dtype=np.float32)
            sums_sent = self._all_to_all(torch.from_numpy(received), torch.from_numpy(summed[: step.travelling]), step.receive_counts, step.send_counts, rows=self.width, async_op=True)
            # The owner's gradient, coalesced: its own sums (added while the others' travel)
            # plus what others sent for its rows.
            asked = len(received)
            coalesced = [np.zeros((len(step.owner_rows), hi - lo), dtype=np.float32) for lo, hi in self.columns]
            for block, (lo, hi) in zip(coalesced, self.columns):
                _add_rows(step.owner_positions[asked:], summed[step.travelling :], lo, block)
            sums_sent.wait()
            indices = torch.from_numpy(step.owner_rows).unsqueeze(0)
            for table, block, (lo, hi) in zip(self.tables, coalesced, self.columns):
                _add_rows(step.owner_positions[:asked], received, lo, block)
                table.grad = torch.sparse_coo_tensor(indices, torch.from_numpy(block), table.shape, check_invariants=False, is_coalesced=True)
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
                    input_splits: list[int] | None = None, rows: int = 1, async_op: bool = False) -> dist.Work | None:
        work = dist.all_to_all_single(output, input, output_splits, input_splits, group=self.group, async_op=async_op)
        self.collectives += 1
        sent_to_others = input.numel() - (input_splits[self.rank] * rows if input_splits is not None else input.numel() // self.world)
        self.bytes_sent += sent_to_others * input.element_size()
        return work


_HEADER = 3  # int32s before the ids in each all-to-all chunk: count, batch size, the sender's largest count


@dataclass(frozen=True)
class _StepRows:
    """One step's row bookkeeping between ``gather`` and ``reduce_gradients``."""

    rows: int  # distinct rows of the local batch (others' grouped by owner, then own)
    travelling: int  # of them, the others' (the first ones)
    owner_rows: np.ndarray  # distinct ascending rows this owner gets gradients for
    owner_positions: np.ndarray  # per row asked of this owner, then per own row: its place in owner_rows
    send_counts: list[int]
    receive_counts: list[int]


@numba.njit(cache=True, nogil=True)
def _grouped_distinct(sorted_rows, world, rank, slot):  # pragma: no cover - compiled
    """The distinct rows of ``sorted_rows``: those of owners 0..N-1 except ``rank``, then
    ``rank``'s own (ascending within each); per-owner counts; slot[row] = its position."""
    counts = np.zeros(world, dtype=np.int64)
    for i in range(sorted_rows.shape[0]):
        if i == 0 or sorted_rows[i] != sorted_rows[i - 1]:
            counts[sorted_rows[i] % world] += 1
    starts = np.empty(world, dtype=np.int64)
    position = 0
    for owner in range(world):
        if owner != rank:
            starts[owner] = position
            position += counts[owner]
    starts[rank] = position
    ordered = np.empty(position + counts[rank], dtype=sorted_rows.dtype)
    for i in range(sorted_rows.shape[0]):
        row = sorted_rows[i]
        if i == 0 or row != sorted_rows[i - 1]:
            owner = row % world
            ordered[starts[owner]] = row
            slot[row] = starts[owner]
            starts[owner] += 1
    return ordered, counts


@numba.njit(cache=True, nogil=True)
def _positions(lookups, slot):  # pragma: no cover - compiled
    """slot[lookups] (prefetching slots ahead: the lookups are random rows of a large table)."""
    out = np.empty(lookups.shape[0], dtype=np.int32)
    for i in range(lookups.shape[0]):
        if i + _PREFETCH_AHEAD < lookups.shape[0]:
            prefetch(slot.ctypes.data + lookups[i + _PREFETCH_AHEAD] * slot.itemsize)
        out[i] = slot[lookups[i]]
    return out


@numba.njit(cache=True, nogil=True)
def _write_rows(table, rows, values, column):  # pragma: no cover - compiled
    """table[rows[i]] = values[i, column:column + width] (prefetching rows ahead, as the lookups)."""
    width = table.shape[1]
    row_bytes = width * table.itemsize
    for i in range(rows.shape[0]):
        if i + _PREFETCH_AHEAD < rows.shape[0]:
            prefetch(table.ctypes.data + rows[i + _PREFETCH_AHEAD] * row_bytes)
        for j in range(width):
            table[rows[i], j] = values[i, column + j]


@numba.njit(cache=True, nogil=True)
def _add_rows(positions, values, column, out):  # pragma: no cover - compiled
    """out[positions[i]] += values[i, column:column + width]."""
    width = out.shape[1]
    for i in range(positions.shape[0]):
        for j in range(width):
            out[positions[i], j] += values[i, column + j]
