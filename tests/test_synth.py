"""``rankstream synth``: planted-model data in the prepare layout, the planted
parameters, and the oracle's metrics per split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from model_zoo.batch import FeatureBatch
from model_zoo.data.layout import load_schema
from model_zoo.data.reader import load_split
from model_zoo.data.synth import OracleMetrics, load_planted
from model_zoo.metrics import task_metrics
from model_zoo.schema import Task
from model_zoo.synthetic import PlantedModel
from model_zoo.vocab import Vocabulary
from rayjobs.cli import main


def planted_logits(planted: PlantedModel, batch: FeatureBatch) -> np.ndarray:
    """The planted FwFM's logits on prepared rows (bags averaged by their weights)."""
    vectors, linear = [], np.full(len(batch), planted.bias)
    for position, name in enumerate(planted.schema.names):
        table, weights = planted.embeddings[position], planted.linear[position]
        if name in batch.single_fields:
            index = batch.single[:, batch.single_fields.index(name)].numpy()
            vectors.append(table[index])
            linear += weights[index]
        else:
            bag = batch.bags[batch.bag_fields.index(name)]
            values, bag_weights = bag.values.numpy(), bag.weights.numpy().astype(np.float64)
            vectors.append((bag_weights[..., None] * table[values]).sum(1))
            linear += (bag_weights * weights[values]).sum(1)
    stacked = np.stack(vectors, axis=1)
    return linear + 0.5 * np.einsum("bik,ij,bjk->b", stacked, planted.interactions, stacked)


def test_synth_writes_a_loadable_layout_with_the_oracle_metric(tmp_path, capsys):
    out = tmp_path / "synth"
    code = main([
        "synth", "--structure", "dplr", "--rows", "20000", "--out", str(out), "--context-fields", "3",
        "--item-fields", "4", "--multi-fields", "1", "--vocab-size", "50", "--dim", "4", "--rank", "2",
        "--seed", "3", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    assert "oracle valid: logloss" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    schema = load_schema(out)
    assert schema.num_fields == 7 and len(schema.context_fields) == 3 and schema.task == Task.binary
    assert sum(stats["rows"].values()) == 20000 and stats["structure"] == "dplr"

    planted = load_planted(out)
    for split in ("train", "valid", "test"):
        batch = load_split(out, split)
        assert len(batch) == stats["rows"][split]
        logits = planted_logits(planted, batch)
        exact = task_metrics(Task.binary, batch.label.numpy(), logits)
        assert stats["oracle"][split]["logloss"] == pytest.approx(exact["logloss"], rel=1e-5)
        assert stats["oracle"][split]["auc"] == pytest.approx(exact["auc"], abs=1e-4)
    assert 0.6 < stats["oracle"]["valid"]["auc"] < 1.0

    vocabulary = Vocabulary.load(out / "vocab")
    assert vocabulary["c0"].lookup(["7", 2, "49", "50", ""]).tolist() == [7, 2, 49, 1, 0]
    assert vocabulary["c0"].size == schema.field("c0").vocab_size == 50


def test_regression_oracle_mse_is_the_noise(tmp_path):
    out = tmp_path / "ratings"
    assert main(["synth", "--structure", "sparse", "--rows", "30000", "--task", "regression", "--out", str(out), "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["task"] == "regression"
    for metrics in stats["oracle"].values():
        assert metrics["mse"] == pytest.approx(0.3**2, rel=0.1)  # PlantedConfig.noise = 0.3


def test_chunks_change_nothing_but_the_draws(tmp_path):
    """Streaming in chunks keeps sizes and split proportions; the same seed repeats."""
    from model_zoo.data.synth import SynthConfig, write_synthetic
    from model_zoo.synthetic import PlantedConfig

    config = SynthConfig(planted=PlantedConfig(structure="dense", seed=1), rows=10000, chunk_rows=999, progress=False)
    first = write_synthetic(tmp_path / "a", config)
    second = write_synthetic(tmp_path / "b", config)
    assert first["rows"] == second["rows"] and first["oracle"] == second["oracle"]
    assert first["rows"]["train"] / 10000 == pytest.approx(0.8, abs=0.02)


def test_streaming_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=50_000), 2)  # many exact ties
    labels = (rng.random(50_000) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    oracle = OracleMetrics(Task.binary)
    for part in np.array_split(np.arange(50_000), 7):
        oracle.add(labels[part], logits[part])
    assert oracle.result()["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-6)
    assert oracle.result()["logloss"] == pytest.approx(task_metrics(Task.binary, labels, logits)["logloss"], rel=1e-9)


def test_synth_argument_errors_exit_2(tmp_path, capsys):
    code = main(["synth", "--rows", "10", "--out", str(tmp_path / "x"), "--item-fields", "2", "--multi-fields", "3"])
    assert code == 2 and "--multi-fields cannot exceed --item-fields" in capsys.readouterr().err
