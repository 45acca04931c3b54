"""Biased matrix factorisation with the dynamic pruning of Wu et al. (arXiv 2404.04265).

    r̂_ui = μ + b_u + b_i + Σ_{d < c_ui} p_ud q_id,    trained by SGD on squared error + L2.

Dense training has c_ui = k. With pruning rate ρ > 0, after epoch ``prune_after_epoch``:
1. fit a normal N(m, s²) to the entries of P (users with training ratings) and one to Q;
   θ_P, θ_Q are chosen so that a fraction ρ of each fitted normal lies inside (−θ, θ);
2. joint sparsity of dimension d = (share of P rows with |p_d| < θ_P) × (share of Q rows
   with |q_d| < θ_Q); one permutation puts the columns of P and Q densest first
   (P Qᵀ is unchanged);
3. from then on, per rating, the dot product and the update stop early, at
   c_ui = min(L_u, L_i), with a per-row cut-off L from one of two readings of the
   paper's rule (``cutoff_rule``), rounded down to a multiple of ``BLOCK`` = 8:
   - ``count``: L_u = k − #{d : |p_ud| < θ_P}: a row keeps as many leading (densest)
     dimensions as it has significant entries ("according to the sparsity of the latent
     factors for different users/items"); the work falls by about ρ, which is what the
     paper's 1.2–1.65× speed-ups at ρ ≤ 0.5 imply;
   - ``first_small``: L_u = the first d with |p_ud| < θ_P (k when none), so c_ui is the
     first dimension where either factor is small (the reading in docs/methods.md). On
     embeddings without column structure this cuts almost everything: per dimension
     either entry is small with probability ≈ 1 − (1 − ρ)², so c_ui ≈ 4 at ρ = 0.1.

L_u and L_i are refreshed from the current factors after every epoch (an O((U + I)k)
pass, negligible next to the O(Nk) epoch) and c_ui is applied per rating, so the SGD
loops run over the first c_ui dimensions only and skipped dimensions cost nothing.

Why the kernel looks the way it does (measured on a 2-core AVX2 CPU, k = 32, 80k
ratings, where an epoch takes ~2 ms and the k-proportional part is only about half):
- Block-granular cut-offs are the CPU analogue of the paper's fixed tensor-core tiles
  ("coarse-grained structured sparsity"): LLVM vectorises the ``range(c)`` loops in
  whole AVX2 registers with a 4-wide epilogue, so c that is a multiple of 8 has no
  scalar tail, and only k/8 + 1 loop lengths occur, which keeps the per-rating branches
  predictable. Per-dimension cut-offs made pruned epochs slower than dense at k = 32
  (0.7–0.9×). Rounding down (rather than to nearest) saves more work at an unchanged
  test RMSE on MovieLens and the planted data, so it is the rule.
- Every epoch (dense or pruned, the same code) first copies the shuffled ratings into
  contiguous buffers and the SGD loop then streams them: this alone made dense epochs
  ~25% faster than visiting them through the permutation.
- Grouping the ratings by c_ui (a counting sort per epoch, so loops of one length run
  back to back) cost more than it saved (~0.6 ms per 80k ratings: the scatter is a
  second random pass), as did hand-unrolled 8-float blocks and per-length kernels with
  a constant trip count (LLVM leaves the unrolled dot product scalar); so the ratings
  are visited in plain shuffled order.
The branches of varying loop lengths still cost about what the skipped dimensions save
at k = 32 (``count``: 0.9–1.06× dense at ρ = 0.1–0.5); the saving shows from k ≈ 128
(1.2× at ρ = 0.4–0.5).
The trained model is equivalently a plain MF whose rows are zeroed from their cut-off on
(``masked_factors``): that is what serving uses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numba
import numpy as np
from pydantic import BaseModel, Field


@dataclass(frozen=True)
class Ratings:
    users: np.ndarray  # (N,) int64 row of P
    items: np.ndarray  # (N,) int64 row of Q
    ratings: np.ndarray  # (N,) float32

    def __len__(self) -> int:
        return int(self.ratings.shape[0])


@dataclass(frozen=True)
class RatingSplits:
    train: Ratings
    valid: Ratings
    test: Ratings
    num_users: int
    num_items: int


def load_prepared_ratings(directory: str | Path, user_field: str = "user_id", item_field: str = "movie_id") -> RatingSplits:
    """(user, item, rating) triples of a `rankstream prepare` directory; rows of P and Q are
    the fields' vocabulary indices (so a trained model serves with the same vocab)."""
    import pyarrow.parquet as pq

    from model_zoo.data.layout import load_schema, split_files

    schema = load_schema(directory)
    splits = {}
    for split in ("train", "valid", "test"):
        tables = [pq.read_table(path, columns=[user_field, item_field, schema.label]) for path in split_files(directory, split)]
        columns = {name: np.concatenate([t[name].to_numpy() for t in tables]) for name in (user_field, item_field, schema.label)}
        splits[split] = Ratings(
            columns[user_field].astype(np.int64), columns[item_field].astype(np.int64), columns[schema.label].astype(np.float32)
        )
    return RatingSplits(**splits, num_users=schema.field(user_field).vocab_size, num_items=schema.field(item_field).vocab_size)


