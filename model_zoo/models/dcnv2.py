"""DCNv2 (Wang et al. 2021), stacked as in the embedding-collapse paper's code: a cross
network over x_0 = [v_1, …, v_F] (F·k),
    x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l,      l = 0 … L−1,
then the MLP: ŷ = Σ w + MLP(x_L). (The multi-embedding frame: see deep.py; each set
has its own cross network and first MLP layer.)

Cached ranking: the first cross layer's product splits by field,
W_0 x_0 = W_0[:, C] x_C + W_0[:, I] x_I, so per auction the context lookups and
W_0[:, C] x_C + b_0 are computed once; the later layers mix context and item.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from model_zoo.models.base import rows_for
from model_zoo.models.deep import DeepContext, DeepModel, joined_vectors
from model_zoo.schema import FeatureSchema


class DCNv2(DeepModel):
    base_kind = kind = "dcnv2"

    def __init__(self, schema: FeatureSchema, dim: int, cross_layers: int = 2, **options: Any):
        """``options``: DeepModel's (sets, hidden, sparse, init_std)."""
        if cross_layers < 1:
            raise ValueError(f"cross_layers must be at least 1, got {cross_layers}")
        super().__init__(schema, dim, **options)
        self.cross_layers = cross_layers
        width = self.interaction_width()
        # Per set and layer: W_l (width × width) and b_l.
        self.cross_weights = nn.Parameter(torch.empty(self.sets, cross_layers, width, width))
        self.cross_biases = nn.Parameter(torch.zeros(self.sets, cross_layers, width))
        for matrix in self.cross_weights.data.view(-1, width, width):
            nn.init.xavier_uniform_(matrix)

    def interaction_width(self) -> int:
        return self.schema.num_fields * self.dim

    def first_layer_input(self, m: int, vectors: Tensor) -> Tensor:
        x0 = vectors.flatten(1)
        return self._cross(m, x0, x0, x0 @ self.cross_weights[m, 0].T + self.cross_biases[m, 0])

    def _cross(self, m: int, x0: Tensor, x: Tensor, first_product: Tensor) -> Tensor:
        """The cross network from layer 0's W_0 x_0 + b_0 on."""
        x = x0 * first_product + x
        for layer in range(1, self.cross_layers):
            x = x0 * (x @ self.cross_weights[m, layer].T + self.cross_biases[m, layer]) + x
        return x

    def encode_set(self, m: int, context_vectors: Tensor, context_fields: tuple[str, ...]) -> tuple[Tensor, ...]:
        columns = self.field_columns(self.cross_weights[m, 0], context_fields)
        return context_vectors, context_vectors.flatten(1) @ columns.T + self.cross_biases[m, 0]

    def score_set(
        self, m: int, cached: tuple[Tensor, ...], item_vectors: Tensor, state: DeepContext, context_index: Tensor | None
    ) -> Tensor:
        context_vectors, context_product = cached
        columns = self.cached(("item_columns", m, state.item_fields), lambda: self.field_columns(self.cross_weights[m, 0], state.item_fields))
        x0 = joined_vectors(self, context_vectors, item_vectors, state, context_index).flatten(1)
        first_product = item_vectors.flatten(1) @ columns.T + rows_for(context_index, context_product)
        return self.first_layers[m](self._cross(m, x0, x0, first_product))

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "cross_layers": self.cross_layers}
