"""Multi-embedding (Guo et al., ICML 2024, against embedding collapse): M embedding sets
of width k, each with its own interaction module (its own R, or its own U and e);
the per-set outputs are averaged:  ŷ = (1/M) Σ_m f_m(x).

Every set is a complete single-embedding model, so cached scoring works per set (M
context states per auction) and a catalog decomposes as concatenated per-set vectors:
    ŷ = mean_m s_C,m + mean_m s_I,m + <[q_1 … q_M] / M, [v_1 … v_M]>.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model_zoo.batch import FeatureBatch
from model_zoo.models.base import ContextState, CTRModel, RankingModel, TrainingOutputs


@dataclass(frozen=True)
class MultiContext(ContextState):
    states: tuple[ContextState, ...]  # one per embedding set


class MultiEmbedding(RankingModel):
    def __init__(self, embedding_sets: list[CTRModel]):
        if len(embedding_sets) < 1:
            raise ValueError("a multi-embedding model needs at least one embedding set")
        super().__init__(embedding_sets[0].schema)
        self.kind = f"me_{embedding_sets[0].kind}"
        self.dim = embedding_sets[0].dim
        self.embedding_sets = nn.ModuleList(embedding_sets)

    def forward(self, batch: FeatureBatch) -> Tensor:
        return torch.stack([model(batch) for model in self.embedding_sets]).mean(0)

    def training_outputs(self, batch: FeatureBatch) -> TrainingOutputs:
        per_set = [model.training_outputs(batch) for model in self.embedding_sets]
        return TrainingOutputs(
            torch.stack([o.outputs for o in per_set]).mean(0), torch.stack([o.row_sq_norm for o in per_set]).sum()
        )

    def encode_context(self, context: FeatureBatch) -> MultiContext:
        states = tuple(model.encode_context(context) for model in self.embedding_sets)
        return MultiContext(context.fields, self.item_fields_for(context.fields), states)

    def score_items(self, state: MultiContext, items: FeatureBatch, context_index: Tensor | None = None) -> Tensor:
        self.check_items(state, items)
        return torch.stack(
            [model.score_items(s, items, context_index) for model, s in zip(self.embedding_sets, state.states)]
        ).mean(0)

    def catalog_item_terms(self, items: FeatureBatch) -> tuple[Tensor, Tensor]:
        vectors, scalars = zip(*(model.catalog_item_terms(items) for model in self.embedding_sets))
        return torch.cat(vectors, dim=1), torch.stack(scalars).mean(0)

    def catalog_query(self, state: MultiContext) -> tuple[Tensor, Tensor]:
        queries, scalars = zip(*(model.catalog_query(s) for model, s in zip(self.embedding_sets, state.states)))
        return torch.cat(queries, dim=1) / len(self.embedding_sets), torch.stack(scalars).mean(0)

    def hyperparameters(self) -> dict[str, Any]:
        return {**self.embedding_sets[0].hyperparameters(), "kind": self.kind, "sets": len(self.embedding_sets)}
