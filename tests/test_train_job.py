"""`rankstream train` on a real local Ray: 2 workers (sharded embedding exchange) learn planted data, the
validation metric is the whole split's (equal to single-process evaluation), a killed
worker resumes from the latest checkpoint (also on another number of workers), and the job runs under `ray job submit`."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ray.train import TrainingFailedError

from model_zoo.bundle import load_bundle
from model_zoo.data.reader import iter_batches
from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.model_config import DPLRFwFMConfig, TensorFMConfig
from model_zoo.synthetic import PlantedConfig
from model_zoo.training import TrainConfig, evaluate
from rayjobs.cli import main
from rayjobs.cluster import cluster_down, cluster_up, init_private_ray, ray_environment
from rayjobs.train import CRASH_ENV, TrainJobConfig, run_training

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("planted") / "data"
    config = SynthConfig(
        planted=PlantedConfig(structure="dplr", rank=2, context_fields=4, item_fields=4, vocab_size=20, seed=5),
        rows=60_000, row_group_rows=4_000, progress=False,
    )  # fmt: skip
    return out, write_synthetic(out, config)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    init_private_ray(num_cpus=2, include_dashboard=False, _temp_dir=f"/tmp/rs-train-{free_port()}")
    yield
    ray.shutdown()


def job(data: Path, tmp_path: Path, **train) -> TrainJobConfig:
    return TrainJobConfig(
        data=data, out=tmp_path / "bundle", model=DPLRFwFMConfig(dim=8, rank=2), workers=2, cpus_per_worker=0.5,
        storage_path=tmp_path / "runs", max_failures=1,
        # l2=0: these few-epoch checks were sized for the unregularised loss.
        train=TrainConfig(batch_size=256, learning_rate=0.2, l2=0.0, **train),
    )  # fmt: skip


def test_two_workers_learn_and_the_bundle_holds_whole_split_metrics(planted, local_ray, tmp_path):
    data, stats = planted
    path = run_training(job(data, tmp_path, epochs=3, patience=3))
    bundle = load_bundle(path)
    metrics = bundle.metrics
    oracle = stats["oracle"]["valid"]["auc"]
    assert metrics["valid"]["auc"] > 0.75
    assert metrics["valid"]["auc"] > oracle - 0.05, (metrics["valid"], oracle)
    assert [record["epoch"] for record in metrics["history"]] == [0, 1, 2]
    assert metrics["attempt_start_epochs"] == [0]
    # Global metrics: every row of the split, equal to one process evaluating the same weights.
    for split in ("valid", "test"):
        single = evaluate(bundle.model, iter_batches(data, split, 4096))
        assert metrics[split]["rows"] == stats["rows"][split]
        assert metrics[split]["auc"] == pytest.approx(single["auc"], abs=1e-6)
        assert metrics[split]["logloss"] == pytest.approx(single["logloss"], rel=1e-5)
    # The bundle is the best epoch's weights, with the curves and the collapse diagnostics.
    best = metrics["history"][metrics["best_epoch"]]["valid"]
    assert best == metrics["valid"]
    assert set(metrics["information_abundance"]["per_field"]) == set(bundle.schema.names)
    assert all(1.0 <= ia <= 8.0 for ia in metrics["information_abundance"]["per_field"].values())
    assert (path / "training_curves.png").stat().st_size > 0
    assert (path / "information_abundance.png").stat().st_size > 0
    assert (path / "vocab").is_dir()
    assert bundle.config["train"]["workers"] == 2


def test_a_killed_worker_resumes_from_the_latest_checkpoint(planted, local_ray, tmp_path, monkeypatch):
    data, _ = planted
    marker = tmp_path / "crashed.txt"
    monkeypatch.setenv(CRASH_ENV, f"1:{marker}")
    path = run_training(job(data, tmp_path, epochs=2, patience=5))
    assert marker.read_text() == "worker 1 exited in epoch 1\n"
    metrics = json.loads((path / "metrics.json").read_text())
    # The restarted attempt began at the epoch after the last checkpoint, not at 0.
    assert metrics["attempt_start_epochs"] == [0, 1]
    assert [record["epoch"] for record in metrics["history"]] == [0, 1]
    assert metrics["test"]["rows"] > 0
    load_bundle(path)


def test_a_run_resumes_on_a_different_number_of_workers(planted, local_ray, tmp_path, monkeypatch):
    """Checkpoints hold whole tables (not one worker's shard): 2 workers stop in epoch 1,
    the same run resumes on 1 worker from epoch 0's checkpoint and learns on."""
    data, _ = planted
    marker = tmp_path / "crashed.txt"
    monkeypatch.setenv(CRASH_ENV, f"1:{marker}")
    first = job(data, tmp_path, epochs=3, patience=5).model_copy(update={"run_name": "resized", "max_failures": 0})
    with pytest.raises(TrainingFailedError):
        run_training(first)
    monkeypatch.delenv(CRASH_ENV)
    path = run_training(first.model_copy(update={"workers": 1}))
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["attempt_start_epochs"] == [0, 1]
    assert [record["epoch"] for record in metrics["history"]] == [0, 1, 2]
    assert metrics["history"][1]["valid"]["auc"] > metrics["history"][0]["valid"]["auc"] - 0.01
    assert metrics["valid"]["auc"] > 0.75
    assert load_bundle(path).config["train"]["workers"] == 1


def test_ray_job_submission_writes_a_bundle(planted, tmp_path):
    data, _ = planted
    temp_dir = f"/tmp/rs-trainjob-{free_port()}"
    try:
        cluster = cluster_up(num_cpus=2, port=free_port(), dashboard_port=free_port(), temp_dir=temp_dir)
        out = tmp_path / "bundle"
        command = [
            str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard_url,
            "--working-dir", str(REPO), "--", "python", "-m", "rayjobs.train", "--data", str(data), "--out", str(out),
            "--model", "fm", "--dim", "4", "--epochs", "1", "--batch-size", "1024", "--workers", "2",
            "--storage-path", str(tmp_path / "runs"),
        ]  # fmt: skip
        result = subprocess.run(command, env=ray_environment(), capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout
        bundle = load_bundle(out)  # worker prints reach the job log only eventually: check the bundle
        assert [record["epoch"] for record in bundle.metrics["history"]] == [0]
        assert bundle.config["model"]["kind"] == "fm"
        assert bundle.metrics["valid"]["auc"] > 0.6
    finally:
        cluster_down(temp_dir)


def test_bad_arguments_fail_before_ray_starts(planted, tmp_path, capsys):
    data, _ = planted
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == f"rankstream train: error: no schema.json in {tmp_path / 'missing'}"
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "b"), "--model", "pruned_fwfm", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "rankstream train: error: pruned_fwfm prunes before epoch 1, so it needs more than 1 epochs"
    )


def test_the_command_line_trains_tensorfm_with_its_orders_and_cp_ranks(planted, local_ray, tmp_path):
    data, _ = planted
    out = tmp_path / "tensorfm"
    assert main([
        "train", "--data", str(data), "--out", str(out), "--model", "tensorfm", "--orders", "2", "3", "--cp-ranks", "2", "1",
        "--dim", "4", "--epochs", "1", "--batch-size", "1024", "--workers", "1", "--storage-path", str(tmp_path / "runs"),
        "--no-progress",
    ]) == 0  # fmt: skip
    bundle = load_bundle(out)
    assert bundle.config["model"] == {"kind": "tensorfm", "dim": 4, "orders": [2, 3], "cp_ranks": [2, 1], "factor_init": "fm"}
    assert bundle.config["train"]["model"] == {"model": "tensorfm", "dim": 4, "orders": [2, 3], "cp_ranks": [2, 1], "factor_init": "fm"}
    assert TrainJobConfig.model_validate({**bundle.config["train"], "out": out}).model == TensorFMConfig(dim=4, cp_ranks=[2, 1])
    assert bundle.metrics["valid"]["auc"] > 0.6
