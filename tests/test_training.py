"""Models learn planted structure: every model beats the constant predictor, DPLR at
the planted rank gets close to the oracle, and its initialisation lets rank 1 learn."""

import numpy as np
import pytest
import torch

from model_zoo.batch import FeatureBatch
from model_zoo.metrics import binary_metrics, constant_baseline
from model_zoo.models.dplr_fwfm import DPLRFwFM
from model_zoo.models.pruned_fwfm import PrunedFwFM
from model_zoo.registry import build_model
from model_zoo.schema import Task
from model_zoo.synthetic import PlantedConfig, planted_model
from model_zoo.training import TrainConfig, build_optimizers, evaluate, fit_in_memory, minibatches, uses_sparse_gradients


def planted_splits(config: PlantedConfig, train_rows: int, valid_rows: int = 10_000):
    planted = planted_model(config)
    rng = np.random.default_rng(config.seed + 100)
    splits = []
    for rows in (train_rows, valid_rows):
        columns, labels, logits = planted.sample(rows, rng)
        splits.append((FeatureBatch.from_columns(planted.schema, columns, labels), logits))
    return planted, splits


def test_every_model_beats_the_constant_predictor():
    planted, [(train, _), (valid, _)] = planted_splits(
        PlantedConfig(structure="dplr", rank=2, multi_fields=1, vocab_size=30, seed=3), 60_000
    )
    constant = constant_baseline(Task.binary, train.label.numpy(), valid.label.numpy())
    config = TrainConfig(epochs=3, batch_size=512, learning_rate=0.05)
    results = {}
    for kind, options in [("fm", {}), ("fwfm", {}), ("dplr_fwfm", {"rank": 2}), ("me_dplr_fwfm", {"rank": 2, "sets": 2})]:
        torch.manual_seed(0)
        model = build_model(planted.schema, kind, 8, sparse=True, **options)
        fit_in_memory(model, config, train, valid)
        results[kind] = (model, evaluate(model, minibatches(valid, 4096)))
    pruned = PrunedFwFM.from_fwfm(results["fwfm"][0], rank=2)
    fit_in_memory(pruned, config.model_copy(update={"epochs": 1}), train, valid)  # fine-tune kept entries
    results["pruned_fwfm"] = (pruned, evaluate(pruned, minibatches(valid, 4096)))
    for kind, (_, metrics) in results.items():
        assert metrics["auc"] > constant["auc"] + 0.2, kind
        assert metrics["logloss"] < constant["logloss"] - 0.05, kind


def test_dplr_reaches_the_oracle_and_its_init_beats_the_reference_one():
    planted, [(train, _), (valid, valid_logits)] = planted_splits(
        PlantedConfig(structure="dplr", rank=1, vocab_size=30, seed=6), 100_000
    )
    oracle = binary_metrics(valid.label.numpy(), valid_logits)["auc"]
    # U and e at the embeddings' rate: the inits compared, not the default slower U, e.
    config = TrainConfig(epochs=5, batch_size=512, learning_rate=0.05, interaction_lr_scale=1.0, patience=5)
    aucs = {}
    for factor_init in ("fm", "reference"):
        torch.manual_seed(0)
        model = DPLRFwFM(planted.schema, 8, rank=1, sparse=True, factor_init=factor_init)
        result = fit_in_memory(model, config, train, valid)
        aucs[factor_init] = result.best_valid["auc"]
    assert aucs["fm"] > oracle - 0.03, (aucs, oracle)
    # The reference std-0.01 U and e leave rank 1 stuck on the wrong sign of e.
    assert aucs["fm"] > aucs["reference"] + 0.03, aucs


