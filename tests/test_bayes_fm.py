"""The Gibbs-sampled Bayesian FM: its bookkeeping is exact, its exported FM is the
posterior-mean predictor, and it learns planted interactions for ratings and clicks."""

import numpy as np
import pytest
import torch

from model_zoo.batch import FeatureBatch
from model_zoo.bundle import load_bundle
from model_zoo import bayes_fm
from model_zoo.bayes_fm import (
    GibbsConfig,
    _sample_factor,
    _sample_linear,
    column_fields,
    gibbs_fm,
    one_hot,
    predict_sample,
    to_fm,
)
from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.metrics import task_metrics
from model_zoo.models.fm import FM
from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Task
from model_zoo.synthetic import PlantedConfig
from model_zoo.training import evaluate
from rayjobs.baselines import linear_model
from rayjobs.cli import main
from rayjobs.tune import load_splits


def rating_schema() -> FeatureSchema:
    fields = (
        FieldSpec(name="user", role="context", vocab_size=30),
        FieldSpec(name="city", role="context", vocab_size=5),
        FieldSpec(name="item", role="item", vocab_size=30),
        FieldSpec(name="tags", role="item", kind=Kind.multi, vocab_size=8),
    )
    return FeatureSchema(fields=fields, label="rating", task=Task.regression)


def planted_ratings(rows: int, seed: int) -> FeatureBatch:
    """rating = 3 + user·item factors (rank 2) + a tag effect + noise of std 0.1."""
    planted = np.random.default_rng(0)
    users, items = planted.normal(size=(30, 2)), planted.normal(size=(30, 2))
    tag_effect = planted.normal(scale=0.5, size=8)
    rng = np.random.default_rng(seed)
    user, item, city = rng.integers(1, 30, rows), rng.integers(1, 30, rows), rng.integers(1, 5, rows)
    tags = rng.integers(1, 8, size=(rows, 2))
    weights = np.ones((rows, 2), dtype=np.float32)
    rating = 3 + (users[user] * items[item]).sum(1) + tag_effect[tags].mean(1) + rng.normal(scale=0.1, size=rows)
    columns = {"user": user, "city": city, "item": item, "tags": (tags, weights)}
    return FeatureBatch.from_columns(rating_schema(), columns, rating.astype(np.float32))


def test_each_update_keeps_the_residuals_equal_to_labels_minus_the_prediction():
    """The samplers update residuals (and the per-field sums) incrementally; after a
    pass over every parameter they must equal what the parameters predict afresh."""
    schema = rating_schema()
    batch = planted_ratings(500, seed=1)
    x = one_hot(schema, batch).tocsc()
    fields = column_fields(schema)
    rng = np.random.default_rng(3)
    n, k = schema.total_vocab, 3
    linear, vectors = rng.normal(size=n), rng.normal(size=(n, k))
    labels = batch.label.numpy().astype(np.float64)
    residual = labels - predict_sample(x.tocsr(), fields, schema.num_fields, 0.5, linear, vectors)
    args = (x.indptr, x.indices.astype(np.int64), x.data)
    groups = fields  # per-field priors
    _sample_linear(*args, groups, linear, residual, 2.0, np.zeros(4), np.ones(4), rng.normal(size=n))
    field_sum, total = np.zeros((500, 4)), np.zeros(500)
    for c in range(k):
        _sample_factor(*args, fields, groups, vectors, c, residual, 2.0, np.zeros((4, k)), np.ones((4, k)),
                       rng.normal(size=n), field_sum, total)  # fmt: skip
    fresh = labels - predict_sample(x.tocsr(), fields, schema.num_fields, 0.5, linear, vectors)
    np.testing.assert_allclose(residual, fresh, atol=1e-9)


