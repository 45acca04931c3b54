"""Cached-context scoring (Algorithm 1) and catalog scoring equal the full forward on
the joined rows, for every model, on random schemas with multi-valued fields."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from model_zoo.batch import FeatureBatch, join_context_items
from model_zoo.catalog import ItemCatalog
from model_zoo.models.base import RankingModel
from model_zoo.models.pruned_fwfm import PrunedFwFM
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Role

CATALOG_KINDS = ["fm", "fwfm", "pruned_fwfm", "dplr_fwfm", "tensorfm", "me_fm", "me_fwfm", "me_dplr_fwfm"]
CATALOG_KINDS += ["dp_mf"]  # schemas without a single-valued context and item field are skipped
KINDS = CATALOG_KINDS + ["rafm"]


@st.composite
def schemas(draw) -> FeatureSchema:
    num_fields = draw(st.integers(2, 9))
    roles = draw(st.lists(st.sampled_from([Role.context, Role.item]), min_size=num_fields, max_size=num_fields))
    roles[0], roles[-1] = Role.context, Role.item  # both sides present
    fields = tuple(
        FieldSpec(
            name=f"f{i}",
            role=roles[i],
            kind=draw(st.sampled_from([Kind.single, Kind.single, Kind.multi])),
            vocab_size=draw(st.integers(2, 12)),
        )
        for i in range(num_fields)
    )
    return FeatureSchema(fields=fields)


def random_rows(schema: FeatureSchema, names, rows: int, rng: np.random.Generator) -> FeatureBatch:
    columns = {}
    for name in names:
        spec = schema.field(name)
        if spec.kind == Kind.single:
            columns[name] = rng.integers(0, spec.vocab_size, size=rows)
        else:
            length = int(rng.integers(1, 4))
            values = rng.integers(0, spec.vocab_size, size=(rows, length))
            weights = rng.uniform(0.0, 2.0, size=(rows, length)).astype(np.float32)
            weights[rng.random((rows, length)) < 0.3] = 0.0  # padding, sometimes a whole empty bag
            columns[name] = (values, weights)
    return FeatureBatch.from_columns(schema, columns)


def random_model(kind: str, schema: FeatureSchema, rank: int, seed: int, **options) -> RankingModel:
    """A model of ``kind`` with every parameter moved off its init; ``options`` go to build_model."""
    torch.manual_seed(seed)
    dim = 4
    if kind == "pruned_fwfm":
        full = build_model(schema, "fwfm", dim)
        perturb(full)
        model = PrunedFwFM.from_fwfm(full, rank)
    elif kind == "dp_mf":
        assume(any(f.kind == Kind.single for f in schema.fields if f.role == Role.context))
        assume(any(f.kind == Kind.single for f in schema.fields if f.role == Role.item))
        model = build_model(schema, kind, dim)
        perturb(model)
    elif kind == "rafm":
        ranks = [2, 3, 4][: 1 + rank % 3]
        model = build_model(schema, kind, ranks[-1], ranks=ranks, thresholds=[5, 50][: len(ranks) - 1])
        perturb(model)
        model.set_feature_counts(torch.randint(0, 80, (schema.total_vocab,)))  # features at every level
    else:
        options = {"rank": rank, **options} if kind.endswith("dplr_fwfm") else options
        if kind.startswith("me_"):
            options["sets"] = 1 + rank % 3
        model = build_model(schema, kind, dim, **options)
        perturb(model)
    return model.eval()


def paired_rows(model: RankingModel, schema: FeatureSchema, count: int, rng: np.random.Generator):
    """3 contexts, ``count`` items each paired with a random one of them, and the full
    forward on the joined rows."""
    contexts = random_rows(schema, schema.context_fields, 3, rng)
    items = random_rows(schema, schema.item_fields, count, rng)
    context_index = torch.as_tensor(rng.integers(0, 3, size=count))
    with torch.no_grad():
        expected = model(join_context_items(schema, contexts, items, context_index))
    return contexts, items, context_index, expected


def perturb(model: RankingModel) -> None:
    """Move every parameter off its initial value (nonzero linear weights, generic R, U, e)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)


