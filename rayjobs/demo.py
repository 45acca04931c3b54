"""``rankstream demo``: the main job end to end on this machine, and ``rankstream down``.

broker → Ray head → prepare data → Ray Train job (DPLR-FwFM) → Serve scorer → auctions
through Kafka → report. By default everything is torn down at the end; ``--keep``
leaves the broker, Ray and the scorer running, and ``rankstream down`` stops them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from rayjobs.cluster import DEFAULT_TEMP_DIR, LocalCluster, auth_headers, cluster_down, cluster_status, cluster_up
from rayjobs.options import FlatCommand, command
from rayjobs.serve import delete, deploy, serve_config, wait_until_reading, wait_until_running
from serve_app.config import ModelConfig, ScorerArgs
from streaming.admin import create_topics
from streaming.broker import broker_status, start_broker, stop_broker
from streaming.kafka_config import KafkaClientConfig, TopicNames
from streaming.producer import LoadConfig, LoadReport, dataset_templates, run_load
from streaming.protocol import decode_auction, decode_reply, encode_auction

SHARED_MOVIELENS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens-1m-sample"
PARTITIONS = 2
REPLICAS = 2
# The job's own lines: rank 0's epoch lines (behind Ray's worker prefix), the bundle line,
# and the driver's final exception line (at a line's start; Ray's actors log lines with
# "Error: " in them while a run succeeds).
JOB_PROGRESS = re.compile(r"(epoch \d+/\d+: .*|wrote bundle .*|^[A-Za-z_][\w.]*(?:Error|Exception): .*)$")


def _port(preferred: int) -> int:
    """``preferred`` when it is free, else any free port (a second demo beside a first)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])


def start_services(console: Console, temp_dir: str) -> tuple[KafkaClientConfig, LocalCluster]:
    console.rule("[bold]1/6 embedded Kafka-compatible broker and local Ray head")
    state = broker_status()
    if state is None:
        state = start_broker(detach=True).state
        console.print(f"broker started at {state.bootstrap_servers} (log {state.log_path})")
    else:
        console.print(f"reusing the broker at {state.bootstrap_servers}")
    kafka = KafkaClientConfig(bootstrap_servers=state.bootstrap_servers)
    create_topics(kafka, TopicNames(), partitions=PARTITIONS)
    cluster = cluster_up(os.cpu_count() or 2, _port(6379), _port(8265), temp_dir)
    console.print(f"Ray head at {cluster.address}; dashboard [link={cluster.dashboard_url}]{cluster.dashboard_url}[/link]")
    return kafka, cluster


def prepare_data(console: Console, data: Path | None, out: Path, seed: int) -> tuple[Path, dict[str, str]]:
    """The MovieLens-1M sample when there is one, else planted synthetic click data;
    with the movie titles by id (none for synthetic data)."""
    from model_zoo.data.movielens import MovieLensSource, movie_titles
    from model_zoo.data.prepare import PrepareConfig, prepare_dataset
    from model_zoo.data.synth import SynthConfig, write_synthetic
    from model_zoo.synthetic import PlantedConfig

    console.rule("[bold]2/6 preparing data")
    movielens = data or (SHARED_MOVIELENS if SHARED_MOVIELENS.is_dir() else None)
    if movielens is not None:
        console.print(f"MovieLens-1M ratings from {movielens}")
        stats = prepare_dataset(MovieLensSource([movielens]), out, PrepareConfig(overwrite=True, seed=seed))
    else:
        console.print("no MovieLens sample found: planted synthetic click data (rankstream synth)")
        planted = PlantedConfig(structure="dplr", rank=2, multi_fields=1, vocab_size=200, seed=seed)
        stats = write_synthetic(out, SynthConfig(planted=planted, rows=60_000, overwrite=True))
    console.print("rows: " + ", ".join(f"{split} {count:,}" for split, count in stats["rows"].items()))
    return out, {} if movielens is None else movie_titles(movielens / "movies.dat")


