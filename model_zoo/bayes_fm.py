"""Bayesian FM fitted by Gibbs sampling (Freudenthaler, Schmidt-Thieme & Rendle 2011,
the MCMC of libFM), on rankstream's FM equation

    ŷ = b + Σ_f w_f + Σ_{f<g} <v_f, v_g>

over field vectors v_f (a multi-valued field: the weighted average of its values', as
``FieldEmbedding`` makes it). Given all other parameters, every single parameter θ
enters ŷ linearly, ŷ = g + θ·h, so under a Gaussian prior its conditional posterior is
Gaussian and is sampled exactly (h = x for a linear weight; for component c of a value
vector in field f, h = x·(Σ_g v_gc − v_fc), the sum of the other fields' c-components).
Each field has its own prior mean and precision for its linear weights and for each
vector component, with Normal-Gamma hyperpriors; ratings have Gaussian noise of a
Gamma-distributed precision, clicks a probit link through latent Gaussian labels
(Albert & Chib 1993).

Why: on small data a point estimate of the pairwise term either overfits or shrinks
to nothing; averaging the predictions of many posterior samples does neither. That
average is itself an FM: the mean of S samples' pairwise terms is the pairwise term of
the S samples' vectors laid side by side and scaled by 1/√S. ``to_fm`` keeps the
largest ``dim`` principal directions of that wide FM (the best rank-``dim``
approximation of every pair's weight <v_i, v_j>), so the bundle is an ordinary FM that
the cached-context scorer serves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import ndtr, ndtri

from model_zoo.batch import FeatureBatch
from model_zoo.models.fm import FM
from model_zoo.schema import FeatureSchema, Task

# A probit latent as a logit: Φ(z) ≈ σ(1.702 z) within 0.01 everywhere.
PROBIT_TO_LOGIT = 1.702
# The kept samples' vectors stay within this many bytes (thinned evenly beyond it).
SAMPLE_BYTES = 1 << 30


class GibbsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: int = Field(default=8, ge=1, description="factor size k of each posterior sample")
    iterations: int = Field(default=200, ge=2, description="Gibbs sweeps over every parameter")
    burn_in: int = Field(default=10, ge=0, description="first sweeps left out of the average")
    export_dim: int = Field(default=64, ge=1, description="factor size of the exported FM (principal directions kept)")
    init_std: float = Field(default=0.1, gt=0, description="std of the first sample's vectors")
    # One prior for all columns by default: a field of a few values gives its own prior
    # too little to go on (Criteo sample, 39 fields: test AUC 0.715 per field, 0.755 shared).
    priors: Literal["shared", "field"] = Field(
        default="shared", description="one prior for every column, or one per field"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _keeps_samples(self) -> "GibbsConfig":
        if self.burn_in >= self.iterations:
            raise ValueError(f"burn_in {self.burn_in} leaves no sample of {self.iterations} iterations")
        return self


def one_hot(schema: FeatureSchema, batch: FeatureBatch) -> sp.csr_matrix:
    """Rows of ``batch`` as one column per (field, value) of the schema's shared
    vocabulary (a multi-valued field: its values' normalised weights)."""
    rows, columns, values = [], [], []
    count = len(batch)
    offsets = schema.offsets
    for position, name in enumerate(batch.single_fields):
        rows.append(np.arange(count))
        columns.append(batch.single[:, position].numpy() + offsets[schema.index[name]])
        values.append(np.ones(count))
    for name, bag in zip(batch.bag_fields, batch.bags):
        weights = bag.weights.numpy().astype(np.float64)
        weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
        present = weights > 0
        rows.append(np.nonzero(present)[0])
        columns.append(bag.values.numpy()[present] + offsets[schema.index[name]])
        values.append(weights[present])
    return sp.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))), shape=(count, schema.total_vocab)
    )


@dataclass
class Posterior:
    """The posterior-mean predictor: mean bias and linear weights, the kept samples' vectors."""

    bias: float
    linear: np.ndarray  # (n,)
    samples: np.ndarray  # (S, n, k) float32
    latent_variance: float  # of the predictions over samples, averaged over training rows
    column_counts: np.ndarray  # (n,) training rows in which each column occurs


def column_fields(schema: FeatureSchema) -> np.ndarray:
    """The field position of every column of the shared vocabulary."""
    return np.repeat(np.arange(schema.num_fields), [f.vocab_size for f in schema.fields]).astype(np.int64)


@numba.njit(cache=True)
def _sample_linear(indptr, rows, values, group, theta, residual, noise, mean, precision, normal):  # pragma: no cover - compiled
    for j in range(theta.shape[0]):
        old = theta[j]
        hh = 0.0
        he = 0.0
        for p in range(indptr[j], indptr[j + 1]):
            h = values[p]
            hh += h * h
            he += h * (residual[rows[p]] + old * h)
        g = group[j]
        prec = noise * hh + precision[g]
        new = (noise * he + precision[g] * mean[g]) / prec + normal[j] / math.sqrt(prec)
        delta = new - old
        for p in range(indptr[j], indptr[j + 1]):
            residual[rows[p]] -= delta * values[p]
        theta[j] = new


