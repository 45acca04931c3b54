"""`rankstream experiment baselines` end to end on small planted data: the one-hot matrix
is the model's own feature layout, the scikit-learn row always runs and scores what its
JSON says, and the peer libraries run when installed (the `baselines` extra) or are
named as missing."""

import json
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from model_zoo.data.reader import load_split
from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.metrics import task_metrics
from model_zoo.schema import Task
from model_zoo.synthetic import PlantedConfig
from model_zoo.bayes_fm import one_hot
from rayjobs.baselines import EXTRAS_HINT
from rayjobs.cli import main
from rayjobs.tune import load_splits


def planted(path, task: str, multi_fields: int = 1):
    config = PlantedConfig(context_fields=3, item_fields=3, multi_fields=multi_fields, vocab_size=20, seed=4, task=task)
    write_synthetic(path, SynthConfig(planted=config, rows=3000, progress=False))
    return path


def test_one_hot_holds_each_row_s_features_at_their_shared_vocabulary_columns(tmp_path):
    splits = load_splits(planted(tmp_path / "data", "binary"))
    batch = splits.valid.rows(torch.arange(50))
    matrix = one_hot(splits.schema, batch).toarray()
    offsets = splits.schema.offsets
    for position, name in enumerate(batch.single_fields):
        columns = batch.single[:, position].numpy() + offsets[splits.schema.index[name]]
        assert (matrix[np.arange(50), columns] == 1).all()
    (name,), (bag,) = batch.bag_fields, batch.bags
    block = matrix[:, offsets[splits.schema.index[name]] : offsets[splits.schema.index[name]] + splits.schema.field(name).vocab_size]
    assert np.allclose(block.sum(axis=1), 1.0)  # a bag's normalised weights
    assert matrix.sum(axis=1) == pytest.approx(np.full(50, len(batch.single_fields) + 1.0))


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_baselines_table_beside_rankstream_models(tmp_path, task, capsys):
    data = planted(tmp_path / "data", task)
    out = tmp_path / "out"
    code = main([
        "experiment", "baselines", "--data", str(data), "--out", str(out), "--dim", "4", "--kinds", "fm", "dplr_fwfm",
        "--ranks", "1", "--myfm-iterations", "20",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "baselines.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    linear = "logistic regression, one-hot" if task == "binary" else "ridge regression, one-hot"
    assert {"constant (train mean)", linear, "FM", "DPLR-FwFM rank 1"} <= set(rows)
    metric = "auc" if task == "binary" else "rmse"
    # Planted pairwise interactions: the linear model beats the constant, and the factorization models beat it.
    better = (lambda a, b: a > b) if task == "binary" else (lambda a, b: a < b)
    if task == "regression":
        assert better(rows[linear]["test"][metric], rows["constant (train mean)"]["test"][metric])
    assert better(rows["FM"]["test"][metric], rows[linear]["test"][metric])
    assert rows["FM"]["settings"]["epochs_run"] >= rows["FM"]["settings"]["best_epoch"] >= 1
    # The constant row is the training mean scored on test.
    train, test = load_split(data, "train"), load_split(data, "test")
    mean = float(train.label.mean())
    constant = np.full(len(test), mean if task == "regression" else np.log(mean / (1 - mean)))
    assert rows["constant (train mean)"]["test"][metric] == pytest.approx(
        task_metrics(Task(task), test.label.numpy(), constant)[metric], rel=1e-6
    )
    has_myfm, has_surprise = find_spec("myfm") is not None, find_spec("surprise") is not None
    assert any(r["library"] == "myfm" for r in report["rows"]) == has_myfm
    assert any(r["library"] == "scikit-surprise" for r in report["rows"]) == (has_surprise and task == "regression")
    assert report["missing_extras"] == [n for n, ok in (("myfm", has_myfm), ("scikit-surprise", has_surprise)) if not ok]
    if report["missing_extras"]:
        assert EXTRAS_HINT in capsys.readouterr().out
    table = (out / "baselines.md").read_text().splitlines()
    assert table[0].startswith(f"| model | library | test {metric} |") and len(table) == 2 + len(report["rows"])
