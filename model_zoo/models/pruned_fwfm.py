"""Pruned FwFM: a trained FwFM keeping only the ρ(m+1) largest-|R_ij| entries of R's
strict upper triangle — the parameter count of a rank-ρ DPLR (the paper's matched rule).

Scoring computes only what survives: c_j for item fields with a kept context pair,
and the kept item–item pairs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from model_zoo.batch import FeatureBatch
from model_zoo.models.fwfm import FwFM, FwFMContext
from model_zoo.models.base import rows_for
from model_zoo.schema import FeatureSchema


def kept_entry_count(num_fields: int, rank: int) -> int:
    return min(rank * (num_fields + 1), num_fields * (num_fields - 1) // 2)


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
        self.check_items(state, items)
        plan = self.cached(("plan", items.fields), lambda: self._plan(items.fields))
        active, pair_a, pair_b, pair_weight = plan
        if items.bags:
            embedded = self.embedding(items)
            vectors, linear = embedded.vectors[:, active], embedded.linear
        else:
            # Single-valued items: gather only the fields that take part in a kept pair.
            rows = self.embedding.global_rows(items)
            vectors = self.embedding.vectors(rows[:, active])
            linear = self.embedding.linear(rows).sum(dim=(1, 2))
        aggregate = rows_for(context_index, state.aggregate)[:, active]
        cross = (vectors * aggregate).sum(dim=(1, 2))
        item_pairs = ((vectors[:, pair_a] * vectors[:, pair_b]).sum(-1) * pair_weight).sum(-1)
        return rows_for(context_index, state.scalar) + linear + cross + item_pairs

    def _plan(self, item_fields: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Item fields that take part in any kept pair (positions within the item batch),
        and the kept item–item pairs as indices into that active list with weights."""
        interactions = self.interaction_matrix().detach()
        item_positions = self.embedding.field_index(item_fields)
        involved = interactions[item_positions].ne(0).any(dim=1)
        active = involved.nonzero().squeeze(1)
        block = interactions[item_positions[active]][:, item_positions[active]]
        a, b = torch.triu_indices(len(active), len(active), offset=1, device=block.device)
        weights = block[a, b]
        keep = weights.ne(0)
        return active, a[keep], b[keep], weights[keep]