def test_the_exported_fm_is_the_average_of_the_samples_predictions():
    schema = rating_schema()
    train, test = planted_ratings(2000, seed=1), planted_ratings(300, seed=2)
    posterior = gibbs_fm(schema, train, GibbsConfig(dim=3, iterations=12, burn_in=2))
    assert posterior.samples.shape == (10, schema.total_vocab, 3)
    per_sample = []
    for vectors in posterior.samples:
        model = FM(schema, dim=3)
        with torch.no_grad():
            model.embedding.vectors.weight.copy_(torch.from_numpy(vectors))
            model.embedding.linear.weight.copy_(torch.from_numpy(posterior.linear)[:, None])
            model.bias.fill_(posterior.bias)
        per_sample.append(model.eval()(test).detach().numpy())
    exact = to_fm(schema, posterior, export_dim=30)  # 10 samples × 3 ≤ 30: nothing dropped
    assert exact.dim == 30
    np.testing.assert_allclose(exact(test).detach().numpy(), np.mean(per_sample, axis=0), atol=1e-4)
    assert to_fm(schema, posterior, export_dim=4).dim == 4


def test_gibbs_fm_learns_planted_rating_interactions():
    schema = rating_schema()
    train, test = planted_ratings(3000, seed=1), planted_ratings(1000, seed=2)
    model = to_fm(schema, gibbs_fm(schema, train, GibbsConfig(dim=4, iterations=60)), export_dim=16)
    rmse = evaluate(model, [test])["rmse"]
    # The label's std is ~1.5 and the planted pairs carry most of it; a model without
    # pairs cannot go below ~1.4 (the linear fit below). The noise floor is 0.1.
    x_train, x_test = one_hot(schema, train), one_hot(schema, test)
    ridge = np.linalg.lstsq(x_train.toarray(), train.label.numpy(), rcond=None)[0]
    linear_rmse = task_metrics(Task.regression, test.label.numpy(), x_test @ ridge)["rmse"]
    assert linear_rmse > 1.0
    assert rmse < 0.25


def test_gibbs_fm_learns_planted_click_interactions_through_the_probit(planted_clicks):
    splits, oracle_auc = planted_clicks
    features = {name: one_hot(splits.schema, getattr(splits, name)) for name in ("train", "valid", "test")}
    linear_auc = linear_model(splits, features)["test"]["auc"]
    model = to_fm(splits.schema, gibbs_fm(splits.schema, splits.train, GibbsConfig(iterations=60)), export_dim=32)
    test = evaluate(model, [splits.test])
    # As with the SGD recipe (test_recipe.py), ~0.06 below the planted model's own AUC on
    # this little data, and the linear model ~0.10.
    assert test["auc"] > linear_auc + 0.03
    assert test["auc"] > oracle_auc - 0.08
    # The exported logits are calibrated: no worse than the linear model's log loss.
    assert test["logloss"] < linear_model(splits, features)["test"]["logloss"]


def test_a_config_that_keeps_no_sample_is_refused():
    with pytest.raises(ValueError, match="leaves no sample"):
        GibbsConfig(iterations=10, burn_in=10)


def test_train_gibbs_writes_a_bundle_that_loads_and_scores_as_its_metrics_say(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic(data, SynthConfig(planted=PlantedConfig(context_fields=2, item_fields=2, vocab_size=10), rows=3000, progress=False))
    out = tmp_path / "bundle"
    assert main(["train-gibbs", "--data", str(data), "--out", str(out), "--iterations", "20", "--export-dim", "16", "--no-progress"]) == 0
    assert "an FM of dim 16, 10 samples" in capsys.readouterr().out
    bundle = load_bundle(out)
    assert bundle.model.kind == "fm" and bundle.model.dim == 16
    assert bundle.config["train"]["gibbs"]["iterations"] == 20
    test = evaluate(bundle.model, [load_splits(data).test])
    assert test["auc"] == pytest.approx(bundle.metrics["test"]["auc"], abs=1e-6)


def test_the_kept_vectors_are_thinned_evenly_to_stay_within_the_byte_budget(monkeypatch):
    schema = rating_schema()
    per_sample = schema.total_vocab * 2 * 4  # float32 vectors of dim 2
    monkeypatch.setattr(bayes_fm, "SAMPLE_BYTES", 3 * per_sample)
    posterior = gibbs_fm(schema, planted_ratings(300, seed=1), GibbsConfig(dim=2, iterations=12, burn_in=2))
    assert posterior.samples.shape[0] == 3  # sweeps 2, 6 and 10 of the 10 after the burn-in (stride 4)
