"""Deep models (dnn, dcnv2, nfwfm; single and multi-embedding): cached scoring equals
the full forward, they learn planted data, bundles round-trip, no catalog."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scoring_equivalence import random_rows

from model_zoo.batch import Bag, FeatureBatch, join_context_items
from model_zoo.bundle import load_bundle, save_bundle
from model_zoo.catalog import ItemCatalog
from model_zoo.diagnostics import embedding_set_information_abundance
from model_zoo.metrics import constant_baseline
from model_zoo.registry import KINDS, build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Role
from model_zoo.synthetic import PlantedConfig, planted_model
from model_zoo.training import TrainConfig, evaluate, fit_in_memory, minibatches

DEEP_KINDS = ["dnn", "me_dnn", "dcnv2", "me_dcnv2", "nfwfm", "me_nfwfm"]


def mixed_schema() -> FeatureSchema:
    """Context and item fields interleaved, multi-valued fields on both sides."""
    roles = [Role.context, Role.item, Role.context, Role.item, Role.item, Role.context, Role.item]
    kinds = [Kind.single, Kind.multi, Kind.multi, Kind.single, Kind.single, Kind.single, Kind.multi]
    return FeatureSchema(
        fields=tuple(FieldSpec(name=f"f{i}", role=r, kind=k, vocab_size=5 + i) for i, (r, k) in enumerate(zip(roles, kinds)))
    )


def in_float64(batch: FeatureBatch) -> FeatureBatch:
    bags = tuple(Bag(bag.values, bag.weights.double()) for bag in batch.bags)
    return FeatureBatch(batch.fields, batch.single_fields, batch.single, batch.bag_fields, bags)


def perturbed(kind: str, schema: FeatureSchema, seed: int = 0, **options):
    torch.manual_seed(seed)
    if kind.startswith("me_"):
        options.setdefault("sets", 3)
    model = build_model(schema, kind, 4, hidden=[16, 8], **options)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def test_kinds_are_registered_with_their_sets():
    schema = mixed_schema()
    assert set(DEEP_KINDS) <= set(KINDS)
    assert build_model(schema, "me_dcnv2", 4, sets=3).hyperparameters() == {
        "kind": "me_dcnv2", "dim": 4, "sets": 3, "hidden": [128, 64], "cross_layers": 2,
    }  # fmt: skip
    assert build_model(schema, "me_nfwfm", 4).sets == 2
    single = build_model(schema, "dnn", 4)
    assert (single.kind, single.sets) == ("dnn", 1)
    # Per set: its own table, interaction parameters and first layer; the rest is shared.
    model = build_model(schema, "me_dcnv2", 4, sets=3, hidden=[16, 8])
    assert len(model.embeddings) == 3 and len(model.first_layers) == 3
    assert model.cross_weights.shape == (3, 2, 28, 28)
    assert build_model(schema, "me_nfwfm", 4, sets=3).interaction_weights.shape == (3, 21)


@st.composite
def schemas(draw) -> FeatureSchema:
    num_fields = draw(st.integers(2, 8))
    roles = draw(st.lists(st.sampled_from([Role.context, Role.item]), min_size=num_fields, max_size=num_fields))
    roles[0], roles[-1] = Role.context, Role.item  # both sides present
    kinds = draw(st.lists(st.sampled_from([Kind.single, Kind.multi]), min_size=num_fields, max_size=num_fields))
    sizes = draw(st.lists(st.integers(2, 9), min_size=num_fields, max_size=num_fields))
    return FeatureSchema(fields=tuple(FieldSpec(name=f"f{i}", role=roles[i], kind=kinds[i], vocab_size=sizes[i]) for i in range(num_fields)))


# Float64: the deep layers amplify float32 rounding past a 1e-5 tolerance on some draws;
# in float64 any real mismatch stands out by ten orders of magnitude.
@settings(max_examples=40, deadline=None)
@given(schema=schemas(), kind=st.sampled_from(DEEP_KINDS), seed=st.integers(0, 10_000))
def test_cached_scoring_equals_forward_in_float64(schema, kind, seed):
    rng = np.random.default_rng(seed)
    model = perturbed(kind, schema, seed).double()
    contexts = in_float64(random_rows(schema, schema.context_fields, 4, rng))
    items = in_float64(random_rows(schema, schema.item_fields, 23, rng))
    context_index = torch.as_tensor(rng.integers(0, 4, size=23))
    with torch.no_grad():
        expected = model(join_context_items(schema, contexts, items, context_index))
        cached = model.score_items(model.encode_context(contexts), items, context_index)
        single_context = model.score_items(model.encode_context(contexts.rows(slice(2, 3))), items)
        expected_single = model(join_context_items(schema, contexts.rows(slice(2, 3)), items))
    assert expected.dtype == torch.float64
    torch.testing.assert_close(cached, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(single_context, expected_single, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["me_dnn", "me_dcnv2", "me_nfwfm"])
def test_cached_column_blocks_follow_parameter_updates(kind):
    schema = mixed_schema()
    rng = np.random.default_rng(0)
    model = perturbed(kind, schema)
    context = random_rows(schema, schema.context_fields, 1, rng)
    items = random_rows(schema, schema.item_fields, 9, rng)
    with torch.no_grad():
        model.score_items(model.encode_context(context), items)  # builds the per-set caches
        for parameter in model.parameters():
            parameter.mul_(1.3)  # as an optimizer step would
        cached = model.score_items(model.encode_context(context), items)
        expected = model(join_context_items(schema, context, items))
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)


def test_full_rows_required_and_no_catalog():
    schema = mixed_schema()
    rng = np.random.default_rng(0)
    model = build_model(schema, "dnn", 4)
    with pytest.raises(ValueError, match="dnn scores full rows: the batch must carry every schema field"):
        model(random_rows(schema, schema.item_fields, 2, rng))
    items = random_rows(schema, schema.item_fields, 3, rng)
    for kind in ("dnn", "me_dcnv2", "me_nfwfm"):
        with pytest.raises(NotImplementedError, match=f"{kind} has no catalog decomposition"):
            ItemCatalog(build_model(schema, kind, 4), ["a", "b", "c"], items)
    with pytest.raises(ValueError, match="at least one embedding set"):
        build_model(schema, "me_dnn", 4, sets=0)


def test_information_abundance_sees_every_set():
    schema = mixed_schema()
    model = build_model(schema, "me_nfwfm", 4, sets=3)
    with torch.no_grad():
        model.embeddings[1].vectors.weight[:, 1:] = 0.0  # set 1 collapsed to one direction
    per_set = embedding_set_information_abundance(model)
    assert len(per_set) == 3
    assert all(value == pytest.approx(1.0) for value in per_set[1].values())
    assert all(value > 1.5 for value in per_set[0].values())


@pytest.mark.parametrize("kind", ["me_dnn", "dcnv2", "me_nfwfm"])
def test_bundle_round_trip(kind, tmp_path):
    schema = mixed_schema()
    rng = np.random.default_rng(1)
    model = perturbed(kind, schema, cross_layers=3) if kind.endswith("dcnv2") else perturbed(kind, schema)
    rows = random_rows(schema, schema.names, 13, rng)
    save_bundle(tmp_path / "bundle", model)
    loaded = load_bundle(tmp_path / "bundle").model
    assert loaded.hyperparameters() == model.hyperparameters()
    with torch.no_grad():
        torch.testing.assert_close(loaded(rows), model(rows), rtol=0, atol=0)


def planted_splits():
    planted = planted_model(PlantedConfig(context_fields=4, item_fields=4, multi_fields=1, vocab_size=40, dim=4, seed=5))
    rng = np.random.default_rng(0)
    splits = {}
    for name, rows in (("train", 12000), ("valid", 2000), ("test", 3000)):
        columns, labels, _ = planted.sample(rows, rng)
        splits[name] = FeatureBatch.from_columns(planted.schema, columns, labels)
    return planted.schema, splits


@pytest.fixture(scope="module")
def planted_data():
    return planted_splits()


@pytest.mark.parametrize("kind", DEEP_KINDS)
def test_learns_planted_interactions(kind, planted_data):
    """Clearly better than the constant predictor on held-out planted data."""
    schema, splits = planted_data
    torch.manual_seed(0)
    options = {"sets": 2} if kind.startswith("me_") else {}
    model = build_model(schema, kind, 4, hidden=[32, 16], **options)
    config = TrainConfig(epochs=6, batch_size=256, optimizer="adam", learning_rate=3e-3, patience=2)
    fit_in_memory(model, config, splits["train"], splits["valid"])
    test = evaluate(model, minibatches(splits["test"], 4096))
    baseline = constant_baseline(schema.task, splits["train"].label.numpy(), splits["test"].label.numpy())
    assert test["auc"] > 0.70, test
    assert test["logloss"] < baseline["logloss"] - 0.04, (test, baseline)
