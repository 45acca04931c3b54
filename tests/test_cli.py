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
