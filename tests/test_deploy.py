"""The deployment manifests (deploy/): valid against the Kubernetes schemas, and true to the project.

Everything here runs offline and without kubectl or a Docker engine: the kustomizations are rendered
by :func:`render` (``resources`` and strategic-merge ``patches``, all they use), every Kubernetes
object is validated with kubernetes-validate, KEDA's objects (CRDs it does not know) against a schema
of the fields used, and the compose file structurally and by the compose tool's own ``config``
(``docker compose``, or Debian's ``docker-compose`` that ``make system-deps`` installs). What ties
them to the code is checked too: every environment variable they give ClassLens is a
:class:`Settings` field with a value it accepts, every HTTP probe is a route of openapi.yaml, the
workers' probe is the image's HEALTHCHECK, and the queues the workers consume and KEDA watches are
the queues the code sends to.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from classlens.core.queue import ALL_QUEUES, ANALYSIS_QUEUE, AUDIT_QUEUE, EXPLAIN_QUEUE
from classlens.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = ["base", "overlays/keda", "overlays/gpu"]
KUBERNETES_VERSION = "1.37.0"
CLASSLENS_IMAGES = ("classlens-api", "classlens-worker")
# Made by the operator (docs/deploy.md), never committed: the keys each must have.
EXTERNAL_SECRETS = {"classlens-redis": {"password", "url", "address"}, "classlens-api-keys": {"keys.yaml"}}
MONITORING_FILES = {  # written by the monitoring work, mounted here
    "./prometheus/prometheus.yml",
    "./prometheus/alerts.yml",
    "./grafana/provisioning",
    "./grafana/dashboards",
}


# --- rendering --------------------------------------------------------------------------------


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge as kustomize makes it of our patches: maps merge, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in [*base, *patch]):
        # kustomize's order: the patch's items (merged into the base's of the same name), then the base's others.
        by_name = {item["name"]: item for item in base}
        patched = [_merge(by_name[p["name"]], p) if p["name"] in by_name else copy.deepcopy(p) for p in patch]
        return patched + [item for item in base if item["name"] not in {p["name"] for p in patch}]
    return copy.deepcopy(patch)


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects a kustomization makes (``kubectl kustomize folder``, for the fields our kustomizations use)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unknown, f"{folder}: render() does not apply {sorted(unknown)}"
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (folder / resource).resolve()
        objects += render(path) if path.is_dir() else _load_all(path)
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{folder}: only file patches are applied: {patch_entry}"
        for patch in _load_all(folder / patch_entry["path"]):
            matches = [i for i, o in enumerate(objects) if _identity(o) == _identity(patch)]
            assert len(matches) == 1, f"{folder}: patch {_identity(patch)} matches {len(matches)} objects"
            objects[matches[0]] = _merge(objects[matches[0]], patch)
    return objects


def _identity(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / request.param)


def _of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in {"Deployment", "StatefulSet"}:
            yield obj["metadata"]["name"], obj["spec"]["template"]


def _classlens_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, template in _pod_templates(objects):
        for container in template["spec"]["containers"]:
            if container["image"].split(":")[0] in CLASSLENS_IMAGES:
                yield name, container


def test_render_patches_the_named_container_only() -> None:
    base = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}, {"name": "b"}]}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "2"}, {"name": "Y", "value": "3"}]}]}}
    merged = _merge(base, patch)
    assert merged["spec"]["containers"][0]["env"] == [{"name": "X", "value": "2"}, {"name": "Y", "value": "3"}]
    assert merged["spec"]["containers"][1] == {"name": "b"}
    assert _merge({"args": ["a", "b"]}, {"args": ["c"]}) == {"args": ["c"]}


# --- schemas ----------------------------------------------------------------------------------

# The fields of KEDA's objects that the manifests use, with the types KEDA's CRDs give them.
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"const": "redis"},
                                # KEDA reads every trigger parameter as a string.
                                "metadata": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["listName", "listLength"],
                                    "properties": {
                                        name: {"type": "string", "pattern": r"^\d+$"}
                                        for name in ("listLength", "activationListLength", "databaseIndex")
                                    }
                                    | {"listName": {"type": "string"}},
                                },
                                "authenticationRef": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {"name": {"type": "string"}},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["secretTargetRef"],
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["parameter", "name", "key"],
                            "properties": {
                                "parameter": {"enum": ["address", "host", "port", "username", "password"]},
                                "name": {"type": "string"},
                                "key": {"type": "string"},
                            },
                        },
                    }
                },
            },
        },
    },
}


def test_every_object_validates_against_the_kubernetes_schemas(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    assert objects, f"{name} renders nothing"
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(obj, KEDA_SCHEMAS[obj["kind"]])
            continue
        # strict: a field the schema does not have (a typo, a wrong level) is an error too.
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_broken_object() -> None:
    """The schemas are really applied: a misplaced field and a wrong type are refused."""
    deployment = _of_kind(render(K8S / "base"), "Deployment")["classlens-api"]
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)
    scaled = _of_kind(render(K8S / "overlays/keda"), "ScaledObject")["classlens-worker"]
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 8
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, KEDA_SCHEMAS["ScaledObject"])


# --- settings ---------------------------------------------------------------------------------


def setting_names() -> set[str]:
    """Every environment variable :class:`Settings` reads: its prefix and the field's name, or the field's aliases."""
    names: set[str] = set()
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = getattr(alias, "choices", None)
        if choices:
            names |= {str(choice) for choice in choices}
        else:
            names.add(f"{Settings.model_config.get('env_prefix', '')}{field_name}".upper())
    return names


def test_setting_names_follow_the_settings_class() -> None:
    names = setting_names()
    assert {"REDIS_URL", "CLASSLENS_REDIS_URL", "CLASSLENS_MODEL_DIRS", "CLASSLENS_BATCH_MAX"} <= names
    assert "CLASSLENS_REDIS_PASSWORD" not in names


def _check_settings(where: str, values: dict[str, str | None], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every name is a setting, and the plain values (not those from Secrets) are ones Settings accepts."""
    unknown = sorted(set(values) - setting_names())
    assert not unknown, f"{where}: not ClassLens settings: {unknown}"
    with monkeypatch.context() as patched:
        for name in setting_names():
            patched.delenv(name, raising=False)
        for name, value in values.items():
            if value is not None:
                patched.setenv(name, value)
        Settings()  # raises on a value of the wrong type or out of range