@numba.njit(cache=True)
def _sample_factor(indptr, rows, values, field, group, vectors, c, residual, noise, mean, precision, normal, field_sum, total):  # pragma: no cover - compiled
    # field_sum[i, f]: component c of row i's field-f vector; total[i]: its sum over fields.
    field_sum[:] = 0.0
    for j in range(vectors.shape[0]):
        f = field[j]
        for p in range(indptr[j], indptr[j + 1]):
            field_sum[rows[p], f] += values[p] * vectors[j, c]
    total[:] = field_sum.sum(axis=1)
    for j in range(vectors.shape[0]):
        f = field[j]
        g = group[j]
        old = vectors[j, c]
        hh = 0.0
        he = 0.0
        for p in range(indptr[j], indptr[j + 1]):
            i = rows[p]
            h = values[p] * (total[i] - field_sum[i, f])
            hh += h * h
            he += h * (residual[i] + old * h)
        prec = noise * hh + precision[g, c]
        new = (noise * he + precision[g, c] * mean[g, c]) / prec + normal[j] / math.sqrt(prec)
        delta = new - old
        if delta != 0.0:
            for p in range(indptr[j], indptr[j + 1]):
                i = rows[p]
                # The other fields' sum is unchanged by this field's update.
                residual[i] -= delta * values[p] * (total[i] - field_sum[i, f])
                field_sum[i, f] += delta * values[p]
                total[i] += delta * values[p]
        vectors[j, c] = new


@numba.njit(cache=True)
def _predict(indptr, columns, values, group, num_fields, bias, linear, vectors, out):  # pragma: no cover - compiled
    k = vectors.shape[1]
    field_vector = np.zeros((num_fields, k))
    for i in range(out.shape[0]):
        field_vector[:] = 0.0
        score = bias
        for p in range(indptr[i], indptr[i + 1]):
            j = columns[p]
            score += values[p] * linear[j]
            field_vector[group[j]] += values[p] * vectors[j]
        total = field_vector.sum(axis=0)
        score += 0.5 * ((total * total).sum() - (field_vector * field_vector).sum())
        out[i] = score


def predict_sample(x: sp.csr_matrix, fields: np.ndarray, num_fields: int, bias: float, linear: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0])
    _predict(x.indptr, x.indices.astype(np.int64), x.data, fields, num_fields, bias, linear, vectors, out)
    return out


