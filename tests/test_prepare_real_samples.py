"""``prepare`` on the real samples in ../shared/data (skipped when they are absent)."""

from __future__ import annotations

import json

import pytest

from model_zoo.data.reader import load_split
from model_zoo.schema import FeatureSchema, Kind, Task
from rayjobs.cli import main


def test_criteo_sample(shared_data, tmp_path, capsys):
    source = shared_data / "criteo-sample" / "train.txt"
    if not source.is_file():
        pytest.skip(f"{source} not found")
    out = tmp_path / "criteo"
    assert main(["prepare", "--dataset", "criteo", "--input", str(source), "--out", str(out), "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    schema = FeatureSchema.load(out / "schema.json")
    assert schema.num_fields == 39 and schema.task == Task.binary
    assert sum(stats["rows"].values()) == 7200 and stats["malformed"]["total"] == 0
    assert stats["rows"]["train"] == pytest.approx(0.8 * 7200, rel=0.05)
    assert 0.1 < stats["label_mean"]["train"] < 0.4
    # Values unseen in training only add to the rare rate outside training.
    assert stats["mean_rare_rate"]["valid"] >= stats["mean_rare_rate"]["train"] > 0
    assert len(load_split(out, "valid")) == stats["rows"]["valid"]


def test_movielens_sample(shared_data, tmp_path):
    folder = shared_data / "movielens-1m-sample"
    if not (folder / "ratings.dat").is_file():
        pytest.skip(f"{folder} not found")
    out = tmp_path / "movielens"
    assert main(["prepare", "--dataset", "movielens1m", "--input", str(folder), "--out", str(out), "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    schema = FeatureSchema.load(out / "schema.json")
    assert schema.num_fields == 11 and schema.task == Task.regression and schema.label == "rating"
    assert schema.field("genres").kind == Kind.multi and schema.item_fields == ("movie_id", "genres")
    assert sum(stats["rows"].values()) == 100_000 and stats["malformed"]["total"] == 0
    assert stats["vocab_size"]["gender"] == 4 and stats["vocab_size"]["age"] == 9  # 2 and 7 values + reserved
    assert stats["vocab_size"]["genres"] == 20  # 18 genres + reserved
    assert all(rate == 0 for rate in stats["missing_rate"]["train"].values())
    assert 3.4 < stats["label_mean"]["train"] < 3.8
    batch = load_split(out, "test")
    assert len(batch) == stats["rows"]["test"] and set(batch.label.unique().tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
