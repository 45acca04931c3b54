import json
import subprocess
import sys

from rayjobs.cli import main


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "rayjobs.cli", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in result.stdout


def test_bench_scoring_writes_records_and_plot(tmp_path, capsys):
    out = tmp_path / "scoring.json"
    code = main([
        "bench", "scoring", "--json", str(out), "--items", "200", "--context-fields", "3", "5",
        "--ranks", "1", "2", "--fields", "8", "--dim", "4", "--vocab-size", "50",
        "--warmup", "1", "--repeats", "3",
    ])
    assert code == 0
    records = json.loads(out.read_text())
    # dplr, catalog, pruned: 2 contexts x 2 ranks each; tensorfm and its catalog: x 2 order
    # sets ({2}, {2, 3}); fwfm, fm: 2 contexts each
    assert len(records) == 3 * 4 + 2 * 8 + 2 * 2
    for record in records:
        assert {"model", "items", "context_fields", "rank", "median_ms", "min_ms", "max_ms"} <= set(record)
        assert record["min_ms"] <= record["median_ms"] <= record["max_ms"]
    assert {r["model"] for r in records} == {"dplr_fwfm", "dplr_catalog", "tensorfm", "tensorfm_catalog", "pruned_fwfm", "fwfm", "fm"}
    assert sorted({tuple(r["orders"]) for r in records if r["model"] == "tensorfm"}) == [(2,), (2, 3)]
    printed = capsys.readouterr().out
    assert "ratio pruned_fwfm ρ=2 / fwfm, items 200, context 5: " in printed
    assert "ratio tensorfm_catalog d={2,3} ρ=1 / tensorfm d={2,3} ρ=1, items 200, context 3: " in printed
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_rejects_unknown_model(tmp_path, capsys):
    code = main(["bench", "scoring", "--json", str(tmp_path / "x.json"), "--models", "nope"])
    assert code == 2
    assert "error: --models: Input should be 'dplr_fwfm', 'dplr_catalog', " in capsys.readouterr().err


def test_serve_status_sums_counters_over_replicas_and_takes_the_cache_hit_ratio_from_them() -> None:
    from rayjobs.serve import summed_metrics

    def replica(hits: int, lookups: int, reason_count: int) -> str:
        return (
            "# TYPE ray_rankstream_context_cache_hits counter\n"
            f'ray_rankstream_context_cache_hits_total{{replica="r"}} {hits}\n'
            "# TYPE ray_rankstream_context_cache_lookups counter\n"
            f'ray_rankstream_context_cache_lookups_total{{replica="r"}} {lookups}\n'
            "# TYPE ray_rankstream_errors counter\n"
            f'ray_rankstream_errors_total{{reason="wrong_type",replica="r"}} {reason_count}\n'
        )

    # Two replicas at 0.9 and 0.5: summed ratios would say 1.4.
    totals = summed_metrics([replica(9, 10, 2), replica(15, 30, 3)])
    assert totals["context_cache_hits_total"] == 24 and totals["context_cache_lookups_total"] == 40
    assert totals["context_cache_hit_ratio"] == 0.6
    assert totals["errors_total{reason=wrong_type}"] == 5
    assert "context_cache_hit_ratio" not in summed_metrics([])


def test_a_replica_exports_cache_hits_and_lookups_as_increments_a_reload_counting_from_zero() -> None:
    from model_zoo.context_cache import ContextCache
    from serve_app.metrics import ScorerMetrics
    from serve_app.runtime import BatchReport

    class Recorded:
        def __init__(self) -> None:
            self.total = 0

        def inc(self, value: int) -> None:
            assert value > 0
            self.total += value

    metrics = ScorerMetrics()
    metrics.cache_hits, metrics.cache_lookups = Recorded(), Recorded()
    cache = ContextCache(4)
    for hits, lookups in ((0, 0), (3, 5), (3, 5), (7, 10)):
        cache.hits, cache.lookups = hits, lookups
        metrics.record_batch(BatchReport(replies=[]), cache)
    reloaded = ContextCache(4)  # the new model's cache
    reloaded.hits, reloaded.lookups = 1, 4
    metrics.record_batch(BatchReport(replies=[]), reloaded)
    assert (metrics.cache_hits.total, metrics.cache_lookups.total) == (8, 14)
    assert metrics.snapshot()["context_cache_hit_ratio"] == 0.25
