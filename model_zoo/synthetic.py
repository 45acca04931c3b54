"""Click or rating data drawn from a planted FwFM, so learned models can be compared
with the truth (and with the oracle that knows it).

The planted model has Zipf-distributed field values, Gaussian embeddings, linear
weights and a field-interaction matrix R of a chosen structure:
- ``dplr``: diagonal plus rank ρ, block-like (each rank-one term lives on a group of
  fields, as in the paper's motivating example), zero diagonal;
- ``sparse``: a few strong pairs and nothing else (pruning's best case);
- ``dense``: a full-rank random symmetric R.
R is scaled so the pairwise term has standard deviation ``interaction_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from model_zoo.schema import RESERVED_INDICES, FeatureSchema, FieldSpec, Kind, Role, Task

Structure = Literal["dplr", "sparse", "dense"]


class PlantedConfig(BaseModel):
    context_fields: int = Field(default=6, ge=1, description="fields of the request (user, page)")
    item_fields: int = Field(default=6, ge=1, description="fields of each candidate item")
    multi_fields: int = Field(default=0, ge=0, description="how many item fields are multi-valued")
    max_bag: int = Field(default=3, ge=1, description="most values in one multi-valued field")
    vocab_size: int = Field(default=200, ge=RESERVED_INDICES + 1, description="indices per field, the 2 reserved ones included")
    zipf_exponent: float = Field(default=1.05, gt=0, description="of the field values' distribution")
    dim: int = Field(default=8, ge=1, description="embedding size k of the planted model")
    structure: Structure = Field(default="dplr", description="the planted interaction matrix R")
    rank: int = Field(default=2, ge=1, description="rank of R (dplr structure)")
    sparse_pairs: int | None = Field(default=None, ge=1, description="strong pairs (sparse structure; default: the number of fields)")
    interaction_scale: float = Field(default=1.5, ge=0, description="standard deviation of the pairwise term")
    linear_scale: float = Field(default=0.5, ge=0, description="standard deviation of the linear weights")
    bias: float = Field(default=-1.0, description="the planted model's constant term")
    task: Task = Field(default=Task.binary, description="binary: clicks; regression: ratings")
    noise: float = Field(default=0.3, ge=0, description="rating noise std (regression only)")
    seed: int = Field(default=0, description="of the planted model, its rows and their splits")


@dataclass(frozen=True)
class PlantedModel:
    config: PlantedConfig
    schema: FeatureSchema
    embeddings: list[np.ndarray]  # per field (vocab, k)
    linear: list[np.ndarray]  # per field (vocab,)
    interactions: np.ndarray  # R (m, m), symmetric, zero diagonal
    bias: float
    value_probabilities: np.ndarray  # Zipf over a field's vocabulary proper

    def sample(self, rows: int, rng: np.random.Generator) -> tuple[dict[str, object], np.ndarray, np.ndarray]:
        """(columns for FeatureBatch.from_columns, labels, planted logits)."""
        columns: dict[str, object] = {}
        vectors = np.empty((rows, self.schema.num_fields, self.config.dim), dtype=np.float64)
        linear = np.zeros(rows)
        for position, spec in enumerate(self.schema.fields):
            table, weights = self.embeddings[position], self.linear[position]
            if spec.kind == Kind.single:
                values = self._draw(rows, rng)
                columns[spec.name] = values
                vectors[:, position] = table[values]
                linear += weights[values]
            else:
                lengths = rng.integers(1, self.config.max_bag + 1, size=rows)
                values = self._draw(rows * self.config.max_bag, rng).reshape(rows, self.config.max_bag)
                mask = np.arange(self.config.max_bag)[None, :] < lengths[:, None]
                bag_weights = mask / lengths[:, None]
                values = np.where(mask, values, 0)
                columns[spec.name] = (values, bag_weights.astype(np.float32))
                vectors[:, position] = (bag_weights[..., None] * table[values]).sum(1)
                linear += (bag_weights * weights[values]).sum(1)
        pairwise = 0.5 * np.einsum("bik,ij,bjk->b", vectors, self.interactions, vectors)
        logits = self.bias + linear + pairwise
        if self.config.task == Task.binary:
            labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        else:
            labels = (logits + rng.normal(scale=self.config.noise, size=rows)).astype(np.float32)
        return columns, labels, logits

    def _draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        proper = rng.choice(len(self.value_probabilities), size=count, p=self.value_probabilities)
        return proper + RESERVED_INDICES


def planted_model(config: PlantedConfig) -> PlantedModel:
    rng = np.random.default_rng(config.seed)
    m = config.context_fields + config.item_fields
    fields = [FieldSpec(name=f"c{i}", role=Role.context, vocab_size=config.vocab_size) for i in range(config.context_fields)]
    for i in range(config.item_fields):
        kind = Kind.multi if i >= config.item_fields - config.multi_fields else Kind.single
        fields.append(FieldSpec(name=f"i{i}", role=Role.item, kind=kind, vocab_size=config.vocab_size))
    schema = FeatureSchema(fields=tuple(fields), task=config.task)
    ranks = np.arange(1, config.vocab_size - RESERVED_INDICES + 1, dtype=np.float64)
    probabilities = ranks ** (-config.zipf_exponent)
    probabilities /= probabilities.sum()
    embeddings = [rng.normal(scale=1.0 / np.sqrt(config.dim), size=(config.vocab_size, config.dim)) for _ in range(m)]
    linear = [rng.normal(scale=config.linear_scale, size=config.vocab_size) for _ in range(m)]
    interactions = _interaction_matrix(config, m, rng)
    planted = PlantedModel(config, schema, embeddings, linear, interactions, config.bias, probabilities)
    # Scale R so the pairwise term has the requested spread on data from this model.
    _, _, logits = planted.sample(4096, np.random.default_rng(config.seed + 1))
    unit = PlantedModel(config, schema, embeddings, [np.zeros_like(w) for w in linear], interactions, 0.0, probabilities)
    _, _, pairwise = unit.sample(4096, np.random.default_rng(config.seed + 1))
    scale = config.interaction_scale / max(float(pairwise.std()), 1e-12)
    return PlantedModel(config, schema, embeddings, linear, interactions * scale, config.bias, probabilities)


def _interaction_matrix(config: PlantedConfig, m: int, rng: np.random.Generator) -> np.ndarray:
    if config.structure == "dplr":
        factors = np.zeros((config.rank, m))
        groups = np.array_split(rng.permutation(m), config.rank)
        for r, group in enumerate(groups):
            factors[r] = rng.normal(scale=0.2, size=m)
            factors[r, group] += rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 2.0, size=len(group))
        eigen = rng.choice([-1.0, 1.0], size=config.rank) * rng.uniform(0.5, 1.5, size=config.rank)
        matrix = factors.T @ np.diag(eigen) @ factors
    elif config.structure == "sparse":
        matrix = np.zeros((m, m))
        rows, cols = np.triu_indices(m, 1)
        count = min(config.sparse_pairs or m, len(rows))
        chosen = rng.choice(len(rows), size=count, replace=False)
        strengths = rng.choice([-1.0, 1.0], size=count) * rng.uniform(1.0, 2.0, size=count)
        matrix[rows[chosen], cols[chosen]] = strengths
        matrix = matrix + matrix.T
    elif config.structure == "dense":
        half = rng.normal(size=(m, m))
        matrix = (half + half.T) / 2
    else:
        raise ValueError(f"unknown structure {config.structure!r}")
    np.fill_diagonal(matrix, 0.0)
    return matrix