def _container_env(container: dict[str, Any], config_maps: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env |= config_maps[source["configMapRef"]["name"]]["data"]
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value")  # None: from a Secret
    return env


def test_every_variable_given_to_classlens_is_a_setting(
    rendered: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, objects = rendered
    config_maps = _of_kind(objects, "ConfigMap")
    containers = list(_classlens_containers(objects))
    assert {owner for owner, _ in containers} >= {"classlens-api", "classlens-worker", "classlens-worker-heavy"}
    for owner, container in containers:
        env = _container_env(container, config_maps)
        assert "REDIS_URL" in env, f"{name}/{owner}: no REDIS_URL (the embedded broker cannot scale out)"
        _check_settings(f"{name}/{owner}", env, monkeypatch)


def test_a_misspelt_variable_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AssertionError, match="CLASSLENS_MODEL_DIR"):
        _check_settings("test", {"CLASSLENS_MODEL_DIR": "/models"}, monkeypatch)
    with pytest.raises(ValidationError, match="batch_max"):
        _check_settings("test", {"CLASSLENS_BATCH_MAX": "0"}, monkeypatch)


# --- what the objects say ---------------------------------------------------------------------


def _openapi_get_paths() -> set[str]:
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    return {path for path, operations in spec["paths"].items() if "get" in operations}


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _healthcheck_command(target: str) -> list[str]:
    """The HEALTHCHECK's CMD of one Dockerfile stage (its continuation lines joined), as argv."""
    stage = re.split(r"^FROM .*$", _dockerfile(), flags=re.M)
    names = re.findall(r"^FROM \S+ AS (\S+)$", _dockerfile(), flags=re.M)
    text = stage[names.index(target) + 1].replace("\\\n", " ")
    found = re.search(r"^HEALTHCHECK .*?CMD (.*)$", text, flags=re.M)
    assert found, f"no HEALTHCHECK in the {target} stage"
    return shlex.split(found.group(1))


def test_probes_point_at_routes_that_exist(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    routes = _openapi_get_paths()
    worker_check = _healthcheck_command("worker")
    for owner, container in _classlens_containers(objects):
        probes = [container[k] for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in container]
        assert probes, f"{name}/{owner} has no probe"
        for probe in probes:
            if "httpGet" in probe:
                assert probe["httpGet"]["path"] in routes, f"{name}/{owner}: {probe['httpGet']['path']} is no route"
            else:
                assert probe["exec"]["command"] == worker_check, f"{name}/{owner}: not the HEALTHCHECK"
        if container["image"].startswith("classlens-api"):
            assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_pods_are_bounded_and_run_as_the_image_user(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    for owner, template in _pod_templates(objects):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), f"{name}/{owner}"
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), f"{name}/{owner}"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for owner, container in _classlens_containers(objects):
        template = dict(_pod_templates(objects))[owner]
        assert template["spec"]["securityContext"]["runAsUser"] == 10001, "the Dockerfile's classlens user"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert mounts["models"]["readOnly"] is True
        assert mounts["models"]["mountPath"] == "/models"
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "classlens-models", "readOnly": True}
    claim = _of_kind(objects, "PersistentVolumeClaim")["classlens-models"]
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_selectors_find_pods(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    pod_labels = [template["metadata"]["labels"] for _, template in _pod_templates(objects)]

    def selects(selector: dict[str, str]) -> bool:
        return any(selector.items() <= labels.items() for labels in pod_labels)

    for service in _of_kind(objects, "Service").values():
        assert selects(service["spec"]["selector"]), f"{name}: Service {service['metadata']['name']} selects nothing"
    budgets = _of_kind(objects, "PodDisruptionBudget")
    assert {"classlens-api", "classlens-worker"} <= set(budgets)
    for budget in budgets.values():
        assert selects(budget["spec"]["selector"]["matchLabels"])


def test_config_maps_exist_and_secrets_are_the_documented_ones(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    config_maps = _of_kind(objects, "ConfigMap")
    for _, template in _pod_templates(objects):
        for container in template["spec"]["containers"]:
            assert all(source["configMapRef"]["name"] in config_maps for source in container.get("envFrom", []))
            refs = [v["valueFrom"]["secretKeyRef"] for v in container.get("env", []) if "valueFrom" in v]
            assert all(ref["key"] in EXTERNAL_SECRETS[ref["name"]] for ref in refs)
        volumes = template["spec"].get("volumes", [])
        secrets = [volume["secret"]["secretName"] for volume in volumes if "secret" in volume]
        assert set(secrets) <= set(EXTERNAL_SECRETS)
    for authentication in _of_kind(objects, "TriggerAuthentication").values():
        for ref in authentication["spec"]["secretTargetRef"]:
            assert ref["key"] in EXTERNAL_SECRETS[ref["name"]]


def test_keda_targets_a_deployment(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    deployments = _of_kind(objects, "Deployment")
    authentications = _of_kind(objects, "TriggerAuthentication")
    for scaled in _of_kind(objects, "ScaledObject").values():
        assert scaled["spec"]["scaleTargetRef"]["name"] in deployments
        assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
        assert all(trigger["authenticationRef"]["name"] in authentications for trigger in scaled["spec"]["triggers"])


def _worker_queues(args: list[str]) -> set[str]:
    assert args[:2] == ["classlens", "worker"], args
    return set(args[args.index("--queues") + 1].split(","))


def test_workers_consume_every_queue_and_keda_watches_their_queues(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, objects = rendered
    consumed: set[str] = set()
    for _, container in _classlens_containers(objects):
        if container["image"].startswith("classlens-worker"):
            queues = _worker_queues(container["args"])
            assert queues <= set(ALL_QUEUES)
            consumed |= queues
    assert consumed == set(ALL_QUEUES), f"{name}: no worker for {set(ALL_QUEUES) - consumed}"
    watched: set[str] = set()
    for scaled in _of_kind(objects, "ScaledObject").values():
        target = _of_kind(objects, "Deployment")[scaled["spec"]["scaleTargetRef"]["name"]]
        target_queues = _worker_queues(target["spec"]["template"]["spec"]["containers"][0]["args"])
        # kombu's Redis transport keeps a queue's messages in a list named after the queue.
        lists = {trigger["metadata"]["listName"] for trigger in scaled["spec"]["triggers"]}
        assert lists <= target_queues, f"{name}: {scaled['metadata']['name']} watches {lists - target_queues}"
        watched |= lists
    if name != "base":
        assert watched == {EXPLAIN_QUEUE, AUDIT_QUEUE, ANALYSIS_QUEUE}


def test_the_gpu_overlay_puts_one_gpu_in_each_explain_worker() -> None:
    objects = render(K8S / "overlays/gpu")
    worker = _of_kind(objects, "Deployment")["classlens-worker"]
    spec = worker["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert container["args"][container["args"].index("--gpus") + 1] == "all"
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["CLASSLENS_DEVICE"] == "cuda"
    assert env["REDIS_URL"] is None
    assert "classlens-worker" in _of_kind(objects, "ScaledObject")
    heavy = _of_kind(objects, "Deployment")["classlens-worker-heavy"]
    assert "nvidia.com/gpu" not in heavy["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


# --- compose ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def _interpolated(value: str) -> str:
    """Compose's ``${VAR:?message}`` and ``${VAR:-default}`` with a stand-in value or the default."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}", lambda m: m.group(2) or f"stand-in-{m.group(1)}", value)


def _classlens_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if str(service.get("image", "")).split(":")[0] in CLASSLENS_IMAGES
    }


def test_compose_builds_the_dockerfile_targets(compose: dict[str, Any]) -> None:
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", _dockerfile(), flags=re.M))
    services = _classlens_services(compose)
    assert {"api", "worker", "worker-heavy"} <= set(services)
    for name, service in services.items():
        build = service["build"]
        assert (DEPLOY / build["context"] / "Dockerfile").resolve() == ROOT / "Dockerfile"
        assert build["target"] in targets
        assert service["image"].split(":")[0] == f"classlens-{build['target']}", name


def test_compose_gives_classlens_only_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in _classlens_services(compose).items():
        env = {key: _interpolated(str(value)) for key, value in service["environment"].items()}
        assert env["REDIS_URL"].startswith("redis://:stand-in-REDIS_PASSWORD@redis:")
        _check_settings(f"compose/{name}", env, monkeypatch)


def test_compose_services_and_references(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"api", "worker", "worker-heavy", "redis", "prometheus", "grafana", "flower"} <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
        if "build" not in service:  # an image pulled from a registry: a version, never latest
            assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", service["image"]), f"{name}: pin the image"
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        assert set(service.get("secrets", [])) <= set(compose.get("secrets", {}))
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"
    for name in ("redis", "flower", "prometheus"):
        assert "ports" not in services[name], f"{name} must not be published"
    api_check = " ".join(services["api"]["healthcheck"]["test"][1:])
    assert "/livez" in api_check
    assert services["api"]["healthcheck"]["test"][1:] == _healthcheck_command("api")


def test_compose_redis_persists_behind_a_password(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert _interpolated(command[command.index("--requirepass") + 1]) == "stand-in-REDIS_PASSWORD"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_compose_workers_mount_the_store_read_only_and_cover_the_queues(compose: dict[str, Any]) -> None:
    worker_check = _healthcheck_command("worker")
    consumed: set[str] = set()
    for name, service in _classlens_services(compose).items():
        assert any(v.endswith(":/models:ro") for v in service["volumes"]), f"{name}: store not read-only"
        if service["image"].startswith("classlens-worker"):
            consumed |= _worker_queues(service["command"])
            assert service["healthcheck"]["test"][1:] == worker_check, name
    assert consumed == set(ALL_QUEUES)


def test_compose_mounts_the_monitoring_files(compose: dict[str, Any]) -> None:
    mounted = {
        volume.split(":")[0]
        for name in ("prometheus", "grafana")
        for volume in compose["services"][name]["volumes"]
        if volume.startswith(".")
    }
    assert mounted == MONITORING_FILES
    flower = compose["services"]["flower"]
    assert re.fullmatch(r"mher/flower:\d+\.\d+\.\d+", flower["image"])
    assert _interpolated(flower["environment"]["CELERY_BROKER_URL"]).startswith("redis://:stand-in-REDIS_PASSWORD@")


# --- KServe -----------------------------------------------------------------------------------


def test_the_inference_service_runs_the_api_as_its_explainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """InferenceService is a CRD: its explainer's pod part is checked as the Pod it becomes, and the rest by hand."""
    (service,) = _load_all(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    assert set(service["spec"]) == {"predictor", "explainer"}
    explainer = service["spec"]["explainer"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": service["metadata"]["name"]},
        "spec": {"containers": explainer["containers"], "volumes": explainer["volumes"]},
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    (container,) = explainer["containers"]
    assert container["image"].split(":")[0] == "classlens-api"
    assert container["args"][:2] == ["classlens", "serve"]
    assert container["args"][container["args"].index("--port") + 1] == "8080"  # where KServe sends its traffic
    config_maps = _of_kind(render(K8S / "base"), "ConfigMap")
    _check_settings("kserve/explainer", _container_env(container, config_maps), monkeypatch)
    routes = _openapi_get_paths()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in routes
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez" in routes
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert "post" in spec["paths"]["/v1/models/{name}:explain"]


def _compose_tool() -> list[str]:
    """``docker compose`` (v2) or Debian's ``docker-compose``: the tool that reads the file as a deployment will."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.fail("neither `docker compose` nor docker-compose is installed (Debian: apt-get install docker-compose)")


@pytest.mark.integration
def test_compose_reads_the_file(tmp_path: Path) -> None:
    command = [*_compose_tool(), "-p", "classlens", "-f", str(DEPLOY / "compose.yaml")]
    passwords = {"REDIS_PASSWORD": "stand-in", "GRAFANA_ADMIN_PASSWORD": "stand-in"}
    base_env = {key: value for key, value in os.environ.items() if key not in passwords}
    for profile in ([], ["--profile", "gpu"]):
        done = subprocess.run([*command, *profile, "config", "-q"], env=base_env | passwords, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
    # A password left unset stops compose, rather than starting Redis without one.
    done = subprocess.run(
        [*command, "config", "-q"], env=base_env | {"GRAFANA_ADMIN_PASSWORD": "x"}, capture_output=True
    )
    assert done.returncode != 0
    assert "REDIS_PASSWORD" in done.stderr.decode()


# --- sizing -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_redis_memory_is_measured_on_the_keys_an_explanation_leaves(tmp_path: Path) -> None:
    """The figures docs/deploy.md gives come from a real service's real keys (the bundled model only, here)."""
    from classlens.bench.redis_memory import format_table, measure

    (record,) = measure(tmp_path, images=2, vit_small=False)
    assert record["model"].startswith("fmnist-vit@")
    sizes = record["bytes"]
    assert len(sizes["result"]) == 2
    for result, text in zip(sizes["result"], sizes["result_json"], strict=True):
        assert result > text > 1000  # Redis's own overhead on top of the JSON it holds
    assert all(size > 0 for size in sizes["image"] + sizes["job"])
    medians = record["median_bytes"]
    assert medians["total"] == medians["result"] + medians["image"] + medians["job"]
    assert "| `fmnist-vit@" in format_table([record])