@settings(max_examples=60, deadline=None)
@given(schema=schemas(), kind=st.sampled_from(KINDS), rank=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_cached_context_equals_full_forward(schema, kind, rank, seed):
    rng = np.random.default_rng(seed)
    model = random_model(kind, schema, rank, seed)
    contexts, items, context_index, expected = paired_rows(model, schema, 17, rng)
    with torch.no_grad():
        state = model.encode_context(contexts)
        cached = model.score_items(state, items, context_index)
        one_context = model.score_items(model.encode_context(contexts.rows(slice(1, 2))), items)
        expected_one = model(join_context_items(schema, contexts.rows(slice(1, 2)), items))
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_context, expected_one, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(schema=schemas(), kind=st.sampled_from(CATALOG_KINDS), rank=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_catalog_equals_full_forward(schema, kind, rank, seed):
    rng = np.random.default_rng(seed)
    model = random_model(kind, schema, rank, seed)
    contexts = random_rows(schema, schema.context_fields, 2, rng)
    items = random_rows(schema, schema.item_fields, 11, rng)
    ids = [f"item-{i}" for i in range(11)]
    with torch.no_grad():
        catalog = ItemCatalog(model, ids, items)
        state = model.encode_context(contexts)
        every = catalog.score_all(state)
        for row in range(2):
            index = torch.full((11,), row, dtype=torch.int64)
            torch.testing.assert_close(
                every[row], model(join_context_items(schema, contexts, items, index)), rtol=1e-5, atol=1e-5
            )
        chosen = ["item-7", "item-2"]
        subset = catalog.score(state, catalog.positions(chosen), torch.tensor([1, 0]))
        torch.testing.assert_close(subset, torch.stack([every[1, 7], every[0, 2]]), rtol=1e-5, atol=1e-5)
        scores, top_ids = catalog.top_k(state, 3)
    best = every.topk(3, dim=1).indices
    assert top_ids == [[ids[i] for i in row] for row in best.tolist()]
    assert torch.equal(scores, every.topk(3, dim=1).values)


def test_score_items_rejects_wrong_fields():
    schema = FeatureSchema(fields=(FieldSpec(name="c", role="context", vocab_size=4), FieldSpec(name="i", role="item", vocab_size=4), FieldSpec(name="j", role="item", vocab_size=4)))
    model = build_model(schema, "dplr_fwfm", 4, rank=2)
    state = model.encode_context(FeatureBatch.from_columns(schema, {"c": [1]}))
    with pytest.raises(ValueError, match="exactly the non-context fields"):
        model.score_items(state, FeatureBatch.from_columns(schema, {"i": [1]}))
    with pytest.raises(KeyError, match="unknown catalog items"):
        ItemCatalog(model, ["a"], FeatureBatch.from_columns(schema, {"i": [1], "j": [2]})).positions(["b"])


def test_derived_tables_follow_parameter_and_mask_updates():
    """Scoring caches (DPLR item tables, pruned plans) are rebuilt after any in-place
    change: an optimizer step, a load_state_dict, a new pruning mask."""
    schema = FeatureSchema(fields=tuple(FieldSpec(name=f"f{i}", role="context" if i < 2 else "item", vocab_size=6) for i in range(6)))
    rng = np.random.default_rng(0)
    context = random_rows(schema, schema.context_fields, 1, rng)
    items = random_rows(schema, schema.item_fields, 9, rng)
    for kind in ("dplr_fwfm", "pruned_fwfm"):
        model = random_model(kind, schema, rank=2, seed=1)
        with torch.no_grad():
            model.score_items(model.encode_context(context), items)  # builds the caches
            if kind == "pruned_fwfm":
                model.kept.copy_(~model.kept)  # the mask alone: a buffer, not a parameter
            else:
                model.embedding.vectors.weight.mul_(1.5)  # as an optimizer step would
            cached = model.score_items(model.encode_context(context), items)
            expected = model(join_context_items(schema, context, items))
            torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)
            # Parameters replaced by new tensors (load_state_dict(assign=True)), not updated.
            model.load_state_dict({name: value * 0.5 for name, value in model.state_dict().items()}, assign=True)
            cached = model.score_items(model.encode_context(context), items)
            expected = model(join_context_items(schema, context, items))
        torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    schema=schemas(),
    orders=st.lists(st.integers(2, 3), min_size=1, max_size=2),
    ranks=st.lists(st.integers(1, 4), min_size=2, max_size=2),
    seed=st.integers(0, 10_000),
)
def test_tensorfm_cached_context_and_catalog_equal_the_full_forward(schema, orders, ranks, seed):
    """Π_j (A + B) per item, and its subset expansion as one inner product per catalog item."""
    rng = np.random.default_rng(seed)
    model = random_model("tensorfm", schema, 1, seed, orders=orders, cp_ranks=ranks[: len(orders)])
    contexts, items, context_index, expected = paired_rows(model, schema, 13, rng)
    with torch.no_grad():
        state = model.encode_context(contexts)
        cached = model.score_items(state, items, context_index)
        catalog = ItemCatalog(model, list(range(13)), items)
        from_catalog = catalog.score(state, torch.arange(13), context_index)
        every = catalog.score_all(state)
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_catalog, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(every[context_index, torch.arange(13)], expected, rtol=1e-4, atol=1e-4)
    assert catalog.vectors.shape[1] == sum(r * 4 * (2**d - 2) for d, r in zip(orders, ranks))


