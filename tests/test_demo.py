"""`rankstream demo --keep` end to end (everything but the install step): broker, Ray
head, data, a Ray Train job, the Serve scorer, auctions through Kafka, the report; the
README's kafka-python example against the scorer it left running; then `rankstream
down` stops it all."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rayjobs import cli
from rayjobs.cluster import cluster_status
from streaming.broker import broker_status, free_port

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(name: str) -> str:
    """The code block after ``<!-- readme-example: NAME -->`` in the README."""
    match = re.search(rf"<!-- readme-example: {name} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"no README example {name!r}"
    return match.group(1)


def test_demo_runs_end_to_end_and_down_stops_what_it_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RANKSTREAM_STATE_DIR", str(tmp_path / "state"))
    temp_dir = f"/tmp/rs-demo-{free_port()}"
    run_dir = tmp_path / "run"
    try:
        code = cli.main(["demo", "--out", str(run_dir), "--temp-dir", temp_dir, "--epochs", "1",
                         "--auctions", "400", "--rate", "200", "--keep"])
        assert code == 0
        report = json.loads((run_dir / "report.json").read_text())
        stream = report["stream"]
        assert stream["sent"] == stream["scored"] == 400
        assert stream["missing"] == stream["dead_lettered"] == 0
        assert report["metrics"]["test"]  # test metrics of the best validation epoch
        assert len(report["example_top_items"]) == 5
        scores = [score for _, score in report["example_top_items"]]
        assert scores == sorted(scores, reverse=True)
        assert (run_dir / "bundle" / "weights.safetensors").is_file()
        assert "epoch 1/1" in (run_dir / "train-job.log").read_text()
        shown = capsys.readouterr().out
        assert "job epoch 1/1" in shown and "Error" not in shown  # a successful run shows no error line
        assert cluster_status(temp_dir) is not None and broker_status() is not None  # --keep
        if json.loads((run_dir / "data" / "stats.json").read_text()).get("dataset") == "movielens1m":
            assert all(re.fullmatch(r"movie_id=\d+ .+ \(\d{4}\)(#\d+)?", item) for item, _ in report["example_top_items"])
            environment = {**os.environ, "RANKSTREAM_BOOTSTRAP_SERVERS": broker_status().bootstrap_servers}
            result = subprocess.run([sys.executable, "-c", readme_example("kafka-python")], env=environment,
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            scores, top, version = re.fullmatch(r"(\[.*\]) (\[.*\]) (\w+)\n", result.stdout).groups()
            assert len(json.loads(scores)) == 2 and json.loads(top.replace("'", '"'))[0] in ("toy-story", "fargo")
            assert version == json.loads((run_dir / "bundle" / "config.json").read_text())["model_version"]
    finally:
        assert cli.main(["down", "--temp-dir", temp_dir]) == 0
    assert cluster_status(temp_dir) is None and broker_status() is None
