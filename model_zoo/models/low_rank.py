"""The diagonal-plus-low-rank interaction family: R = Uᵀ diag(e) U + diag(d), d = −diag(Uᵀ diag(e) U).

With P = U V (ρ × k), the pairwise term Σ_{i<j} R_ij <v_i, v_j> equals
    ½ (Σ_i d_i ‖v_i‖² + Σ_r e_r ‖P_r‖²)            (O(ρ m k), R never formed).
FM is the member with ρ = 1, U = 1, e = 1 (then d = −1): ½(‖Σ v‖² − Σ ‖v‖²).

Cached ranking (the paper's Algorithm 1): per context P_C = U_C V_C and the context
scalars; per item P = P_C + P_I with P_I = U_I V_I, so
    score = s_C + s_I + <e ⊙ P_C, P_I> + ½ Σ_r e_r ‖P_I,r‖²,
where s_C = b + lin_C + ½(Σ_C d‖v‖² + Σ_r e_r‖P_C,r‖²) and s_I = lin_I + ½ Σ_I d‖v‖².
Every term of P_I and s_I is a sum over the item's features, so per feature we
precompute the row [U_f ⊗ v (ρk), lin + ½ d_f ‖v‖²] once and one fused
``embedding_bag`` sum gives (P_I, s_I) per item. A multi-valued field's ‖v̄‖² is not
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
from model_zoo.models.base import ContextState, CTRModel, rows_for


@dataclass(frozen=True)
class LowRankContext(ContextState):
    query: Tensor  # (A, ρk): e ⊙ P_C, flattened
    scalar: Tensor  # (A,): s_C


@dataclass(frozen=True)
class _ItemTables:
    table: Tensor  # (rows, ρk + 1): [U_f ⊗ v, lin + ½ d_f ‖v‖² (single fields) or lin (bag fields)]
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
        d = self.diagonal(factors, eigen)
        projection = torch.einsum("rf,bfk->brk", factors, vectors)
        return 0.5 * ((vectors.pow(2).sum(-1) * d).sum(-1) + (projection.pow(2).sum(-1) * eigen).sum(-1))

    # -- Algorithm 1 --------------------------------------------------------------
    def encode_context(self, context: FeatureBatch) -> LowRankContext:
        embedded = self.embedding(context)
        factors, eigen = self.factors()
        factors = factors[:, self.embedding.field_index(context.fields)]
        projection = torch.einsum("rf,bfk->brk", factors, embedded.vectors)
        scalar = (
            self.bias
            + embedded.linear
            + 0.5 * (embedded.vectors.pow(2).sum(-1) * self.diagonal(factors, eigen)).sum(-1)
            + 0.5 * (projection.pow(2).sum(-1) * eigen).sum(-1)
        )
        query = (eigen[:, None] * projection).flatten(1)
        return LowRankContext(context.fields, self.item_fields_for(context.fields), query, scalar)

    def score_items(
        self, state: LowRankContext, items: FeatureBatch, context_index: Tensor | None = None
    ) -> Tensor:
        self.check_items(state, items)
        item_projection, item_scalar = self._item_terms(items)
        _, eigen = self.factors()
        half_eigen = 0.5 * eigen.repeat_interleave(self.dim)
        query = rows_for(context_index, state.query)
        cross = (item_projection * (query + half_eigen * item_projection)).sum(-1)
        return rows_for(context_index, state.scalar) + item_scalar + cross

    def catalog_item_terms(self, items: FeatureBatch) -> tuple[Tensor, Tensor]:
        item_projection, item_scalar = self._item_terms(items)
        _, eigen = self.factors()
        half_eigen = 0.5 * eigen.repeat_interleave(self.dim)
        return item_projection, item_scalar + (half_eigen * item_projection.pow(2)).sum(-1)

    def catalog_query(self, state: LowRankContext) -> tuple[Tensor, Tensor]:
        return state.query, state.scalar

    # -- per-item terms via precomputed per-feature rows ----------------------------
    def _item_terms(self, items: FeatureBatch) -> tuple[Tensor, Tensor]:
        """(N, ρk) P_I and (N,) s_I."""
        tables = self.cached(("item_tables", items.fields, items.single_fields), lambda: self._build_tables(items))
        width = tables.table.shape[1] - 1
        if items.single_fields:
            summed = F.embedding_bag(items.single + tables.single_offsets, tables.table, mode="sum")
        else:
            summed = tables.table.new_zeros((len(items), width + 1))
        if items.bags:
            factors, eigen = self.factors()
            d = self.diagonal(factors, eigen)
            for name, bag, offset in zip(items.bag_fields, items.bags, tables.bag_offsets):
                weights = normalised_weights(bag)
                summed = summed + F.embedding_bag(
                    bag.values + offset, tables.table, per_sample_weights=weights, mode="sum"
                )
                mean_vector = (weights.unsqueeze(-1) * self.embedding.vectors(self.embedding.bag_rows(name, bag))).sum(1)
                self_term = 0.5 * d[self.schema.index[name]] * mean_vector.pow(2).sum(-1)
                summed = summed + F.pad(self_term.unsqueeze(1), (width, 0))
        return summed[:, :width], summed[:, width]

    def _build_tables(self, items: FeatureBatch) -> _ItemTables:
        factors, eigen = self.factors()
        d = self.diagonal(factors, eigen)
        vectors = self.embedding.vectors.weight
        linear = self.embedding.linear.weight.squeeze(1)
        parts, starts, start = [], {}, 0
        for name in list(items.single_fields) + list(items.bag_fields):
            position = self.schema.index[name]
            lo = int(self.schema.offsets[position])
            hi = lo + self.schema.fields[position].vocab_size
            rows = vectors[lo:hi]
            projection = torch.einsum("r,nk->nrk", factors[:, position], rows).flatten(1)
            scalar = linear[lo:hi]
            if name in items.single_fields:
                scalar = scalar + 0.5 * d[position] * rows.pow(2).sum(-1)
            parts.append(torch.cat([projection, scalar.unsqueeze(1)], dim=1))
            starts[name] = start
            start += hi - lo
        table = torch.cat(parts).detach().contiguous()
        single_offsets = torch.tensor([starts[n] for n in items.single_fields], dtype=torch.int64, device=table.device)
        return _ItemTables(table, single_offsets, tuple(starts[n] for n in items.bag_fields))
