"""The training and ranking contract every model follows.

- ``forward(batch)`` scores full rows: logits for clicks, the rating for ratings.
- ``encode_context(context_batch)`` runs once per request (the paper's Algorithm 1,
  step 1) and ``score_items(state, item_batch)`` scores any number of items against
  it; together they equal the forward on the joined rows.
- Models whose score splits into context scalar + item scalar + <query, item vector>
  also give ``catalog_item_terms``/``catalog_query`` so a static catalog can be
  precomputed (see catalog.py).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from model_zoo.batch import FeatureBatch
from model_zoo.embedding import Embedded, FieldEmbedding
from model_zoo.schema import FeatureSchema


@dataclass(frozen=True)
class TrainingOutputs:
    outputs: Tensor  # (B,) logits or ratings
    row_sq_norm: Tensor  # sum of squared norms of the embedding rows looked up (for L2)
    auxiliary_loss: Tensor | float = 0.0  # model-specific extra loss (e.g. RaFM's distillation)


@dataclass(frozen=True)
class ContextState:
    """What a model caches for A contexts; subclasses add their tensors."""

    fields: tuple[str, ...]  # the context fields encoded
    item_fields: tuple[str, ...]  # the fields items must bring: every other field


class RankingModel(nn.Module, ABC):
    """The interface training and serving rely on."""

    kind: ClassVar[str]
    schema: FeatureSchema

    def __init__(self, schema: FeatureSchema):
        super().__init__()
        self.schema = schema
        self._cache: dict[Any, tuple[tuple, Any]] = {}

    @abstractmethod
    def forward(self, batch: FeatureBatch) -> Tensor:
        ...

    @abstractmethod
    def training_outputs(self, batch: FeatureBatch) -> TrainingOutputs:
        """Everything one training step needs from the model."""

    # -- ranking with a cached context -----------------------------------------
    @abstractmethod
    def encode_context(self, context: FeatureBatch) -> ContextState:
        ...

    @abstractmethod
    def score_items(
        self, state: ContextState, items: FeatureBatch, context_index: Tensor | None = None
    ) -> Tensor:
        """(N,) scores of item rows; item n is paired with context row context_index[n]
        (default: every item with context row 0)."""

    # -- catalog scoring ----------------------------------------------------------
    def catalog_item_terms(self, items: FeatureBatch) -> tuple[Tensor, Tensor]:
        """(N, D) item vectors and (N,) item scalars; see catalog.py."""
        raise NotImplementedError(f"{self.kind} has no catalog decomposition")

    def catalog_query(self, state: ContextState) -> tuple[Tensor, Tensor]:
        """(A, D) query vectors and (A,) context scalars; see catalog.py."""
        raise NotImplementedError(f"{self.kind} has no catalog decomposition")

    # -- bookkeeping --------------------------------------------------------------
    @abstractmethod
    def hyperparameters(self) -> dict[str, Any]:
        """Everything needed, with the schema, to rebuild this model (see registry.py)."""

    def item_fields_for(self, context_fields: tuple[str, ...]) -> tuple[str, ...]:
        context = set(context_fields)
        return tuple(n for n in self.schema.names if n not in context)

    def check_items(self, state: ContextState, items: FeatureBatch) -> None:
        if items.fields != state.item_fields:
            raise ValueError(
                f"items must carry exactly the non-context fields {list(state.item_fields)}, "
                f"got {list(items.fields)}"
            )

    def cached(self, key: Any, build: Any) -> Any:
        """Memoise a derived tensor until any parameter or buffer changes (in-place
        updates bump a tensor's version counter, so a stale table is never served)."""
        # Inference tensors cannot change outside inference mode and carry no version.
        # One walk over the modules' own tensors, not parameters() plus buffers() (two
        # walks): 33 against 61 µs per call here, and scoring calls it per batch.
        version = tuple(
            (t.data_ptr(), 0 if t.is_inference() else t._version)
            for module in self.modules()
            for t in itertools.chain(module._parameters.values(), module._buffers.values())
            if t is not None
        )
        hit = self._cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        # Built as normal tensors without autograd history, whatever mode the caller is in.
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        self._cache[key] = (version, value)
        return value


# L2 on the interaction parameters (R, U and e, W) as on an embedding row looked up by
# this share of the rows. Unpenalised, FwFM overfits through R where FM, which has none,
# does not (MovieLens sample, L2 0.3: FwFM test RMSE 0.9793 at best epoch 5 of 9; FM
# 0.9695). At share 1 (as if used once per row, which they are) they collapse the
# interactions of planted click data at the default L2 (FwFM test AUC 0.758 = the linear
# model's 0.755); at 0.01 the FwFM reaches 0.794 against 0.788 unpenalised (oracle 0.855),
# and the MovieLens FwFM 0.9662.
INTERACTION_L2_SHARE = 0.01


class CTRModel(RankingModel):
    """A single-embedding model: embeddings + linear weights + bias + a pairwise term."""

    # The interaction parameters' learning rate as a fraction of the embeddings' (the
    # training config may override it).
    interaction_lr_scale = 1.0

    def __init__(self, schema: FeatureSchema, dim: int, sparse: bool = False, init_std: float = 0.1):
        super().__init__(schema)
        self.dim = dim
        self.embedding = FieldEmbedding(schema, dim, sparse=sparse, init_std=init_std)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, batch: FeatureBatch) -> Tensor:
        return self.forward_embedded(batch, self.embedding(batch))

    def training_outputs(self, batch: FeatureBatch) -> TrainingOutputs:
        embedded = self.embedding(batch)
        row_sq_norm = embedded.row_sq_norm
        interaction = self.interaction_parameters()
        if interaction and self.training:
            # The training loop's l2 · row_sq_norm / B then penalises
            # l2 · INTERACTION_L2_SHARE · ‖θ‖² per step.
            share = INTERACTION_L2_SHARE * len(batch)
            row_sq_norm = row_sq_norm + share * sum(p.square().sum() for p in interaction)
        return TrainingOutputs(self.forward_embedded(batch, embedded), row_sq_norm)

    def interaction_parameters(self) -> list[Tensor]:
        """The dense parameters of the pairwise term (R, U and e, W): L2 penalises them,
        and they learn at ``interaction_lr_scale`` × the learning rate."""
        return []

    def forward_embedded(self, batch: FeatureBatch, embedded: Embedded) -> Tensor:
        positions = self.embedding.field_index(batch.fields)
        return self.bias + embedded.linear + self.pairwise(embedded.vectors, positions)

    @abstractmethod
    def pairwise(self, vectors: Tensor, positions: Tensor) -> Tensor:
        """(B,) pairwise-interaction term of field vectors (B, F, k) at schema positions."""

    def hyperparameters(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim}


def rows_for(context_index: Tensor | None, values: Tensor) -> Tensor:
    """Per-item rows of per-context ``values`` (broadcast when there is one context)."""
    if context_index is None:
        if values.shape[0] != 1:
            raise ValueError("several contexts encoded: pass context_index to pair items with them")
        return values
    return values[context_index]


def paired_dot(vectors: Tensor, per_context: Tensor, context_index: Tensor | None) -> Tensor:
    """(N,) <vectors[n], per_context[context_index[n]]>; one matrix–vector product when
    every item shares context row 0."""
    if context_index is None:
        if per_context.shape[0] != 1:
            raise ValueError("several contexts encoded: pass context_index to pair items with them")
        return vectors @ per_context[0]
    return (vectors * per_context[context_index]).sum(-1)
