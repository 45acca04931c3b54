"""A real local Ray head: `rankstream cluster up`, a real `ray job submit` with the
repository as working dir, `status`, `down`."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rayjobs.cluster import cluster_down, cluster_status, cluster_up, ray_environment

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_job_submission_against_a_local_head(tmp_path):
    temp_dir = f"/tmp/rs-test-{free_port()}"  # short: Ray socket paths
    cluster = cluster_up(num_cpus=1, port=free_port(), dashboard_port=free_port(), temp_dir=temp_dir)
    try:
        assert cluster.dashboard_url.startswith("http://127.0.0.1:")
        assert cluster_status(temp_dir) == cluster
        assert cluster_up(1, 0, 0, temp_dir) == cluster  # a second `up` reports the running head
        marker = tmp_path / "job-ran.txt"
        entrypoint = (
            "python -c \"import os, ray, model_zoo.schema, pathlib; ray.init(); "
            "nice = ray.get(ray.remote(lambda: os.nice(0)).remote()); "
            f"pathlib.Path('{marker}').write_text(str(int(ray.cluster_resources()['CPU'])) + ' ' + str(nice))\""
        )
        result = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard_url,
             "--working-dir", str(REPO), "--", *["bash", "-c", entrypoint]],
            env=ray_environment(), capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout
        # The job ran on this head, with rankstream importable, and its tasks at the
        # niceness `up` gives the workers (Ray's default would be 15).
        assert marker.read_text() == "1 0"
    finally:
        cluster_down(temp_dir)
    assert cluster_status(temp_dir) is None
