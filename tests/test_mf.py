import json
import math

import numpy as np
import pytest
import torch

from model_zoo.batch import FeatureBatch
from model_zoo.bundle import load_bundle, save_bundle
from model_zoo.catalog import ItemCatalog
from model_zoo.mf import (
    BLOCK, MFConfig, MFModel, Ratings, _gather, _sgd_epoch, initial_model, joint_sparsity, load_prepared_ratings,
    load_ratings_dat, normal_threshold, planted_ratings, row_cutoffs, start_pruning, train_mf,
)  # fmt: skip
from model_zoo.models.dp_mf import DPMF
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Task
from rayjobs.cli import main

PLANTED_NOISE = 0.3


@pytest.fixture(scope="module")
def planted():
    return planted_ratings(300, 200, 4, 40_000, PLANTED_NOISE, seed=0)


def planted_config(**update) -> MFConfig:
    return MFConfig(**{"dim": 16, "epochs": 30, "learning_rate": 0.02, "l2": 0.02, **update})


def mean_rmse(splits) -> float:
    return float(np.sqrt(np.mean((splits.test.ratings - splits.train.ratings.mean()) ** 2)))


def test_mf_learns_planted_low_rank_ratings(planted):
    result = train_mf(planted, planted_config())
    assert result.model.rmse(planted.test) < 1.2 * PLANTED_NOISE < 0.4 * mean_rmse(planted)
    assert result.work == 30 * 3 * 16 * len(planted.train)  # dense: every dimension of every rating


@pytest.mark.parametrize("rule", ["count", "first_small"])
def test_pruning_skips_work_as_the_rate_grows(planted, rule):
    config = planted_config(dim=32, cutoff_rule=rule)  # 4 blocks of 8
    results = {rate: train_mf(planted, config.model_copy(update={"pruning_rate": rate})) for rate in (0.0, 0.25, 0.5)}
    work = [results[rate].work for rate in (0.0, 0.25, 0.5)]
    assert work[0] > work[1] > work[2]
    # the first two epochs are dense; afterwards each rating stops at min(L_u, L_i)
    model = results[0.5].model
    assert results[0.5].history[1].work == results[0.0].history[1].work
    assert np.array_equal(model.user_cutoff, row_cutoffs(model.user_factors, model.threshold_p, rule))
    assert np.array_equal(model.item_cutoff, row_cutoffs(model.item_factors, model.threshold_q, rule))
    for cutoffs in (model.user_cutoff, model.item_cutoff):  # whole blocks of 8 floats only
        assert np.all(cutoffs % BLOCK == 0) and cutoffs.min() >= 0 and cutoffs.max() <= 32
    # the pruned prediction is the plain dot product of the masked factors (what serving uses)
    user, item = model.masked_factors()
    expected = model.mean + model.user_bias[planted.test.users] + model.item_bias[planted.test.items]
    expected = expected + (user[planted.test.users] * item[planted.test.items]).sum(1)
    np.testing.assert_allclose(model.predict(planted.test), expected, rtol=1e-5, atol=1e-5)
    if rule == "count":  # about a share ρ of each row is cut (a little more: rounded down to whole blocks)
        assert 0.3 < work[2] / work[0] < 0.7  # accuracy kept on rank 4 < k/2
        assert results[0.5].model.rmse(planted.test) < 1.1 * results[0.0].model.rmse(planted.test)
    else:  # the first small entry of either vector comes early: almost all work is cut
        assert work[2] / work[0] < 0.2


