"""The cluster manifests (cluster/) parse and agree with each other and with the code
they run: one image and one Ray version everywhere (the pins in pyproject.toml), job
entrypoints accepted by the real argument parsers, the RayService's Serve config valid
for Serve and for ``serve_app.config.ScorerArgs``, paths on mounted volumes, enough
CPUs for what is asked. Pure parsing: no cluster, no Docker."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from rayjobs.cli import build_parser
from rayjobs.train import FLAGS
from serve_app.config import ModelConfig, ScorerArgs
from streaming.kafka_config import SASL_PASSWORD_ENV, KafkaClientConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RAY_PIN = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
PACKAGES = [name.rstrip("*") for name in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
# The image reference comes from the Dockerfile's build command; everything else must use it.
IMAGE = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", (CLUSTER / "Dockerfile").read_text())[1]
RAY_KINDS = {"raycluster.yaml": "RayCluster", "rayservice.yaml": "RayService",
             "rayjob-train.yaml": "RayJob", "rayjob-tune.yaml": "RayJob"}  # fmt: skip


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def ray_resources() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in documents(path)
            if doc["apiVersion"].startswith("ray.io/")]  # fmt: skip


def cluster_spec(resource: dict[str, Any]) -> dict[str, Any]:
    key = {"RayCluster": None, "RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}[resource["kind"]]
    return resource["spec"] if key is None else resource["spec"][key]


def pod_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Head first, then each worker group's pod spec."""
    return [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]


def mount_paths(pod: dict[str, Any]) -> list[str]:
    return [mount["mountPath"] for mount in pod["containers"][0].get("volumeMounts", [])]


