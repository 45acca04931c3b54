"""`rankstream bench stream` end to end at a tiny size: broker, local Ray, the Serve
scorer, the echo floor and the load generator; the JSON report and its plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayjobs import cli

pytestmark = pytest.mark.slow


def test_bench_stream_reports_rates_and_latency(tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    # Latency is measured at a given rate (not only at half the sustained one): whether a
    # loaded machine keeps up with the step is a measurement, not what is tested here.
    code = cli.main(["bench", "stream", "--json", str(out), "--rates", "50", "--latency-rates", "25", "--seconds", "2",
                     "--items", "5", "--context-fields", "2", "--item-fields", "2", "--vocab-size", "20",
                     "--distinct", "20", "--partitions", "2", "--rounds", "1"])
    assert code == 0
    result = json.loads(out.read_text())
    (step,) = result["steps"]
    assert step["offered"] == 50 and step["report"]["sent"] == 100
    assert step["report"]["scored"] == 100 and step["report"]["missing"] == 0
    report = step["report"]
    kept_up = report["throughput"] >= 0.95 * 50 and report["latency_ms"]["p99"] <= 1000.0
    assert result["max_sustained_rate"] == (50 if kept_up else 0)
    assert [p["offered"] for p in result["latency"]] == [25]  # half the sustained rate
    (floor,) = result["floor"]  # the echo scorer at the same rate, every auction answered with zero scores
    assert floor["scorer"] == "floor" and floor["offered"] == 25
    assert floor["report"]["scored"] == 50 and floor["report"]["missing"] == 0
    assert floor["report"]["model_versions"] == {"echo": 50}
    assert set(floor["cpu_cores"]) == {"broker", "load generator", "echo"}
    assert set(result["latency"][0]["cpu_cores"]) == {"broker", "load generator", "scorer replicas"}
    (comparison,) = result["comparison"]
    latency, floor_latency = result["latency"][0]["report"]["latency_ms"], floor["report"]["latency_ms"]
    assert comparison["p99_ratio"] == pytest.approx(latency["p99"] / floor_latency["p99"])
    assert comparison["p50_excess_ms"] == pytest.approx(latency["p50"] - floor_latency["p50"])
    assert out.with_suffix(".png").stat().st_size > 0