def load_ratings_dat(path: str | Path, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0) -> RatingSplits:
    """MovieLens ``ratings.dat`` (UserID::MovieID::Rating::Timestamp): ids become
    contiguous rows, ratings are split at random (seeded) by ``fractions``."""
    path = Path(path)
    if path.is_dir():
        path = path / "ratings.dat"
    with path.open(encoding="latin-1") as lines:
        table = np.loadtxt((line.replace("::", ":") for line in lines), delimiter=":", dtype=np.int64, usecols=(0, 1, 2), ndmin=2)
    _, users = np.unique(table[:, 0], return_inverse=True)
    _, items = np.unique(table[:, 1], return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(table))
    cuts = np.cumsum(np.array(fractions[:2]) * len(table)).astype(np.int64)
    parts = np.split(order, cuts)
    splits = [Ratings(users[p], items[p], table[p, 2].astype(np.float32)) for p in parts]
    return RatingSplits(*splits, num_users=int(users.max()) + 1, num_items=int(items.max()) + 1)


def planted_ratings(
    num_users: int, num_items: int, rank: int, num_ratings: int, noise: float, seed: int = 0
) -> RatingSplits:
    """Ratings from a planted biased rank-``rank`` MF plus Gaussian noise of std ``noise``
    (so the best achievable test RMSE is about ``noise``); 80/10/10 split."""
    rng = np.random.default_rng(seed)
    user_factors = rng.normal(0, 1 / rank**0.25, (num_users, rank))
    item_factors = rng.normal(0, 1 / rank**0.25, (num_items, rank))
    user_bias, item_bias = rng.normal(0, 0.3, num_users), rng.normal(0, 0.3, num_items)
    users = rng.integers(0, num_users, num_ratings)
    items = rng.integers(0, num_items, num_ratings)
    truth = 3.5 + user_bias[users] + item_bias[items] + (user_factors[users] * item_factors[items]).sum(1)
    ratings = (truth + rng.normal(0, noise, num_ratings)).astype(np.float32)
    cuts = [int(0.8 * num_ratings), int(0.9 * num_ratings)]
    parts = np.split(np.arange(num_ratings), cuts)
    splits = [Ratings(users[p], items[p], ratings[p]) for p in parts]
    return RatingSplits(*splits, num_users=num_users, num_items=num_items)


CutoffRule = Literal["count", "first_small"]
BLOCK = 8  # cut-off granularity in floats: one AVX2 register


class MFConfig(BaseModel):
    dim: int = Field(default=32, ge=1, le=4096, description="factor size k")
    epochs: int = Field(default=20, ge=1)
    learning_rate: float = Field(default=0.005, gt=0, description="SGD step size")
    l2: float = Field(default=0.05, ge=0, description="L2 on the biases and factors touched by each rating")
    init_std: float = Field(default=0.1, gt=0, description="standard deviation of the initial factors")
    pruning_rate: float = Field(default=0.0, ge=0, lt=1)
    prune_after_epoch: int = Field(default=2, ge=1, description="fit thresholds and permute after this many epochs")
    cutoff_rule: CutoffRule = "count"
    seed: int = Field(default=0, description="of the initial factors and the rating order")


