"""The Helm chart (helm/colshard): rendered offline with real Go templates, linted, schema-checked.

- Rendering and linting: helm-python-sdk (`helm_python`), which binds Helm's Go SDK through a
  shared library in the wheel, so no `helm` binary and no cluster are needed.
- Core Kubernetes objects: kubernetes-validate in strict mode (unknown fields are errors) against
  the pinned Kubernetes version below.
- The RayCluster: jsonschema against the KubeRay CRD's openAPIV3Schema in
  `tests/data/kuberay/ray.io_rayclusters.yaml` (vendored, see its README), as is and with
  unknown fields forbidden (the API server would silently prune them); its pod templates also
  go through kubernetes-validate.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shlex
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "colshard"
CRD_PATH = REPO / "tests" / "data" / "kuberay" / "ray.io_rayclusters.yaml"  # vendored
K8S_VERSION = "1.30.0"
RELEASE = "demo"
NAMESPACE = "search"

Manifest = dict[str, Any]

# Value sets every structural check runs over.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "ingress-hpa-pdb": {
        "gateway": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "tls": [{"secretName": "colshard-tls", "hosts": ["colshard.example.com"]}],
            },
            "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
            "pdb": {"enabled": True},
        }
    },
    "existing-secret": {"auth": {"existingSecret": "my-keys", "existingSecretKey": "keys.txt"}},
    "storage-class": {
        "global": {"storageClass": "fast-ssd"},
        "etcd": {"persistence": {"storageClass": "etcd-ssd"}},
    },
    "single-etcd": {"etcd": {"replicas": 1}},
    "external-etcd-hostpath": {
        "etcd": {"enabled": False},
        "externalEtcd": {"endpoints": ["etcd-a.db.example:2379", "etcd-b.db.example:2379"]},
        "ray": {"worker": {"storage": {"type": "hostPath"}, "podAntiAffinity": "hard"}},
    },
    "no-auth-autoscaler-emptydir": {
        "auth": {"enabled": False},
        "ray": {
            "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"idleTimeoutSeconds": 300},
            "worker": {"storage": {"type": "emptyDir"}},
        },
        "etcd": {"persistence": {"enabled": False}},
    },
    "shared-pvc-extras": {
        "colshard": {"clusterName": "prod", "extraEnv": {"COLSHARD_LOG_LEVEL": "debug"}},
        "auth": {"apiKeys": ["key-one", "key-two"]},
        "imagePullSecrets": [{"name": "regcred"}],
        "ray": {
            "head": {"extraEnv": {"RAY_GRAFANA_HOST": "http://grafana.monitoring:3000"}},
            "worker": {
                "storage": {
                    "type": "persistentVolumeClaim",
                    "claimName": "colshard-shared",
                    "subPathExpr": "$(COLSHARD_POD_NAME)",
                },
                "customResources": {"ssd": 1},
                "rayStartParams": {"object-store-memory": "1000000000"},
            },
        },
    },
}


# ---------------------------------------------------------------- rendering helpers


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render_raw(
    chart: helm_python.Chart, values: dict[str, Any], release: str = RELEASE
) -> dict[str, str]:
    return chart.render(copy.deepcopy(values), name=release, namespace=NAMESPACE, is_install=True)


def render(
    chart: helm_python.Chart, values: dict[str, Any], release: str = RELEASE
) -> list[Manifest]:
    """Every object the chart renders (NOTES.txt left out), in template order."""
    manifests: list[Manifest] = []
    for path, text in sorted(render_raw(chart, values, release).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                assert isinstance(doc, dict), f"{path} rendered a non-object document"
                manifests.append(doc)
    return manifests


def notes(chart: helm_python.Chart, values: dict[str, Any]) -> str:
    rendered = render_raw(chart, values)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def by_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    found = [m for m in by_kind(manifests, kind) if m["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {len(found)}"
    return found[0]


def api_key_secrets(manifests: list[Manifest]) -> list[Manifest]:
    return [s for s in by_kind(manifests, "Secret") if s["metadata"]["name"].endswith("-api-keys")]


def gateway(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment", "-gateway")


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, pod metadata, pod spec) of everything that makes pods, RayCluster groups included."""
    for m in manifests:
        kind, name = m["kind"], m["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet"):
            template = m["spec"]["template"]
            yield f"{kind}/{name}", template["metadata"], template["spec"]
        elif kind == "Pod":
            yield f"Pod/{name}", m["metadata"], m["spec"]
        elif kind == "RayCluster":
            head = m["spec"]["headGroupSpec"]["template"]
            yield f"RayCluster/{name}/head", head["metadata"], head["spec"]
            for group in m["spec"]["workerGroupSpecs"]:
                tpl = group["template"]
                yield f"RayCluster/{name}/{group['groupName']}", tpl["metadata"], tpl["spec"]


