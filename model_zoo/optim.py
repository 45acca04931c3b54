"""Adagrad whose embedding-table update touches only the looked-up rows, in compiled
passes over those rows in sorted order.

The update is memory-bound: each distinct looked-up row is a read-modify-write of a
random table row and of its accumulator. torch's sparse Adagrad coalesces the gradient
and runs several sparse ops over it (about 100 ms per batch of 4,096 rows × 39 fields
on a 1M-row table on one core). Here, per step and table:
  1. sort the looked-up rows (numpy's vectorised sort, ~2 ms for 160k rows) and take
     the distinct ones; tables looked up with the same rows (vectors and linear
     weights) share this;
  2. sum each distinct row's gradients (exact Adagrad steps on the summed gradient);
  3. update the rows in ascending order, prefetching a few rows ahead: ascending
     addresses let the hardware stream, the prefetches keep more misses in flight.
The 1M × 16 table's update takes ~13 ms this way against ~34 ms for one pass in
first-seen order (and ~100 ms for torch's).
Updates per element, as ``torch.optim.Adagrad`` (no lr decay, no weight decay):
    state += g²;  row −= lr · g / (√state + eps)
or, with ``rowwise=True``, FBGEMM's row-wise Adagrad: one accumulator per row
(half the memory traffic, 1/k of the state):
    state += mean(g²);  row −= lr · g / (√state + eps).
Dense parameters (bias, U, e, R) always take the per-element update with torch ops.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from model_zoo.embedding import prefetch

_PREFETCH_AHEAD = 8  # rows; 4–32 measured alike


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _distinct_rows(sorted_rows, rows, slot):  # pragma: no cover - compiled
    """Distinct rows (ascending) and, per lookup in ``rows``, its distinct row's position."""
    distinct = np.empty(sorted_rows.shape[0], dtype=np.int64)
    count = 0
    for i in range(sorted_rows.shape[0]):
        if count == 0 or sorted_rows[i] != distinct[count - 1]:
            distinct[count] = sorted_rows[i]
            slot[sorted_rows[i]] = count
            count += 1
    positions = np.empty(rows.shape[0], dtype=np.int32)
    for i in range(rows.shape[0]):
        positions[i] = slot[rows[i]]
    return distinct[:count], positions


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _summed_gradients(positions, count, grads, scratch):  # pragma: no cover - compiled
    summed = scratch[: count * grads.shape[1]].reshape((count, grads.shape[1]))
    summed[:] = 0.0
    row_bytes = grads.shape[1] * summed.itemsize
    for i in range(positions.shape[0]):
        if i + _PREFETCH_AHEAD < positions.shape[0]:
            prefetch(summed.ctypes.data + positions[i + _PREFETCH_AHEAD] * row_bytes)
        position = positions[i]
        for j in range(grads.shape[1]):
            summed[position, j] += grads[i, j]
    return summed


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _adagrad_rows(table, state, distinct, summed, lr, eps):  # pragma: no cover - compiled
    dim = table.shape[1]
    row_bytes = dim * table.itemsize
    for position in range(distinct.shape[0]):
        if position + _PREFETCH_AHEAD < distinct.shape[0]:
            ahead = distinct[position + _PREFETCH_AHEAD]
            prefetch(table.ctypes.data + ahead * row_bytes)
            prefetch(state.ctypes.data + ahead * row_bytes)
        row = distinct[position]
        for j in range(dim):
            g = summed[position, j]
            accumulated = state[row, j] + g * g
            state[row, j] = accumulated
            table[row, j] -= lr * g / (np.sqrt(accumulated) + eps)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _rowwise_adagrad_rows(table, state, distinct, summed, lr, eps):  # pragma: no cover - compiled
    dim = table.shape[1]
    row_bytes = dim * table.itemsize
    for position in range(distinct.shape[0]):
        if position + _PREFETCH_AHEAD < distinct.shape[0]:
            ahead = distinct[position + _PREFETCH_AHEAD]
            prefetch(table.ctypes.data + ahead * row_bytes)
            prefetch(state.ctypes.data + ahead * state.itemsize)
        row = distinct[position]
        square_sum = np.float32(0.0)
        for j in range(dim):
            square_sum += summed[position, j] * summed[position, j]
        accumulated = state[row] + square_sum / dim
        state[row] = accumulated
        step = lr / (np.sqrt(accumulated) + eps)
        for j in range(dim):
            table[row, j] -= step * summed[position, j]


