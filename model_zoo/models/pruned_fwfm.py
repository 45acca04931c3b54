"""Pruned FwFM: a trained FwFM keeping only the ρ(m+1) largest-|R_ij| entries of R's
strict upper triangle — the parameter count of a rank-ρ DPLR (the paper's matched rule).

Scoring skips the item fields that no kept entry touches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from model_zoo.models.fwfm import FwFM
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

    def scoring_plan(self, item_fields: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """Only item fields in some kept pair, and R's block among them. The block stays
        dense: at the paper's kept fractions a CPU GEMM over it beats torch.sparse.mm
        (10k items, 30 item fields, rank 3: 11 ms dense vs 32 ms sparse)."""
        interactions = self.interaction_matrix().detach()
        positions = self.embedding.field_index(item_fields)
        active = interactions[positions].ne(0).any(dim=1).nonzero().squeeze(1)
        block = interactions[positions[active]][:, positions[active]]
        return active, block