# ---------------------------------------------------------------- schema helpers


def validate_core(manifest: Manifest) -> None:
    """Raises unless `manifest` is valid for K8S_VERSION with unknown fields forbidden."""
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def strict_schema(schema: Any) -> Any:
    """Forbid unknown fields wherever the CRD lists the known ones (kubectl --validate=strict)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def raycluster_validators() -> list[jsonschema.protocols.Validator]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = version["schema"]["openAPIV3Schema"]
    return [
        jsonschema.Draft7Validator(schema),
        jsonschema.Draft7Validator(strict_schema(schema)),
    ]


def validate_raycluster(
    manifest: Manifest, validators: list[jsonschema.protocols.Validator]
) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    for validator in validators:
        errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]
        )
    # The embedded pod templates are core PodSpecs: check them as strictly as a Pod.
    for label, metadata, spec in pod_specs([manifest]):
        try:
            validate_core({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{label}: {exc.message}") from exc


# ---------------------------------------------------------------- lint and schemas, every value set


def test_chart_metadata(chart: helm_python.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "colshard"
    assert meta["appVersion"] == "0.1.0"


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_strict_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm_python.lint(
        CHART_DIR,
        copy.deepcopy(values),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{K8S_VERSION}",
    )
    # Severity 1 is informational ("icon is recommended"); warnings and errors must not appear.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_core_manifests_are_valid_kubernetes(
    chart: helm_python.Chart, values: dict[str, Any]
) -> None:
    manifests = [m for m in render(chart, values) if m["kind"] != "RayCluster"]
    assert manifests
    for manifest in manifests:
        label = f"{manifest['kind']}/{manifest['metadata']['name']}"
        try:
            validate_core(manifest)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{label}: {exc.message} at {list(exc.absolute_path)}") from exc


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_raycluster_matches_kuberay_crd(
    chart: helm_python.Chart,
    values: dict[str, Any],
    raycluster_validators: list[jsonschema.protocols.Validator],
) -> None:
    (raycluster,) = by_kind(render(chart, values), "RayCluster")
    validate_raycluster(raycluster, raycluster_validators)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_pod_runs_as_non_root(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    specs = list(pod_specs(render(chart, values)))
    assert len(specs) >= 4  # etcd (unless external), gateway, ray head, ray workers, test pod
    for label, _, spec in specs:
        pod_ctx = spec.get("securityContext", {})
        assert spec.get("enableServiceLinks") is False, label
        for c in spec["containers"]:
            ctx = {**pod_ctx, **c.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, f"{label}/{c['name']}"
            assert ctx.get("runAsUser", 0) != 0, f"{label}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{label}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}/{c['name']}"


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_images_are_pinned(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    for label, _, spec in pod_specs(render(chart, values)):
        for c in spec["containers"]:
            image = c["image"]
            assert re.fullmatch(r"[^:@\s]+(:[\w][\w.-]*|@sha256:[0-9a-f]{64})", image), image
            assert not image.endswith(":latest"), f"{label}: {image}"


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_selectors_match_their_pods(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    manifests = render(chart, values)
    pods = [(label, meta.get("labels", {})) for label, meta, _ in pod_specs(manifests)]

    def selected(selector: dict[str, str]) -> list[str]:
        return [label for label, labels in pods if selector.items() <= labels.items()]

    for m in manifests:
        name = f"{m['kind']}/{m['metadata']['name']}"
        if m["kind"] in ("Deployment", "StatefulSet"):
            selector = m["spec"]["selector"]["matchLabels"]
            assert selector.items() <= m["spec"]["template"]["metadata"]["labels"].items(), name
        if m["kind"] == "Service":
            hit = selected(m["spec"]["selector"])
            assert len(hit) == 1, f"{name} selects {hit}"
            # Named target ports must exist on the selected pods' containers.
            workload = next(spec for label, _, spec in pod_specs(manifests) if label == hit[0])
            port_names = {p.get("name") for c in workload["containers"] for p in c.get("ports", [])}
            for port in m["spec"]["ports"]:
                if isinstance(port.get("targetPort"), str):
                    assert port["targetPort"] in port_names, f"{name}: {port}"
        if m["kind"] == "PodDisruptionBudget":
            assert len(selected(m["spec"]["selector"]["matchLabels"])) == 1, name


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_names_fit_kubernetes_limits(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    release = "a-very-long-release-name-for-colshard-in-production-eu"
    manifests = render(chart, values, release=release)
    for m in manifests:
        assert len(m["metadata"]["name"]) <= 63, m["metadata"]["name"]
        for key, value in m["metadata"].get("labels", {}).items():
            assert len(str(value)) <= 63, (key, value)
    (raycluster,) = by_kind(manifests, "RayCluster")
    # KubeRay cuts "<name>-head-svc" from the front when it exceeds 50 characters.
    assert len(raycluster["metadata"]["name"] + "-head-svc") <= 50
    for sts in by_kind(manifests, "StatefulSet"):
        # The controller-revision-hash label is "<sts>-<10 chars>" and must fit in 63.
        assert len(sts["metadata"]["name"]) <= 52


# ---------------------------------------------------------------- what the manifests say


def test_default_install_objects(chart: helm_python.Chart) -> None:
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in render(chart, {}))
    assert kinds == sorted(
        [
            ("ConfigMap", "demo-colshard-config"),
            ("Deployment", "demo-colshard-gateway"),
            ("PodDisruptionBudget", "demo-colshard-etcd"),
            ("PodDisruptionBudget", "demo-colshard-ray-worker"),
            ("Pod", "demo-colshard-test-connection"),
            ("RayCluster", "demo-colshard"),
            ("Secret", "demo-colshard-api-keys"),
            ("Secret", "demo-colshard-ray-auth"),
            ("Service", "demo-colshard-etcd"),
            ("Service", "demo-colshard-etcd-headless"),
            ("Service", "demo-colshard-gateway"),
            ("ServiceAccount", "demo-colshard"),
            ("StatefulSet", "demo-colshard-etcd"),
        ]
    )


@pytest.mark.parametrize("replicas", [1, 3, 5])
def test_etcd_initial_cluster_lists_every_member(chart: helm_python.Chart, replicas: int) -> None:
    manifests = render(chart, {"etcd": {"replicas": replicas}})
    sts = one(manifests, "StatefulSet", "-etcd")
    headless = one(manifests, "Service", "-etcd-headless")
    assert sts["spec"]["replicas"] == replicas
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True

    etcd = container(sts["spec"]["template"]["spec"], "etcd")
    env = env_of(etcd)
    assert env["ETCD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    domain = f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    peers = env["ETCD_INITIAL_CLUSTER"].split(",")
    assert peers == [
        f"demo-colshard-etcd-{i}=http://demo-colshard-etcd-{i}.{domain}:2380"
        for i in range(replicas)
    ]
    # Each member advertises the URL the initial cluster lists for it ($(ETCD_NAME) = pod name).
    assert env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == f"http://$(ETCD_NAME).{domain}:2380"
    assert env["ETCD_ADVERTISE_CLIENT_URLS"] == f"http://$(ETCD_NAME).{domain}:2379"
    assert env["ETCD_INITIAL_CLUSTER_STATE"] == "new"
    # Kubernetes only expands $(VAR) for variables defined earlier in the list.
    names = [e["name"] for e in etcd["env"]]
    assert names.index("ETCD_NAME") < names.index("ETCD_INITIAL_ADVERTISE_PEER_URLS")

    assert etcd["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert etcd["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert etcd["image"].startswith("quay.io/coreos/etcd:v3.5.")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/var/run/etcd"} in etcd["volumeMounts"]
    assert env["ETCD_DATA_DIR"].startswith("/var/run/etcd/")
    etcd_pdbs = [
        m for m in by_kind(manifests, "PodDisruptionBudget") if "-etcd" in m["metadata"]["name"]
    ]
    assert bool(etcd_pdbs) == (replicas > 1)


def test_gateway_points_at_etcd_service_and_ray_head(chart: helm_python.Chart) -> None:
    manifests = render(chart, {})
    (raycluster,) = by_kind(manifests, "RayCluster")
    etcd_service = one(manifests, "Service", "-etcd")
    config = one(manifests, "ConfigMap", "-config")
    deployment = gateway(manifests)
    spec = deployment["spec"]["template"]["spec"]
    gw = container(spec, "gateway")

    etcd_endpoint = f"{etcd_service['metadata']['name']}.{NAMESPACE}.svc:2379"
    assert 2379 in [p["port"] for p in etcd_service["spec"]["ports"]]
    ray_address = f"ray://{raycluster['metadata']['name']}-head-svc.{NAMESPACE}.svc:10001"

    args = gw["args"]
    assert args[0] == "gateway"
    assert arg_after(args, "--etcd") == etcd_endpoint
    assert arg_after(args, "--ray-address") == ray_address
    assert arg_after(args, "--host") == "0.0.0.0"
    assert arg_after(args, "--port") == "8080"
    assert arg_after(args, "--cluster-name") == RELEASE

    assert env_of(gw)["COLSHARD_RAY_ADDRESS"] == ray_address
    assert gw["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert config["data"]["COLSHARD_ETCD"] == etcd_endpoint
    assert config["data"]["COLSHARD_CLUSTER_NAME"] == RELEASE
    assert gw["ports"] == [{"name": "http", "containerPort": 8080}]

    service = one(manifests, "Service", "-gateway")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http"}]


def test_gateway_probes_metrics_and_service_account(chart: helm_python.Chart) -> None:
    manifests = render(chart, {})
    template = gateway(manifests)["spec"]["template"]
    gw = container(template["spec"], "gateway")
    assert gw["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gw["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gw["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gw["startupProbe"]["periodSeconds"] * gw["startupProbe"]["failureThreshold"] >= 300
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"
    account = one(manifests, "ServiceAccount")
    assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert template["spec"]["automountServiceAccountToken"] is False
    assert gw["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in gw["volumeMounts"]


def test_gateway_rolls_when_settings_change(chart: helm_python.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        annotations = gateway(render(chart, values))["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"colshard": {"extraEnv": {"COLSHARD_LOG_LEVEL": "debug"}}})


def test_raycluster_head_and_worker_group(chart: helm_python.Chart) -> None:
    manifests = render(chart, {})
    (raycluster,) = by_kind(manifests, "RayCluster")
    config = one(manifests, "ConfigMap", "-config")
    spec = raycluster["spec"]
    assert spec["rayVersion"] == "2.60.0"

    head = spec["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    head_container = container(head["template"]["spec"], "ray-head")
    head_ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert head_ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
    assert "command" not in head_container  # KubeRay writes the `ray start` command

    (group,) = spec["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 8)
    params = group["rayStartParams"]
    assert params["num-cpus"] == "2"
    # KubeRay pastes the value into a shell command line: one shell word holding JSON.
    (word,) = shlex.split(params["resources"])
    assert json.loads(word) == {"colshard_shard": 64}
    assert "colshard_shard" not in json.dumps(head["rayStartParams"])
    # ... and every shard replica asks for one unit, so shards never land on the head.
    assert json.loads(config["data"]["COLSHARD_SHARD_RESOURCES"]) == {"colshard_shard": 1}
    assert config["data"]["COLSHARD_VECTORIZER_REPLICAS"] == "1"
    assert "JINAAI_APIKEY" not in env_of(head_container)  # no Jina secret configured

    pod = group["template"]["spec"]
    worker = container(pod, "ray-worker")
    data_dir = config["data"]["COLSHARD_DATA_DIR"]
    assert data_dir == "/data"
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in worker["envFrom"]
    mount = next(m for m in worker["volumeMounts"] if m["name"] == "data")
    assert mount["mountPath"] == data_dir
    volume = next(v for v in pod["volumes"] if v["name"] == "data")
    claim = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "50Gi"
    assert "storageClassName" not in claim
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["fsGroup"] == 1000  # makes the data volume writable


def test_jina_key_secret_reaches_the_ray_pods(chart: helm_python.Chart) -> None:
    values = {"vectorizers": {"jinaai": {"existingSecret": "jina", "existingSecretKey": "key"}}}
    (raycluster,) = by_kind(render(chart, values), "RayCluster")
    spec = raycluster["spec"]
    ray_containers = [
        container(spec["headGroupSpec"]["template"]["spec"], "ray-head"),
        container(spec["workerGroupSpecs"][0]["template"]["spec"], "ray-worker"),
    ]
    for c in ray_containers:
        assert env_of(c)["JINAAI_APIKEY"] == {"secretKeyRef": {"name": "jina", "key": "key"}}


def _ray_and_gateway_containers(manifests: list[Manifest]) -> list[dict[str, Any]]:
    (raycluster,) = by_kind(manifests, "RayCluster")
    spec = raycluster["spec"]
    return [
        container(spec["headGroupSpec"]["template"]["spec"], "ray-head"),
        container(spec["workerGroupSpecs"][0]["template"]["spec"], "ray-worker"),
        container(gateway(manifests)["spec"]["template"]["spec"], "gateway"),
    ]


def test_ray_token_auth_on_by_default(chart: helm_python.Chart) -> None:
    manifests = render(chart, {})
    secret = one(manifests, "Secret", "-ray-auth")
    token = base64.b64decode(secret["data"]["auth_token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", token)
    for c in _ray_and_gateway_containers(manifests):
        env = env_of(c)
        assert env["RAY_AUTH_MODE"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"] == {
            "secretKeyRef": {"name": secret["metadata"]["name"], "key": "auth_token"}
        }, c["name"]


def test_ray_token_from_existing_secret_or_off(chart: helm_python.Chart) -> None:
    manifests = render(
        chart, {"ray": {"auth": {"existingSecret": "ray-tok", "existingSecretKey": "tok"}}}
    )
    assert not [
        s for s in by_kind(manifests, "Secret") if s["metadata"]["name"].endswith("-ray-auth")
    ]
    for c in _ray_and_gateway_containers(manifests):
        assert env_of(c)["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "ray-tok", "key": "tok"}}
    manifests = render(chart, {"ray": {"auth": {"enabled": False}}})
    for c in _ray_and_gateway_containers(manifests):
        assert env_of(c)["RAY_AUTH_MODE"] == "disabled"
        assert "RAY_AUTH_TOKEN" not in env_of(c)


def test_worker_extras_and_shared_claim(chart: helm_python.Chart) -> None:
    (raycluster,) = by_kind(render(chart, VALUE_SETS["shared-pvc-extras"]), "RayCluster")
    (group,) = raycluster["spec"]["workerGroupSpecs"]
    (word,) = shlex.split(group["rayStartParams"]["resources"])
    assert json.loads(word) == {"colshard_shard": 64, "ssd": 1}
    assert group["rayStartParams"]["object-store-memory"] == "1000000000"
    pod = group["template"]["spec"]
    worker = container(pod, "ray-worker")
    mount = next(m for m in worker["volumeMounts"] if m["name"] == "data")
    assert mount["subPathExpr"] == "$(COLSHARD_POD_NAME)"
    assert env_of(worker)["COLSHARD_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    volume = next(v for v in pod["volumes"] if v["name"] == "data")
    assert volume["persistentVolumeClaim"] == {"claimName": "colshard-shared"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    head = container(raycluster["spec"]["headGroupSpec"]["template"]["spec"], "ray-head")
    assert env_of(head)["RAY_GRAFANA_HOST"] == "http://grafana.monitoring:3000"
    assert "RAY_GRAFANA_HOST" not in env_of(worker)


def test_hostpath_storage_with_hard_anti_affinity(chart: helm_python.Chart) -> None:
    (raycluster,) = by_kind(render(chart, VALUE_SETS["external-etcd-hostpath"]), "RayCluster")
    pod = raycluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "data")
    assert volume["hostPath"] == {"path": "/var/lib/colshard", "type": "DirectoryOrCreate"}
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-worker"


def test_external_etcd(chart: helm_python.Chart) -> None:
    manifests = render(chart, VALUE_SETS["external-etcd-hostpath"])
    assert not by_kind(manifests, "StatefulSet")
    assert not [m for m in by_kind(manifests, "Service") if "-etcd" in m["metadata"]["name"]]
    endpoints = "etcd-a.db.example:2379,etcd-b.db.example:2379"
    assert one(manifests, "ConfigMap")["data"]["COLSHARD_ETCD"] == endpoints
    gw = container(gateway(manifests)["spec"]["template"]["spec"], "gateway")
    assert arg_after(gw["args"], "--etcd") == endpoints


def test_storage_classes(chart: helm_python.Chart) -> None:
    manifests = render(chart, VALUE_SETS["storage-class"])
    sts = one(manifests, "StatefulSet", "-etcd")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "etcd-ssd"
    (raycluster,) = by_kind(manifests, "RayCluster")
    pod = raycluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "data")
    claim = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "fast-ssd"  # from global.storageClass

    # "-" asks for no dynamic provisioning: an explicit empty class.
    manifests = render(chart, {"global": {"storageClass": "-"}})
    sts = one(manifests, "StatefulSet", "-etcd")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == ""


def test_workers_are_disrupted_one_at_a_time(chart: helm_python.Chart) -> None:
    pdb = one(render(chart, {}), "PodDisruptionBudget", "-ray-worker")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-worker"
    off = render(chart, {"ray": {"worker": {"pdb": {"enabled": False}}}})
    assert not [
        m for m in by_kind(off, "PodDisruptionBudget") if "ray-worker" in m["metadata"]["name"]
    ]


def test_ingress_hpa_and_pdb(chart: helm_python.Chart) -> None:
    manifests = render(chart, VALUE_SETS["ingress-hpa-pdb"])
    deployment = gateway(manifests)
    service = one(manifests, "Service", "-gateway")
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count

    hpa = one(manifests, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    metrics = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"]}
    assert metrics == {
        "cpu": {"type": "Utilization", "averageUtilization": 70},
        "memory": {"type": "Utilization", "averageUtilization": 80},
    }
    gw = container(deployment["spec"]["template"]["spec"], "gateway")
    assert gw["resources"]["requests"]["cpu"]  # utilisation is measured against requests

    ingress = one(manifests, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "colshard-tls"

    pdb = one(manifests, "PodDisruptionBudget", "-gateway")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_api_keys_from_existing_secret(chart: helm_python.Chart) -> None:
    manifests = render(chart, VALUE_SETS["existing-secret"])
    assert not api_key_secrets(manifests)
    spec = gateway(manifests)["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "my-keys"
    assert volume["secret"]["items"] == [{"key": "keys.txt", "path": "api-keys"}]
    gw = container(spec, "gateway")
    mount = next(m for m in gw["volumeMounts"] if m["name"] == "api-keys")
    assert env_of(gw)["COLSHARD_API_KEYS_FILE"] == f"{mount['mountPath']}/api-keys"
    assert mount["readOnly"] is True


def test_api_keys_secret_given_or_generated(chart: helm_python.Chart) -> None:
    def keys_file(values: dict[str, Any]) -> str:
        secret = one(render(chart, values), "Secret", "-api-keys")
        return base64.b64decode(secret["data"]["api-keys"]).decode()

    assert keys_file({"auth": {"apiKeys": ["key-one", "key-two"]}}) == "key-one\nkey-two\n"
    (generated,) = keys_file({}).splitlines()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", generated)


def test_auth_disabled_mounts_no_keys(chart: helm_python.Chart) -> None:
    manifests = render(chart, {"auth": {"enabled": False}})
    assert not api_key_secrets(manifests)
    spec = gateway(manifests)["spec"]["template"]["spec"]
    assert "COLSHARD_API_KEYS_FILE" not in env_of(container(spec, "gateway"))
    assert [v["name"] for v in spec["volumes"]] == ["tmp"]


def test_gateway_reads_the_charts_keys_file(chart: helm_python.Chart) -> None:
    """The Secret's file is what gateway.auth loads (bare keys: admin), and a gateway
    without keys is told --allow-insecure (it binds 0.0.0.0 and refuses otherwise)."""
    from gateway.auth import Role, load_api_keys

    manifests = render(chart, {"auth": {"apiKeys": ["key-one-0123456789", "key-two"]}})
    keys_text = base64.b64decode(one(manifests, "Secret", "-api-keys")["data"]["api-keys"]).decode()
    gw = container(gateway(manifests)["spec"]["template"]["spec"], "gateway")
    assert "--allow-insecure" not in gw["args"]
    path = env_of(gw)["COLSHARD_API_KEYS_FILE"]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(path).name
        local.write_text(keys_text)
        keys = load_api_keys(None, {"COLSHARD_API_KEYS_FILE": str(local)})
    assert [(k.key, k.role, k.collections) for k in keys] == [
        ("key-one-0123456789", Role.admin, None),
        ("key-two", Role.admin, None),
    ]
    open_gw = container(
        gateway(render(chart, {"auth": {"enabled": False}}))["spec"]["template"]["spec"], "gateway"
    )
    assert "--allow-insecure" in open_gw["args"]


def test_notes_show_port_forwards(chart: helm_python.Chart) -> None:
    text = notes(chart, {})
    assert f"kubectl -n {NAMESPACE} port-forward svc/demo-colshard-gateway 8080:8080" in text
    assert f"kubectl -n {NAMESPACE} port-forward svc/demo-colshard-head-svc 8265:8265" in text
    assert "helm install kuberay-operator kuberay/kuberay-operator" in text
    assert "get secret demo-colshard-api-keys" in text
    assert "get secret" not in notes(chart, {"auth": {"enabled": False}})


# ---------------------------------------------------------------- the checks can fail


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"etcd": {"replicas": 0}}, "/etcd/replicas"),
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"ray": {"worker": {"storage": {"type": "nfs"}}}}, "/ray/worker/storage/type"),
        ({"gateway": {"replica": 3}}, "replica"),
        ({"etcd": {"enabled": False}}, "externalEtcd.endpoints"),
        ({"ray": {"worker": {"minReplicas": 9, "maxReplicas": 4}}}, "minReplicas"),
        ({"ray": {"clusterName": "9lives"}}, "must start with a letter"),
        ({"ray": {"worker": {"storage": {"type": "persistentVolumeClaim"}}}}, "claimName"),
        ({"etcd": {"podAntiAffinity": "sometimes"}}, "/etcd/podAntiAffinity"),
    ],
)
def test_bad_values_are_rejected(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render_raw(chart, values)


def test_validators_reject_broken_manifests(
    chart: helm_python.Chart, raycluster_validators: list[jsonschema.protocols.Validator]
) -> None:
    manifests = render(chart, {})
    deployment = copy.deepcopy(gateway(manifests))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(deployment)
    service = copy.deepcopy(one(manifests, "Service", "-gateway"))
    service["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(service)

    (raycluster,) = by_kind(manifests, "RayCluster")
    wrong_type = copy.deepcopy(raycluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(AssertionError, match="replicas"):
        validate_raycluster(wrong_type, raycluster_validators)
    typo = copy.deepcopy(raycluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(AssertionError, match="maxReplica"):
        validate_raycluster(typo, raycluster_validators)
    not_a_string = copy.deepcopy(raycluster)
    not_a_string["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(AssertionError, match="num-cpus"):
        validate_raycluster(not_a_string, raycluster_validators)
    bad_pod = copy.deepcopy(raycluster)
    bad_pod["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["mounts"] = []
    with pytest.raises(AssertionError, match="head"):
        validate_raycluster(bad_pod, raycluster_validators)


# ---------------------------------------------------------------- values.yaml is documented

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")


def undocumented_values(text: str) -> list[str]:
    """Leaf values with no "# --" comment on themselves or on an enclosing key.

    A comment block directly above a key (or after it on the same line) documents it when it
    starts with "# --"; a documented key documents everything under it.
    """
    lines = text.splitlines()
    missing: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    comment: list[str] = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        if not stripped:
            comment = []
            continue
        match = _KEY.match(line)
        if match is None:  # list items and continuation lines belong to the key above
            comment = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = bool(comment) and comment[0].startswith("# --")
        documented = documented or "# --" in match["rest"]
        inherited = any(doc for _, _, doc in stack)
        path = ".".join([key for _, key, _ in stack] + [match["key"]])
        rest = lines[number + 1 :]
        nxt = next((x for x in rest if x.strip() and not x.strip().startswith("#")), "")
        has_children = len(nxt) - len(nxt.lstrip(" ")) > indent and not match["rest"].strip()
        if not has_children and not (documented or inherited):
            missing.append(path)
        stack.append((indent, match["key"], documented))
        comment = []
    return missing


def test_every_value_is_documented() -> None:
    assert undocumented_values((CHART_DIR / "values.yaml").read_text()) == []
    # The checker itself notices a bare value.
    assert undocumented_values("a:\n  # -- ok\n  b: 1\n  c: 2\n# section\nd: x\n") == ["a.c", "d"]


def test_values_yaml_matches_the_schema_keys(chart: helm_python.Chart) -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())

    def walk(values: Any, node: dict[str, Any], path: str) -> None:
        if not isinstance(values, dict) or "properties" not in node:
            return
        for key, value in values.items():
            assert key in node["properties"], f"{path}{key} is missing from values.schema.json"
            walk(value, node["properties"][key], f"{path}{key}.")

    walk(chart.values, schema, "")
