"""``rankstream serve up|status|down``: the scorer on a running Ray cluster.

``up`` is a config deploy through the dashboard's Serve REST API — the same thing
`serve deploy cluster/serve_config.yaml` does — so running ``up`` again with a new
``--bundle`` against a running scorer changes only the model (the deployment's
user_config) and reloads it in place, without restarting replicas or losing messages.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import CliPositionalArg

from rayjobs.cluster import DEFAULT_TEMP_DIR, auth_headers, cluster_status
from rayjobs.options import FlatCommand, command
from serve_app.config import ModelConfig, ScorerArgs
from serve_app.runtime import ScoringRuntime
from streaming.kafka_config import SASL_PASSWORD_ENV, TOPIC_FLAGS, KafkaFlags, TopicNames
from streaming.protocol import ProtocolLimits

APP_NAME = "rankstream"
IMPORT_PATH = "serve_app.app:build_app"
METRIC_PREFIX = "ray_rankstream_"
INFO_TAGS = ("reason", "partition", "version", "bundle", "error")  # tags kept apart when summing over replicas
RELOAD_ERROR_METRIC = "model_reload_error_info"


def serve_config(
    args: ScorerArgs, model: ModelConfig, http_host: str = "127.0.0.1", http_port: int = 8000
) -> dict[str, Any]:
    """The Serve config (the `serve deploy` file format) of the scorer application; the
    model goes into the deployment's user_config, so redeploying with another model
    reloads it in place."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": http_host, "port": http_port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": json.loads(_args_json(args)),
                "deployments": [
                    {"name": "Scorer", "num_replicas": args.num_replicas, "user_config": model.model_dump(mode="json")}
                ],
            }
        ],
    }


def _args_json(args: ScorerArgs) -> str:
    """Args as JSON. A Serve config is shown by the dashboard, so it never carries the
    SASL password: replicas read it from $RANKSTREAM_KAFKA_SASL_PASSWORD on the nodes."""
    if args.kafka is not None and args.kafka.sasl_plain_password is not None:
        raise ValueError(
            f"serve up does not put passwords into the Serve config (the dashboard shows it); "
            f"set ${SASL_PASSWORD_ENV} in the Ray nodes' environment instead"
        )
    # num_replicas goes only into the deployment's entry: a change of it alone is then a
    # lightweight update (replicas added or removed, none restarted), not a rebuild.
    return json.dumps(args.model_dump(mode="json", exclude_none=True, exclude={"num_replicas"}))


# -- the dashboard's Serve REST API -----------------------------------------------------
def _request(url: str, method: str = "GET", body: dict[str, Any] | None = None, timeout_s: float = 30) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **auth_headers()}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = response.read()
    except urllib.error.HTTPError as error:
        raise ValueError(f"{method} {url} failed ({error.code}): {error.read().decode(errors='replace')[:2000]}") from None
    return json.loads(payload) if payload else None


def deploy(dashboard_url: str, config: dict[str, Any]) -> None:
    _request(f"{dashboard_url}/api/serve/applications/", "PUT", config)


def serve_details(dashboard_url: str) -> dict[str, Any]:
    return _request(f"{dashboard_url}/api/serve/applications/")


def wait_until_running(dashboard_url: str, deployed_at: float, timeout_s: float = 180.0) -> dict[str, Any]:
    """The application's details once the config deployed at ``deployed_at`` (Unix time)
    is RUNNING; raises if it fails to deploy."""
    deadline = time.monotonic() + timeout_s
    while True:
        application = serve_details(dashboard_url).get("applications", {}).get(APP_NAME)
        status = application and application.get("status")
        current = application and application.get("last_deployed_time_s", 0) >= deployed_at - 1.0
        if status == "RUNNING" and current:
            return application
        if status == "DEPLOY_FAILED":  # the deployment's message carries the replica's error (a first load failing)
            messages = [d.get("message") for d in application.get("deployments", {}).values() if d.get("message")]
            raise ValueError(f"the scorer failed to deploy: {application.get('message')} {' '.join(messages)}"[:4000])
        if time.monotonic() > deadline:
            raise TimeoutError(f"the scorer is not running after {timeout_s:.0f} s (status {status})")
        time.sleep(1.0)


