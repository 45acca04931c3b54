"""The feature schema: one description of every field, shared by data preparation,
training and serving, saved as JSON beside every dataset and model bundle.

Index convention inside each field: 0 is the field's "missing" index, 1 its "rare"
index (values seen fewer than min-count times in training, or never seen), and
2.. the vocabulary proper. A field's ``vocab_size`` counts all of them.
"""

from __future__ import annotations

import json
from enum import Enum
from functools import cached_property
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MISSING_INDEX = 0
RARE_INDEX = 1
RESERVED_INDICES = 2


class Role(str, Enum):
    context = "context"  # user/query/page side: fixed within one auction
    item = "item"  # ad/candidate side: varies across the items of an auction


class Kind(str, Enum):
    single = "single"  # one categorical value per row
    multi = "multi"  # a weighted bag of values; its vector is the weighted average


class Task(str, Enum):
    binary = "binary"  # clicks: logits, BCE, AUC/logloss
    regression = "regression"  # ratings: the rating itself, MSE/RMSE


class FieldSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    role: Role
    kind: Kind = Kind.single
    vocab_size: int = Field(ge=RESERVED_INDICES)


class FeatureSchema(BaseModel):
    """Ordered fields plus the label; the order is the model's field order."""

    model_config = ConfigDict(frozen=True)

    fields: tuple[FieldSpec, ...]
    label: str = "label"
    task: Task = Task.binary

    @field_validator("fields")
    @classmethod
    def _unique_names(cls, fields: tuple[FieldSpec, ...]) -> tuple[FieldSpec, ...]:
        names = [f.name for f in fields]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate field names: {duplicates}")
        if not fields:
            raise ValueError("a schema needs at least one field")
        return fields

    @model_validator(mode="after")
    def _label_not_a_field(self) -> "FeatureSchema":
        if self.label in self.names:
            raise ValueError(f"label {self.label!r} is also a field name")
        return self

    # -- views -----------------------------------------------------------------
    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @cached_property
    def index(self) -> dict[str, int]:
        return {f.name: i for i, f in enumerate(self.fields)}

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    def field(self, name: str) -> FieldSpec:
        return self.fields[self.index[name]]

    def names_with_role(self, role: Role | str) -> tuple[str, ...]:
        role = Role(role)
        return tuple(f.name for f in self.fields if f.role == role)

    @cached_property
    def context_fields(self) -> tuple[str, ...]:
        return self.names_with_role(Role.context)

    @cached_property
    def item_fields(self) -> tuple[str, ...]:
        return self.names_with_role(Role.item)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Start of each field's rows in one table holding every field's vocabulary."""
        sizes = np.array([f.vocab_size for f in self.fields], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(sizes)[:-1]])

    @property
    def total_vocab(self) -> int:
        return int(sum(f.vocab_size for f in self.fields))

    def ordered(self, names: "tuple[str, ...] | list[str]") -> tuple[str, ...]:
        """``names`` in schema order; unknown names are an error."""
        unknown = sorted(set(names) - set(self.names))
        if unknown:
            raise KeyError(f"unknown fields: {unknown}")
        wanted = set(names)
        return tuple(n for n in self.names if n in wanted)

    def with_roles(self, context_fields: "list[str] | tuple[str, ...]") -> "FeatureSchema":
        """The same schema with ``context_fields`` as context and every other field as item."""
        self.ordered(context_fields)
        chosen = set(context_fields)
        fields = tuple(
            f.model_copy(update={"role": Role.context if f.name in chosen else Role.item})
            for f in self.fields
        )
        # A fresh instance, not model_copy: cached views must not carry over.
        return FeatureSchema(fields=fields, label=self.label, task=self.task)

    # -- persistence -----------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> "FeatureSchema":
        return cls.model_validate(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSchema":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
