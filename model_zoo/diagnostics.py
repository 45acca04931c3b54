"""Embedding-collapse diagnostics (Guo et al., ICML 2024).

Information abundance IA(E) = ‖σ‖₁ / ‖σ‖_∞ of an embedding table E (rows = values,
columns = dims), 1 ≤ IA ≤ k: low IA = collapsed embeddings. The singular values come
from the k × k Gram matrix EᵀE in float64, so a table of millions of rows costs one
pass over it and a k × k eigendecomposition (singular values below about
√ε·σ_max read as ≈1e-8·σ_max — immaterial to IA).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model_zoo.models.base import RankingModel
from model_zoo.models.multi_embedding import MultiEmbedding
from model_zoo.schema import FeatureSchema


def singular_values(table: torch.Tensor | np.ndarray) -> np.ndarray:
    """Singular values of ``table``, descending, via its Gram matrix."""
    matrix = torch.as_tensor(table).detach().to("cpu", torch.float64)
    eigenvalues = torch.linalg.eigvalsh(matrix.T @ matrix).clamp_min(0.0)
    return eigenvalues.sqrt().flip(0).numpy()


def information_abundance(table: torch.Tensor | np.ndarray) -> float:
    sigma = singular_values(table)
    if sigma[0] == 0.0:
        return 0.0  # an all-zero table carries no information
    return float(sigma.sum() / sigma[0])


def field_information_abundance(model: RankingModel) -> dict[str, float]:
    """IA of each field's rows of the embedding table; for a multi-embedding model the
    mean over its sets (``embedding_set_information_abundance`` gives each set)."""
    tables = embedding_tables(model)
    per_set = [_per_field(model.schema, table) for table in tables]
    return {name: float(np.mean([values[name] for values in per_set])) for name in model.schema.names}


def embedding_set_information_abundance(model: RankingModel) -> list[dict[str, float]]:
    return [_per_field(model.schema, table) for table in embedding_tables(model)]


def embedding_tables(model: RankingModel) -> list[torch.Tensor]:
    if hasattr(model, "embedding_tables"):  # models that hold their sets themselves (deep.py)
        return model.embedding_tables()
    if isinstance(model, MultiEmbedding):
        return [m.embedding.vectors.weight for m in model.embedding_sets]
    return [model.embedding.vectors.weight]


def _per_field(schema: FeatureSchema, weights: torch.Tensor) -> dict[str, float]:
    result = {}
    for position, spec in enumerate(schema.fields):
        start = int(schema.offsets[position])
        result[spec.name] = information_abundance(weights[start : start + spec.vocab_size])
    return result


def plot_information_abundance(
    series: dict[str, dict[str, float]], vocab_sizes: dict[str, int], path: str | Path
) -> None:
    """IA per field (fields sorted by vocabulary size), one line per model/embedding set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = sorted(vocab_sizes, key=lambda name: (vocab_sizes[name], name))
    figure, axis = plt.subplots(figsize=(max(6, 0.3 * len(fields)), 4))
    for label, values in series.items():
        axis.plot(range(len(fields)), [values.get(f, np.nan) for f in fields], marker="o", label=label)
    axis.set_xticks(range(len(fields)), [f"{f} ({vocab_sizes[f]})" for f in fields], rotation=90, fontsize=7)
    axis.set_ylabel("information abundance")
    axis.set_xlabel("field (vocabulary size), ascending")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
