"""The Ray Serve scorer: ``serve_app.app:build_app`` (see cluster/serve_config.yaml).

Each ``Scorer`` replica loads the model bundle, consumes auctions from Kafka in its own
thread (all replicas in one consumer group, so at most one replica per partition does
work) and answers HTTP:

    POST /score    an auction as JSON or msgpack (Content-Type: application/msgpack) -> its reply
    GET  /healthz  200 with the model version while the consumer runs, else 503; also the
                   partitions this replica reads and the last failed reload, if any
    GET  /stats    this replica's counters (the same numbers go to ray.serve.metrics)

The model arrives as the deployment's ``user_config``: Serve calls ``reconfigure`` with it
right after construction, and again in place when only the model changes in a config
deploy (hot reload) — the new model is loaded beside the old one and swapped in
between two batches; each reply names the version that scored it. A reload that
fails (a missing or corrupt bundle) keeps the old model serving and is reported on
``/healthz`` and in the metrics (`rankstream serve status`): raising would make Serve
replace the replica, whose replacement would start with the same bad config. A
replica's first load has no old model to keep: it raises, and Serve reports the failed
start (`serve up` prints it); see docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import torch
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from model_zoo.runtime import freeze_heap, retain_freed_memory
from serve_app.config import ModelConfig, ScorerArgs, ServiceConfig
from serve_app.kafka_loop import KafkaLoop
from serve_app.membership import HandoverMembership, ServeView, describe
from serve_app.metrics import ScorerMetrics
from serve_app.runtime import BatchReport, ScoringRuntime
from streaming.protocol import ProtocolError, Reason, decode_error, encode_error, now_ms, unpack

logger = logging.getLogger("ray.serve")

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
ERROR_STATUS = {Reason.scoring_failed: 500, Reason.message_too_large: 413}
RELOAD_ERROR_CHARS = 500  # a traceback's last line is enough to act on; the replica log has the rest


@dataclass(frozen=True)
class ReloadError:
    bundle: str
    error: str
    at_ms: int


@serve.deployment(
    name="Scorer",
    health_check_period_s=5,
    graceful_shutdown_timeout_s=30,
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.5},
)
class Scorer:
    def __init__(self, service: ServiceConfig) -> None:
        # One scoring thread per replica; freed multi-MB temporaries stay mapped (see runtime.py).
        torch.set_num_threads(1)
        retain_freed_memory()
        self.service = service
        self.metrics = ScorerMetrics()
        self._score_lock = threading.Lock()  # HTTP and Kafka share one model and its caches
        self._runtime: ScoringRuntime | None = None
        self.last_reload_error: ReloadError | None = None
        self.loop: KafkaLoop | None = None
        self.membership: HandoverMembership | None = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        try:
            config = ModelConfig.model_validate(user_config)
            if self._runtime is not None and config == self._runtime.config:
                self._reload_failed(None)  # back to the model it serves
                return
            runtime = ScoringRuntime(config, self.service.limits, self.service.context_cache_size)  # beside the old one
        except Exception as error:
            if self._runtime is None:
                raise  # nothing to serve: Serve reports the failed start
            bundle = user_config.get("bundle") if isinstance(user_config, dict) else None
            logger.exception("hot reload to %s failed; still serving version %s", bundle, self._runtime.model_version)
            self._reload_failed(ReloadError(str(bundle), f"{type(error).__name__}: {error}"[:RELOAD_ERROR_CHARS], now_ms()))
            return
        self._reload_failed(None)
        with self._score_lock:  # between two batches
            reloaded = self._runtime is not None
            self._runtime = runtime
            self.metrics.record_model(runtime.model_name, runtime.model_version)
        logger.info(
            "%s %s version %s from %s",
            "hot reload: now serving" if reloaded else "serving",
            runtime.model_name,
            runtime.model_version,
            config.bundle,
        )
        freeze_heap()
        if self.loop is None and self.service.kafka is not None:
            self.membership = HandoverMembership(ServeView())
            self.loop = KafkaLoop(
                self.service.kafka,
                self.service.topics,
                self.service.group_id,
                self.service.max_poll_records,
                self.score,
                self.metrics.record_lag,
                self.membership,
                on_dead_letter=self.metrics.record_dead_letter,
            )
            self.loop.start()

    def _reload_failed(self, error: ReloadError | None) -> None:
        self.last_reload_error = error
        self.metrics.record_reload_error(None if error is None else (error.bundle, error.error))

    def score(
        self, messages: Sequence[bytes], received_at_ms: int | None = None, sources: Sequence[dict[str, object]] | None = None
    ) -> BatchReport:
        with self._score_lock:
            runtime = self._runtime
            if runtime is None:
                raise RuntimeError("no model loaded yet")
            report = runtime.score_messages(messages, received_at_ms, sources)
            self.metrics.record_batch(report, runtime.context_cache)
        return report

    def check_health(self) -> None:
        if self._runtime is None:
            raise RuntimeError("no model configured: set the Scorer deployment's user_config {bundle: DIR} (or args.model)")
        if self.loop is not None and not self.loop.is_alive():
            raise RuntimeError(f"the Kafka consumer thread died: {self.loop.error!r}")

    def __del__(self) -> None:
        if getattr(self, "loop", None) is not None:
            self.loop.stop()

    # -- HTTP ------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if request.method == "POST" and path.endswith("/score"):
            return await self._score_http(request)
        if request.method == "GET" and path.endswith("/healthz"):
            return self._healthz()
        if request.method == "GET" and path.endswith("/stats"):
            return JSONResponse(self.stats())
        return JSONResponse({"error": f"no route {request.method} {request.url.path}"}, status_code=404)

    def stats(self) -> dict[str, object]:
        alive = None if self.loop is None else self.loop.is_alive()
        return {**self.metrics.snapshot(), "consumer_running": alive}

    def _healthz(self) -> Response:
        runtime = self._runtime
        if runtime is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        consumer = "disabled" if self.loop is None else ("running" if self.loop.is_alive() else "dead")
        error = self.last_reload_error
        body = {"status": "ok" if consumer != "dead" else "unhealthy", "model": runtime.model_name,
                "model_version": runtime.model_version, "consumer": consumer,
                "replica": serve.get_replica_context().replica_id.unique_id,
                "partitions": None if self.membership is None else describe(self.membership.reading),
                "last_reload_error": None if error is None else asdict(error)}
        return JSONResponse(body, status_code=200 if consumer != "dead" else 503)

    async def _score_http(self, request: Request) -> Response:
        as_msgpack = request.headers.get("content-type", "").split(";")[0].strip() in MSGPACK_TYPES
        body = await _read_body(request, self.service.limits.max_message_bytes)
        if body is None:
            failure = ProtocolError(Reason.message_too_large, f"body over {self.service.limits.max_message_bytes} bytes")
            return _error_response(encode_error(failure, b""), as_msgpack)
        if not as_msgpack:
            try:
                parsed = json.loads(body)
            except Exception as error:  # ValueError, RecursionError (deep nesting), UnicodeDecodeError
                failure = ProtocolError(Reason.malformed_json, f"cannot parse the JSON body: {type(error).__name__}: {error}")
                return _error_response(encode_error(failure, body), as_msgpack=False)
            try:
                body = msgpack.packb(parsed, use_bin_type=True)
            except Exception as error:  # integers beyond 64 bits, nesting beyond msgpack's limit
                failure = ProtocolError(Reason.invalid_value, f"the JSON body has no msgpack form: {type(error).__name__}: {error}")
                return _error_response(encode_error(failure, body), as_msgpack=False)
        report = await asyncio.to_thread(self.score, [body])
        reply = report.replies[0]
        if reply.reason is not None:
            return _error_response(reply.value, as_msgpack)
        if as_msgpack:
            return Response(reply.value, media_type=MSGPACK_TYPES[0])
        return JSONResponse(unpack(reply.value))


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``limit`` bytes (from
    Content-Length, else while it streams in): an oversized body is never read whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error_response(value: bytes, as_msgpack: bool) -> Response:
    error = decode_error(value)
    status = ERROR_STATUS.get(Reason(error.reason), 400)
    if as_msgpack:
        return Response(value, status_code=status, media_type=MSGPACK_TYPES[0])
    # The original bytes stay out of JSON: the client has them.
    return JSONResponse(
        {"auction_id": error.auction_id, "reason": error.reason, "message": error.message}, status_code=status
    )


def build_app(args: ScorerArgs | dict[str, Any]) -> Application:
    """The application for ``serve run``/``serve deploy``: a config file's ``args`` map is
    validated into ScorerArgs here (unknown keys are errors)."""
    args = ScorerArgs.model_validate(args)
    options: dict[str, Any] = {"num_replicas": args.num_replicas}
    if args.model is not None:
        options["user_config"] = args.model.model_dump()
    return Scorer.options(**options).bind(args.service())
