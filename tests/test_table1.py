"""`rankstream experiment table1` on a real local Ray: every row and column of the
paper's layout, the percentage column is its formula on the JSON's numbers, each model's
number is its validation-best learning rate's test metric, and the pruned models really
are the selected FwFM cut to ρ(m+1) entries, scored as reported."""

import json
import socket
from pathlib import Path

import pytest
import ray
from safetensors.torch import load_file

from model_zoo.data.layout import load_schema
from model_zoo.data.reader import load_split
from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.models.fwfm import FwFM
from model_zoo.models.pruned_fwfm import PrunedFwFM, kept_entry_count
from model_zoo.schema import Task
from model_zoo.synthetic import PlantedConfig
from model_zoo.training import evaluate, minibatches
from rayjobs.cli import main
from rayjobs.cluster import init_private_ray
from rayjobs.table1 import markdown, table_rows
from rayjobs.tune import WEIGHTS_FILE, TrialRecord


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def table1(tmp_path_factory):
    """One real run: 4+4 planted fields (one multi-valued), k = 4, ranks 1 and 2, two learning rates."""
    root = tmp_path_factory.mktemp("table1")
    data = root / "planted"
    planted = PlantedConfig(context_fields=4, item_fields=4, multi_fields=1, vocab_size=30, structure="sparse", seed=2)
    write_synthetic(data, SynthConfig(planted=planted, rows=6000, progress=False))
    init_private_ray(num_cpus=2, include_dashboard=False, _temp_dir=f"/tmp/rs-t1-{free_port()}")
    try:
        code = main([
            "experiment", "table1", "--data", str(data), "--out", str(root / "out"), "--dims", "4",
            "--ranks", "1", "2", "--lr-grid", "0.05", "0.2", "--l2-grid", "0.3", "--epochs", "2", "--name", "Planted",
        ])  # fmt: skip
    finally:
        ray.shutdown()
    assert code == 0
    return data, root / "out", json.loads((root / "out" / "table1.json").read_text())


def test_every_row_and_column_and_the_percentage_formula(table1):
    _, out, report = table1
    rows = report["rows"]
    assert [(r["metric"], r["rank"]) for r in rows] == [("auc", 1), ("auc", 2), ("logloss", 1), ("logloss", 2)]
    pairs = 8 * 7 // 2
    for row in rows:
        assert row["kept_entries"] == row["rank"] * 9
        assert row["pruned_sparsity_pct"] == pytest.approx(100 * row["rank"] * 9 / pairs)
        values = row["dims"]["4"]
        assert set(values) == {"fm", "fwfm", "dplr", "tensorfm", "pruned", "dplr_vs_pruned_pct", "pruned_as_cut",
                               "dplr_vs_pruned_as_cut_pct"}
        sign = 1 if row["metric"] == "auc" else -1  # positive = DPLR better
        for pruned in ("pruned", "pruned_as_cut"):
            expected = sign * 100 * (values["dplr"] - values[pruned]) / values[pruned]
            assert values[f"dplr_vs_{pruned}_pct"] == pytest.approx(expected)
    for metric in ("auc", "logloss"):  # FM and FwFM are replicated across ranks, as in the paper
        same = [r["dims"]["4"] for r in rows if r["metric"] == metric]
        assert same[0]["fm"] == same[1]["fm"] and same[0]["fwfm"] == same[1]["fwfm"]
    lines = (out / "table1.md").read_text().splitlines()
    assert lines[0] == ("| Dataset (Metric) | Rank | Pruned sparsity | FM k=4 | FwFM k=4 | DPLR k=4 | tensorFM k=4 "
                        "| Pruned k=4 | DPLR vs Pruned (%) k=4 |")  # fmt: skip
    # then a blank line, a caption, a blank line and the same table with the pruned models as cut
    assert lines[2 + len(rows)] == "" and lines[2 + len(rows) + 3] == lines[0]
    # then the selected trial of each of the 8 cells (fm, fwfm, dplr ×2, tensorfm ×2, pruned ×2) with its epochs
    selection = lines[2 * (2 + len(rows)) + 3 :]
    assert selection[:3] == ["", "The selected trial of each cell:", ""]
    assert selection[3].startswith("| model | k | rank | lr | l2 | epochs trained | best epoch |")
    assert len(selection) == 5 + 8
    for record in report["selected"]:
        assert record["l2"] == 0.3 and 1 <= record["epochs_run"] <= 2
        assert record["hit_epoch_cap"] == (record["epochs_run"] == 2 and record["best_epoch"] == 2)
    assert lines[2].startswith("| Planted (AUC) | 1 | 32.1% |") and lines[4].startswith("| Planted (LogLoss) | 1 |")
    # fm, fwfm, dplr ×2 ranks, tensorfm ×2 CP ranks, pruned ×2 ranks; × 2 learning rates
    assert len(report["trials"]) == (2 + 2 + 2 + 2) * 2