def _sample_group_prior(
    rng: np.random.Generator, theta: np.ndarray, group: np.ndarray, mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Normal-Gamma hyperprior (α₀ = β₀ = γ₀ = 1, μ₀ = 0) per group and per column of
    ``theta``: the precision given the current mean, then the mean given it (libFM's order)."""
    groups = mean.shape[0]
    theta = theta.reshape(theta.shape[0], -1)
    mean = mean.reshape(groups, -1)
    count = np.bincount(group, minlength=groups).astype(np.float64)[:, None]
    sums = np.zeros((groups, theta.shape[1]))
    np.add.at(sums, group, theta)
    squares = np.zeros((groups, theta.shape[1]))
    np.add.at(squares, group, (theta - mean[group]) ** 2)
    precision = rng.gamma((1.0 + count + 1.0) / 2.0, 2.0 / (1.0 + squares + mean**2))
    mean = rng.normal(sums / (count + 1.0), 1.0 / np.sqrt((count + 1.0) * precision))
    return mean, precision


def gibbs_fm(schema: FeatureSchema, train: FeatureBatch, config: GibbsConfig, progress: Callable[[int], None] | None = None) -> Posterior:
    """Draw ``config.iterations`` sweeps of samples; average those after the burn-in."""
    if train.label is None:
        raise ValueError("the training batch has no labels")
    rng = np.random.default_rng(config.seed)
    x = one_hot(schema, train).tocsc()
    indptr, rows, values = x.indptr, x.indices.astype(np.int64), x.data
    count, n, k, m = x.shape[0], schema.total_vocab, config.dim, schema.num_fields
    fields = column_fields(schema)
    groups = fields if config.priors == "field" else np.zeros(n, dtype=np.int64)
    g = int(groups.max()) + 1
    labels = train.label.numpy().astype(np.float64)
    binary = schema.task == Task.binary
    bias = 0.0 if binary else float(labels.mean())
    linear = np.zeros(n)
    vectors = rng.normal(0.0, config.init_std, size=(n, k))
    latent = np.where(labels > 0.5, 1.0, -1.0) if binary else labels
    residual = latent - predict_sample(x.tocsr(), fields, m, bias, linear, vectors)
    noise = 1.0  # ratings: sampled every sweep; the probit's latent noise stays 1
    linear_mean, linear_precision = np.zeros(g), np.ones(g)
    vector_mean, vector_precision = np.zeros((g, k)), np.ones((g, k))
    field_sum, total = np.zeros((count, m)), np.zeros(count)
    sums = {"bias": 0.0, "linear": np.zeros(n), "prediction": np.zeros(count), "square": np.zeros(count)}
    samples = []
    # The average over every sweep is exact for the bias and linear weights; the vectors
    # of every `stride`-th sweep are kept, within SAMPLE_BYTES.
    stride = max(1, math.ceil((config.iterations - config.burn_in) * n * k * 4 / SAMPLE_BYTES))
    for sweep in range(config.iterations):
        if binary:
            prediction = latent - residual
            latent = _probit_latents(rng, prediction, labels)
            residual = latent - prediction
        old = bias  # under a flat prior
        bias = (residual + old).sum() / count + rng.normal() / math.sqrt(noise * count)
        residual -= bias - old
        _sample_linear(indptr, rows, values, groups, linear, residual, noise, linear_mean, linear_precision, rng.normal(size=n))
        for c in range(k):
            _sample_factor(
                indptr, rows, values, fields, groups, vectors, c, residual, noise, vector_mean, vector_precision,
                rng.normal(size=n), field_sum, total,
            )  # fmt: skip
        if not binary:
            noise = rng.gamma((1.0 + count) / 2.0, 2.0 / (1.0 + (residual**2).sum()))
        linear_mean, linear_precision = (a[:, 0] for a in _sample_group_prior(rng, linear, groups, linear_mean))
        vector_mean, vector_precision = _sample_group_prior(rng, vectors, groups, vector_mean)
        if sweep >= config.burn_in:
            prediction = latent - residual
            sums["bias"] += bias
            sums["linear"] += linear
            sums["prediction"] += prediction
            sums["square"] += prediction**2
            if (sweep - config.burn_in) % stride == 0:
                samples.append(vectors.astype(np.float32))
        if progress is not None:
            progress(sweep)
    kept = config.iterations - config.burn_in
    mean_prediction = sums["prediction"] / kept
    return Posterior(
        bias=sums["bias"] / kept,
        linear=sums["linear"] / kept,
        samples=np.stack(samples),
        latent_variance=float(np.maximum(sums["square"] / kept - mean_prediction**2, 0.0).mean()),
        column_counts=np.diff(indptr),
    )


def to_fm(schema: FeatureSchema, posterior: Posterior, export_dim: int) -> FM:
    """The posterior-mean predictor as an FM of factor size at most ``export_dim``.

    The S samples' vectors side by side, over √S, are an exact FM of size S·k. Above
    ``export_dim`` it keeps the leading singular directions of that wide matrix with
    each row weighted by √(its training count + 1), so the pair weights <v_i, v_j> come
    out closest where features co-occur most (MovieLens sample, per-field priors, 64 of
    1,560 directions: test RMSE 0.9528 weighted, 0.9579 unweighted, 0.9483 all of them).
    Clicks: the mean latent over √(1 + its mean variance) stands in for the mean
    probability, and 1.702 turns the probit into a logit."""
    samples, n, k = posterior.samples.shape
    wide = torch.from_numpy(np.ascontiguousarray(posterior.samples.transpose(1, 0, 2)).reshape(n, samples * k))
    wide = wide / math.sqrt(samples)
    if samples * k > export_dim:
        weight = torch.from_numpy(np.sqrt(posterior.column_counts + 1.0).astype(np.float32))[:, None]
        left, singular, _ = torch.svd_lowrank(wide * weight, q=min(export_dim + 10, samples * k), niter=4)
        wide = left[:, :export_dim] * singular[:export_dim] / weight
    scale = 1.0
    if schema.task == Task.binary:
        scale = PROBIT_TO_LOGIT / math.sqrt(1.0 + posterior.latent_variance)
    model = FM(schema, dim=wide.shape[1])
    with torch.no_grad():
        model.embedding.vectors.weight.copy_(wide * math.sqrt(scale))
        model.embedding.linear.weight.copy_(torch.from_numpy(posterior.linear * scale)[:, None])
        model.bias.fill_(posterior.bias * scale)
    return model.eval()


def _probit_latents(rng: np.random.Generator, prediction: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """z ~ N(prediction, 1) truncated to z > 0 for a click, z < 0 otherwise, by inverting the CDF."""
    below = ndtr(-prediction)  # P(z < 0)
    u = rng.uniform(size=prediction.shape)
    p = np.where(labels > 0.5, below + u * (1.0 - below), u * below)
    return prediction + ndtri(np.clip(p, 1e-12, 1 - 1e-12))
