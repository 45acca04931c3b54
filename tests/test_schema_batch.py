import numpy as np
import pytest
import torch
from pydantic import ValidationError

from model_zoo.batch import FeatureBatch, concat_batches, join_context_items
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Kind, Role, Task
from model_zoo.vocab import FieldVocabulary, Vocabulary, log_square_token


def small_schema() -> FeatureSchema:
    return FeatureSchema(
        fields=(
            FieldSpec(name="user", role=Role.context, vocab_size=10),
            FieldSpec(name="genres", role=Role.item, kind=Kind.multi, vocab_size=6),
            FieldSpec(name="movie", role=Role.item, vocab_size=8),
        ),
        label="rating",
        task=Task.regression,
    )


def test_schema_json_round_trip(tmp_path):
    schema = small_schema()
    schema.save(tmp_path / "schema.json")
    loaded = FeatureSchema.load(tmp_path / "schema.json")
    assert loaded == schema
    assert loaded.context_fields == ("user",) and loaded.item_fields == ("genres", "movie")
    assert loaded.offsets.tolist() == [0, 10, 16] and loaded.total_vocab == 24


def test_schema_rejects_duplicates_and_tiny_vocab():
    with pytest.raises(ValidationError, match="duplicate field names"):
        FeatureSchema(fields=(FieldSpec(name="a", role="context", vocab_size=3),) * 2)
    with pytest.raises(ValidationError):
        FieldSpec(name="a", role="context", vocab_size=1)  # needs room for missing + rare
    with pytest.raises(ValidationError, match="also a field name"):
        FeatureSchema(fields=(FieldSpec(name="label", role="item", vocab_size=3),))


def test_with_roles_reassigns_context():
    schema = small_schema().with_roles(["user", "movie"])
    assert schema.context_fields == ("user", "movie") and schema.item_fields == ("genres",)
    with pytest.raises(KeyError):
        small_schema().with_roles(["nope"])


def test_batch_columns_bags_and_range_check():
    schema = small_schema()
    batch = FeatureBatch.from_columns(schema, {"movie": [1, 7], "user": [3, 4], "genres": [[2, 3], [5]]}, [4.0, 2.0])
    assert batch.fields == ("user", "genres", "movie")
    assert batch.single_fields == ("user", "movie") and batch.single.tolist() == [[3, 1], [4, 7]]
    assert batch.bags[0].values.tolist() == [[2, 3], [5, 0]]
    assert batch.bags[0].weights.tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="'movie' has indices outside"):
        FeatureBatch.from_columns(schema, {"movie": [8]})


def test_int32_indices_stay_int32_and_train_as_int64_ones():
    schema = small_schema()
    columns = {"user": [3, 4, 9], "movie": [1, 7, 0], "genres": (np.array([[2, 3], [5, 0], [1, 4]]), np.array([[1, 1], [1, 0], [2, 1]], np.float32))}

    def typed(dtype):
        return {"user": np.asarray(columns["user"], dtype), "movie": np.asarray(columns["movie"], dtype),
                "genres": (columns["genres"][0].astype(dtype), columns["genres"][1])}  # fmt: skip

    narrow, wide = (FeatureBatch.from_columns(schema, typed(t), [4.0, 2.0, 5.0]) for t in (np.int32, np.int64))
    assert narrow.single.dtype == narrow.bags[0].values.dtype == torch.int32
    assert wide.single.dtype == wide.bags[0].values.dtype == torch.int64
    mixed = FeatureBatch.from_columns(schema, {"user": np.int32([3]), "movie": [1]})
    assert mixed.single.dtype == torch.int64 and mixed.single.tolist() == [[3, 1]]
    gradients = []
    for batch in (narrow, wide):
        torch.manual_seed(0)
        model = build_model(schema, "dplr_fwfm", 4, sparse=True)
        model(batch).sum().backward()
        gradients.append({name: p.grad.to_dense() for name, p in model.named_parameters()})
    for name, value in gradients[0].items():
        assert torch.equal(value, gradients[1][name]), name


def test_join_and_concat():
    schema = small_schema()
    context = FeatureBatch.from_columns(schema, {"user": [3, 5]})
    items = FeatureBatch.from_columns(schema, {"movie": [1, 2, 6], "genres": [[2], [3, 4], [5]]})
    joined = join_context_items(schema, context, items, torch.tensor([1, 0, 1]))
    assert joined.fields == schema.names
    assert joined.single.tolist() == [[5, 1], [3, 2], [5, 6]]
    both = concat_batches([items, FeatureBatch.from_columns(schema, {"movie": [3], "genres": [[2, 3, 4]]})])
    assert len(both) == 4 and both.bags[0].values.shape == (4, 3)


def test_vocabulary_lookup_and_round_trip(tmp_path):
    vocabulary = Vocabulary([FieldVocabulary("movie", ["10", "20"]), FieldVocabulary("count", ["b5", "v1"], "log_square")])
    vocabulary.save(tmp_path)
    loaded = Vocabulary.load(tmp_path)
    assert loaded["movie"].lookup(["10", 20, "99", None, ""]).tolist() == [2, 3, 1, 0, 0]
    assert log_square_token("10") == "b5"  # floor(ln(10)^2) = floor(5.30)
    assert loaded["count"].lookup([10, 1, 1000]).tolist() == [2, 3, 1]
    assert np.array_equal(loaded["count"].lookup([]), np.array([], dtype=np.int64))