def test_rating_regression_beats_the_mean():
    planted, [(train, _), (valid, _)] = planted_splits(
        PlantedConfig(structure="dense", task=Task.regression, vocab_size=30, seed=2, bias=3.0), 40_000
    )
    torch.manual_seed(0)
    model = build_model(planted.schema, "dplr_fwfm", 8, rank=2, sparse=True)
    result = fit_in_memory(model, TrainConfig(epochs=3, batch_size=512, learning_rate=0.05), train, valid)
    constant = constant_baseline(Task.regression, train.label.numpy(), valid.label.numpy())
    assert "auc" not in result.best_valid
    assert result.best_valid["mse"] < 0.7 * constant["mse"]


@pytest.mark.parametrize("optimizer,lr", [("adagrad", 0.05), ("sparse_adam", 0.01), ("adam", 0.01), ("sgd", 0.5)])
def test_optimizers_reduce_the_loss(optimizer, lr):
    planted, [(train, _), (valid, _)] = planted_splits(PlantedConfig(vocab_size=20, seed=4), 20_000, 4_000)
    torch.manual_seed(0)
    model = build_model(planted.schema, "dplr_fwfm", 8, rank=2, sparse=uses_sparse_gradients(optimizer))
    before = evaluate(model, minibatches(valid, 4096))["logloss"]
    fit_in_memory(model, TrainConfig(epochs=2, batch_size=256, optimizer=optimizer, learning_rate=lr, l2=1e-4), train, valid)
    assert evaluate(model, minibatches(valid, 4096))["logloss"] < before - 0.02


def test_early_stopping_restores_the_best_epoch():
    planted, [(train, _), (valid, _)] = planted_splits(PlantedConfig(vocab_size=200, seed=5), 5_000, 2_000)
    torch.manual_seed(0)
    model = build_model(planted.schema, "fwfm", 8, sparse=True)
    # A tiny train set and a large rate overfit quickly, so validation AUC peaks early.
    result = fit_in_memory(model, TrainConfig(epochs=12, batch_size=64, learning_rate=0.3, patience=1), train, valid)
    history = [epoch.valid["auc"] for epoch in result.history]
    assert result.best_epoch == int(np.argmax(history))
    assert len(history) == result.best_epoch + 2  # stopped one epoch (the patience) after the best
    assert evaluate(model, minibatches(valid, 4096))["auc"] == pytest.approx(result.best_valid["auc"], abs=1e-9)


@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise_adagrad", "sgd", "adam", "sparse_adam"])
def test_interaction_parameters_step_at_their_models_rate(optimizer):
    """DPLR's U and e (of every embedding set) learn at a tenth of the rate, the FwFM's R
    and the embeddings at the rate itself; the config's scale overrides every model's."""
    planted = planted_model(PlantedConfig(structure="dplr", rank=1, vocab_size=10, seed=1))
    sparse = uses_sparse_gradients(optimizer)

    def rates(kind, **options):
        model = build_model(planted.schema, kind, 4, sparse=sparse, **options)
        names = {id(p): name for name, p in model.named_parameters()}
        config = TrainConfig(optimizer=optimizer, learning_rate=0.2)
        groups = [group for built in build_optimizers(model, config) for group in built.param_groups]
        return {names[id(p)]: group["lr"] for group in groups for p in group["params"]}

    dplr = rates("dplr_fwfm", rank=2)
    assert dplr["factor_matrix"] == dplr["eigen"] == pytest.approx(0.02)
    assert dplr["embedding.vectors.weight"] == dplr["bias"] == 0.2
    assert rates("fwfm")["interaction_weights"] == 0.2
    sets = rates("me_dplr_fwfm", rank=1, sets=2)
    assert [sets[f"embedding_sets.{i}.eigen"] for i in (0, 1)] == pytest.approx([0.02, 0.02])
    model = build_model(planted.schema, "dplr_fwfm", 4, sparse=sparse, rank=1)
    overridden = TrainConfig(optimizer=optimizer, learning_rate=0.2, interaction_lr_scale=0.5)
    groups = [group for optimizer in build_optimizers(model, overridden) for group in optimizer.param_groups]
    assert sorted(group["lr"] for group in groups if any(p is model.eigen for p in group["params"])) == [0.1]
