import numpy as np
import pytest
import torch

from model_zoo.batch import FeatureBatch
from model_zoo.bundle import load_bundle, save_bundle
from model_zoo.metrics import constant_baseline
from model_zoo.models.rafm import RaFM
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Task
from model_zoo.synthetic import PlantedConfig, planted_model
from model_zoo.training import TrainConfig, evaluate, fit_in_memory, minibatches


def tiny_schema() -> FeatureSchema:
    return FeatureSchema(fields=(FieldSpec(name="a", role="context", vocab_size=4), FieldSpec(name="b", role="item", vocab_size=4)))


def test_levels_from_counts_and_effective_size():
    model = RaFM(tiny_schema(), 8, ranks=[2, 8], thresholds=[10])
    model.set_feature_counts(np.array([0, 5, 10, 11, 100, 3, 50, 9]))
    assert model.feature_levels.tolist() == [1, 1, 1, 2, 2, 1, 2, 1]
    # every feature has a rank-2 vector, the 3 frequent ones a rank-8 vector too, plus 8 linear weights
    assert model.effective_parameters() == 8 * 2 + 3 * 8 + 8
    with pytest.raises(ValueError, match="ranks must increase"):
        RaFM(tiny_schema(), 8, ranks=[8, 2], thresholds=[10])


def test_pairs_interact_at_the_lower_level():
    model = RaFM(tiny_schema(), 3, ranks=[1, 3], thresholds=[10])
    model.set_feature_counts(np.array([0, 0, 100, 0, 0, 0, 100, 100]))  # a=2 frequent; b=2 frequent, b=3 frequent
    with torch.no_grad():
        model.levels[0].vectors.weight.copy_(torch.arange(8, dtype=torch.float32).unsqueeze(1) + 1)
        model.levels[1].vectors.weight.copy_(torch.ones(8, 3) * 2)
    batch = FeatureBatch.from_columns(tiny_schema(), {"a": [2, 1], "b": [2, 2]})
    with torch.no_grad():
        scores = model(batch)
    # both frequent: <v2^(2), v6^(2)> = 12 ; a=1 infrequent: level 1, v1^(1) * v6^(1) = 2 * 7
    assert scores.tolist() == [12.0, 14.0]


def test_rafm_learns_on_planted_data_and_round_trips_through_a_bundle(tmp_path):
    planted = planted_model(PlantedConfig(structure="dense", vocab_size=60, seed=8))
    rng = np.random.default_rng(0)
    columns, labels, _ = planted.sample(40_000, rng)
    train = FeatureBatch.from_columns(planted.schema, columns, labels)
    columns, labels, _ = planted.sample(8_000, rng)
    valid = FeatureBatch.from_columns(planted.schema, columns, labels)
    counts = np.zeros(planted.schema.total_vocab, dtype=np.int64)
    np.add.at(counts, (train.single + torch.as_tensor(planted.schema.offsets)).reshape(-1).numpy(), 1)
    torch.manual_seed(0)
    model = build_model(planted.schema, "rafm", 16, ranks=[4, 16], thresholds=[200], sparse=True)
    model.set_feature_counts(counts)
    assert 0 < int((model.feature_levels == 2).sum()) < planted.schema.total_vocab
    fit_in_memory(model, TrainConfig(epochs=3, batch_size=512, learning_rate=0.05), train, valid)
    metrics = evaluate(model, minibatches(valid, 4096))
    constant = constant_baseline(Task.binary, train.label.numpy(), valid.label.numpy())
    assert metrics["auc"] > constant["auc"] + 0.2
    path = save_bundle(tmp_path / "rafm", model)
    with torch.no_grad():
        assert torch.equal(load_bundle(path).model(valid), model(valid))


def test_distillation_pulls_the_truncated_model_towards_the_full_one():
    planted = planted_model(PlantedConfig(vocab_size=30, seed=9))
    columns, labels, _ = planted.sample(20_000, np.random.default_rng(1))
    train = FeatureBatch.from_columns(planted.schema, columns, labels)
    gaps = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        model = RaFM(planted.schema, 8, ranks=[2, 8], thresholds=[-1], distillation=weight, sparse=True)
        model.set_feature_counts(np.zeros(planted.schema.total_vocab, dtype=np.int64))  # every feature at level 2
        fit_in_memory(model, TrainConfig(epochs=2, batch_size=512, learning_rate=0.05), train, train.rows(slice(0, 2000)))
        with torch.no_grad():
            base = model.bias + model._linear(train)
            level_one = model._level_terms(train)[0][0]  # the rank-2 model over every feature
            gaps[weight] = float((base + level_one - model(train)).square().mean())
    assert gaps[5.0] < 0.5 * gaps[0.0], gaps
