"""The diagonal-plus-low-rank interaction family: R = Uᵀ diag(e) U + diag(d), d = −diag(Uᵀ diag(e) U).

With P = U V (ρ × k), the pairwise term Σ_{i<j} R_ij <v_i, v_j> equals
    ½ (Σ_i d_i ‖v_i‖² + Σ_r e_r ‖P_r‖²)            (O(ρ m k), R never formed).
FM is the member with ρ = 1, U = 1, e = 1 (then d = −1): ½(‖Σ v‖² − Σ ‖v‖²).

Cached ranking (the paper's Algorithm 1): per context P_C = U_C V_C and the context
scalars; per item P = P_C + P_I with P_I = U_I V_I, so
    score = s_C + s_I + <e ⊙ P_C, P_I> + ½ Σ_r e_r ‖P_I,r‖²,
where s_C = b + lin_C + ½(Σ_C d‖v‖² + Σ_r e_r‖P_C,r‖²) and s_I = lin_I + ½ Σ_I d‖v‖².
Every term of P_I and s_I is a sum over the item's features, so per feature we
precompute U_f ⊗ v (ρk) and lin + ½ d_f ‖v‖² once, and fused ``embedding_bag``
sums give (P_I, s_I) per item. A multi-valued field's ‖v̄‖² is not
a sum over its values, so that one term is computed directly.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model_zoo.batch import FeatureBatch
from model_zoo.embedding import normalised_weights
from model_zoo.models.base import ContextState, CTRModel, paired_dot, rows_for


@dataclass(frozen=True)
class LowRankContext(ContextState):
    query: Tensor  # (A, ρk): e ⊙ P_C, flattened
    scalar: Tensor  # (A,): s_C


@dataclass(frozen=True)
class _ItemTables:
    # Two tables, not one (rows, ρk + 1): a 48-float row is three whole cache lines,
    # a 49-float one often four — the gather is memory-bound.
    projection: Tensor  # (rows, ρk): U_f ⊗ v
    scalar: Tensor  # (rows, 1): lin + ½ d_f ‖v‖² (single fields) or lin (bag fields)
    single_offsets: Tensor  # (S,) start of each single item field's rows in `table`
    bag_offsets: tuple[int, ...]  # start of each bag item field's rows in `table`


class LowRankInteractionModel(CTRModel):
    @abstractmethod
    def factors(self) -> tuple[Tensor, Tensor]:
        """U (ρ, m) and e (ρ,)."""

    def diagonal(self, factors: Tensor, eigen: Tensor) -> Tensor:
        """d = −diag(Uᵀ diag(e) U): what makes diag(R) zero."""
        return -(eigen.unsqueeze(1) * factors.pow(2)).sum(dim=0)

    def pairwise(self, vectors: Tensor, positions: Tensor) -> Tensor:
        factors, eigen = self.factors()
        factors = factors[:, positions]
        return self.pairwise_from(vectors, torch.matmul(factors, vectors), factors, eigen)

    # -- Algorithm 1 --------------------------------------------------------------
    def encode_context(self, context: FeatureBatch) -> LowRankContext:
        embedded = self.embedding(context)
        factors, eigen = self.factors()
        factors = factors[:, self.embedding.field_index(context.fields)]
        projection = torch.matmul(factors, embedded.vectors)  # P_C = U_C V_C: (A, ρ, k)
        scalar = self.bias + embedded.linear + self.pairwise_from(embedded.vectors, projection, factors, eigen)
        query = (eigen.unsqueeze(1) * projection).flatten(1)
        return LowRankContext(context.fields, self.item_fields_for(context.fields), query, scalar)

    def pairwise_from(self, vectors: Tensor, projection: Tensor, factors: Tensor, eigen: Tensor) -> Tensor:
        """½(Σ d_i‖v_i‖² + Σ_r e_r‖P_r‖²) given P = U V."""
        return 0.5 * (vectors.square().sum(-1) @ self.diagonal(factors, eigen) + projection.square().sum(-1) @ eigen)

    def score_items(
        self, state: LowRankContext, items: FeatureBatch, context_index: Tensor | None = None
    ) -> Tensor:
        self.check_items(state, items)
        item_projection, item_scalar = self._item_terms(items)
        _, eigen = self.factors()
        # Matrix–vector products, not elementwise temporaries over (N, ρk).
        quadratic = item_projection.square() @ (0.5 * eigen.repeat_interleave(self.dim))
        cross = paired_dot(item_projection, state.query, context_index)
        return rows_for(context_index, state.scalar) + item_scalar + quadratic + cross

    def catalog_item_terms(self, items: FeatureBatch) -> tuple[Tensor, Tensor]:
        item_projection, item_scalar = self._item_terms(items)
        _, eigen = self.factors()
        return item_projection, item_scalar + item_projection.square() @ (0.5 * eigen.repeat_interleave(self.dim))

    def catalog_query(self, state: LowRankContext) -> tuple[Tensor, Tensor]:
        return state.query, state.scalar

    # -- per-item terms via precomputed per-feature rows ----------------------------
    def _item_terms(self, items: FeatureBatch) -> tuple[Tensor, Tensor]:
        """(N, ρk) P_I and (N,) s_I."""
        tables = self.cached(("item_tables", items.fields, items.single_fields), lambda: self._build_tables(items))
        if items.single_fields:
            rows = items.single + tables.single_offsets
            projection = F.embedding_bag(rows, tables.projection, mode="sum")
            scalar = F.embedding_bag(rows, tables.scalar, mode="sum").squeeze(1)
        else:
            projection = tables.projection.new_zeros((len(items), tables.projection.shape[1]))
            scalar = tables.scalar.new_zeros(len(items))
        if items.bags:
            factors, eigen = self.factors()
            d = self.diagonal(factors, eigen)
            for name, bag, offset in zip(items.bag_fields, items.bags, tables.bag_offsets):
                weights = normalised_weights(bag)
                rows = bag.values + offset
                projection = projection + F.embedding_bag(rows, tables.projection, per_sample_weights=weights, mode="sum")
                scalar = scalar + F.embedding_bag(rows, tables.scalar, per_sample_weights=weights, mode="sum").squeeze(1)
                mean_vector = (weights.unsqueeze(-1) * self.embedding.vectors(self.embedding.bag_rows(name, bag))).sum(1)
                scalar = scalar + 0.5 * d[self.schema.index[name]] * mean_vector.pow(2).sum(-1)
        return projection, scalar

    def _build_tables(self, items: FeatureBatch) -> _ItemTables:
        factors, eigen = self.factors()
        d = self.diagonal(factors, eigen)
        vectors = self.embedding.vectors.weight
        linear = self.embedding.linear.weight.squeeze(1)
        projections, scalars, starts, start = [], [], {}, 0
        for name in list(items.single_fields) + list(items.bag_fields):
            position = self.schema.index[name]
            lo = int(self.schema.offsets[position])
            hi = lo + self.schema.fields[position].vocab_size
            rows = vectors[lo:hi]
            projections.append(torch.einsum("r,nk->nrk", factors[:, position], rows).flatten(1))
            scalar = linear[lo:hi]
            if name in items.single_fields:
                scalar = scalar + 0.5 * d[position] * rows.pow(2).sum(-1)
            scalars.append(scalar)
            starts[name] = start
            start += hi - lo
        device = vectors.device
        return _ItemTables(
            projection=torch.cat(projections).detach().contiguous(),
            scalar=torch.cat(scalars).detach().unsqueeze(1).contiguous(),
            single_offsets=torch.tensor([starts[n] for n in items.single_fields], dtype=torch.int64, device=device),
            bag_offsets=tuple(starts[n] for n in items.bag_fields),
        )