def test_sgd_kernel_equals_a_numpy_reference_with_cutoffs():
    rng = np.random.default_rng(3)
    model = MFModel(
        mean=3.0, user_bias=rng.normal(size=3).astype(np.float32), item_bias=rng.normal(size=2).astype(np.float32),
        user_factors=rng.normal(size=(3, 4)).astype(np.float32), item_factors=rng.normal(size=(2, 4)).astype(np.float32),
        user_cutoff=np.array([4, 2, 3]), item_cutoff=np.array([1, 4]),
    )  # fmt: skip
    ratings = Ratings(np.array([0, 1, 2, 0, 2, 1]), np.array([1, 1, 0, 0, 1, 0]), np.array([4, 1, 5, 3, 2, 4], dtype=np.float32))
    order = np.array([5, 0, 3, 1, 4, 2])
    visit = [np.empty(6, dtype=np.int32), np.empty(6, dtype=np.int32), np.empty(6, dtype=np.float32)]
    _gather(order, ratings.users, ratings.items, ratings.ratings, *visit)
    assert np.array_equal(visit[0], ratings.users[order]) and np.array_equal(visit[2], ratings.ratings[order])
    lr, l2 = 0.05, 0.1
    P, Q = model.user_factors.astype(np.float64), model.item_factors.astype(np.float64)
    bu, bi = model.user_bias.astype(np.float64), model.item_bias.astype(np.float64)
    expected_error = 0.0
    for n in order:
        u, i, r = ratings.users[n], ratings.items[n], float(ratings.ratings[n])
        c = min(model.user_cutoff[u], model.item_cutoff[i])
        error = r - (model.mean + bu[u] + bi[i] + P[u, :c] @ Q[i, :c])
        expected_error += error**2
        bu[u] += lr * (error - l2 * bu[u])
        bi[i] += lr * (error - l2 * bi[i])
        P[u, :c], Q[i, :c] = P[u, :c] + lr * (error * Q[i, :c] - l2 * P[u, :c]), Q[i, :c] + lr * (error * P[u, :c] - l2 * Q[i, :c])
    original = model.user_factors.copy()
    squared_error, work = _sgd_epoch(
        *visit, np.float32(model.mean), model.user_bias, model.item_bias,
        model.user_factors, model.item_factors, model.user_cutoff, model.item_cutoff, np.float32(lr), np.float32(l2),
    )  # fmt: skip
    assert squared_error == pytest.approx(expected_error, rel=1e-5)
    assert work == 3 * sum(min(model.user_cutoff[u], model.item_cutoff[i]) for u, i in zip(ratings.users, ratings.items))
    np.testing.assert_allclose(model.user_factors, P, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.item_factors, Q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.user_bias, bu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.item_bias, bi, rtol=1e-5, atol=1e-6)
    assert np.array_equal(model.user_factors[1, 2:], original[1, 2:])  # at or past user 1's cut-off: never updated


def test_thresholds_permutation_and_cutoffs():
    assert normal_threshold(0.0, 1.0, 0.5) == pytest.approx(0.6744898, abs=1e-6)
    mass = 0.5 * (math.erf((0.7 - 0.2) / (2**0.5 * 0.5)) - math.erf((-0.7 - 0.2) / (2**0.5 * 0.5)))
    assert normal_threshold(0.2, 0.5, mass) == pytest.approx(0.7, abs=1e-6)
    rng = np.random.default_rng(0)
    model = initial_model(50, 40, 3.0, MFConfig(dim=6, init_std=1.0))
    scales = np.array([1.0, 0.05, 2.0, 0.3, 1.5, 0.1], dtype=np.float32)  # columns of very different sparsity
    model.user_factors *= scales
    model.item_factors *= scales
    before = model.user_factors @ model.item_factors.T
    train = Ratings(rng.integers(0, 50, 500), rng.integers(0, 40, 500), np.ones(500, dtype=np.float32))
    start_pruning(model, 0.3, train)
    np.testing.assert_allclose(model.user_factors @ model.item_factors.T, before, atol=1e-5)  # float32 sum order
    assert list(model.permutation[:4]) == [2, 4, 0, 3]  # densest (largest scale) first; the last two are all small
    sparsity = joint_sparsity(model, np.arange(50), np.arange(40))
    assert np.all(np.diff(sparsity) >= 0)
    # rows of 24: the raw cut-offs (k − #small, first small) are rounded down to whole blocks of 8
    factors = np.ones((4, 24), dtype=np.float32)
    factors[0, [1, 3]] = 0.1  # count 22 → 16, first small 1 → 0
    factors[2, 0] = 0.1  # count 23 → 16, first small 0
    factors[3, 17:] = 0.1  # count 17 → 16, first small 17 → 16
    assert row_cutoffs(factors, 0.5, "count").tolist() == [16, 24, 16, 16]
    assert row_cutoffs(factors, 0.5, "first_small").tolist() == [0, 24, 0, 16]