def wait_until_reading(dashboard_url: str, http_url: str, timeout_s: float) -> dict[str, str]:
    """Replica id -> the partitions it reads, once every running replica reads some (a
    new replica takes its share after the partition handover, serve_app/membership.py).
    ``/healthz`` is answered by any replica: ask until each one has answered."""
    deadline = time.monotonic() + timeout_s
    reading: dict[str, str] = {}
    while True:
        deployment = serve_details(dashboard_url)["applications"][APP_NAME]["deployments"]["Scorer"]
        running = {r["replica_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"}
        try:
            health = _request(f"{http_url}/healthz", timeout_s=10)
            reading[health["replica"]] = health["partitions"]
        except (urllib.error.URLError, ConnectionError):  # the proxy may still be starting
            pass
        reading = {replica: share for replica, share in reading.items() if replica in running}
        if reading.keys() == running and "none" not in reading.values():
            return reading
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every replica reads partitions after {timeout_s:.0f} s: {reading}")
        time.sleep(0.5)


def delete(dashboard_url: str) -> None:
    _request(f"{dashboard_url}/api/serve/applications/", "DELETE")


# -- metrics ----------------------------------------------------------------------------
def scorer_metrics(metrics_urls: list[str]) -> dict[str, float]:
    """The scorer's metrics summed over replicas, from the nodes' Prometheus endpoints
    (what Prometheus scrapes)."""
    texts = []
    for url in metrics_urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            texts.append(response.read().decode())
    return summed_metrics(texts)


def summed_metrics(texts: list[str]) -> dict[str, float]:
    """Prometheus texts' scorer samples summed over replicas. Histograms give count, mean
    and bucket quantiles; the context cache's hit ratio comes from the summed counters."""
    totals: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(METRIC_PREFIX):
                continue
            name = family.name[len(METRIC_PREFIX) :]
            for sample in family.samples:
                tags = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k in INFO_TAGS)
                if sample.name.endswith("_bucket"):
                    bucket = buckets.setdefault(name, {})
                    edge = float(sample.labels["le"])
                    bucket[edge] = bucket.get(edge, 0.0) + sample.value
                    continue
                suffix = sample.name[len(METRIC_PREFIX) + len(name) :]
                key = f"{name}{suffix}" + (f"{{{tags}}}" if tags else "")
                totals[key] = totals.get(key, 0.0) + sample.value
    for name, bucket in buckets.items():
        count = totals.get(f"{name}_count", 0.0)
        if count:
            totals[f"{name}_mean"] = totals.get(f"{name}_sum", 0.0) / count
            for q in (0.5, 0.99):
                totals[f"{name}_p{int(q * 100)}<="] = next(edge for edge in sorted(bucket) if bucket[edge] >= q * count)
    lookups = totals.get("context_cache_lookups_total", 0.0)
    if lookups:
        totals["context_cache_hit_ratio"] = totals.get("context_cache_hits_total", 0.0) / lookups
    return totals


