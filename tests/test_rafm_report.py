import json
from pathlib import Path

import numpy as np
import pytest

from model_zoo.batch import FeatureBatch
from model_zoo.schema import FeatureSchema, FieldSpec, Kind
from rayjobs.cli import main
from rayjobs.rafm_report import feature_counts

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance")


def write_tiny_movielens(directory: Path, rows: int = 6000, seed: int = 0) -> Path:
    """MovieLens-1M-format files whose ratings follow user and movie effects plus noise."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    users, movies = 80, 60
    (directory / "users.dat").write_text(
        "".join(f"{u}::{'MF'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 7}::{10000 + u % 13}\n" for u in range(1, users + 1)),
        encoding="latin-1",
    )
    (directory / "movies.dat").write_text(
        "".join(f"{m}::Film {m} (1995)::{'|'.join(GENRES[g] for g in {m % 5, (m * 3) % 5})}\n" for m in range(1, movies + 1)),
        encoding="latin-1",
    )
    user_effect, movie_effect = rng.normal(0, 0.7, users + 1), rng.normal(0, 0.7, movies + 1)
    user_ids = rng.integers(1, users + 1, rows)
    movie_ids = np.minimum(rng.zipf(1.3, rows), movies)  # popular movies reach the top level
    ratings = np.clip(np.rint(3.5 + user_effect[user_ids] + movie_effect[movie_ids] + rng.normal(0, 0.5, rows)), 1, 5)
    (directory / "ratings.dat").write_text(
        "".join(f"{u}::{m}::{int(r)}::{978300760 + 3600 * n}\n" for n, (u, m, r) in enumerate(zip(user_ids, movie_ids, ratings))),
        encoding="latin-1",
    )
    return directory


def test_feature_counts_cover_single_fields_and_bag_values():
    schema = FeatureSchema(
        fields=(FieldSpec(name="a", role="context", vocab_size=4), FieldSpec(name="g", role="item", kind=Kind.multi, vocab_size=5))
    )
    batch = FeatureBatch.from_columns(schema, {"a": [2, 2, 3], "g": [[2, 3], [4], [2]]})
    assert feature_counts(schema, batch).tolist() == [0, 0, 2, 1, 0, 0, 2, 1, 1]


def test_rafm_report_on_a_small_prepared_dataset(tmp_path):
    raw = write_tiny_movielens(tmp_path / "raw")
    data = tmp_path / "ml"
    assert main(["prepare", "--dataset", "movielens1m", "--input", str(raw), "--out", str(data), "--no-progress"]) == 0
    out = tmp_path / "report" / "rafm.json"
    argv = ["experiment", "rafm", "--data", str(data), "--json", str(out), "--ranks", "2", "8", "--thresholds", "300",
            "--epochs", "4", "--repeats", "3", "--items", "40"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    fm_small, fm_large, rafm = report["records"]
    assert [r["model"] for r in report["records"]] == ["fm k=2", "fm k=8", "rafm k=2/8"]
    assert report["features_per_level"][0] > 0 and report["features_per_level"][1] > 0
    # RaFM keeps rank-8 vectors only for frequent features: smaller than the rank-8 FM, bigger than rank 2
    assert fm_small["parameters"] < rafm["parameters"] < fm_large["parameters"]
    assert fm_small["entries_per_item"] <= rafm["entries_per_item"] <= fm_large["entries_per_item"]
    assert rafm["scoring_us_per_item"] > 0 and report["scored_items"] == 40
    assert rafm["test"]["rmse"] < report["constant_baseline"]["rmse"]


def test_rafm_report_needs_a_prepared_dataset(tmp_path, capsys):
    assert main(["experiment", "rafm", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"rankstream experiment: error: no prepared dataset at {tmp_path} (schema.json missing); run `rankstream prepare` first"
    )
    with pytest.raises(SystemExit):
        main(["experiment", "rafm"])  # --data is required
