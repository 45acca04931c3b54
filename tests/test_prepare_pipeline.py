"""``prepare`` end to end on small files written here: vocabulary from the training
split only, missing/rare indices, split proportions and seeds, stats.json, parquet
layout, and the command line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from model_zoo.data.criteo import CATEGORY_FIELDS, INTEGER_FIELDS, CriteoSource
from model_zoo.data.layout import SPLITS, split_files
from model_zoo.data.movielens import MovieLensSource
from model_zoo.data.prepare import PrepareConfig, prepare_dataset
from model_zoo.data.reader import load_split
from model_zoo.data.splits import SplitAssigner
from model_zoo.schema import MISSING_INDEX, RARE_INDEX, FeatureSchema, Kind
from model_zoo.vocab import Vocabulary
from rayjobs.cli import main
from test_data_formats import criteo_line, write_movielens

ROWS = 3000
SEED = 7


def criteo_rows(seed: int = SEED) -> list[tuple[str, list[str], list[str]]]:
    """Rows where C1 says which split the row lands in ("train"/"eval") and C2 is
    "common" (frequent), "seldom" (4 training rows) or empty."""
    splits = SplitAssigner((0.8, 0.1, 0.1), seed).assign(np.arange(ROWS, dtype=np.uint64))
    rng = np.random.default_rng(0)
    rows, seldom = [], 0
    for row, split in enumerate(splits):
        integers = [str(v) for v in rng.integers(-1, 1000, 13)]
        integers[0] = "" if row % 5 == 0 else integers[0]
        c2 = "common"
        if row % 11 == 0:
            c2 = ""
        elif split == 0 and seldom < 4:
            c2, seldom = "seldom", seldom + 1
        categories = ["train" if split == 0 else "eval", c2, *[f"{v:x}" for v in rng.integers(0, 30, 24)]]
        rows.append((str(row % 2), integers, categories))
    return rows


def write_criteo(path: Path, seed: int = SEED) -> list[tuple[str, list[str], list[str]]]:
    rows = criteo_rows(seed)
    path.write_text("".join(criteo_line(*row) for row in rows))
    return rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, list]:
    folder = tmp_path_factory.mktemp("criteo")
    rows = write_criteo(folder / "train.txt")
    prepare_dataset(CriteoSource([folder / "train.txt"]), folder / "out", PrepareConfig(min_count=5, seed=SEED))
    return folder / "out", rows


def test_layout_and_schema(prepared):
    out, _ = prepared
    schema = FeatureSchema.load(out / "schema.json")
    assert schema.names == (*INTEGER_FIELDS, *CATEGORY_FIELDS) and schema.label == "label"
    parquet = pq.read_schema(split_files(out, "train")[0])
    assert parquet.names == [*schema.names, "label"]
    assert all(str(parquet.field(n).type) == "int32" for n in schema.names)
    vocabulary = Vocabulary.load(out / "vocab")
    assert all(vocabulary[n].size == schema.field(n).vocab_size for n in schema.names)
    assert vocabulary["I1"].transform == "log_square" and vocabulary["C1"].transform == "none"


def test_vocabulary_comes_from_the_training_split_only(prepared):
    out, _ = prepared
    vocabulary = Vocabulary.load(out / "vocab")
    assert vocabulary["C1"].tokens == ["train"]  # "eval" only occurs outside training
    assert "common" in vocabulary["C2"].tokens and "seldom" not in vocabulary["C2"].tokens
    valid = load_split(out, "valid")
    c1 = valid.single[:, valid.single_fields.index("C1")]
    assert len(valid) > 0 and bool((c1 == RARE_INDEX).all())
    train = load_split(out, "train")
    assert bool((train.single[:, train.single_fields.index("C1")] == 2).all())


def test_indices_equal_the_serving_lookup_of_the_raw_values(prepared):
    """What serving computes from raw values through vocab/ equals what training reads."""
    out, rows = prepared
    vocabulary = Vocabulary.load(out / "vocab")
    splits = SplitAssigner((0.8, 0.1, 0.1), SEED).assign(np.arange(ROWS, dtype=np.uint64))
    for number, split in enumerate(SPLITS):
        batch = load_split(out, split)
        chosen = [row for row, s in zip(rows, splits) if s == number]
        assert len(batch) == len(chosen)
        assert batch.label.tolist() == [float(label) for label, _, _ in chosen]
        for column, name in enumerate(batch.single_fields):
            position = (INTEGER_FIELDS + CATEGORY_FIELDS).index(name)
            raw = [(integers + categories)[position] for _, integers, categories in chosen]
            assert batch.single[:, column].tolist() == vocabulary[name].lookup(raw).tolist(), name


def test_missing_and_rare_indices_and_stats(prepared):
    out, rows = prepared
    stats = json.loads((out / "stats.json").read_text())
    train = load_split(out, "train")
    c2 = train.single[:, train.single_fields.index("C2")]
    i1 = train.single[:, train.single_fields.index("I1")]
    assert int((c2 == RARE_INDEX).sum()) == 4  # the "seldom" rows: 4 < min-count 5
    assert float((c2 == MISSING_INDEX).float().mean()) == pytest.approx(stats["missing_rate"]["train"]["C2"])
    assert float((i1 == MISSING_INDEX).float().mean()) == pytest.approx(0.2, abs=0.03)
    assert stats["rare_rate"]["valid"]["C1"] == 1.0 and stats["rare_rate"]["train"]["C1"] == 0.0
    assert sum(stats["rows"].values()) == ROWS
    assert stats["rows"]["train"] == len(train)
    assert stats["label_mean"]["train"] == pytest.approx(float(train.label.mean()))
    assert stats["vocab_size"]["C1"] == 3 and stats["malformed"] == {"total": 0, "by_reason": {}}
    assert stats["min_count"] == 5 and stats["rows_per_second"] > 0


def test_split_proportions_and_seeds():
    ids = np.arange(200_000, dtype=np.uint64)
    splits = SplitAssigner((0.8, 0.1, 0.1), 3).assign(ids)
    assert np.bincount(splits, minlength=3) / len(ids) == pytest.approx([0.8, 0.1, 0.1], abs=0.005)
    assert np.array_equal(splits, SplitAssigner((0.8, 0.1, 0.1), 3).assign(ids))
    assert not np.array_equal(splits, SplitAssigner((0.8, 0.1, 0.1), 4).assign(ids))
    # A row's split depends on its number only, never on the chunk it arrives in.
    assert np.array_equal(splits[1000:1010], SplitAssigner((0.8, 0.1, 0.1), 3).assign(ids[1000:1010]))
    assert PrepareConfig(split=[0.7, 0.2, 0.1]).split == (0.7, 0.2, 0.1)
    for bad in ([0.8, 0.1], [0.5, 0.5, 0.5], ["a", "b", "c"], [0, 0.5, 0.5]):
        with pytest.raises(ValueError):
            PrepareConfig(split=bad)


def test_same_seed_same_files_other_seed_other_split(tmp_path):
    write_criteo(tmp_path / "train.txt")
    tables = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        source = CriteoSource([tmp_path / "train.txt"], block_bytes=64 << 10 if name == "b" else 32 << 20)
        prepare_dataset(source, tmp_path / name, PrepareConfig(min_count=2, seed=seed))
        tables[name] = pq.read_table(split_files(tmp_path / name, "valid")[0])
    assert tables["a"].equals(tables["b"])  # chunking does not matter either
    assert not tables["a"].equals(tables["c"])


def test_gzipped_input_gives_the_same_dataset(tmp_path):
    write_criteo(tmp_path / "train.txt")
    (tmp_path / "train.txt.gz").write_bytes(gzip.compress((tmp_path / "train.txt").read_bytes()))
    for name in ("train.txt", "train.txt.gz"):
        prepare_dataset(CriteoSource([tmp_path / name]), tmp_path / f"out-{name}", PrepareConfig(min_count=2))
    plain, packed = (pq.read_table(split_files(tmp_path / f"out-{n}", "train")[0]) for n in ("train.txt", "train.txt.gz"))
    assert plain.num_rows > 0 and plain.equals(packed)


def test_row_groups_and_file_rolling(tmp_path):
    write_criteo(tmp_path / "train.txt")
    config = PrepareConfig(min_count=2, seed=SEED, row_group_rows=500, file_rows=1000)
    stats = prepare_dataset(CriteoSource([tmp_path / "train.txt"], block_bytes=64 << 10), tmp_path / "out", config)
    files = split_files(tmp_path / "out", "train")
    assert len(files) == -(-stats["rows"]["train"] // 1000)
    groups = [pq.ParquetFile(f).metadata.row_group(g).num_rows for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
    assert groups[:-1] == [500] * (len(groups) - 1) and 0 < groups[-1] <= 500
    assert sum(groups) == stats["rows"]["train"]


def test_malformed_lines_are_counted_in_stats(tmp_path):
    rows = criteo_rows()
    lines = [criteo_line(*row) for row in rows]
    lines[10] = "1\t2\n"
    lines[20] = lines[20].replace("\t", "\tx", 1)  # a non-numeric I1
    (tmp_path / "train.txt").write_text("".join(lines))
    stats = prepare_dataset(CriteoSource([tmp_path / "train.txt"]), tmp_path / "out", PrepareConfig(seed=SEED))
    assert stats["malformed"] == {"total": 2, "by_reason": {"non_numeric_integer": 1, "wrong_column_count": 1}}
    assert sum(stats["rows"].values()) == ROWS - 2


def test_movielens_bags_round_trip(tmp_path):
    source = MovieLensSource([write_movielens(tmp_path / "ml")])
    prepare_dataset(source, tmp_path / "out", PrepareConfig(min_count=1, split=(1.0, 0.0, 0.0)))
    schema = FeatureSchema.load(tmp_path / "out" / "schema.json")
    assert schema.field("genres").kind == Kind.multi and schema.num_fields == 11
    batch = load_split(tmp_path / "out", "train")
    genres = batch.bags[batch.bag_fields.index("genres")]
    vocabulary = Vocabulary.load(tmp_path / "out" / "vocab")["genres"]
    assert genres.values.tolist() == [
        vocabulary.lookup(["Animation", "Children's", "Comedy"]).tolist(),
        [vocabulary.lookup_one("Drama"), 0, 0],
        [MISSING_INDEX, 0, 0],
    ]
    np.testing.assert_allclose(genres.weights.numpy(), [[1 / 3] * 3, [1, 0, 0], [1, 0, 0]], rtol=1e-6)
    assert batch.label.tolist() == [5.0, 3.0, 4.0]
    assert len(load_split(tmp_path / "out", "test")) == 0  # an empty split still loads


def test_cli_prepare_writes_and_summarises(tmp_path, capsys):
    write_criteo(tmp_path / "train.txt")
    code = main([
        "prepare", "--dataset", "criteo", "--input", str(tmp_path / "train.txt"), "--out", str(tmp_path / "out"),
        "--min-count", "3", "--split", "0.6,0.2,0.2", "--seed", "5", "--context-fields", "I1,C1", "C2", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    assert "3,000 rows at" in capsys.readouterr().out
    schema = FeatureSchema.load(tmp_path / "out" / "schema.json")
    assert schema.context_fields == ("I1", "C1", "C2")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows"]["train"] / ROWS == pytest.approx(0.6, abs=0.04) and stats["seed"] == 5


def test_cli_prepare_csv_from_flags(tmp_path, capsys):
    lines = ["clicked,user,country,ad,topics,price"] + [
        f"{i % 2},u{i % 7},c{i % 3},a{i % 5},t{i % 4}|t{i % 6},{10 + i}" for i in range(400)
    ]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    code = main([
        "prepare", "--dataset", "csv", "--input", str(tmp_path / "log.csv"), "--out", str(tmp_path / "out"),
        "--label", "clicked", "--context-fields", "user,country", "--multi-fields", "topics",
        "--log-square-fields", "price", "--min-count", "1", "--no-progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    schema = FeatureSchema.load(tmp_path / "out" / "schema.json")
    assert schema.context_fields == ("user", "country") and schema.item_fields == ("ad", "topics", "price")
    assert schema.field("topics").kind == Kind.multi
    vocabulary = json.loads((tmp_path / "out" / "vocab" / "price.json").read_text())
    assert vocabulary["transform"] == "log_square"


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    code = main(["prepare", "--dataset", "criteo", "--input", str(missing), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and error == f"rankstream prepare: error: input not found: {missing}\n"

    write_criteo(tmp_path / "train.txt")
    args = ["prepare", "--dataset", "criteo", "--input", str(tmp_path / "train.txt"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0

    code = main(["prepare", "--dataset", "csv", "--input", str(tmp_path / "train.txt"), "--out", str(tmp_path / "o2")])
    assert code == 2 and "needs --config or --label" in capsys.readouterr().err

    (tmp_path / "garbage.txt").write_text("not\ta\tcriteo\tline\n")
    code = main(["prepare", "--dataset", "criteo", "--input", str(tmp_path / "garbage.txt"), "--out", str(tmp_path / "o3")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "no usable rows" in error and "wrong_column_count" in error

    (tmp_path / "latin1.txt").write_bytes(criteo_line("0", ["1"] * 13, ["caf\xe9"] * 26).encode("latin-1"))
    code = main(["prepare", "--dataset", "criteo", "--input", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "o4")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "invalid UTF8" in error
