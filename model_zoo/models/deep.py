"""Deep CTR models of the embedding-collapse paper's scaling table (Guo et al., ICML 2024),
single- and multi-embedding, in one frame:

    h   = (1/M) Σ_m ReLU(W_m · interaction_m(V_m) + b_m)      per set m: its own table V_m,
    ŷ   = mean_m Σ w_m + MLP(h)                               interaction module and first layer

With M = 1 this is the single-embedding model (kind ``dnn``, ``dcnv2``, ``nfwfm``); with
M > 1 sets of width k it is the multi-embedding one (``me_…``): the per-set non-linear
first layer is what keeps M sets from collapsing into one table of width M·k (for the
DNN the interaction is the identity, so averaging before a non-linearity would be that
single wide table). The hidden layers after the first and the output layer are shared.
Each set also keeps first-order weights (as the ``me_`` FM family); they are averaged.

Cached ranking: per auction each set's context vectors are looked up once and the
model caches whatever of its first linear map depends on the context alone (see
each model's ``encode_set``/``score_set``); everything after the first non-linearity
needs the item. No catalog decomposition exists for these models.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model_zoo.batch import FeatureBatch
from model_zoo.embedding import FieldEmbedding
from model_zoo.models.base import ContextState, RankingModel, TrainingOutputs, rows_for
from model_zoo.schema import FeatureSchema

DEFAULT_HIDDEN = (128, 64)


@dataclass(frozen=True)
class DeepContext(ContextState):
    linear: Tensor  # (A,) mean over sets of the context fields' first-order terms
    per_set: tuple[tuple[Tensor, ...], ...]  # per embedding set: what the model caches (see encode_set)


class DeepModel(RankingModel):
    base_kind: str  # the single-embedding kind; M > 1 sets make it "me_<base_kind>"

    def __init__(
        self,
        schema: FeatureSchema,
        dim: int,
        sets: int = 1,
        hidden: tuple[int, ...] | list[int] = DEFAULT_HIDDEN,
        sparse: bool = False,
        init_std: float = 0.1,
    ):
        super().__init__(schema)
        if sets < 1:
            raise ValueError(f"a model needs at least one embedding set, got sets={sets}")
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden needs at least one positive layer width, got {list(hidden)}")
        self.kind = self.base_kind if sets == 1 else f"me_{self.base_kind}"
        self.dim, self.sets, self.hidden = dim, sets, tuple(int(h) for h in hidden)
        self.embeddings = nn.ModuleList(FieldEmbedding(schema, dim, sparse=sparse, init_std=init_std) for _ in range(sets))
        self.first_layers = nn.ModuleList(nn.Linear(self.interaction_width(), self.hidden[0]) for _ in range(sets))
        shared: list[nn.Module] = []
        for width_in, width_out in zip(self.hidden, self.hidden[1:]):
            shared += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.shared = nn.Sequential(*shared, nn.Linear(self.hidden[-1], 1))

    # -- what each model defines --------------------------------------------------
    @abstractmethod
    def interaction_width(self) -> int:
        """Width of one set's interaction output (the first layer's input)."""

    @abstractmethod
    def first_layer_input(self, m: int, vectors: Tensor) -> Tensor:
        """(B, interaction_width) of set m from its field vectors (B, F, k) in schema order."""

    @abstractmethod
    def encode_set(self, m: int, context_vectors: Tensor, context_fields: tuple[str, ...]) -> tuple[Tensor, ...]:
        """Per-context tensors of set m (leading dim A) that ``score_set`` needs."""

    @abstractmethod
    def score_set(
        self, m: int, cached: tuple[Tensor, ...], item_vectors: Tensor, state: DeepContext, context_index: Tensor | None
    ) -> Tensor:
        """(N, hidden[0]) pre-activations of set m's first layer for the joined rows."""

    # -- shared machinery ---------------------------------------------------------
    def forward(self, batch: FeatureBatch) -> Tensor:
        return self.training_outputs(batch).outputs

    def training_outputs(self, batch: FeatureBatch) -> TrainingOutputs:
        if batch.fields != self.schema.names:
            raise ValueError(f"{self.kind} scores full rows: the batch must carry every schema field, got {list(batch.fields)}")
        embedded = [embedding(batch) for embedding in self.embeddings]
        activations = [layer(self.first_layer_input(m, e.vectors)) for m, (layer, e) in enumerate(zip(self.first_layers, embedded))]
        linear = torch.stack([e.linear for e in embedded]).mean(0)
        outputs = linear + self.head(activations)
        return TrainingOutputs(outputs, torch.stack([e.row_sq_norm for e in embedded]).sum())

    def head(self, pre_activations: list[Tensor]) -> Tensor:
        """Mean of the per-set ReLU layers, then the shared layers: (B,) logits."""
        hidden = torch.stack([torch.relu(p) for p in pre_activations]).mean(0)
        return self.shared(hidden).squeeze(-1)

    def encode_context(self, context: FeatureBatch) -> DeepContext:
        embedded = [embedding(context) for embedding in self.embeddings]
        per_set = tuple(self.encode_set(m, e.vectors, context.fields) for m, e in enumerate(embedded))
        linear = torch.stack([e.linear for e in embedded]).mean(0)
        return DeepContext(context.fields, self.item_fields_for(context.fields), linear, per_set)

    def score_items(self, state: DeepContext, items: FeatureBatch, context_index: Tensor | None = None) -> Tensor:
        self.check_items(state, items)
        embedded = [embedding(items) for embedding in self.embeddings]
        pre = [self.score_set(m, cached, e.vectors, state, context_index) for m, (cached, e) in enumerate(zip(state.per_set, embedded))]
        linear = rows_for(context_index, state.linear) + torch.stack([e.linear for e in embedded]).mean(0)
        return linear + self.head(pre)

    def field_columns(self, weight: Tensor, fields: tuple[str, ...]) -> Tensor:
        """The columns of a (rows, F·k) weight that multiply ``fields``' vectors (field-major)."""
        positions = self.embeddings[0].field_index(fields)
        return weight.view(weight.shape[0], self.schema.num_fields, self.dim)[:, positions].reshape(weight.shape[0], -1)

    def embedding_tables(self) -> list[Tensor]:
        """One (total_vocab, k) vector table per embedding set (for the IA diagnostics)."""
        return [embedding.vectors.weight for embedding in self.embeddings]

    def hyperparameters(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "sets": self.sets, "hidden": list(self.hidden)}


def joined_vectors(
    model: DeepModel, context_vectors: Tensor, item_vectors: Tensor, state: DeepContext, context_index: Tensor | None
) -> Tensor:
    """(N, F, k) field vectors of the joined rows in schema order."""
    rows = item_vectors.shape[0]
    context_rows = rows_for(context_index, context_vectors).expand(rows, -1, -1)
    joined = item_vectors.new_empty(rows, model.schema.num_fields, model.dim)
    joined[:, model.embeddings[0].field_index(state.fields)] = context_rows
    joined[:, model.embeddings[0].field_index(state.item_fields)] = item_vectors
    return joined
