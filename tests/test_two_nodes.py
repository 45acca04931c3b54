"""`rankstream train` across two Ray nodes on one machine (ray.cluster_utils.Cluster,
two 2-CPU nodes: a Ray Data read task takes a whole CPU beside a worker's 0.5): a
strict spread placement puts one worker on each, the sharded exchange runs between
them over gloo, and the bundle is written."""

import json
import socket
from pathlib import Path

import pytest

from model_zoo.bundle import load_bundle
from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.model_config import DPLRFwFMConfig
from model_zoo.synthetic import PlantedConfig
from model_zoo.training import TrainConfig
from rayjobs.train import TrainJobConfig, run_training

pytestmark = pytest.mark.slow


def test_two_nodes_train_with_a_spread_placement_and_write_a_bundle(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    data = tmp_path / "data"
    planted = PlantedConfig(structure="dplr", rank=2, context_fields=2, item_fields=2, multi_fields=1, vocab_size=20, seed=7)
    stats = write_synthetic(data, SynthConfig(planted=planted, rows=3_000, row_group_rows=1_000, progress=False))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        temp_dir = f"/tmp/rs-2n-{sock.getsockname()[1]}"  # short: Ray's socket paths
    nodes = {"num_cpus": 2, "object_store_memory": 80 << 20, "temp_dir": temp_dir}
    cluster = Cluster(initialize_head=True, head_node_args={**nodes, "include_dashboard": False})
    try:
        cluster.add_node(**nodes)
        cluster.wait_for_nodes()
        job = TrainJobConfig(
            data=data, out=tmp_path / "bundle", model=DPLRFwFMConfig(dim=4, rank=2), workers=2, cpus_per_worker=0.5,
            placement_strategy="STRICT_SPREAD", address=cluster.address, storage_path=tmp_path / "runs",
            max_failures=0, progress=False, train=TrainConfig(epochs=1, batch_size=500, patience=1),
        )  # fmt: skip
        bundle = run_training(job)
    finally:
        ray.shutdown()
        cluster.shutdown()
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["nodes"] == 2  # one worker per node
    epoch = metrics["history"][0]
    assert 0.9 * stats["rows"]["train"] <= epoch["samples"] <= stats["rows"]["train"]  # equal shards may drop a few
    assert epoch["bytes_sent_per_step"] > 0  # rows crossed between the nodes' workers
    assert metrics["test"]["rows"] > 0
    assert load_bundle(bundle).model.kind == "dplr_fwfm"
