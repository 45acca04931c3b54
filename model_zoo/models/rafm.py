"""Rank-Aware FM (Chen et al., ICML 2019).

Ranks k_1 < … < k_L and count thresholds c_1 < … < c_{L−1}: a feature seen n times in
training has level r = 1 + #{j : n > c_j} and embeddings v^(1) … v^(r) of widths
k_1 … k_r. A pair interacts at the lower level of the two. With S_l the row's
features at level ≥ l and FM_l(S) = ½(‖Σ_S v^(l)‖² − Σ_S ‖v^(l)‖²):
    ŷ = b + Σ w + Σ_l [FM_l(S_l) − FM_l(S_{l+1})]          (S_{L+1} = ∅),
costing Σ_l k_l |S_l|: frequent features are few, so most work is at the small rank.
A multi-valued field contributes, at each level, the weighted average over its values
at that level or above (and never interacts with itself).

Training adds the distillation term: the model truncated at level l,
ŷ_l = b + Σ w + Σ_{j<l}[FM_j(S_j) − FM_j(S_{j+1})] + FM_l(S_l), is pulled towards
ŷ_{l+1} with a stop-gradient on ŷ_{l+1} (ŷ_L = ŷ), so lower-level embeddings of
frequent features learn to stand in for their higher-level ones.

Cached ranking: every FM_l term splits into context and item sums, so per auction the
context sums (S, ‖·‖² totals) per level and threshold are cached. Items are scored from
compacted tables: per (level l, set S_t) only the rows of features at level ≥ t, every
other feature mapped to one shared zero row, so scoring an item reads k_l floats per
feature in S_l — the Σ_l k_l|S_l| cost — plus a hot zero row for the rest.

Storage note: each level keeps a full table (vocabulary × k_l) so that bundles load by
shape alone; ``effective_parameters`` counts what the model uses (k_l per feature at
level ≥ l), the figure to compare with an FM's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo.batch import FeatureBatch
from model_zoo.embedding import FieldEmbedding, normalised_weights
from model_zoo.models.base import ContextState, RankingModel, TrainingOutputs, rows_for
from model_zoo.schema import FeatureSchema


@dataclass(frozen=True)
class RaFMContext(ContextState):
    scalar: Tensor  # (A,): bias + context linear terms
    sums: tuple[tuple[Tensor, Tensor], ...]  # per (level, threshold): (A, k_l) sum and (A,) sum of squared norms


class RaFM(RankingModel):
    kind = "rafm"

    def __init__(
        self,
        schema: FeatureSchema,
        dim: int,
        ranks: list[int] | None = None,
        thresholds: list[int] | None = None,
        distillation: float = 1.0,
        sparse: bool = False,
        init_std: float = 0.1,
    ):
        super().__init__(schema)
        ranks = list(ranks or [dim])
        thresholds = list(thresholds or [])
        if ranks != sorted(set(ranks)) or ranks[-1] != dim:
            raise ValueError(f"ranks must increase strictly and end with dim={dim}, got {ranks}")
        if len(thresholds) != len(ranks) - 1 or thresholds != sorted(thresholds):
            raise ValueError(f"need {len(ranks) - 1} increasing count thresholds, got {thresholds}")
        self.dim, self.ranks, self.thresholds, self.distillation = dim, ranks, thresholds, distillation
        self.levels = nn.ModuleList(
            FieldEmbedding(schema, k, sparse=sparse, init_std=init_std, with_linear=(level == 0))
            for level, k in enumerate(ranks)
        )
        self.bias = nn.Parameter(torch.zeros(()))
        # Until training counts are given every feature sits at the top level (an FM of rank k_L).
        self.register_buffer("feature_levels", torch.full((schema.total_vocab,), len(ranks), dtype=torch.int64))

    def set_feature_counts(self, counts: np.ndarray | Tensor) -> None:
        """Levels from training counts: r = 1 + #{j : n > c_j}."""
        counts = torch.as_tensor(counts, dtype=torch.int64)
        if counts.shape != self.feature_levels.shape:
            raise ValueError(f"need one count per feature ({self.feature_levels.shape[0]}), got {tuple(counts.shape)}")
        levels = 1 + (counts.unsqueeze(1) > torch.tensor(self.thresholds, dtype=torch.int64)).sum(1)
        self.feature_levels.copy_(levels)

    def effective_parameters(self) -> int:
        """Embedding entries in use: k_l for each feature at level ≥ l, plus linear weights."""
        at_least = [(self.feature_levels >= level + 1).sum().item() for level in range(len(self.ranks))]
        return int(sum(k * n for k, n in zip(self.ranks, at_least)) + self.schema.total_vocab)

    # -- level sums ---------------------------------------------------------------------
    def _level_sums(self, batch: FeatureBatch, level: int) -> list[tuple[Tensor, Tensor]]:
        """At level ``level`` (0-based table), for S_l and S_{l+1} (features of level ≥ l,
        ≥ l + 1) over the batch's fields: (B, k) sum of field vectors and (B,) sum of
        their squared norms. One gather serves both sets."""
        table = self.levels[level]
        rows = table.global_rows(batch)
        vectors = table.vectors(rows)  # (B, S, k)
        feature_levels = self.feature_levels[rows]
        bags = []
        for name, bag in zip(batch.bag_fields, batch.bags):
            bag_rows = table.bag_rows(name, bag)
            bags.append((normalised_weights(bag), table.vectors(bag_rows), self.feature_levels[bag_rows]))
        sums = []
        for threshold in (level + 1, level + 2):
            if threshold > len(self.ranks):  # S_{L+1} is empty
                sums.append((vectors.new_zeros((len(batch), table.dim)), vectors.new_zeros(len(batch))))
                continue
            kept_vectors = vectors * (feature_levels >= threshold).unsqueeze(-1)
            total, squares = kept_vectors.sum(1), kept_vectors.square().sum(dim=(1, 2))
            for weights, values, value_levels in bags:
                field_vector = ((weights * (value_levels >= threshold)).unsqueeze(-1) * values).sum(1)
                total = total + field_vector
                squares = squares + field_vector.square().sum(-1)
            sums.append((total, squares))
        return sums

    def _level_terms(self, batch: FeatureBatch) -> list[tuple[Tensor, Tensor]]:
        """[FM_l(S_l), FM_l(S_{l+1})] for every level l."""
        return [
            tuple(0.5 * (total.square().sum(-1) - squares) for total, squares in self._level_sums(batch, level))
            for level in range(len(self.ranks))
        ]

    def _linear(self, batch: FeatureBatch) -> Tensor:
        return self.levels[0].linear_terms(batch)

    # -- training ---------------------------------------------------------------------------
    def forward(self, batch: FeatureBatch) -> Tensor:
        base = self.bias + self._linear(batch)
        return base + sum(full - upper for full, upper in self._level_terms(batch))

    def training_outputs(self, batch: FeatureBatch) -> TrainingOutputs:
        base = self.bias + self._linear(batch)
        terms = self._level_terms(batch)
        # truncated[l] = ŷ_l: levels below l as in the model, then FM_l(S_l) in full.
        truncated, below = [], base
        for full, upper in terms:
            truncated.append(below + full)
            below = below + full - upper
        outputs = truncated[-1]
        distillation = sum(
            (truncated[l] - truncated[l + 1].detach()).square().mean() for l in range(len(terms) - 1)
        )
        return TrainingOutputs(outputs, self._used_rows_sq_norm(batch), self.distillation * distillation)

    def _used_rows_sq_norm(self, batch: FeatureBatch) -> Tensor:
        """L2 over the level-l rows of looked-up single-valued features at level ≥ l."""
        total = self.bias.new_zeros(())
        for level, table in enumerate(self.levels):
            rows = table.global_rows(batch)
            kept = (self.feature_levels[rows] >= level + 1).unsqueeze(-1)
            total = total + (table.vectors(rows) * kept).square().sum()
        return total

    # -- cached ranking ---------------------------------------------------------------------------
    def encode_context(self, context: FeatureBatch) -> RaFMContext:
        sums = tuple(pair for level in range(len(self.ranks)) for pair in self._level_sums(context, level))
        scalar = self.bias + self._linear(context)
        return RaFMContext(context.fields, self.item_fields_for(context.fields), scalar, sums)

    def score_items(self, state: RaFMContext, items: FeatureBatch, context_index: Tensor | None = None) -> Tensor:
        self.check_items(state, items)
        score = rows_for(context_index, state.scalar) + self._linear(items)
        for level in range(len(self.ranks)):
            item_sums = self._compact_level_sums(items, level)
            for sign, (context_total, context_squares), (item_total, item_squares) in zip(
                (1.0, -1.0), state.sums[2 * level : 2 * level + 2], item_sums
            ):
                total = rows_for(context_index, context_total) + item_total
                squares = rows_for(context_index, context_squares) + item_squares
                score = score + sign * 0.5 * (total.square().sum(-1) - squares)
        return score

    def _compact_tables(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per (level, threshold t): global row -> compact row (0 for features below t),
        the (n_t + 1, k_l) vectors of features at level ≥ t after a zero row, and their
        (n_t + 1, 1) squared norms."""

        def build() -> list[tuple[Tensor, Tensor, Tensor]]:
            tables = []
            for level, table in enumerate(self.levels):
                weight = table.vectors.weight
                for threshold in (level + 1, level + 2):
                    keep = self.feature_levels >= threshold
                    remap = torch.zeros(len(keep), dtype=torch.int64)
                    remap[keep] = torch.arange(1, int(keep.sum()) + 1)
                    vectors = torch.cat([weight.new_zeros((1, table.dim)), weight[keep]])
                    tables.append((remap, vectors, vectors.square().sum(-1, keepdim=True)))
            return tables

        return self.cached("compact_tables", build)

    def _compact_level_sums(self, batch: FeatureBatch, level: int) -> list[tuple[Tensor, Tensor]]:
        """``_level_sums`` from the compacted tables (scoring only: no gradients)."""
        table = self.levels[level]
        rows = table.global_rows(batch)
        sums = []
        for remap, vectors, squared_norms in self._compact_tables()[2 * level : 2 * level + 2]:
            if rows.shape[1]:
                compact = remap[rows]
                total = F.embedding_bag(compact, vectors, mode="sum")
                squares = F.embedding_bag(compact, squared_norms, mode="sum").squeeze(-1)
            else:  # only multi-valued fields on this side
                total, squares = vectors.new_zeros((len(batch), table.dim)), vectors.new_zeros(len(batch))
            for name, bag in zip(batch.bag_fields, batch.bags):
                field_vector = F.embedding_bag(
                    remap[table.bag_rows(name, bag)], vectors, mode="sum", per_sample_weights=normalised_weights(bag)
                )
                total = total + field_vector
                squares = squares + field_vector.square().sum(-1)
            sums.append((total, squares))
        return sums

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "dim": self.dim, "ranks": self.ranks,
            "thresholds": self.thresholds, "distillation": self.distillation,
        }
