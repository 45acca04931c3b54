"""`bench train` end to end at a tiny size, ingest-free variant (the Ray variant runs
`rankstream train`, tested in test_train_job.py): 1 and 2 gloo workers, the sharded
exchange's bytes reported, JSON and plot written."""

import json

from rayjobs.cli import main


def test_bench_train_ingest_free_reports_both_worker_counts(tmp_path):
    out = tmp_path / "train.json"
    assert main([
        "bench", "train", "--json", str(out), "--models", "fm", "--workers", "1", "2", "--variants", "ingest-free",
        "--fields", "4", "--table-rows", "400", "--batch-size", "64", "--batches", "4", "--warmup", "1",
    ]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    one, two = report["records"]
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["bytes_sent_per_step"] == 0 and two["bytes_sent_per_step"] > 0
    assert {"rows", "gradients"} <= set(two["ms_per_batch"]) and "rows" not in one["ms_per_batch"]
    assert report["speedups"]["fm (ingest-free) 2 workers"] == two["samples_per_second"] / one["samples_per_second"]
    assert out.with_suffix(".png").stat().st_size > 0