def test_each_number_is_the_validation_best_learning_rate_at_its_test_metric(table1):
    _, _, report = table1
    trials = report["trials"]
    for row in report["rows"]:
        for column, kind, rank in [("fm", "fm", None), ("fwfm", "fwfm", None), ("dplr", "dplr_fwfm", row["rank"]),
                                   ("tensorfm", "tensorfm", row["rank"]), ("pruned", "pruned_fwfm", row["rank"])]:  # fmt: skip
            candidates = [t for t in trials if t["kind"] == kind and t["rank"] == rank and t["dim"] == 4]
            assert sorted(t["learning_rate"] for t in candidates) == [0.05, 0.2]
            chosen = max(candidates, key=lambda t: t["valid"]["auc"])
            assert row["dims"]["4"][column] == chosen["test"][row["metric"]]


def test_pruned_models_cut_the_selected_fwfm_and_score_as_reported(table1):
    data, _, report = table1
    selected = {(t["kind"], t["rank"]): t for t in report["selected"]}
    fwfm = load_file(str(Path(selected[("fwfm", None)]["checkpoint"]) / WEIGHTS_FILE))
    test = load_split(data, "test")
    for rank in (1, 2):
        record = selected[("pruned_fwfm", rank)]
        state = load_file(str(Path(record["checkpoint"]) / WEIGHTS_FILE))
        kept = state["kept"]
        assert int(kept.sum()) == kept_entry_count(8, rank)
        # the kept entries are the FwFM's largest |R_ij| (fine-tuning moves values, never the mask)
        assert set(fwfm["interaction_weights"].abs().topk(int(kept.sum())).indices.tolist()) == set(
            kept.nonzero().squeeze(1).tolist()
        )
        embeddings = fwfm["embedding.vectors.weight"].numel() + fwfm["embedding.linear.weight"].numel()
        assert record["parameters"] == embeddings + 1 + int(kept.sum())  # + bias
        model = PrunedFwFM(load_schema(data), 4, rank=rank)
        model.load_state_dict(state)
        assert evaluate(model, minibatches(test, 4096))["auc"] == pytest.approx(record["test"]["auc"], abs=1e-6)
        full = FwFM(load_schema(data), 4)
        full.load_state_dict(fwfm)
        as_cut = evaluate(PrunedFwFM.from_fwfm(full, rank), minibatches(test, 4096))
        assert as_cut["auc"] == pytest.approx(record["initial_test"]["auc"], abs=1e-6)


def test_regression_rows_report_mse_and_rmse_with_lower_is_better():
    def record(kind, rank, mse):
        return TrialRecord(
            trial_id=f"{kind}{rank}", kind=kind, dim=8, rank=rank, learning_rate=0.1, l2=0.3, epochs_run=1, best_epoch=1,
            valid={"mse": mse}, test={"mse": mse, "rmse": mse**0.5}, parameters=1, checkpoint=None,
        )  # fmt: skip

    selected = {("fm", 8, None): record("fm", None, 0.80), ("fwfm", 8, None): record("fwfm", None, 0.78),
                ("dplr_fwfm", 8, 1): record("dplr_fwfm", 1, 0.76), ("tensorfm", 8, 1): record("tensorfm", 1, 0.77),
                ("pruned_fwfm", 8, 1): record("pruned_fwfm", 1, 0.80)}  # fmt: skip
    rows = table_rows(selected, Task.regression, 11, [8], [1])
    assert [r["metric"] for r in rows] == ["mse", "rmse"]
    assert rows[0]["dims"]["8"]["dplr_vs_pruned_pct"] == pytest.approx(5.0)  # (0.80 − 0.76) / 0.80
    assert rows[0]["pruned_sparsity_pct"] == pytest.approx(100 * 12 / 55)
    table = markdown("MovieLens", rows, [8])
    assert "| MovieLens (MSE) | 1 | 21.8% | 0.8000 | 0.7800 | 0.7600 | 0.7700 | 0.8000 | 5.00% |" in table
    assert "| MovieLens (RMSE) | 1 |" in table
