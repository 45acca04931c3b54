import numpy as np
import torch

from model_zoo.analysis import dplr_from_fwfm, field_drop_effect, field_importance, fit_dplr, pruned_error_spectrum
from model_zoo.batch import FeatureBatch
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec
from model_zoo.synthetic import PlantedConfig, planted_model
from model_zoo.training import minibatches


def dplr_matrix(m: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(rank, m))
    matrix = factors.T @ np.diag(rng.choice([-1.0, 1.0], size=rank) * rng.uniform(0.5, 2, size=rank)) @ factors
    np.fill_diagonal(matrix, 0.0)
    return matrix


def test_fit_recovers_an_exact_dplr_matrix_and_beats_pruning():
    matrix = dplr_matrix(12, 2, seed=0)
    fit = fit_dplr(matrix, rank=2)
    assert np.abs(fit.approximation - matrix).max() < 1e-6
    assert np.allclose(np.diag(fit.approximation), 0.0)
    assert fit.error_spectrum[0] < 1e-5
    assert pruned_error_spectrum(matrix, rank=2)[0] > 0.1  # same parameter count, real error


def test_fit_of_a_full_rank_matrix_decreases_with_rank():
    rng = np.random.default_rng(1)
    half = rng.normal(size=(10, 10))
    matrix = (half + half.T) / 2
    np.fill_diagonal(matrix, 0.0)
    errors = [np.linalg.norm(fit_dplr(matrix, rank).error_spectrum) for rank in (1, 3, 6)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_dplr_from_fwfm_reproduces_a_low_rank_fwfm():
    schema = FeatureSchema(fields=tuple(FieldSpec(name=f"f{i}", role="context" if i < 3 else "item", vocab_size=6) for i in range(7)))
    torch.manual_seed(0)
    fwfm = build_model(schema, "fwfm", 4)
    matrix = dplr_matrix(7, 2, seed=3)
    with torch.no_grad():
        fwfm.interaction_weights.copy_(torch.as_tensor(matrix[np.triu_indices(7, 1)], dtype=torch.float32))
        fwfm.embedding.linear.weight.normal_()
    dplr, _ = dplr_from_fwfm(fwfm, rank=2)
    batch = FeatureBatch.from_columns(schema, {f"f{i}": np.arange(10) % 6 for i in range(7)})
    with torch.no_grad():
        torch.testing.assert_close(dplr(batch), fwfm(batch), rtol=1e-4, atol=1e-4)


def test_field_importance_ranks_an_unused_field_last_and_dropping_it_changes_nothing():
    planted = planted_model(PlantedConfig(context_fields=3, item_fields=3, vocab_size=20, seed=0))
    columns, labels, _ = planted.sample(2000, np.random.default_rng(0))
    batch = FeatureBatch.from_columns(planted.schema, columns, labels)
    torch.manual_seed(0)
    model = build_model(planted.schema, "dplr_fwfm", 4, rank=2)
    with torch.no_grad():
        model.factor_matrix.normal_()
        model.factor_matrix[:, 4] = 0.0  # field i1 takes part in no interaction
        model.embedding.linear.weight.zero_()
    ranking = field_importance(model)
    assert ranking[-1] == ("i1", 0.0)
    effect = field_drop_effect(model, lambda: minibatches(batch, 512), max_dropped=2)
    assert effect[1]["dropped"] == ["i1"] and effect[1]["auc"] == effect[0]["auc"]
    assert effect[2]["auc"] != effect[0]["auc"]
