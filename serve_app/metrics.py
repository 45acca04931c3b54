"""The scorer's metrics: exported through ``ray.serve.metrics`` (tagged per application,
deployment and replica by Serve; scraped by Prometheus from each node's metrics port,
read back by `rankstream serve status`) and kept as a local snapshot for ``GET /stats``."""

from __future__ import annotations

import os
from collections import Counter as Tally
from collections import deque

import numpy as np
from ray.serve import metrics

from model_zoo.context_cache import ContextCache
from serve_app.runtime import BatchReport

LATENCY_BOUNDARIES_MS = [0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 25, 35, 50, 75, 100, 250, 500, 1000, 5000]
RECENT_REPLIES = 10_000


class ScorerMetrics:
    def __init__(self) -> None:
        self.auctions = metrics.Counter("rankstream_auctions_scored", "auctions answered with scores")
        self.items = metrics.Counter("rankstream_items_scored", "item scores computed")
        self.errors = metrics.Counter("rankstream_errors", "messages sent to the dead-letter topic", tag_keys=("reason",))
        self.scoring_latency = metrics.Histogram(
            "rankstream_scoring_latency_ms", "encode + score time of one batch", LATENCY_BOUNDARIES_MS
        )
        self.end_to_end_latency = metrics.Histogram(
            "rankstream_end_to_end_latency_ms", "reply time - the auction's sent_at_ms", LATENCY_BOUNDARIES_MS
        )
        self.consumer_lag = metrics.Gauge(
            "rankstream_consumer_lag", "messages behind the high watermark", tag_keys=("partition",)
        )
        # Counters, not a ratio gauge: `serve status` sums over replicas, and a sum of ratios is none.
        self.cache_hits = metrics.Counter("rankstream_context_cache_hits", "contexts found in the context cache")
        self.cache_lookups = metrics.Counter("rankstream_context_cache_lookups", "contexts looked up in the context cache")
        self.model_version = metrics.Gauge(
            "rankstream_model_version_info", "1 for the model version this replica serves", tag_keys=("model", "version")
        )
        self.reload_error = metrics.Gauge(
            "rankstream_model_reload_error_info",
            "1 while this replica's last hot reload failed (it serves its old model)",
            tag_keys=("bundle", "error"),
        )
        self.totals: Tally[str] = Tally()
        self.error_totals: Tally[str] = Tally()
        self.recent_end_to_end: deque[float] = deque(maxlen=RECENT_REPLIES)
        self.lag: dict[int, int] = {}
        self._cache_counted: tuple[ContextCache | None, int, int] = (None, 0, 0)  # the cache, its hits and lookups counted
        self.serving: tuple[str, str] | None = None
        self.failed_reload: tuple[str, str] | None = None  # (bundle, error)

    def record_batch(self, report: BatchReport, cache: ContextCache) -> None:
        if report.auctions:
            self.auctions.inc(report.auctions)
            self.items.inc(report.items)
            self.scoring_latency.observe(report.scoring_ms)
        for reason, count in report.errors.items():
            self.record_dead_letter(reason, count)
        for reply in report.replies:
            if reply.end_to_end_ms is not None:
                self.end_to_end_latency.observe(reply.end_to_end_ms)
                self.recent_end_to_end.append(reply.end_to_end_ms)
        self.totals.update(auctions=report.auctions, items=report.items, batches=1)
        counted, hits, lookups = self._cache_counted
        if counted is not cache:  # a reload brings a new cache, counting from zero
            hits = lookups = 0
        for counter, new in ((self.cache_hits, cache.hits - hits), (self.cache_lookups, cache.lookups - lookups)):
            if new > 0:  # Ray's counters refuse an increment of 0
                counter.inc(new)
        self._cache_counted = (cache, cache.hits, cache.lookups)

    def record_dead_letter(self, reason: str, count: int = 1) -> None:
        self.errors.inc(count, tags={"reason": reason})
        self.error_totals[reason] += count

    def record_lag(self, lag: dict[int, int]) -> None:
        for partition in self.lag.keys() - lag.keys():  # moved to another replica
            self.consumer_lag.set(0, tags={"partition": str(partition)})
        for partition, behind in lag.items():
            self.consumer_lag.set(behind, tags={"partition": str(partition)})
        self.lag = lag

    def record_model(self, name: str, version: str) -> None:
        if self.serving is not None:
            self.model_version.set(0, tags={"model": self.serving[0], "version": self.serving[1]})
        self.model_version.set(1, tags={"model": name, "version": version})
        self.serving = (name, version)

    def record_reload_error(self, failed: tuple[str, str] | None) -> None:
        """The last reload's failure (bundle, error), or None once a reload succeeded."""
        if self.failed_reload is not None:
            self.reload_error.set(0, tags={"bundle": self.failed_reload[0], "error": self.failed_reload[1]})
        if failed is not None:
            self.reload_error.set(1, tags={"bundle": failed[0], "error": failed[1]})
        self.failed_reload = failed

    def snapshot(self) -> dict[str, object]:
        recent = np.asarray(self.recent_end_to_end) if self.recent_end_to_end else None
        cache = self._cache_counted[0]
        return {
            "pid": os.getpid(),
            "model": self.serving[0] if self.serving else None,
            "model_version": self.serving[1] if self.serving else None,
            "auctions_scored": self.totals["auctions"],
            "items_scored": self.totals["items"],
            "batches": self.totals["batches"],
            "errors": dict(self.error_totals),
            "context_cache_hit_ratio": 0.0 if cache is None else round(cache.hit_ratio, 4),
            "consumer_lag": {str(p): n for p, n in sorted(self.lag.items())},
            "end_to_end_ms_recent": None
            if recent is None
            else {q: round(float(np.percentile(recent, int(q[1:]))), 3) for q in ("p50", "p95", "p99")},
        }
