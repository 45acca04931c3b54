"""Each model's pairwise term equals its equation computed naively over field pairs."""

import pytest
import torch

from model_zoo.models.pruned_fwfm import PrunedFwFM, kept_entry_count
from model_zoo.registry import build_model, model_from_hyperparameters
from model_zoo.schema import FeatureSchema, FieldSpec


def schema(m: int = 6) -> FeatureSchema:
    return FeatureSchema(fields=tuple(FieldSpec(name=f"f{i}", role="context" if i < 2 else "item", vocab_size=5) for i in range(m)))


def naive_pairwise(vectors: torch.Tensor, interactions: torch.Tensor) -> torch.Tensor:
    m = vectors.shape[1]
    total = torch.zeros(vectors.shape[0], dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            total += interactions[i, j].double() * (vectors[:, i].double() * vectors[:, j].double()).sum(-1)
    return total


def test_dplr_matches_explicit_r():
    torch.manual_seed(0)
    model = build_model(schema(), "dplr_fwfm", 4, rank=3)
    with torch.no_grad():
        model.factor_matrix.normal_()
        model.eigen.normal_()
    factors, eigen = model.factor_matrix.detach(), model.eigen.detach()
    r = factors.T @ torch.diag(eigen) @ factors
    r = r - torch.diag(torch.diag(r))
    vectors = torch.randn(7, 6, 4)
    got = model.pairwise(vectors, torch.arange(6))
    torch.testing.assert_close(got.double(), naive_pairwise(vectors, r), rtol=1e-4, atol=1e-4)


def test_fm_and_fwfm_match_naive_sums():
    torch.manual_seed(1)
    vectors = torch.randn(5, 6, 4)
    fm = build_model(schema(), "fm", 4)
    torch.testing.assert_close(fm.pairwise(vectors, torch.arange(6)).double(), naive_pairwise(vectors, torch.ones(6, 6)), rtol=1e-4, atol=1e-4)
    fwfm = build_model(schema(), "fwfm", 4)
    with torch.no_grad():
        fwfm.interaction_weights.normal_()
    r = fwfm.interaction_matrix().detach()
    assert torch.equal(r, r.T) and torch.all(torch.diag(r) == 0)
    torch.testing.assert_close(fwfm.pairwise(vectors, torch.arange(6)).double(), naive_pairwise(vectors, r), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_pruning_keeps_the_largest_parameter_matched_entries(rank):
    torch.manual_seed(rank)
    fwfm = build_model(schema(8), "fwfm", 4)
    with torch.no_grad():
        fwfm.interaction_weights.copy_(torch.randperm(28).float() - 13.5)  # distinct magnitudes
    pruned = PrunedFwFM.from_fwfm(fwfm, rank)
    count = kept_entry_count(8, rank)
    assert count == min(rank * 9, 28)
    kept = pruned.effective_weights().detach()
    assert int((kept != 0).sum()) == count
    threshold = fwfm.interaction_weights.abs().sort(descending=True).values[count - 1]
    assert torch.all(fwfm.interaction_weights.abs()[kept != 0] >= threshold)
    # Fine-tuning moves only kept entries: the others get zero gradient.
    vectors = torch.randn(3, 8, 4)
    pruned.pairwise(vectors, torch.arange(8)).sum().backward()
    assert torch.all(pruned.interaction_weights.grad[~pruned.kept] == 0)
    assert torch.any(pruned.interaction_weights.grad[pruned.kept] != 0)


def test_rebuild_from_hyperparameters_and_state_dict():
    model = build_model(schema(), "pruned_fwfm", 4, rank=2)
    with torch.no_grad():
        model.kept[::2] = False
    rebuilt = model_from_hyperparameters(schema(), model.hyperparameters())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.kept, model.kept)
    assert model.hyperparameters() == {"kind": "pruned_fwfm", "dim": 4, "rank": 2}
    with pytest.raises(ValueError, match="unknown model"):
        build_model(schema(), "nope", 4)


def test_pruned_scoring_visits_only_the_kept_pairs():
    """Per item: the kept item–item pairs and the item fields with a kept context pair, nothing else."""
    fwfm = build_model(schema(8), "fwfm", 4)
    with torch.no_grad():
        fwfm.interaction_weights.copy_(torch.randperm(28).float() - 13.5)
    pruned = PrunedFwFM.from_fwfm(fwfm, rank=1)  # 9 of 28 entries
    item_fields = tuple(f"f{i}" for i in range(2, 8))
    plan = pruned.kept_pairs(item_fields)
    r = pruned.interaction_matrix().detach()
    items = plan.active + 2  # schema positions (context fields are f0, f1)
    visited = {(int(items[a]), int(items[b])) for a, b in zip(plan.left, plan.right)}
    assert visited == {(i, j) for i in range(2, 8) for j in range(i + 1, 8) if r[i, j] != 0}
    assert torch.equal(plan.weights, r[items[plan.left], items[plan.right]])
    assert set((plan.cross_fields + 2).tolist()) == {j for j in range(2, 8) if r[:2, j].ne(0).any()}
    assert torch.equal(plan.active[plan.cross], plan.cross_fields)
    kept_item_pairs = sum(1 for i in range(2, 8) for j in range(i + 1, 8) if r[i, j] != 0)
    assert len(plan.left) == kept_item_pairs < 15  # fewer than the dense 6 × 5 / 2
