"""Model analysis: post-hoc DPLR factorisation of a trained FwFM's R (the paper's
Section 5.4) and field importance from the columns of U (Section 6)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from model_zoo.batch import FeatureBatch
from model_zoo.models.dplr_fwfm import DPLRFwFM
from model_zoo.models.fwfm import FwFM
from model_zoo.models.pruned_fwfm import kept_entry_count
from model_zoo.training import evaluate


@dataclass(frozen=True)
class DPLRFit:
    factors: np.ndarray  # U (ρ, m)
    eigen: np.ndarray  # e (ρ,)
    approximation: np.ndarray  # Uᵀ diag(e) U with its diagonal removed
    error_spectrum: np.ndarray  # singular values of R − approximation, descending


def fit_dplr(interactions: np.ndarray, rank: int, iterations: int = 2000, tolerance: float = 1e-9) -> DPLRFit:
    """Best symmetric rank-ρ plus diagonal fit of R's off-diagonal entries (Frobenius).

    R's diagonal is free (DPLR sets it to zero anyway), so alternate: fill the diagonal
    with the current low-rank part's diagonal, then take the ρ largest-|λ| eigenpairs.
    Each step cannot increase the off-diagonal error. (The paper minimises the
    nuclear norm of the error instead; both give a DPLR model of rank ρ.)
    """
    matrix = np.array(interactions, dtype=np.float64)
    np.fill_diagonal(matrix, 0.0)
    diagonal = np.zeros(len(matrix))
    previous = np.inf
    for _ in range(iterations):
        values, vectors = np.linalg.eigh(matrix + np.diag(diagonal))
        top = np.argsort(-np.abs(values))[:rank]
        low_rank = (vectors[:, top] * values[top]) @ vectors[:, top].T
        diagonal = np.diag(low_rank).copy()
        off_diagonal_error = np.sum((matrix - low_rank) ** 2) - np.sum((np.diag(low_rank)) ** 2)
        # Relative: the iteration converges linearly, so an absolute step size says little.
        if np.isfinite(previous) and previous - off_diagonal_error <= tolerance * previous:
            break
        previous = off_diagonal_error
    approximation = low_rank - np.diag(np.diag(low_rank))
    return DPLRFit(
        factors=vectors[:, top].T.copy(),
        eigen=values[top].copy(),
        approximation=approximation,
        error_spectrum=np.linalg.svd(matrix - approximation, compute_uv=False),
    )


def pruned_error_spectrum(interactions: np.ndarray, rank: int) -> np.ndarray:
    """Singular values of R minus its parameter-matched pruning (for the Figure 2 comparison)."""
    matrix = np.array(interactions, dtype=np.float64)
    m = len(matrix)
    rows, cols = np.triu_indices(m, 1)
    keep = np.argsort(-np.abs(matrix[rows, cols]))[: kept_entry_count(m, rank)]
    pruned = np.zeros_like(matrix)
    pruned[rows[keep], cols[keep]] = matrix[rows[keep], cols[keep]]
    pruned = pruned + pruned.T
    return np.linalg.svd(matrix - pruned, compute_uv=False)


def dplr_from_fwfm(fwfm: FwFM, rank: int) -> tuple[DPLRFwFM, DPLRFit]:
    """A DPLR model with the FwFM's embeddings, linear weights and bias and U, e from
    ``fit_dplr`` of its R."""
    fit = fit_dplr(fwfm.interaction_matrix().detach().cpu().numpy(), rank)
    model = DPLRFwFM(fwfm.schema, fwfm.dim, rank=rank, sparse=fwfm.embedding.vectors.sparse)
    model.embedding.load_state_dict(fwfm.embedding.state_dict())
    with torch.no_grad():
        model.bias.copy_(fwfm.bias)
        model.factor_matrix.copy_(torch.as_tensor(fit.factors, dtype=torch.float32))
        model.eigen.copy_(torch.as_tensor(fit.eigen, dtype=torch.float32))
    return model, fit


def field_importance(model: DPLRFwFM) -> list[tuple[str, float]]:
    """Fields ranked by sqrt(Σ_r |e_r| U_ri²): a field whose column of U is negligible
    takes part in no interaction. Most important first."""
    factors = model.factor_matrix.detach().cpu().numpy()
    eigen = np.abs(model.eigen.detach().cpu().numpy())
    scores = np.sqrt((eigen[:, None] * factors**2).sum(axis=0))
    order = np.argsort(-scores, kind="stable")
    return [(model.schema.names[i], float(scores[i])) for i in order]


def without_fields(model: DPLRFwFM, fields: Iterable[str]) -> DPLRFwFM:
    """A copy in which ``fields`` contribute nothing (their vectors and linear weights zeroed)."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name in fields:
            position = model.schema.index[name]
            lo = int(model.schema.offsets[position])
            hi = lo + model.schema.fields[position].vocab_size
            pruned.embedding.vectors.weight[lo:hi] = 0.0
            pruned.embedding.linear.weight[lo:hi] = 0.0
    return pruned


def field_drop_effect(
    model: DPLRFwFM, batches: Callable[[], Iterable[FeatureBatch]], max_dropped: int
) -> list[dict[str, object]]:
    """Metrics after dropping the 0, 1, …, max_dropped least important fields."""
    ranking = [name for name, _ in field_importance(model)]
    results = []
    for dropped in range(max_dropped + 1):
        names = ranking[len(ranking) - dropped :] if dropped else []
        results.append({"dropped": names, **evaluate(without_fields(model, names), batches())})
    return results
