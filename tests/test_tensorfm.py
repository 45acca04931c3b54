"""tensorFM: its interaction term is the CP formula, its order-2 term is an FwFM plus a
diagonal, its init learns planted interactions, L2 reaches W, and bundles and the
scorer (cached and catalog paths) serve it."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model_zoo.batch import FeatureBatch, join_context_items
from model_zoo.bundle import load_bundle, save_bundle
from model_zoo.metrics import constant_baseline
from model_zoo.models.tensorfm import TensorFM
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Role, Task
from model_zoo.synthetic import PlantedConfig, planted_model
from model_zoo.training import TrainConfig, fit_in_memory
from model_zoo.vocab import FieldVocabulary, Vocabulary
from serve_app.config import ModelConfig
from serve_app.runtime import ScoringRuntime
from streaming.encode import AuctionEncoder
from streaming.protocol import decode_auction, decode_reply, encode_auction


def schema(m: int = 6) -> FeatureSchema:
    return FeatureSchema(fields=tuple(FieldSpec(name=f"f{i}", role="context" if i < 2 else "item", vocab_size=5) for i in range(m)))


def test_the_interaction_term_is_the_cp_formula_summed_naively():
    torch.manual_seed(0)
    model = build_model(schema(), "tensorfm", 3, orders=[2, 3, 2], cp_ranks=[2, 3, 1])
    vectors = torch.randn(4, 6, 3, dtype=torch.float64)
    expected = torch.zeros(4, dtype=torch.float64)
    for factor in model.factors:
        factor = factor.detach().double()
        for r in range(factor.shape[1]):
            for k in range(3):
                product = torch.ones(4, dtype=torch.float64)
                for j in range(factor.shape[0]):
                    product = product * sum(factor[j, r, f] * vectors[:, f, k] for f in range(6))
                expected += product
    got = model.double().pairwise(vectors, torch.arange(6))
    torch.testing.assert_close(got, expected)


def test_one_order_two_term_is_an_fwfm_with_its_diagonal():
    """Σ_{f,g} M_fg <v_f, v_g> with M = W[0]ᵀ W[1]: R = M + Mᵀ off the diagonal, plus M_ff ‖v_f‖²."""
    torch.manual_seed(1)
    model = build_model(schema(), "tensorfm", 4, orders=[2], cp_ranks=[3], factor_init="reference")
    factor = model.factors[0].detach()
    interactions = factor[0].T @ factor[1]  # (m, m), rank ≤ 3, not symmetric
    assert torch.linalg.matrix_rank(interactions) == 3
    vectors = torch.randn(5, 6, 4)
    gram = torch.einsum("bfk,bgk->bfg", vectors, vectors)
    symmetric = interactions + interactions.T
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    fwfm_pairs = (symmetric * gram)[:, upper].sum(-1)
    diagonal = (torch.diagonal(interactions) * torch.diagonal(gram, dim1=1, dim2=2)).sum(-1)
    torch.testing.assert_close(model.pairwise(vectors, torch.arange(6)), fwfm_pairs + diagonal, rtol=1e-5, atol=1e-6)


def test_the_fm_init_learns_planted_interactions_at_least_as_well_as_the_reference_init():
    planted = planted_model(PlantedConfig(structure="dplr", rank=1, vocab_size=30, seed=6))
    rng = np.random.default_rng(106)
    train, valid = (FeatureBatch.from_columns(planted.schema, *planted.sample(rows, rng)[:2]) for rows in (60_000, 10_000))
    constant = constant_baseline(Task.binary, train.label.numpy(), valid.label.numpy())
    config = TrainConfig(epochs=4, batch_size=512, learning_rate=0.05, l2=0.0, patience=4)  # the inits alone
    for orders, ranks in [([2], [1]), ([2, 3], [1, 1])]:
        aucs = {}
        for factor_init in ("fm", "reference"):
            torch.manual_seed(0)
            model = TensorFM(planted.schema, 8, orders=orders, cp_ranks=ranks, sparse=True, factor_init=factor_init)
            aucs[factor_init] = fit_in_memory(model, config, train, valid).best_valid["auc"]
        assert aucs["fm"] > constant["auc"] + 0.3, (orders, aucs)
        assert aucs["fm"] >= aucs["reference"] + 0.02, (orders, aucs)


def test_bad_orders_and_ranks_are_clear_errors():
    with pytest.raises(ValueError, match="one rank per interaction order"):
        build_model(schema(), "tensorfm", 4, orders=[2, 3], cp_ranks=[2])
    with pytest.raises(ValueError, match="orders must be at least 2 and CP ranks"):
        build_model(schema(), "tensorfm", 4, orders=[1], cp_ranks=[2])
    with pytest.raises(ValueError, match="unknown factor_init"):
        build_model(schema(), "tensorfm", 4, factor_init="zeros")


SERVE_SCHEMA = FeatureSchema(
    fields=(
        FieldSpec(name="user", role=Role.context, vocab_size=6),
        FieldSpec(name="tags", role=Role.context, kind=Kind.multi, vocab_size=5),
        FieldSpec(name="advertiser", role=Role.item, vocab_size=5),
        FieldSpec(name="genres", role=Role.item, kind=Kind.multi, vocab_size=6),
    )
)
SERVE_VOCABULARY = Vocabulary(
    [
        FieldVocabulary("user", ["u1", "u2", "u3"]),
        FieldVocabulary("tags", ["sport", "news", "tech"]),
        FieldVocabulary("advertiser", ["acme", "globex", "initech"]),
        FieldVocabulary("genres", ["drama", "comedy", "noir", "sf"]),
    ]
)


def test_a_bundle_round_trips_and_the_scorer_serves_it_by_features_and_from_a_catalog(tmp_path: Path):
    torch.manual_seed(3)
    model = build_model(SERVE_SCHEMA, "tensorfm", 4, orders=[2, 3], cp_ranks=[3, 2])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)  # nonzero linear weights, generic W
    SERVE_VOCABULARY.save(tmp_path / "vocab")
    bundle_path = save_bundle(tmp_path / "bundle", model, vocabulary_dir=tmp_path / "vocab")
    bundle = load_bundle(bundle_path)
    assert bundle.model.hyperparameters() == {
        "kind": "tensorfm", "dim": 4, "orders": [2, 3], "cp_ranks": [3, 2], "factor_init": "fm",
    }
    features = {"advertiser": ["globex", "acme", None], "genres": [["noir"], ["drama", "sf"], []]}
    catalog_path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["ad-1", "ad-2", "ad-3"], **features}), catalog_path)
    runtime = ScoringRuntime(ModelConfig(bundle=str(bundle_path), catalog=str(catalog_path)))
    context = {"user": "u2", "tags": {"sport": 2.0, "tech": 1.0}}
    by_features = encode_auction("f", context, {"item_id": ["ad-1", "ad-2", "ad-3"], "features": features})
    by_id = encode_auction("c", context, ["ad-3", "ad-1", "ad-2"], top_k=2)
    report = runtime.score_messages([by_features, by_id])
    feature_reply, catalog_reply = (decode_reply(r.value) for r in report.replies)
    encoded_context, items = AuctionEncoder(SERVE_SCHEMA, SERVE_VOCABULARY).encode(decode_auction(by_features))
    with torch.no_grad():
        expected = model.eval()(join_context_items(SERVE_SCHEMA, encoded_context, items)).numpy()
    np.testing.assert_allclose(feature_reply.scores, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(catalog_reply.scores, expected[[2, 0, 1]], rtol=1e-5, atol=1e-5)
    assert catalog_reply.top_k == [["ad-1", "ad-2", "ad-3"][i] for i in np.argsort(-expected)[:2]]