def failed_reloads(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """The failed hot reloads that replicas report now: bundle, error, number of replicas."""
    failures = []
    for key, value in metrics.items():
        if key.startswith(RELOAD_ERROR_METRIC + "{") and value > 0:
            tags = dict(tag.split("=", 1) for tag in key[len(RELOAD_ERROR_METRIC) + 1 : -1].split(",", 1))
            failures.append({"bundle": tags.get("bundle"), "error": tags.get("error"), "replicas": int(value)})
    return failures


def metrics_urls(dashboard_url: str) -> list[str]:
    """Every live node's Prometheus endpoint, from the dashboard's node summary."""
    nodes = _request(f"{dashboard_url}/nodes?view=summary")["data"]["summary"]
    return [
        f"http://{node['raylet']['nodeManagerAddress']}:{node['raylet']['metricsExportPort']}/metrics"
        for node in nodes
        if node.get("raylet", {}).get("state") == "ALIVE"
    ]


# -- CLI -----------------------------------------------------------------------------------
class ServeCommand(BaseModel):
    """`rankstream serve up|status|down`. The scorer's flags are ``ScorerArgs``, the Serve
    application's own arguments (their one declaration, defaults included); the model is
    its ``ModelConfig`` (the deployment's user_config)."""

    model_config = ConfigDict(extra="forbid")

    serve_command: CliPositionalArg[Literal["up", "status", "down"]] = Field(description="up, status or down")
    model: ModelConfig | None = None  # --bundle, --catalog (up)
    scorer: ScorerArgs = ScorerArgs()
    kafka: bool = Field(default=True, description="consume auctions from Kafka (--no-kafka: HTTP only)")
    client: KafkaFlags = KafkaFlags()
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    timeout: float = Field(default=180.0, gt=0, description="seconds to wait for the deploy")
    json_status: bool = Field(default=False, description="status as JSON")
    dashboard_url: str | None = Field(default=None, description="the Ray cluster's dashboard (default: the head of `rankstream cluster up`)")
    temp_dir: str = Field(default=DEFAULT_TEMP_DIR, description="the local Ray head's temp dir")


FLAGS = FlatCommand(
    "Serve", ServeCommand,
    sections={"model": ModelConfig, "scorer": ScorerArgs, "scorer.topics": TopicNames, "scorer.limits": ProtocolLimits,
              "client": KafkaFlags},
    exclude=("scorer.kafka", "scorer.model"), renames={**TOPIC_FLAGS, "num_replicas": "replicas"},
    shortcuts={"json-status": "json"},
)  # fmt: skip


def _dashboard_url(args: ServeCommand) -> str:
    """The target cluster's dashboard (its Serve REST API and node list)."""
    if args.dashboard_url:
        return args.dashboard_url
    cluster = cluster_status(args.temp_dir)
    if cluster is None:
        raise ValueError("no local Ray cluster running; start one with `rankstream cluster up` or pass --dashboard-url")
    return cluster.dashboard_url


def scorer_args_from(args: ServeCommand) -> tuple[ModelConfig, ScorerArgs]:
    """The model (bundle and catalog as absolute paths) and the scorer's arguments with its Kafka client."""
    if args.model is None:
        raise ValueError("serve up needs --bundle DIR")
    bundle = Path(args.model.bundle).resolve()
    if not (bundle / "config.json").is_file():
        raise FileNotFoundError(f"no model bundle at {bundle}")
    catalog = str(Path(args.model.catalog).resolve()) if args.model.catalog else None
    kafka = args.client.client_config() if args.kafka else None
    if kafka is not None and kafka.sasl_plain_password is not None:
        if kafka.sasl_plain_password.get_secret_value() == os.environ.get(SASL_PASSWORD_ENV):
            kafka = kafka.model_copy(update={"sasl_plain_password": None})  # replicas read the same variable
    return ModelConfig(bundle=str(bundle), catalog=catalog), args.scorer.model_copy(update={"kafka": kafka})


def check_loads(model: ModelConfig, args: ScorerArgs) -> None:
    """Load the bundle (and catalog) here as a replica would, before any replica sees it:
    a bundle that cannot load is refused with nothing deployed. (A config deployed by
    other means is the replicas' to refuse: running ones keep their model.)"""
    try:
        ScoringRuntime(model, args.limits, context_cache_size=1)
    except Exception as error:
        raise ValueError(
            f"{model.bundle} does not load ({type(error).__name__}: {error}); nothing deployed, "
            f"the running scorer keeps its model"[:2000]
        ) from None


def handle(args: ServeCommand) -> int:
    dashboard_url = _dashboard_url(args)
    if args.serve_command == "up":
        model, scorer_args = scorer_args_from(args)
        check_loads(model, scorer_args)
        deployed_at = time.time()
        deploy(dashboard_url, serve_config(scorer_args, model, args.http_host, args.http_port))
        application = wait_until_running(dashboard_url, deployed_at, args.timeout)
        version = json.loads((Path(model.bundle) / "config.json").read_text())["model_version"]
        print(f"scorer running: {scorer_args.num_replicas} replica(s), model version {version} deployed")
        print("  (a running replica that cannot load it keeps its model: `rankstream serve status` shows failed reloads)")
        print(f"HTTP: POST http://{args.http_host}:{args.http_port}/score, GET /healthz, GET /stats")
        if scorer_args.kafka is not None:
            topics = scorer_args.topics
            print(f"Kafka: {scorer_args.kafka.bootstrap_servers} {topics.auctions} -> {topics.scores} (dead letters: {topics.dlq})")
            reading = wait_until_reading(dashboard_url, f"http://{args.http_host}:{args.http_port}", args.timeout)
            print(f"partitions read: {', '.join(sorted(reading.values()))}")
        print(f"dashboard: {dashboard_url}/#/serve (status {application['status']})")
        return 0
    if args.serve_command == "down":
        delete(dashboard_url)
        print("scorer deleted")
        return 0
    return _print_status(dashboard_url, args.json_status)


def _print_status(dashboard_url: str, as_json: bool) -> int:
    application = serve_details(dashboard_url).get("applications", {}).get(APP_NAME)
    if application is None:
        print("no scorer deployed" if not as_json else json.dumps(None))
        return 1
    deployments = {
        name: {"status": d["status"], "replicas": [r["state"] for r in d.get("replicas", [])]}
        for name, d in application.get("deployments", {}).items()
    }
    metrics = scorer_metrics(metrics_urls(dashboard_url))
    reload_errors = failed_reloads(metrics)
    if as_json:
        print(json.dumps({"status": application["status"], "deployments": deployments, "metrics": metrics,
                          "reload_errors": reload_errors}, indent=2))
        return 0
    print(f"application {APP_NAME}: {application['status']}")
    for name, deployment in deployments.items():
        print(f"  {name}: {deployment['status']}, replicas {deployment['replicas']}")
    for failure in reload_errors:
        print(f"  RELOAD FAILED on {failure['replicas']} replica(s), still serving their old model: "
              f"{failure['bundle']}: {failure['error']}")
    if not metrics:
        print("no metrics exported yet (Ray exports them every few seconds)")
    for key in sorted(metrics):
        print(f"  {key} {metrics[key]:g}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="the Ray Serve scorer: up, status, down")
    command(parser, FLAGS, handle)