@dataclass
class MFModel:
    mean: float
    user_bias: np.ndarray  # (U,) float32
    item_bias: np.ndarray  # (I,) float32
    user_factors: np.ndarray  # (U, k) float32, P
    item_factors: np.ndarray  # (I, k) float32, Q
    user_cutoff: np.ndarray  # (U,) int64, L_u (k while not pruning)
    item_cutoff: np.ndarray  # (I,) int64, L_i
    threshold_p: float = 0.0
    threshold_q: float = 0.0
    permutation: np.ndarray | None = None  # column order applied at pruning time

    @property
    def dim(self) -> int:
        return int(self.user_factors.shape[1])

    def predict(self, ratings: Ratings) -> np.ndarray:
        """Predictions under the model's cut-off rule (dense when not pruned)."""
        return _predict(
            ratings.users, ratings.items, self.mean, self.user_bias, self.item_bias,
            self.user_factors, self.item_factors, self.user_cutoff, self.item_cutoff,
        )  # fmt: skip

    def rmse(self, ratings: Ratings) -> float:
        return float(np.sqrt(np.mean((self.predict(ratings).astype(np.float64) - ratings.ratings) ** 2)))

    def masked_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """P and Q with each row zeroed from its cut-off on: their plain dot product is
        the pruned prediction (for d ≥ min(L_u, L_i) one of the two is zero)."""
        columns = np.arange(self.dim)
        user = np.where(columns < self.user_cutoff[:, None], self.user_factors, 0.0).astype(np.float32)
        item = np.where(columns < self.item_cutoff[:, None], self.item_factors, 0.0).astype(np.float32)
        return user, item


@dataclass
class MFEpoch:
    epoch: int
    seconds: float  # SGD pass, plus thresholds, permutation and cut-off refresh when pruning
    train_rmse: float  # running error over the pass
    valid_rmse: float
    work: int  # multiply-adds: 3 per dimension visited (1 in the dot product, 2 in the update)
    mean_cutoff: float  # average c_ui over the pass


@dataclass
class MFResult:
    model: MFModel
    history: list[MFEpoch] = field(default_factory=list)

    @property
    def train_seconds(self) -> float:
        return float(sum(e.seconds for e in self.history))

    @property
    def work(self) -> int:
        return int(sum(e.work for e in self.history))


@dataclass(frozen=True)
class VisitBuffers:
    """One epoch's ratings in visiting order, contiguous (filled in place every epoch)."""

    users: np.ndarray  # (N,) int32
    items: np.ndarray  # (N,) int32
    ratings: np.ndarray  # (N,) float32

    @classmethod
    def empty(cls, size: int) -> "VisitBuffers":
        return cls(np.empty(size, dtype=np.int32), np.empty(size, dtype=np.int32), np.empty(size, dtype=np.float32))


def initial_model(num_users: int, num_items: int, mean: float, config: MFConfig) -> MFModel:
    rng = np.random.default_rng(config.seed)
    return MFModel(
        mean=mean,
        user_bias=np.zeros(num_users, dtype=np.float32),
        item_bias=np.zeros(num_items, dtype=np.float32),
        user_factors=rng.normal(0, config.init_std, (num_users, config.dim)).astype(np.float32),
        item_factors=rng.normal(0, config.init_std, (num_items, config.dim)).astype(np.float32),
        user_cutoff=np.full(num_users, config.dim, dtype=np.int64),
        item_cutoff=np.full(num_items, config.dim, dtype=np.int64),
    )


def train_mf(splits: RatingSplits, config: MFConfig) -> MFResult:
    """SGD over shuffled training ratings for ``config.epochs`` epochs, pruning as the
    module docstring says when ``config.pruning_rate`` > 0."""
    train = splits.train
    model = initial_model(splits.num_users, splits.num_items, float(train.ratings.mean()), config)
    result = MFResult(model)
    rng = np.random.default_rng(config.seed + 1)
    pruning = False
    visit = VisitBuffers.empty(len(train))
    for epoch in range(config.epochs):
        order = rng.permutation(len(train))
        started = time.perf_counter()
        _gather(order, train.users, train.items, train.ratings, visit.users, visit.items, visit.ratings)
        squared_error, work = _sgd_epoch(
            visit.users, visit.items, visit.ratings, np.float32(model.mean),
            model.user_bias, model.item_bias, model.user_factors, model.item_factors,
            model.user_cutoff, model.item_cutoff, np.float32(config.learning_rate), np.float32(config.l2),
        )  # fmt: skip
        if config.pruning_rate > 0 and epoch + 1 == config.prune_after_epoch:
            start_pruning(model, config.pruning_rate, train)
            pruning = True
        if pruning:  # the cut-offs the next epoch (or the trained model) uses
            refresh_cutoffs(model, config.cutoff_rule)
        seconds = time.perf_counter() - started
        result.history.append(
            MFEpoch(
                epoch, seconds, math.sqrt(squared_error / len(train)), model.rmse(splits.valid),
                int(work), work / (3 * len(train)),
            )
        )
    return result


