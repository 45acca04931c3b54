"""Factorization machine (Rendle 2010) in the O(mk) form:
    ŷ = b + Σ w + ½ (‖Σ_i v_i‖² − Σ_i ‖v_i‖²),
i.e. the low-rank family's member with U = 1 (one row of ones), e = 1, d = −1."""

from __future__ import annotations

import torch
from torch import Tensor

from model_zoo.models.low_rank import LowRankInteractionModel
from model_zoo.schema import FeatureSchema


class FM(LowRankInteractionModel):
    kind = "fm"

    def __init__(self, schema: FeatureSchema, dim: int, sparse: bool = False, init_std: float = 0.1):
        super().__init__(schema, dim, sparse=sparse, init_std=init_std)
        self.register_buffer("ones_factor", torch.ones(1, schema.num_fields), persistent=False)
        self.register_buffer("unit_eigen", torch.ones(1), persistent=False)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.ones_factor, self.unit_eigen
