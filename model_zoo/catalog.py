"""Catalog scoring: when item features are static, everything item-only is computed
once at load time. For models whose score splits as
    score = context scalar + item scalar + <query(context), item vector>
(DPLR: query = e ⊙ P_C, item vector = P_I of length ρk; FM: k; FwFM: |I|·k), ranking a
catalog is one matrix–vector product and top-K is exact maximum-inner-product search.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from model_zoo.batch import FeatureBatch
from model_zoo.models.base import ContextState, RankingModel


class ItemCatalog:
    def __init__(self, model: RankingModel, item_ids: Sequence[object], items: FeatureBatch):
        if len(item_ids) != len(items):
            raise ValueError(f"{len(item_ids)} ids for {len(items)} item rows")
        self.model = model
        self.ids = list(item_ids)
        self.position = {item_id: i for i, item_id in enumerate(self.ids)}
        if len(self.position) != len(self.ids):
            raise ValueError("duplicate item ids in the catalog")
        self.fields = items.fields
        with torch.inference_mode():
            vectors, scalars = model.catalog_item_terms(items)
        self.vectors = vectors.contiguous()  # (N, D)
        self.scalars = scalars.contiguous()  # (N,)

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, item_ids: Sequence[object]) -> Tensor:
        unknown = [i for i in item_ids if i not in self.position]
        if unknown:
            raise KeyError(f"unknown catalog items: {unknown[:10]}")
        return torch.tensor([self.position[i] for i in item_ids], dtype=torch.int64)

    def score_all(self, state: ContextState) -> Tensor:
        """(A, N) scores of every catalog item for each encoded context."""
        query, context_scalar = self.model.catalog_query(state)
        return torch.addmm(self.scalars.unsqueeze(0), query, self.vectors.T) + context_scalar.unsqueeze(1)

    def score(self, state: ContextState, positions: Tensor, context_index: Tensor | None = None) -> Tensor:
        """(N,) scores of the catalog items at ``positions``; item n pairs with context
        row context_index[n] (default: row 0)."""
        query, context_scalar = self.model.catalog_query(state)
        if context_index is None:
            context_index = torch.zeros(len(positions), dtype=torch.int64)
        vectors = self.vectors[positions]
        return context_scalar[context_index] + self.scalars[positions] + (vectors * query[context_index]).sum(-1)

    def top_k(self, state: ContextState, k: int) -> tuple[Tensor, list[list[object]]]:
        """Exact top-k per context: (A, k) scores and the matching item ids."""
        scores = self.score_all(state)
        best = scores.topk(min(k, len(self)), dim=1)
        return best.values, [[self.ids[i] for i in row] for row in best.indices.tolist()]
