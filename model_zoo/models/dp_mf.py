"""Serving wrapper for (dynamically pruned) matrix factorisation, model_zoo/mf.py:

    ŷ = b + b_u + b_i + ⟨p_u, q_i⟩

over two single-valued fields of the schema, the user (a context field) and the item (an
item field); every other field is carried but unused. A pruned model is stored with
each row zeroed from its cut-off on, which makes the plain dot product equal the
pruned one. The user's vector is the cached context and the item vectors are the
catalog: query = p_u, item vector = q_i, scalars b + b_u and b_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model_zoo.batch import FeatureBatch
from model_zoo.mf import MFModel
from model_zoo.models.base import ContextState, RankingModel, TrainingOutputs, paired_dot, rows_for
from model_zoo.schema import FeatureSchema, Kind, Role


@dataclass(frozen=True)
class MFContext(ContextState):
    query: Tensor  # (A, k) p_u
    scalar: Tensor  # (A,) b + b_u


class DPMF(RankingModel):
    kind = "dp_mf"

    def __init__(
        self, schema: FeatureSchema, dim: int, user_field: str | None = None, item_field: str | None = None,
        init_std: float = 0.1,
    ):  # fmt: skip
        super().__init__(schema)
        self.user_field = user_field or _first_single(schema, Role.context)
        self.item_field = item_field or _first_single(schema, Role.item)
        for name, role in ((self.user_field, Role.context), (self.item_field, Role.item)):
            spec = schema.field(name)
            if spec.kind != Kind.single or spec.role != role:
                raise ValueError(f"dp_mf needs {name!r} to be a single-valued {role.value} field")
        self.dim = dim
        users, items = schema.field(self.user_field).vocab_size, schema.field(self.item_field).vocab_size
        self.bias = nn.Parameter(torch.zeros(()))
        self.user_bias = nn.Parameter(torch.zeros(users))
        self.item_bias = nn.Parameter(torch.zeros(items))
        self.user_factors = nn.Parameter(torch.randn(users, dim) * init_std)
        self.item_factors = nn.Parameter(torch.randn(items, dim) * init_std)

    @classmethod
    def from_trained(
        cls, schema: FeatureSchema, trained: MFModel, user_field: str | None = None, item_field: str | None = None
    ) -> "DPMF":
        """The serving model of an ``MFModel`` whose rows are the fields' vocabulary indices."""
        model = cls(schema, trained.dim, user_field, item_field)
        if model.user_factors.shape[0] != trained.user_factors.shape[0] or model.item_factors.shape[0] != trained.item_factors.shape[0]:
            raise ValueError(
                f"trained MF has {trained.user_factors.shape[0]} users × {trained.item_factors.shape[0]} items, "
                f"the schema's {model.user_field!r} × {model.item_field!r} vocabularies are "
                f"{model.user_factors.shape[0]} × {model.item_factors.shape[0]}"
            )
        user_factors, item_factors = trained.masked_factors()
        with torch.no_grad():
            model.bias.fill_(trained.mean)
            model.user_bias.copy_(torch.from_numpy(trained.user_bias))
            model.item_bias.copy_(torch.from_numpy(trained.item_bias))
            model.user_factors.copy_(torch.from_numpy(user_factors))
            model.item_factors.copy_(torch.from_numpy(item_factors))
        return model

    def _column(self, batch: FeatureBatch, name: str) -> Tensor:
        if name not in batch.single_fields:
            raise ValueError(f"dp_mf needs field {name!r}, the batch has {list(batch.fields)}")
        return batch.single[:, batch.single_fields.index(name)]

    def forward(self, batch: FeatureBatch) -> Tensor:
        users, items = self._column(batch, self.user_field), self._column(batch, self.item_field)
        interaction = (self.user_factors[users] * self.item_factors[items]).sum(-1)
        return self.bias + self.user_bias[users] + self.item_bias[items] + interaction

    def training_outputs(self, batch: FeatureBatch) -> TrainingOutputs:
        users, items = self._column(batch, self.user_field), self._column(batch, self.item_field)
        row_sq_norm = self.user_factors[users].square().sum() + self.item_factors[items].square().sum()
        return TrainingOutputs(self.forward(batch), row_sq_norm)

    def encode_context(self, context: FeatureBatch) -> MFContext:
        users = self._column(context, self.user_field)
        scalar = self.bias + self.user_bias[users]
        return MFContext(context.fields, self.item_fields_for(context.fields), self.user_factors[users], scalar)

    def score_items(self, state: MFContext, items: FeatureBatch, context_index: Tensor | None = None) -> Tensor:
        self.check_items(state, items)
        rows = self._column(items, self.item_field)
        return (
            rows_for(context_index, state.scalar) + self.item_bias[rows]
            + paired_dot(self.item_factors[rows], state.query, context_index)
        )  # fmt: skip

    def catalog_item_terms(self, items: FeatureBatch) -> tuple[Tensor, Tensor]:
        rows = self._column(items, self.item_field)
        return self.item_factors[rows], self.item_bias[rows]

    def catalog_query(self, state: MFContext) -> tuple[Tensor, Tensor]:
        return state.query, state.scalar

    def hyperparameters(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "user_field": self.user_field, "item_field": self.item_field}


def _first_single(schema: FeatureSchema, role: Role) -> str:
    for spec in schema.fields:
        if spec.role == role and spec.kind == Kind.single:
            return spec.name
    raise ValueError(f"dp_mf needs a single-valued {role.value} field; the schema has none")
