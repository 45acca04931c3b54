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

import numba
import numpy as np
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
    half_eigen: Tensor  # (ρk,) ½ e_r repeated k times: the weights of ‖P_I‖²


@dataclass(frozen=True)
class _ContextTables:
    single_offsets: Tensor  # (S,) start of each single context field's rows in the embedding tables
    factors: Tensor  # (ρ, S) U of the context fields
    diagonal: Tensor  # (S,) d of the context fields
    eigen: Tensor  # (ρ,) e


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
        if vectors.device.type == "cpu" and vectors.dtype == torch.float32:
            return LowRankPairwise.apply(vectors, factors, eigen, self.diagonal(factors, eigen))
        return self.pairwise_from(vectors, torch.matmul(factors, vectors), factors, eigen)

    # -- Algorithm 1 --------------------------------------------------------------
    def encode_context(self, context: FeatureBatch) -> LowRankContext:
        vectors = self.embedding.vectors.weight
        if not context.bags and context.single_fields and not torch.is_grad_enabled() and _compiled_dtype(vectors):
            # Serving: one compiled pass per context in place of about twenty small
            # torch operations (their dispatch is most of a few contexts' cost).
            tables = self._context_tables(context)
            query = vectors.new_empty((len(context), tables.factors.shape[0] * self.dim))
            scalar = vectors.new_empty(len(context))
            _encode_single_contexts(
                context.single.contiguous().numpy(), tables.single_offsets.numpy(), vectors.detach().numpy(),
                self.embedding.linear.weight.detach().numpy(), tables.factors.numpy(), tables.diagonal.numpy(),
                tables.eigen.numpy(), float(self.bias), query.numpy(), scalar.numpy(),
            )  # fmt: skip
            return LowRankContext(context.fields, self.item_fields_for(context.fields), query, scalar)
        return self.encode_context_composed(context)

    def encode_context_composed(self, context: FeatureBatch) -> LowRankContext:
        """``encode_context`` from torch operations (any device, bags, autograd): the
        reference the compiled serving path is tested against."""
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
        query = state.query
        if not items.bags and items.single_fields and not torch.is_grad_enabled() and _compiled_dtype(query):
            # Serving: one compiled pass per item (its rows summed, then both products) in
            # place of two embedding_bag calls and four (N, ρk) temporaries.
            tables = self._tables(items)
            index = torch.zeros(len(items), dtype=torch.int64) if context_index is None else context_index
            if context_index is None and query.shape[0] != 1:
                raise ValueError("several contexts encoded: pass context_index to pair items with them")
            out = query.new_empty(len(items))
            _score_single_items(
                items.single.contiguous().numpy(), tables.single_offsets.numpy(), tables.projection.numpy(),
                tables.scalar.numpy(), query.contiguous().numpy(), state.scalar.contiguous().numpy(),
                index.contiguous().numpy(), tables.half_eigen.numpy(), out.numpy(),
            )  # fmt: skip
            return out
        return self.score_items_composed(state, items, context_index)

    def score_items_composed(
        self, state: LowRankContext, items: FeatureBatch, context_index: Tensor | None = None
    ) -> Tensor:
        """``score_items`` from torch operations (any device, bags, autograd): the
        reference the compiled serving path is tested against."""
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
        tables = self._tables(items)
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

    def _context_tables(self, context: FeatureBatch) -> _ContextTables:
        def build() -> _ContextTables:
            factors, eigen = self.factors()
            factors = factors[:, self.embedding.field_index(context.fields)]
            return _ContextTables(
                single_offsets=self.embedding.offsets[self.embedding.field_index(context.single_fields)].contiguous(),
                factors=factors.detach().contiguous(),
                diagonal=self.diagonal(factors, eigen).detach().contiguous(),
                eigen=eigen.detach().contiguous(),
            )

        return self.cached(("context_tables", context.fields, context.single_fields), build)

    def _tables(self, items: FeatureBatch) -> _ItemTables:
        return self.cached(("item_tables", items.fields, items.single_fields), lambda: self._build_tables(items))

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
            half_eigen=(0.5 * eigen.repeat_interleave(self.dim)).detach().contiguous(),
        )