def train_job(console: Console, cluster: LocalCluster, data: Path, bundle: Path, run_dir: Path, epochs: int) -> Path:
    from ray.job_submission import JobStatus, JobSubmissionClient

    console.rule("[bold]3/6 Ray Train job: DPLR-FwFM rank 2 on 2 workers")
    entrypoint = (
        f"python -m rayjobs.train --data {data} --out {bundle} --model dplr_fwfm --rank 2 --dim 8 --workers 2 "
        f"--epochs {epochs} --lr 0.05 --storage-path {run_dir / 'ray_results'}"
    )
    client = JobSubmissionClient(cluster.dashboard_url, headers=auth_headers())
    # Ray Train's own actors (e.g. its placement-group cleaner) query the State API; without
    # an address they look for "the" local Ray and fail when another runs on the machine.
    job_id = _submit(client, entrypoint, {"env_vars": {"RAY_ADDRESS": cluster.address}})
    console.print(f"submitted {job_id}: {entrypoint}")
    console.print(f"watch it in the dashboard: {cluster.dashboard_url}/#/jobs/{job_id} (Train view: {cluster.dashboard_url}/#/train)")
    log_path = run_dir / "train-job.log"
    shown, printed = 0, set()
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        for line in logs[shown:].splitlines():
            progress = JOB_PROGRESS.search(line)  # the job's own progress lines, not Ray's chatter
            if progress and progress.group(0) not in printed:  # a worker's line can reach the log twice
                printed.add(progress.group(0))
                console.print(f"  [dim]job[/dim] {progress.group(0)}")
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    log_path.write_text(logs)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"the training job {status.value.lower()}; its log: {log_path}")
    return bundle