def cpus(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_cpus(spec: dict[str, Any]) -> float:
    return sum(g["replicas"] * cpus(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in spec["workerGroupSpecs"])  # fmt: skip


def serve_config(service: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def the_resource(name: str) -> dict[str, Any]:
    (resource,) = [doc for file, doc in ray_resources() if file == name]
    return resource


def entrypoint_args(job: dict[str, Any]) -> tuple[str, list[str]]:
    tokens = shlex.split(job["spec"]["entrypoint"])
    assert tokens[:2] == ["python", "-m"], f"entrypoint should run `python -m MODULE ...`: {tokens}"
    return tokens[2], tokens[3:]


def test_every_manifest_parses_with_kind_and_name():
    paths = sorted(CLUSTER.rglob("*.yaml"))
    assert {path.name for path in paths} >= {*RAY_KINDS, "storage.yaml", "monitoring.yaml", "launcher.yaml"}
    for path in paths:
        docs = documents(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path
        if path.parent == KUBERAY:
            for doc in docs:
                assert {"apiVersion", "kind", "metadata", "spec"} <= doc.keys(), path
                assert doc["metadata"]["name"], path


def test_ray_resources_have_their_required_keys():
    resources = ray_resources()
    assert sorted((file, doc["kind"]) for file, doc in resources) == sorted(RAY_KINDS.items())
    for file, resource in resources:
        assert resource["apiVersion"] == "ray.io/v1", file
        spec = cluster_spec(resource)
        assert spec["rayVersion"], file
        assert spec["headGroupSpec"]["template"]["spec"]["containers"], file
        assert spec["workerGroupSpecs"], file
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and "rayStartParams" in group, file
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], file
        for pod in pod_specs(spec):
            for container in pod["containers"]:
                assert container["image"] and container["resources"]["limits"]["cpu"], file
                # Prometheus scrapes every Ray node through this port name (monitoring.yaml).
                assert {"containerPort": 8080, "name": "metrics"} in container["ports"], file
        if resource["kind"] == "RayJob":
            assert resource["spec"]["entrypoint"], file
            assert resource["spec"]["shutdownAfterJobFinishes"] is True, file
            assert resource["spec"]["ttlSecondsAfterFinished"] > 0, file
        if resource["kind"] == "RayService":
            assert resource["spec"]["serveConfigV2"], file


def test_one_image_and_one_ray_version_everywhere():
    assert IMAGE.rsplit(":", 1)[1] == PYPROJECT["project"]["version"]
    images, versions = set(), set()
    for _, resource in ray_resources():
        spec = cluster_spec(resource)
        versions.add(spec["rayVersion"])
        images |= {container["image"] for pod in pod_specs(spec) for container in pod["containers"]}
        submitter = resource["spec"].get("submitterPodTemplate")
        if submitter:
            images |= {container["image"] for container in submitter["spec"]["containers"]}
    assert images == {IMAGE}
    assert versions == {RAY_PIN}
    assert re.search(r"^FROM rayproject/ray:(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)[1] == f"{RAY_PIN}-py311-cpu"
    for doc in (CLUSTER / "README.md", ROOT / "docs" / "deploy.md"):
        assert IMAGE in doc.read_text(), doc


def test_volumes_exist_and_claims_are_defined():
    (claim,) = documents(KUBERAY / "storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for file, resource in ray_resources():
        for pod in pod_specs(cluster_spec(resource)):
            volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
            for container in pod["containers"]:
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, (file, mount)
            for volume in volumes.values():
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], file


def test_monitoring_selects_the_metrics_port_of_ray_pods():
    (monitor,) = documents(KUBERAY / "monitoring.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert [endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


@pytest.mark.parametrize("file", ["rayjob-train.yaml", "rayjob-tune.yaml"])
def test_job_entrypoint_runs_a_module_whose_parser_accepts_its_flags(file):
    module, flags = entrypoint_args(the_resource(file))
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{module} does not exist"
    assert re.search(r'^if __name__ == "__main__":', Path(spec.origin).read_text(), re.M), f"{module} is not runnable with -m"
    # `python -m rayjobs.NAME ...` is `rankstream NAME ...`: the same parser.
    command = module.rsplit(".", 1)[1]
    try:
        args = build_parser().parse_args([command, *flags])
    except SystemExit as exit_:
        pytest.fail(f"`rankstream {command}` rejects the entrypoint flags {flags} (exit {exit_.code})")
    assert callable(args.func)


def test_job_paths_are_on_volumes_every_node_mounts():
    for file in ("rayjob-train.yaml", "rayjob-tune.yaml"):
        job = the_resource(file)
        _, flags = entrypoint_args(job)
        paths = [flag for flag in flags if flag.startswith("/")]
        assert paths, file
        for pod in pod_specs(cluster_spec(job)):  # the driver on the head, trials/workers elsewhere
            for path in paths:
                assert any(path.startswith(mount + "/") for mount in mount_paths(pod)), (file, path)


def test_train_job_leaves_cpus_for_ray_data():
    job = the_resource("rayjob-train.yaml")
    _, flags = entrypoint_args(job)
    train = FLAGS.parse(build_parser().parse_args(["train", *flags]))  # the typed job the flags give
    assert train.workers * train.cpus_per_worker < worker_cpus(cluster_spec(job))


def test_rayservice_runs_the_scorer_with_valid_arguments():
    service = the_resource("rayservice.yaml")
    config = serve_config(service)
    ServeDeploySchema.parse_obj(config)  # what the dashboard's Serve API accepts
    (application,) = config["applications"]
    module_name, attribute = application["import_path"].split(":")
    assert (module_name, attribute) == ("serve_app.app", "build_app")
    app_module = importlib.import_module(module_name)
    assert isinstance(getattr(app_module, attribute)(application["args"]), Application)
    args = ScorerArgs.model_validate(application["args"])
    assert args.kafka is not None and args.kafka.security_protocol == "SASL_SSL"
    (deployment,) = application["deployments"]
    assert deployment["name"] == app_module.Scorer.name
    # The hot-reload hook: the model is the deployment's user_config, not an argument
    # (a change to args replaces the replicas).
    ModelConfig.model_validate(deployment["user_config"])
    assert args.model is None
    assert deployment["num_replicas"] == args.num_replicas
    # Every replica fits on the worker pods.
    replica_cpus = deployment.get("ray_actor_options", {}).get("num_cpus", 1)
    assert args.num_replicas * replica_cpus <= worker_cpus(cluster_spec(service))


def test_rayservice_files_are_on_the_scorer_pods():
    service = the_resource("rayservice.yaml")
    (application,) = serve_config(service)["applications"]
    model = ModelConfig.model_validate(application["deployments"][0]["user_config"])
    kafka = ScorerArgs.model_validate(application["args"]).kafka
    for pod in pod_specs(cluster_spec(service))[1:]:  # replicas run on workers (head has num-cpus 0)
        for path in filter(None, [model.bundle, model.catalog, kafka.ssl_cafile]):
            assert any(str(path).startswith(mount + "/") for mount in mount_paths(pod)), path


def test_rayservice_runs_the_same_application_as_serve_config():
    (local,) = yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())["applications"]
    (remote,) = serve_config(the_resource("rayservice.yaml"))["applications"]
    assert remote["import_path"] == local["import_path"]
    assert [d["name"] for d in remote["deployments"]] == [d["name"] for d in local["deployments"]]
    for application in (local, remote):
        ScorerArgs.model_validate(application["args"])
        ModelConfig.model_validate(application["deployments"][0]["user_config"])


def test_scorer_reads_the_sasl_password_from_the_pod_environment(monkeypatch):
    """The password stays out of the RayService: the pods get it from a Secret."""
    service = the_resource("rayservice.yaml")
    kafka = serve_config(service)["applications"][0]["args"]["kafka"]
    assert "sasl_plain_password" not in kafka
    for worker in pod_specs(cluster_spec(service))[1:]:
        (env,) = [e for e in worker["containers"][0]["env"] if e["name"] == SASL_PASSWORD_ENV]
        assert env["valueFrom"]["secretKeyRef"]["name"] == "rankstream-kafka"
    monkeypatch.setenv(SASL_PASSWORD_ENV, "from-the-secret")
    kwargs = KafkaClientConfig(**kafka).client_kwargs()
    assert kwargs.get("sasl_plain_password") == "from-the-secret", (
        f"with sasl_plain_password unset, the Kafka clients should take ${SASL_PASSWORD_ENV}"
    )


def test_launcher_is_a_valid_ray_cluster_config():
    config = yaml.safe_load((CLUSTER / "launcher.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    setup = config["setup_commands"]
    torch_step = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    project_step = next(i for i, c in enumerate(setup) if "~/rankstream" in c)
    assert torch_step < project_step
    assert f"ray[default]=={RAY_PIN}" in setup[project_step]
    sources = {os.path.normpath(source) for source in config["file_mounts"].values()}
    assert {*PACKAGES, "pyproject.toml"} <= sources
    assert all((ROOT / source).exists() for source in sources)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_dockerfile_installs_the_torch_pin_before_the_project():
    lines = [line.strip() for line in (CLUSTER / "Dockerfile").read_text().splitlines()]
    torch_step = next(i for i, line in enumerate(lines) if line.startswith("RUN") and "torch==2.13.0" in line)
    project_step = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install --no-cache-dir ."))
    assert torch_step < project_step
    copied = {line.split()[-1] for line in lines[:project_step] if line.startswith("COPY")}
    assert {*PACKAGES, "./"} <= copied
    assert all((ROOT / package).is_dir() for package in PACKAGES)


def test_deploy_doc_names_every_scorer_metric():
    source = (ROOT / "serve_app" / "metrics.py").read_text()
    names = re.findall(r'metrics\.(?:Counter|Gauge|Histogram)\(\s*"(\w+)"', source)
    assert len(names) >= 8
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert [name for name in names if name not in doc] == []
