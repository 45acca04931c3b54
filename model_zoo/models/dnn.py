"""DNN: an MLP over the concatenated field embeddings, x = [v_1, …, v_F] (F·k):
    ŷ = Σ w + MLP(x),  first layer ReLU(W x + b).
(The multi-embedding frame and the first-order term: see deep.py.)

Cached ranking: the first layer splits by field, W x = W_C x_C + W_I x_I, so per
auction W_C x_C + b is computed once and per item only W_I x_I (|I|·k × hidden[0]).
"""

from __future__ import annotations

from torch import Tensor

from model_zoo.models.base import rows_for
from model_zoo.models.deep import DeepContext, DeepModel


class DNN(DeepModel):
    base_kind = kind = "dnn"

    def interaction_width(self) -> int:
        return self.schema.num_fields * self.dim

    def first_layer_input(self, m: int, vectors: Tensor) -> Tensor:
        return vectors.flatten(1)

    def encode_set(self, m: int, context_vectors: Tensor, context_fields: tuple[str, ...]) -> tuple[Tensor, ...]:
        layer = self.first_layers[m]
        return (context_vectors.flatten(1) @ self.field_columns(layer.weight, context_fields).T + layer.bias,)

    def score_set(
        self, m: int, cached: tuple[Tensor, ...], item_vectors: Tensor, state: DeepContext, context_index: Tensor | None
    ) -> Tensor:
        (context_part,) = cached
        columns = self.cached(("item_columns", m, state.item_fields), lambda: self.field_columns(self.first_layers[m].weight, state.item_fields))
        return item_vectors.flatten(1) @ columns.T + rows_for(context_index, context_part)