def _submit(client: Any, entrypoint: str, runtime_env: dict[str, Any], timeout_s: float = 120.0) -> str:
    """Submit, waiting for the head's job agent: a fresh head refuses jobs for a few seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def deploy_scorer(console: Console, cluster: LocalCluster, kafka: KafkaClientConfig, bundle: Path) -> int:
    console.rule("[bold]4/6 Ray Serve scorer")
    http_port = _port(8000)
    args = ScorerArgs(kafka=kafka, num_replicas=REPLICAS)
    deployed_at = time.time()
    deploy(cluster.dashboard_url, serve_config(args, ModelConfig(bundle=str(bundle)), http_port=http_port))
    wait_until_running(cluster.dashboard_url, deployed_at)
    wait_until_reading(cluster.dashboard_url, f"http://127.0.0.1:{http_port}", timeout_s=180)  # the partition handover
    console.print(f"{REPLICAS} replicas consuming `auctions` → `scores`; HTTP on http://127.0.0.1:{http_port}/score")
    return http_port


def send_auctions(console: Console, kafka: KafkaClientConfig, data: Path, count: int, rate: float) -> LoadReport:
    console.rule(f"[bold]5/6 {count:,} auctions through Kafka at {rate:.0f}/s")
    templates = dataset_templates(data, count=500, items_per_auction=50, item_format="columns")
    return run_load(kafka, templates, LoadConfig(count=count, rate=rate, progress=True))


def example_auction(data: Path, http_port: int, titles: dict[str, str]) -> tuple[dict[str, Any], list[tuple[str, float]]]:
    """One auction of the test split over HTTP, asking for its top 5 items (labelled by
    the first item field's raw value, and its title when ``titles`` has it)."""
    template = dataset_templates(data, count=1, items_per_auction=50, item_format="columns")[0]
    auction = decode_auction(template.stamp("demo-example", 0))
    columns = auction.item_columns or {}
    first_field = next(iter(columns))
    labels = [f"{first_field}={value}" + (f" {titles[str(value)]}" if str(value) in titles else "") for value in columns[first_field]]
    ids = [f"{label}#{n}" if labels.count(label) > 1 else label for n, label in enumerate(labels)]
    message = encode_auction("demo-example", auction.context, {"item_id": ids, "features": columns}, top_k=5)
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/score", data=message, headers={"Content-Type": "application/msgpack"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        reply = decode_reply(response.read())
    score_of = dict(zip(ids, reply.scores))
    return auction.context, [(item, score_of[item]) for item in reply.top_k or []]


def report(
    console: Console, bundle: Path, load: LoadReport, example: tuple[dict[str, Any], list[tuple[str, float]]],
    run_dir: Path, cluster: LocalCluster,
) -> dict[str, Any]:
    console.rule("[bold]6/6 report")
    metrics = json.loads((bundle / "metrics.json").read_text())
    table = Table("split", "metric", "value", title="model (best validation epoch)")
    for split in ("valid", "test"):
        for name, value in (metrics.get(split) or {}).items():
            if isinstance(value, float) and name != "rows":
                table.add_row(split, name, f"{value:.4f}")
    console.print(table)
    context, top = example
    console.print(f"example auction, context {context}:")
    for item, score in top:
        console.print(f"  {item:50s} {score:.4f}")
    latency = load.latency_ms
    console.print(
        f"stream: {load.scored:,}/{load.sent:,} auctions scored ({load.missing} missing, {load.duplicates} duplicates, "
        f"{load.dead_lettered} dead-lettered); {load.throughput:,.0f} auctions/s, {load.item_scores_per_s:,.0f} item scores/s; "
        f"end-to-end ms p50 {latency.p50:.1f} p95 {latency.p95:.1f} p99 {latency.p99:.1f} max {latency.max:.1f}"
    )
    plots = sorted(str(p) for p in bundle.glob("*.png"))
    console.print(f"bundle: {bundle}\nplots: {', '.join(plots) or 'none'}\ntraining job log: {run_dir / 'train-job.log'}")
    console.print(f"Ray logs: {cluster.temp_dir}/session_latest/logs; dashboard {cluster.dashboard_url}")
    summary = {"metrics": metrics, "example_top_items": top, "stream": load.model_dump(exclude={"dead_letter_by_id"})}
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def tear_down(console: Console, temp_dir: str) -> None:
    cluster = cluster_status(temp_dir)
    if cluster is not None:
        try:
            delete(cluster.dashboard_url)  # replicas commit and leave before Ray goes
        except ValueError:
            pass
        cluster_down(temp_dir)
        console.print("stopped the local Ray head (and the scorer on it)")
    state = stop_broker()
    if state is not None:
        console.print(f"stopped the broker at {state.bootstrap_servers}")


class DemoJob(BaseModel):
    """`rankstream demo`: the run's data, training length and load."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(default=None, description="a MovieLens-1M directory (default: ../shared/data's sample, else synthetic)")
    out: Path = Field(default=Path("runs/demo"), description="run directory: data, bundle, logs, report.json")
    epochs: int = Field(default=3, ge=1)
    auctions: int = Field(default=3000, ge=1)
    rate: float = Field(default=500.0, gt=0, description="auctions per second")
    keep: bool = Field(default=False, description="leave broker, Ray and the scorer running")
    temp_dir: str = Field(default=DEFAULT_TEMP_DIR, description="the Ray head's temp dir")
    seed: int = 0


class DownCommand(BaseModel):
    """`rankstream down`: what `rankstream demo --keep` left running."""

    model_config = ConfigDict(extra="forbid")

    temp_dir: str = Field(default=DEFAULT_TEMP_DIR, description="the Ray head's temp dir")


FLAGS = FlatCommand("Demo", DemoJob)
DOWN_FLAGS = FlatCommand("Down", DownCommand)


def handle(args: DemoJob) -> int:
    console = Console(soft_wrap=True)  # long report lines stay whole in logs and pipes
    started = time.perf_counter()
    run_dir = args.out.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        kafka, cluster = start_services(console, args.temp_dir)
        data, titles = prepare_data(console, args.data.resolve() if args.data else None, run_dir / "data", args.seed)
        bundle = train_job(console, cluster, data, run_dir / "bundle", run_dir, args.epochs)
        http_port = deploy_scorer(console, cluster, kafka, bundle)
        load = send_auctions(console, kafka, data, args.auctions, args.rate)
        report(console, bundle, load, example_auction(data, http_port, titles), run_dir, cluster)
    except BaseException:
        if not args.keep:
            tear_down(console, args.temp_dir)
        raise
    console.rule(f"[bold]done in {time.perf_counter() - started:.0f} s")
    if args.keep:
        console.print(f"still running (stop with `rankstream down`): broker, Ray head ({cluster.dashboard_url}), "
                      f"scorer on http://127.0.0.1:{http_port}; try `rankstream serve status`")
    else:
        tear_down(console, args.temp_dir)
    return 0


def handle_down(args: DownCommand) -> int:
    tear_down(Console(soft_wrap=True), args.temp_dir)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the main job end to end: broker, Ray, data, train, serve, stream")
    command(parser, FLAGS, handle)
    down = subparsers.add_parser("down", help="stop what `rankstream demo --keep` left running")
    command(down, DOWN_FLAGS, handle_down)