def test_ratings_dat_loader(tmp_path):
    lines = [f"{10 + n % 7}::{100 + n % 5}::{1 + n % 5}::{978300760 + n}" for n in range(100)]
    (tmp_path / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    splits = load_ratings_dat(tmp_path, seed=1)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (80, 10, 10)
    assert (splits.num_users, splits.num_items) == (7, 5)
    everything = np.concatenate([s.ratings for s in (splits.train, splits.valid, splits.test)])
    assert sorted(everything.tolist()) == sorted(float(1 + n % 5) for n in range(100))


def mf_schema() -> FeatureSchema:
    return FeatureSchema(
        fields=(
            FieldSpec(name="user", role="context", vocab_size=30),
            FieldSpec(name="hour", role="context", vocab_size=5),
            FieldSpec(name="movie", role="item", vocab_size=20),
            FieldSpec(name="genres", role="item", kind=Kind.multi, vocab_size=6),
        ),
        label="rating", task=Task.regression,
    )  # fmt: skip


def test_serving_wrapper_equals_the_pruned_model_and_its_cached_scores(tmp_path):
    schema = mf_schema()
    rng = np.random.default_rng(5)
    splits = planted_ratings(30, 20, 3, 3000, 0.2, seed=2)
    result = train_mf(splits, MFConfig(dim=8, epochs=6, learning_rate=0.02, pruning_rate=0.4))
    assert result.model.user_cutoff.min() < 8  # pruned rows present
    model = build_model(schema, "dp_mf", 8)
    assert (model.user_field, model.item_field) == ("user", "movie")
    model = DPMF.from_trained(schema, result.model).eval()
    columns = {
        "user": splits.test.users, "hour": rng.integers(0, 5, len(splits.test)), "movie": splits.test.items,
        "genres": [list(rng.integers(0, 6, 1 + n % 3)) for n in range(len(splits.test))],
    }  # fmt: skip
    batch = FeatureBatch.from_columns(schema, columns, splits.test.ratings)
    with torch.no_grad():
        full = model(batch)
        np.testing.assert_allclose(full.numpy(), result.model.predict(splits.test), rtol=1e-5, atol=1e-5)
        contexts = batch.rows(slice(0, 7)).select(schema, schema.context_fields)
        items = batch.select(schema, schema.item_fields)
        context_index = torch.arange(len(batch)) % 7
        joined = FeatureBatch.from_columns(
            schema, {"user": columns["user"][context_index.numpy()], "hour": columns["hour"][context_index.numpy()],
                     "movie": columns["movie"], "genres": columns["genres"]},
        )  # fmt: skip
        state = model.encode_context(contexts)
        torch.testing.assert_close(model.score_items(state, items, context_index), model(joined))
        catalog = ItemCatalog(model, list(range(len(items))), items)
        torch.testing.assert_close(catalog.score_all(state)[context_index, torch.arange(len(items))], model(joined))
    loaded = load_bundle(save_bundle(tmp_path / "dp_mf", model)).model
    with torch.no_grad():
        assert torch.equal(loaded(batch), full)
    with pytest.raises(ValueError, match="dp_mf needs 'genres' to be a single-valued item field"):
        DPMF(schema, 4, item_field="genres")


def test_mf_beats_the_mean_on_the_prepared_movielens_sample(shared_data, tmp_path):
    out = tmp_path / "ml"
    assert main(["prepare", "--dataset", "movielens1m", "--input", str(shared_data / "movielens-1m-sample"),
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    splits = load_prepared_ratings(out)
    assert len(splits.train) + len(splits.valid) + len(splits.test) == 100_000
    result = train_mf(splits, MFConfig(dim=32, epochs=15, learning_rate=0.005, l2=0.05, pruning_rate=0.3))
    assert result.model.rmse(splits.test) < mean_rmse(splits) - 0.1


def test_bench_mf_on_planted_ratings_writes_each_configuration(tmp_path, capsys):
    out = tmp_path / "mf.json"
    code = main(["bench", "mf", "--planted", "--planted-shape", "60", "40", "2", "3000", "--dim", "8", "--epochs", "3",
                 "--prune-after-epoch", "1", "--rates", "0", "0.25", "--rules", "count", "--repeats", "2",
                 "--json", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["data"].startswith("planted rank-2 MF, 60 users × 40 items, 3000 ratings")
    assert (report["config"]["dim"], report["config"]["epochs"], report["repeats"]) == (8, 3, 2)
    assert [(r["rule"], r["pruning_rate"]) for r in report["records"]] == [("dense", 0.0), ("count", 0.25)]
    assert report["records"][1]["work_fraction"] < 1.0
    assert out.with_suffix(".png").is_file()
    assert main(["bench", "mf", "--json", str(out)]) == 2
    assert "error: give exactly one of --data and --planted" in capsys.readouterr().err
