"""Field-weighted FM (Pan et al. 2018): pairwise term Σ_{i<j} R_ij <v_i, v_j> = ½ <V, R V>
with R symmetric and zero on the diagonal (learned as its strict upper triangle).

Cached ranking, the strongest honest baseline: per context the context–context term
and, for every item field j, the aggregate c_j = Σ_{i∈C} R_ij v_i; per item only the
item–item pairs plus Σ_j <c_j, v_j>. The same split makes a catalog decomposition
with query = (c_j)_j and item vector = (v_j)_j, both of length |I|·k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model_zoo.batch import FeatureBatch
from model_zoo.models.base import ContextState, CTRModel, rows_for
from model_zoo.schema import FeatureSchema


@dataclass(frozen=True)
class FwFMContext(ContextState):
    aggregate: Tensor  # (A, |I|, k): c_j for every item field j
    scalar: Tensor  # (A,): bias + context linear + context–context pairs


class FwFM(CTRModel):
    kind = "fwfm"

    def __init__(self, schema: FeatureSchema, dim: int, sparse: bool = False, init_std: float = 0.1):
        super().__init__(schema, dim, sparse=sparse, init_std=init_std)
        m = schema.num_fields
        upper = torch.triu_indices(m, m, offset=1)
        self.register_buffer("upper_rows", upper[0], persistent=False)
        self.register_buffer("upper_cols", upper[1], persistent=False)
        # All-ones start = the FM this model generalises.
        self.interaction_weights = nn.Parameter(torch.ones(upper.shape[1]))

    def effective_weights(self) -> Tensor:
        """The strict upper triangle of R as used (pruned models mask it)."""
        return self.interaction_weights

    def interaction_parameters(self) -> list[Tensor]:
        # All of R's entries, pruned ones too: those never reach an output, so their
        # penalty changes no score.
        return [self.interaction_weights]

    def interaction_matrix(self) -> Tensor:
        m = self.schema.num_fields
        upper = torch.zeros(m, m, device=self.interaction_weights.device, dtype=self.interaction_weights.dtype)
        upper = upper.index_put((self.upper_rows, self.upper_cols), self.effective_weights())
        return upper + upper.T

    def pairwise(self, vectors: Tensor, positions: Tensor) -> Tensor:
        interactions = self.interaction_matrix()[positions][:, positions]
        return 0.5 * (vectors * torch.matmul(interactions, vectors)).sum(dim=(1, 2))

    def encode_context(self, context: FeatureBatch) -> FwFMContext:
        embedded = self.embedding(context)
        item_fields = self.item_fields_for(context.fields)
        context_positions = self.embedding.field_index(context.fields)
        item_positions = self.embedding.field_index(item_fields)
        interactions = self.interaction_matrix()
        context_block = interactions[context_positions][:, context_positions]
        cross_block = interactions[item_positions][:, context_positions]
        scalar = (
            self.bias
            + embedded.linear
            + 0.5 * (embedded.vectors * torch.matmul(context_block, embedded.vectors)).sum(dim=(1, 2))
        )
        aggregate = torch.matmul(cross_block, embedded.vectors)
        return FwFMContext(context.fields, item_fields, aggregate, scalar)

    def score_items(
        self, state: FwFMContext, items: FeatureBatch, context_index: Tensor | None = None
    ) -> Tensor:
        self.check_items(state, items)
        item_block = self.cached(("item_block", items.fields), lambda: self.item_block(items.fields))
        vectors, linear = self._item_terms(items)  # (|I|, N, k), (N,)
        if context_index is None:
            aggregate = rows_for(None, state.aggregate)[0].unsqueeze(1)  # (|I|, 1, k), broadcast over items
        else:
            aggregate = state.aggregate[context_index].transpose(0, 1)
        # c_j + ½ (R_II V)_j with R_II V as one GEMM, updated in place (no extra (|I|, N, k) copies).
        weights = torch.mm(item_block, vectors.flatten(1)).view_as(vectors).mul_(0.5).add_(aggregate)
        pairs = (vectors * weights).sum(-1).sum(0)  # two reductions: far faster than sum(dim=(0, 2))
        return rows_for(context_index, state.scalar) + linear + pairs

    def catalog_item_terms(self, items: FeatureBatch) -> tuple[Tensor, Tensor]:
        vectors, linear = self._item_terms(items)
        pair_weights = torch.mm(self.item_block(items.fields), vectors.flatten(1)).view_as(vectors)
        item_scalar = linear + 0.5 * (vectors * pair_weights).sum(-1).sum(0)
        return vectors.transpose(0, 1).flatten(1), item_scalar

    def catalog_query(self, state: FwFMContext) -> tuple[Tensor, Tensor]:
        return state.aggregate.flatten(1), state.scalar

    def item_block(self, item_fields: tuple[str, ...]) -> Tensor:
        """R's item–item block."""
        positions = self.embedding.field_index(item_fields)
        return self.interaction_matrix().detach()[positions][:, positions]

    def _item_terms(self, items: FeatureBatch) -> tuple[Tensor, Tensor]:
        """(|I|, N, k) item vectors, gathered field-major so that R_II V is a single
        (|I| × |I|) @ (|I| × N·k) product, and (N,) the items' linear terms."""
        if items.bags:
            embedded = self.embedding(items)
            return embedded.vectors.transpose(0, 1), embedded.linear
        return self.embedding.vectors(self.embedding.global_rows(items).T), self.embedding.linear_terms(items)
