"""Prepared parquet back to FeatureBatch: from arrow tables, from Ray-style numpy
dicts, batch by batch (shuffled or not), and whole splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from model_zoo.batch import concat_batches
from model_zoo.data.layout import columns_for, load_schema, split_files
from model_zoo.data.reader import batch_from_numpy, batch_from_table, check_index_ranges, iter_batches, iter_tables, load_split
from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.synthetic import PlantedConfig


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    planted = PlantedConfig(context_fields=3, item_fields=3, multi_fields=2, vocab_size=30, seed=4)
    write_synthetic(out, SynthConfig(planted=planted, rows=5000, chunk_rows=1500, row_group_rows=256, file_rows=1024, progress=False))
    return out


def assert_same(a, b) -> None:
    assert a.fields == b.fields and a.single_fields == b.single_fields and a.bag_fields == b.bag_fields
    assert torch.equal(a.single, b.single) and torch.equal(a.label, b.label)
    for x, y in zip(a.bags, b.bags):
        assert torch.equal(x.values, y.values) and torch.equal(x.weights, y.weights)


def test_table_and_numpy_dict_give_the_same_batch(dataset):
    schema = load_schema(dataset)
    table = pq.read_table(split_files(dataset, "train")[0])
    from_table = batch_from_table(schema, table)
    assert from_table.single.dtype == from_table.bags[0].values.dtype == torch.int32  # as stored: no widening pass
    ray_style = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    assert ray_style["i2"].dtype == object  # ragged lists, as Ray Data hands them out
    assert_same(from_table, batch_from_numpy(schema, ray_style))
    bag = from_table.bags[0]
    lengths = (bag.weights > 0).sum(1)
    assert bool((lengths >= 1).all()) and bool(torch.allclose(bag.weights.sum(1), torch.ones(len(from_table))))
    assert bool(((bag.values == 0) == (bag.weights == 0)).all())  # padding only where weights are 0


def test_context_only_batches(dataset):
    schema = load_schema(dataset)
    table = pq.read_table(split_files(dataset, "valid")[0], columns=columns_for(schema, schema.context_fields))
    batch = batch_from_table(schema, table, schema.context_fields)
    assert batch.fields == schema.context_fields and batch.bags == ()
    assert torch.equal(batch.single, load_split(dataset, "valid").select(schema, schema.context_fields).single[: len(batch)])


def test_iter_batches_in_order_equals_load_split(dataset):
    whole = load_split(dataset, "train")
    batches = list(iter_batches(dataset, "train", 300))
    assert [len(b) for b in batches[:-1]] == [300] * (len(batches) - 1)
    assert_same(concat_batches(batches), whole)
    assert sum(len(b) for b in iter_batches(dataset, "train", 300, drop_last=True)) == len(whole) // 300 * 300


def test_shuffled_batches_cover_every_row_once(dataset):
    in_order = load_split(dataset, "train").single[:, 0].tolist()

    def first_columns(seed: int) -> list[int]:
        tables = iter_tables(dataset, "train", 128, columns=["c0"], shuffle=True, seed=seed, shuffle_buffer_rows=700)
        return [v for table in tables for v in table["c0"].to_pylist()]

    shuffled = first_columns(0)
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    assert shuffled == first_columns(0) and shuffled != first_columns(1)


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no schema.json"):
        load_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        split_files(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split"):
        split_files(tmp_path, "dev")


def test_padded_numpy_lists_are_accepted(dataset):
    schema = load_schema(dataset)
    table = pq.read_table(split_files(dataset, "test")[0])
    data = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    expected = batch_from_numpy(schema, data)
    bag = expected.bags[0]
    data["i1"], data["i1__weights"] = bag.values.numpy(), bag.weights.numpy()  # already 2-D
    assert np.array_equal(batch_from_numpy(schema, data).bags[0].values.numpy(), bag.values.numpy())


def test_index_ranges_are_checked_once_from_the_parquet_footers(dataset, tmp_path):
    import shutil

    import pyarrow as pa

    schema = load_schema(dataset)
    check_index_ranges(dataset, schema)  # as written: inside every vocabulary
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    path = split_files(broken, "valid")[0]
    table = pq.read_table(path)
    bag = schema.fields[-1]  # a multi-valued field: its list values' statistics
    values = table[bag.name].combine_chunks()
    flat = values.flatten().to_numpy().copy()
    flat[-1] = bag.vocab_size
    table = table.set_column(table.schema.get_field_index(bag.name), bag.name, pa.ListArray.from_arrays(values.offsets, pa.array(flat, pa.int32())))
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=rf"field '{bag.name}' has indices outside \[0, {bag.vocab_size}\): min \d+, max {bag.vocab_size}"):
        check_index_ranges(broken, schema)
    with pytest.raises(ValueError, match="indices outside"):  # what the unchecked path would have let through
        batch_from_table(schema, table)
    assert int(batch_from_table(schema, table, checked=True).bags[-1].values.max()) == bag.vocab_size