@pytest.mark.parametrize("kind", ["dplr_fwfm", "fm"])
def test_compiled_context_encoding_equals_the_composed_reference(kind):
    """Without autograd, contexts of single-valued fields take one compiled pass; its
    query and context scalar equal the torch composition (``encode_context_composed``)."""
    schema = FeatureSchema(
        fields=tuple(FieldSpec(name=f"f{i}", role=Role.context if i < 5 else Role.item, vocab_size=30) for i in range(9))
    )
    rng = np.random.default_rng(6)
    model = random_model(kind, schema, rank=3, seed=6)
    contexts = random_rows(schema, schema.context_fields, 7, rng)
    with torch.inference_mode():
        compiled, composed = model.encode_context(contexts), model.encode_context_composed(contexts)
    torch.testing.assert_close(compiled.query, composed.query, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled.scalar, composed.scalar, rtol=1e-6, atol=1e-6)
    assert (compiled.fields, compiled.item_fields) == (composed.fields, composed.item_fields)
    out_of_range = FeatureBatch(contexts.fields, contexts.single_fields, contexts.single + schema.total_vocab, (), ())
    with torch.inference_mode(), pytest.raises(IndexError):
        model.encode_context(out_of_range)


@pytest.mark.parametrize("kind", ["dplr_fwfm", "fm"])
def test_compiled_serving_scores_equal_the_composed_reference(kind):
    """Without autograd, items of single-valued fields take one compiled pass; it equals
    the torch composition (``score_items_composed``) for shared and per-item contexts."""
    schema = FeatureSchema(
        fields=tuple(FieldSpec(name=f"f{i}", role=Role.context if i < 4 else Role.item, vocab_size=30) for i in range(10))
    )
    rng = np.random.default_rng(5)
    model = random_model(kind, schema, rank=3, seed=5)
    contexts = random_rows(schema, schema.context_fields, 3, rng)
    items = random_rows(schema, schema.item_fields, 50, rng)
    context_index = torch.from_numpy(rng.integers(0, 3, 50))
    with torch.inference_mode():
        state = model.encode_context(contexts)
        one = model.encode_context(contexts.rows(slice(2, 3)))
        torch.testing.assert_close(
            model.score_items(state, items, context_index), model.score_items_composed(state, items, context_index),
            rtol=1e-6, atol=1e-5,
        )  # fmt: skip
        torch.testing.assert_close(model.score_items(one, items), model.score_items_composed(one, items), rtol=1e-6, atol=1e-5)
        with pytest.raises(ValueError, match="pass context_index"):
            model.score_items(state, items)
