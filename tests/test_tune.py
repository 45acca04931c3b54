"""`rankstream tune` on a real local Ray: the sweep writes its table, Pareto front, plot
and best bundle; the front is exactly the non-dominated set; the bundle reproduces its
reported validation metric."""

import itertools
import json
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from model_zoo.bundle import load_bundle
from model_zoo.data.reader import load_split
from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.synthetic import PlantedConfig
from model_zoo.training import evaluate, minibatches
from rayjobs.cli import main
from rayjobs.cluster import init_private_ray
from rayjobs.tune import pareto_front


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    init_private_ray(num_cpus=2, include_dashboard=False, _temp_dir=f"/tmp/rs-tune-{free_port()}")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def planted_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("planted")
    planted = PlantedConfig(context_fields=4, item_fields=4, multi_fields=1, vocab_size=30, structure="dplr", rank=2, seed=1)
    write_synthetic(directory, SynthConfig(planted=planted, rows=6000, progress=False))
    return directory


def dominated_brute_force(costs, scores, higher_is_better):
    sign = 1 if higher_is_better else -1
    return [
        any(
            costs[j] <= costs[i] and sign * scores[j] >= sign * scores[i]
            and (costs[j] < costs[i] or sign * scores[j] > sign * scores[i])
            for j in range(len(costs))
        )
        for i in range(len(costs))
    ]  # fmt: skip


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_pareto_front_is_exactly_the_non_dominated_points(higher_is_better):
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 15))
        # few distinct values: ties in cost, in score and in both
        costs = rng.integers(0, 5, n).astype(float).tolist()
        scores = rng.integers(0, 5, n).astype(float).tolist()
        front = pareto_front(costs, scores, higher_is_better)
        assert front == [not d for d in dominated_brute_force(costs, scores, higher_is_better)], (costs, scores)


def test_pareto_front_keeps_duplicates_and_orders_by_direction():
    assert pareto_front([1.0, 1.0, 2.0], [0.5, 0.5, 0.6], True) == [True, True, True]
    assert pareto_front([1.0, 2.0], [0.5, 0.6], False) == [True, False]  # lower is better: the cheaper one wins


def test_tune_writes_table_front_plot_and_a_bundle_that_reproduces_its_metric(local_ray, planted_data, tmp_path):
    out = tmp_path / "sweep"
    code = main([
        "tune", "--data", str(planted_data), "--out", str(out), "--ranks", "1", "2", "--dims", "4", "8",
        "--lr-min", "0.02", "--lr-max", "0.2", "--l2-min", "0.05", "--l2-max", "0.5", "--epochs", "2", "--items", "200",
    ])  # fmt: skip
    assert code == 0
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == 4  # rank × dim, one learning rate each
    assert {(t["dim"], t["rank"]) for t in trials} == set(itertools.product([4, 8], [1, 2]))
    for trial in trials:
        assert trial["kind"] == "dplr_fwfm" and 0.02 <= trial["learning_rate"] <= 0.2 and 0.05 <= trial["l2"] <= 0.5
        assert 1 <= trial["best_epoch"] <= trial["epochs_run"] <= 2
        assert trial["scoring_us_per_item"] > 0 and trial["parameters"] > 0
        assert 0.5 < trial["valid_auc"] <= 1.0 and 0 < trial["test_logloss"]
    # Parameters: (V k + V) embeddings and linear weights + bias + U (ρ × m) + e (ρ).
    vocab, fields = 8 * 30, 8
    by_config = {(t["dim"], t["rank"]): t for t in trials}
    for (dim, rank), trial in by_config.items():
        assert trial["parameters"] == vocab * dim + vocab + 1 + rank * fields + rank

    costs = [t["scoring_us_per_item"] for t in trials]
    aucs = [t["valid_auc"] for t in trials]
    expected = [not d for d in dominated_brute_force(costs, aucs, True)]
    assert [t["pareto"] for t in trials] == expected
    front = pq.read_table(out / "pareto.parquet").to_pylist()
    assert sorted(t["trial_id"] for t in front) == sorted(t["trial_id"] for t in trials if t["pareto"])
    assert (out / "pareto.png").stat().st_size > 10_000
    assert (out / "trials.md").read_text().count("\n") == 2 + len(trials)

    best = max(trials, key=lambda t: t["valid_auc"])
    bundle = load_bundle(out / "best_bundle")
    assert bundle.config["model"]["rank"] == best["rank"] and bundle.config["model"]["dim"] == best["dim"]
    assert bundle.vocabulary is not None and set(bundle.vocabulary.fields) == set(bundle.schema.names)
    valid = evaluate(bundle.model, minibatches(load_split(planted_data, "valid"), 4096))
    assert valid["auc"] == pytest.approx(best["valid_auc"], abs=1e-6)
    assert valid["auc"] == pytest.approx(bundle.metrics["valid"]["auc"], abs=1e-6)
    test = evaluate(bundle.model, minibatches(load_split(planted_data, "test"), 4096))
    assert test["logloss"] == pytest.approx(bundle.metrics["test"]["logloss"], rel=1e-5)
    assert json.loads((out / "summary.json").read_text())["best"]["trial_id"] == best["trial_id"]