def _compiled_dtype(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _score_single_items(
    rows, offsets, projection, scalar, query, context_scalar, context_index, half_eigen, out
):  # pragma: no cover - compiled
    """out[n] = s_C + s_I + <q, P_I> + ½ Σ e ‖P_I‖² for items of single-valued fields:
    P_I and s_I are sums of the items' table rows (``score_items_composed``'s terms)."""
    items, fields = rows.shape
    width = projection.shape[1]
    table_rows = projection.shape[0]
    item_projection = np.empty(width, dtype=np.float32)
    for n in range(items):
        item_projection[:] = 0.0
        item_scalar = np.float32(0.0)
        for f in range(fields):
            row = rows[n, f] + offsets[f]
            if row < 0 or row >= table_rows:
                raise IndexError("item index out of range")
            for k in range(width):
                item_projection[k] += projection[row, k]
            item_scalar += scalar[row, 0]
        context = context_index[n]
        if context < 0 or context >= query.shape[0]:
            raise IndexError("context row out of range")
        products = np.float32(0.0)
        for k in range(width):
            products += item_projection[k] * (query[context, k] + half_eigen[k] * item_projection[k])
        out[n] = context_scalar[context] + item_scalar + products


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _encode_single_contexts(
    rows, offsets, vectors, linear, factors, diagonal, eigen, bias, query, scalar
):  # pragma: no cover - compiled
    """``encode_context_composed`` for contexts of single-valued fields: per context
    P_C = U_C V_C, query = e ⊙ P_C and s_C = b + lin_C + ½(Σ d‖v‖² + Σ_r e_r‖P_C,r‖²)."""
    contexts, fields = rows.shape
    rank, dim = factors.shape[0], vectors.shape[1]
    projection = np.empty((rank, dim), dtype=np.float32)
    for a in range(contexts):
        projection[:] = 0.0
        linear_sum = np.float32(0.0)
        diagonal_sum = np.float32(0.0)
        for f in range(fields):
            row = rows[a, f] + offsets[f]
            if row < 0 or row >= vectors.shape[0]:
                raise IndexError("embedding row out of range")
            linear_sum += linear[row, 0]
            square_norm = np.float32(0.0)
            for k in range(dim):
                square_norm += vectors[row, k] * vectors[row, k]
            diagonal_sum += square_norm * diagonal[f]
            for r in range(rank):
                u = factors[r, f]
                for k in range(dim):
                    projection[r, k] += u * vectors[row, k]
        eigen_sum = np.float32(0.0)
        for r in range(rank):
            square_norm = np.float32(0.0)
            for k in range(dim):
                square_norm += projection[r, k] * projection[r, k]
                query[a, r * dim + k] = eigen[r] * projection[r, k]
            eigen_sum += square_norm * eigen[r]
        scalar[a] = np.float32(bias) + linear_sum + np.float32(0.5) * (diagonal_sum + eigen_sum)


# -- the training-time pairwise term on CPU, one compiled pass per direction ---------
class LowRankPairwise(torch.autograd.Function):
    """½(Σ_f d_f‖v_f‖² + Σ_r e_r‖P_r‖²), P = U V, with its gradient written out:
        ∂/∂v_f = d_f v_f + Σ_r e_r U_rf P_r,   ∂/∂U_rf = e_r <P_r, v_f>,
        ∂/∂e_r = ½‖P_r‖²,                     ∂/∂d_f = ½‖v_f‖²
    (d's own dependence on U and e is left to autograd). Per row the (F, k) block stays
    in L1; composed torch ops make ~10 passes over the (B, F, k) tensor instead
    (forward + backward ~45 ms → ~6 ms per 4,096 × 39 × 16 batch on one core)."""

    @staticmethod
    def forward(ctx, vectors: Tensor, factors: Tensor, eigen: Tensor, diagonal: Tensor) -> Tensor:
        vectors = vectors.contiguous()
        batch, _, dim = vectors.shape
        projection = vectors.new_empty(batch, factors.shape[0], dim)
        square_norms = vectors.new_empty(batch, vectors.shape[1])
        out = vectors.new_empty(batch)
        weights = [t.detach().contiguous().numpy() for t in (factors, eigen, diagonal)]
        _pairwise_forward(vectors.detach().numpy(), *weights, projection.numpy(), square_norms.numpy(), out.numpy())
        ctx.save_for_backward(vectors, factors, eigen, diagonal, projection, square_norms)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        vectors, factors, eigen, diagonal, projection, square_norms = ctx.saved_tensors
        grad_vectors = torch.empty_like(vectors)
        grad_factors = np.zeros(factors.shape, dtype=np.float64)
        grad_eigen = np.zeros(eigen.shape, dtype=np.float64)
        grad_diagonal = np.zeros(diagonal.shape, dtype=np.float64)
        _pairwise_backward(
            vectors.detach().numpy(), factors.detach().contiguous().numpy(), eigen.detach().numpy(),
            diagonal.detach().numpy(), projection.numpy(), square_norms.numpy(), grad.contiguous().numpy(),
            grad_vectors.numpy(), grad_factors, grad_eigen, grad_diagonal,
        )
        as_tensor = lambda array: torch.from_numpy(array).to(vectors.dtype)  # noqa: E731
        return grad_vectors, as_tensor(grad_factors), as_tensor(grad_eigen), as_tensor(grad_diagonal)


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _pairwise_forward(vectors, factors, eigen, diagonal, projection, square_norms, out):  # pragma: no cover - compiled
    batch, fields, dim = vectors.shape
    rank = factors.shape[0]
    for b in range(batch):
        projection[b] = 0.0
        total = np.float32(0.0)
        for f in range(fields):
            square_norm = np.float32(0.0)
            for k in range(dim):
                square_norm += vectors[b, f, k] * vectors[b, f, k]
            square_norms[b, f] = square_norm
            total += diagonal[f] * square_norm
            for r in range(rank):
                u = factors[r, f]
                for k in range(dim):
                    projection[b, r, k] += u * vectors[b, f, k]
        for r in range(rank):
            square_norm = np.float32(0.0)
            for k in range(dim):
                square_norm += projection[b, r, k] * projection[b, r, k]
            total += eigen[r] * square_norm
        out[b] = 0.5 * total


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _pairwise_backward(
    vectors, factors, eigen, diagonal, projection, square_norms, grad,
    grad_vectors, grad_factors, grad_eigen, grad_diagonal,
):  # pragma: no cover - compiled
    batch, fields, dim = vectors.shape
    rank = factors.shape[0]
    scaled_projection = np.empty((rank, dim), dtype=np.float32)  # g_b P_b
    row = np.empty(dim, dtype=np.float32)
    # Σ_b g_b P_br ⊙ v_bf, summed over k only at the end: no per-row horizontal sums.
    factor_terms = np.zeros((rank, fields, dim), dtype=np.float32)
    for b in range(batch):
        g = grad[b]
        for r in range(rank):
            square_norm = np.float32(0.0)
            for k in range(dim):
                square_norm += projection[b, r, k] * projection[b, r, k]
                scaled_projection[r, k] = g * projection[b, r, k]
            grad_eigen[r] += 0.5 * g * square_norm
        for f in range(fields):
            grad_diagonal[f] += 0.5 * g * square_norms[b, f]
            scaled_diagonal = g * diagonal[f]
            for k in range(dim):
                row[k] = scaled_diagonal * vectors[b, f, k]
            for r in range(rank):
                weight = eigen[r] * factors[r, f]
                for k in range(dim):
                    row[k] += weight * scaled_projection[r, k]
                    factor_terms[r, f, k] += scaled_projection[r, k] * vectors[b, f, k]
            for k in range(dim):
                grad_vectors[b, f, k] = row[k]
    for r in range(rank):
        for f in range(fields):
            grad_factors[r, f] = eigen[r] * factor_terms[r, f].sum()
