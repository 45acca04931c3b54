"""NFwFM: NFM with FwFM's field weights. The bi-interaction vector
    z = Σ_{i<j} R_ij v_i ⊙ v_j = ½ Σ_i v_i ⊙ (R V)_i        (k entries; R symmetric, zero diagonal)
feeds the MLP: ŷ = Σ w + MLP(z). (The multi-embedding frame: see deep.py; each set
has its own R.)

Cached ranking, as for the FwFM but vector-valued: per auction the context–context
part z_CC and, for every item field j, c_j = Σ_{i∈C} R_ij v_i; the first layer is
linear in z, so W z_CC + b is cached too. Per item:
    z_rest = Σ_{j∈I} v_j ⊙ (c_j + ½ (R_II V_I)_j),  pre-activation = W z_rest + (W z_CC + b).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from model_zoo.models.base import rows_for
from model_zoo.models.deep import DeepContext, DeepModel
from model_zoo.schema import FeatureSchema


class NFwFM(DeepModel):
    base_kind = kind = "nfwfm"

    def __init__(self, schema: FeatureSchema, dim: int, **options: Any):
        """``options``: DeepModel's (sets, hidden, sparse, init_std)."""
        super().__init__(schema, dim, **options)
        m = schema.num_fields
        upper = torch.triu_indices(m, m, offset=1)
        self.register_buffer("upper_rows", upper[0], persistent=False)
        self.register_buffer("upper_cols", upper[1], persistent=False)
        # Per set the strict upper triangle of R; all ones = NFM's bi-interaction.
        self.interaction_weights = nn.Parameter(torch.ones(self.sets, upper.shape[1]))

    def interaction_matrix(self, m: int) -> Tensor:
        size = self.schema.num_fields
        upper = self.interaction_weights.new_zeros(size, size).index_put((self.upper_rows, self.upper_cols), self.interaction_weights[m])
        return upper + upper.T

    def interaction_width(self) -> int:
        return self.dim

    def first_layer_input(self, m: int, vectors: Tensor) -> Tensor:
        return 0.5 * (vectors * torch.matmul(self.interaction_matrix(m), vectors)).sum(1)

    def encode_set(self, m: int, context_vectors: Tensor, context_fields: tuple[str, ...]) -> tuple[Tensor, ...]:
        positions = self.embeddings[0].field_index(context_fields)
        item_positions = self.embeddings[0].field_index(self.item_fields_for(context_fields))
        interactions = self.interaction_matrix(m)
        context_pairs = 0.5 * (context_vectors * torch.matmul(interactions[positions][:, positions], context_vectors)).sum(1)
        aggregate = torch.matmul(interactions[item_positions][:, positions], context_vectors)  # (A, |I|, k): c_j
        return self.first_layers[m](context_pairs), aggregate

    def score_set(
        self, m: int, cached: tuple[Tensor, ...], item_vectors: Tensor, state: DeepContext, context_index: Tensor | None
    ) -> Tensor:
        context_part, aggregate = cached
        item_block = self.cached(("item_block", m, state.item_fields), lambda: self._item_block(m, state.item_fields))
        weights = rows_for(context_index, aggregate) + 0.5 * torch.matmul(item_block, item_vectors)
        rest = (item_vectors * weights).sum(1)  # (N, k)
        return rest @ self.first_layers[m].weight.T + rows_for(context_index, context_part)

    def _item_block(self, m: int, item_fields: tuple[str, ...]) -> Tensor:
        positions = self.embeddings[0].field_index(item_fields)
        return self.interaction_matrix(m)[positions][:, positions]
