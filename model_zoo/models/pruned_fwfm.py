"""Pruned FwFM: a trained FwFM keeping only the ρ(m+1) largest-|R_ij| entries of R's
strict upper triangle — the parameter count of a rank-ρ DPLR (the paper's matched rule).

Cached scoring works on the kept entries only: the kept item–item pairs are listed
once per item-field set, and the kept context–item pairs enter through the cached
c_j = Σ_{i∈C} R_ij v_i of the item fields j that have one. Per item that is
O((kept pairs + those fields) · k), not the dense FwFM's O(|I|² k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from model_zoo.batch import FeatureBatch
from model_zoo.embedding import prefetch
from model_zoo.models.base import rows_for
from model_zoo.models.fwfm import FwFM, FwFMContext
from model_zoo.schema import FeatureSchema


def kept_entry_count(num_fields: int, rank: int) -> int:
    return min(rank * (num_fields + 1), num_fields * (num_fields - 1) // 2)


@dataclass(frozen=True)
class _KeptPairs:
    active: Tensor  # (F',) positions within the item batch of the fields in some kept pair
    left: Tensor  # (P,) kept item–item pairs (left[p], right[p]) as indices into `active`
    right: Tensor
    weights: Tensor  # (P,) their R_ij
    cross: Tensor  # (J,) indices into `active` of the fields with a kept context pair
    cross_fields: Tensor  # (J,) the same fields as positions within the item batch (= rows of c)


class PrunedFwFM(FwFM):
    kind = "pruned_fwfm"

    def __init__(self, schema: FeatureSchema, dim: int, rank: int = 1, sparse: bool = False, init_std: float = 0.1):
        super().__init__(schema, dim, sparse=sparse, init_std=init_std)
        self.rank = rank
        # Persistent: which entries survive is part of the model file.
        self.register_buffer("kept", torch.ones_like(self.interaction_weights, dtype=torch.bool))

    @classmethod
    def from_fwfm(cls, fwfm: FwFM, rank: int) -> "PrunedFwFM":
        """Keep the ρ(m+1) largest-magnitude entries of a trained FwFM's R."""
        pruned = cls(fwfm.schema, fwfm.dim, rank=rank, sparse=fwfm.embedding.vectors.sparse)
        state = {k: v for k, v in fwfm.state_dict().items()}
        count = kept_entry_count(fwfm.schema.num_fields, rank)
        keep = torch.zeros_like(fwfm.interaction_weights, dtype=torch.bool)
        keep[fwfm.effective_weights().detach().abs().topk(count).indices] = True
        state["kept"] = keep
        pruned.load_state_dict(state)
        return pruned

    def effective_weights(self) -> Tensor:
        return self.interaction_weights * self.kept

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "rank": self.rank}

    def score_items(
        self, state: FwFMContext, items: FeatureBatch, context_index: Tensor | None = None
    ) -> Tensor:
        if items.single.device.type != "cpu" or self.embedding.vectors.weight.dtype != torch.float32:
            return super().score_items(state, items, context_index)  # the dense masked R off the CPU
        self.check_items(state, items)
        plan = self.cached(("kept_pairs", items.fields), lambda: self.kept_pairs(items.fields))
        if items.bags:
            # The averaged bag vectors become the table the kernel reads, one row per (item, field).
            embedded = self.embedding(items)
            table = embedded.vectors[:, plan.active].reshape(-1, self.dim)
            rows = torch.arange(table.shape[0]).view(len(items), -1)
            linear = embedded.linear
        else:
            table, linear = self.embedding.vectors.weight, self.embedding.linear_terms(items)
            rows = self.embedding.global_rows(items)[:, plan.active]
        scalar = rows_for(context_index, state.scalar)
        index = torch.zeros(len(items), dtype=torch.int64) if context_index is None else context_index
        aggregate = state.aggregate[:, plan.cross_fields]  # (A, J, k)
        pairs = torch.empty(len(items))
        _kept_pair_terms(
            *(t.detach().contiguous().numpy() for t in (table, rows, plan.left, plan.right, plan.weights, plan.cross, aggregate, index)),
            pairs.numpy(),
        )
        return scalar + linear + pairs

    def kept_pairs(self, item_fields: tuple[str, ...]) -> _KeptPairs:
        """The kept entries of R among the item fields and between them and the rest."""
        interactions = self.interaction_matrix().detach()
        positions = self.embedding.field_index(item_fields)
        context = torch.ones(self.schema.num_fields, dtype=torch.bool)
        context[positions] = False
        item_block = interactions[positions][:, positions]
        has_cross = interactions[positions][:, context].ne(0).any(dim=1)
        active = (item_block.ne(0).any(dim=1) | has_cross).nonzero().squeeze(1)
        left, right = torch.triu(item_block[active][:, active], diagonal=1).nonzero(as_tuple=True)
        return _KeptPairs(
            active=active,
            left=left.contiguous(),
            right=right.contiguous(),
            weights=item_block[active[left], active[right]].contiguous(),
            cross=has_cross[active].nonzero().squeeze(1),
            cross_fields=has_cross.nonzero().squeeze(1),
        )


_PREFETCH_ITEMS = 2  # items ahead whose rows are requested while one is summed


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _kept_pair_terms(table, rows, left, right, weights, cross, aggregate, context_index, out):  # pragma: no cover - compiled
    """out[n] = Σ_p w_p <v_{n,left_p}, v_{n,right_p}> + Σ_j <c_{a(n), j}, v_{n, cross_j}>, with
    v_{n,f} = table[rows[n, f]] read in place (no gathered copy). Products are summed
    elementwise and reduced once per item: no horizontal sum per pair."""
    items, fields = rows.shape
    count, dim = table.shape
    row_bytes = dim * table.itemsize
    acc = np.empty(dim, dtype=np.float32)
    for n in range(items):
        if n + _PREFETCH_ITEMS < items:
            for f in range(fields):
                ahead = rows[n + _PREFETCH_ITEMS, f]
                if 0 <= ahead < count:
                    prefetch(table.ctypes.data + ahead * row_bytes)
        context = context_index[n]
        acc[:] = 0.0
        for p in range(left.shape[0]):
            a, b, w = rows[n, left[p]], rows[n, right[p]], weights[p]
            for k in range(dim):
                acc[k] += w * table[a, k] * table[b, k]
        for j in range(cross.shape[0]):
            a = rows[n, cross[j]]
            for k in range(dim):
                acc[k] += aggregate[context, j, k] * table[a, k]
        out[n] = acc.sum()