def normal_threshold(mean: float, std: float, rate: float) -> float:
    """θ with P(|X| < θ) = rate for X ~ N(mean, std²) (bisection: the mass is monotone in θ)."""
    def inside(theta: float) -> float:
        return 0.5 * (math.erf((theta - mean) / (std * math.sqrt(2))) - math.erf((-theta - mean) / (std * math.sqrt(2))))

    low, high = 0.0, abs(mean) + 10 * std
    for _ in range(100):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if inside(middle) < rate else (low, middle)
    return 0.5 * (low + high)


def joint_sparsity(model: MFModel, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(k,) share of P rows small in d × share of Q rows small in d."""
    small_p = (np.abs(model.user_factors[users]) < model.threshold_p).mean(0)
    small_q = (np.abs(model.item_factors[items]) < model.threshold_q).mean(0)
    return small_p * small_q


def start_pruning(model: MFModel, rate: float, train: Ratings) -> None:
    """Thresholds from normals fitted to the trained rows and the joint-sparsity
    permutation of the columns (densest first)."""
    # rows with training ratings (bincount: O(N), no sort)
    users = np.flatnonzero(np.bincount(train.users, minlength=model.user_factors.shape[0]))
    items = np.flatnonzero(np.bincount(train.items, minlength=model.item_factors.shape[0]))
    p, q = model.user_factors[users], model.item_factors[items]
    model.threshold_p = normal_threshold(float(p.mean()), float(p.std()), rate)
    model.threshold_q = normal_threshold(float(q.mean()), float(q.std()), rate)
    permutation = np.argsort(joint_sparsity(model, users, items), kind="stable")
    model.user_factors[:] = model.user_factors[:, permutation]
    model.item_factors[:] = model.item_factors[:, permutation]
    model.permutation = permutation


def refresh_cutoffs(model: MFModel, rule: CutoffRule) -> None:
    model.user_cutoff[:] = row_cutoffs(model.user_factors, model.threshold_p, rule)
    model.item_cutoff[:] = row_cutoffs(model.item_factors, model.threshold_q, rule)


def row_cutoffs(factors: np.ndarray, threshold: float, rule: CutoffRule) -> np.ndarray:
    """(rows,) L per row: k minus its small entries (``count``) or the index of its first
    small entry, k when none (``first_small``), rounded down to a multiple of ``BLOCK``."""
    return _row_cutoffs(factors, np.float32(threshold), rule == "count")


@numba.njit(cache=True, nogil=True)
def _row_cutoffs(factors, threshold, count):  # pragma: no cover - compiled
    rows, dim = factors.shape
    out = np.empty(rows, dtype=np.int64)
    for r in range(rows):
        small = 0
        cut = dim
        for d in range(dim):
            if abs(factors[r, d]) < threshold:
                if not count:
                    cut = d
                    break
                small += 1
        if count:
            cut = dim - small
        out[r] = cut // BLOCK * BLOCK
    return out


@numba.njit(cache=True, nogil=True)
def _gather(order, users, items, ratings, out_users, out_items, out_ratings):  # pragma: no cover - compiled
    for position in range(order.shape[0]):
        n = order[position]
        out_users[position] = users[n]
        out_items[position] = items[n]
        out_ratings[position] = ratings[n]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _sgd_epoch(users, items, ratings, mean, user_bias, item_bias, P, Q,
               user_cutoff, item_cutoff, lr, l2):  # pragma: no cover - compiled
    squared_error = 0.0
    work = 0
    for n in range(ratings.shape[0]):
        u = users[n]
        i = items[n]
        cut = min(user_cutoff[u], item_cutoff[i])  # k for both while training densely
        dot = np.float32(0.0)
        for d in range(cut):
            dot += P[u, d] * Q[i, d]
        error = ratings[n] - (mean + user_bias[u] + item_bias[i] + dot)
        squared_error += error * error
        user_bias[u] += lr * (error - l2 * user_bias[u])
        item_bias[i] += lr * (error - l2 * item_bias[i])
        for d in range(cut):
            p = P[u, d]
            q = Q[i, d]
            P[u, d] = p + lr * (error * q - l2 * p)
            Q[i, d] = q + lr * (error * p - l2 * q)
        work += 3 * cut
    return squared_error, work


@numba.njit(cache=True, nogil=True, fastmath=True)
def _predict(users, items, mean, user_bias, item_bias, P, Q, user_cutoff, item_cutoff):  # pragma: no cover - compiled
    out = np.empty(users.shape[0], dtype=np.float32)
    for n in range(users.shape[0]):
        u = users[n]
        i = items[n]
        dot = np.float32(0.0)
        for d in range(min(user_cutoff[u], item_cutoff[i])):
            dot += P[u, d] * Q[i, d]
        out[n] = mean + user_bias[u] + item_bias[i] + dot
    return out