class FusedSparseAdagrad(torch.optim.Optimizer):
    """Adagrad (no lr decay, no weight decay, zero initial accumulator); sparse gradients
    of CPU tables go through the compiled row kernels. With ``rowwise=False`` it equals
    ``torch.optim.Adagrad``; with ``rowwise=True`` tables keep one accumulator per row."""

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-10, rowwise: bool = False):
        super().__init__(params, {"lr": lr, "eps": eps, "rowwise": rowwise})
        # Scratch, not state (never checkpointed): row → distinct position, and the last
        # step's distinct rows so a second table looked up with the same rows reuses them.
        self._slot = np.empty(0, dtype=np.int32)
        self._summed = np.empty(0, dtype=np.float32)  # reused: a fresh 10 MB array page-faults each step
        self._last_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        self._last_rows = None
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self._update(parameter, parameter.grad, group)
        self._last_rows = None
        return loss

    def _update(self, parameter: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[parameter]
        rowwise = group["rowwise"] and grad.is_sparse
        if not state:
            shape = parameter.shape[:1] if rowwise else parameter.shape
            state["sum"] = torch.zeros(shape, dtype=parameter.dtype, device=parameter.device)
        if not grad.is_sparse:
            state["sum"].addcmul_(grad, grad)
            parameter.addcdiv_(grad, state["sum"].sqrt().add_(group["eps"]), value=-group["lr"])
            return
        if parameter.dim() != 2 or not parameter.is_contiguous() or parameter.device.type != "cpu":
            raise ValueError("sparse updates need a contiguous 2-D CPU table")
        if parameter.dtype != torch.float32:
            raise ValueError(f"sparse updates need a float32 table, got {parameter.dtype}")
        expected_state = parameter.shape[:1] if rowwise else parameter.shape
        if state["sum"].shape != expected_state:
            raise ValueError(f"accumulator of shape {tuple(state['sum'].shape)} does not fit {'row-wise' if rowwise else 'per-element'} updates")
        rows = grad._indices()[0].contiguous().numpy()
        grads = grad._values().reshape(-1, parameter.shape[1]).contiguous().numpy()
        if grad.is_coalesced():  # distinct ascending rows, summed already (the sharded owners')
            _check_rows(rows, parameter.shape[0])
            distinct, summed = rows, grads
        else:
            distinct, positions = self._distinct(rows, parameter.shape[0])
            if self._summed.shape[0] < grads.size:
                self._summed = np.empty(grads.size, dtype=np.float32)
            summed = _summed_gradients(positions, distinct.shape[0], grads, self._summed)
        kernel = _rowwise_adagrad_rows if rowwise else _adagrad_rows
        kernel(parameter.numpy(), state["sum"].numpy(), distinct, summed, np.float32(group["lr"]), np.float32(group["eps"]))
        # Views share their base's version counter: bump it (derived caches key on it)
        # without a pass over the whole table.
        parameter.view(-1)[:1].add_(0)

    def _distinct(self, rows: np.ndarray, table_rows: int) -> tuple[np.ndarray, np.ndarray]:
        if self._last_rows is not None and np.array_equal(self._last_rows[0], rows):
            _, distinct, positions = self._last_rows
            _check_rows(distinct, table_rows)
            return distinct, positions
        if self._slot.shape[0] < table_rows:
            self._slot = np.empty(table_rows, dtype=np.int32)
        sorted_rows = np.sort(rows)
        _check_rows(sorted_rows, table_rows)
        distinct, positions = _distinct_rows(sorted_rows, rows, self._slot)
        self._last_rows = (rows, distinct, positions)
        return distinct, positions


def _check_rows(sorted_rows: np.ndarray, table_rows: int) -> None:
    """The kernels index without bounds checks: sorted rows need only their ends checked."""
    if sorted_rows.shape[0] and (sorted_rows[0] < 0 or sorted_rows[-1] >= table_rows):
        raise IndexError(f"gradient rows outside the table's {table_rows} rows")
