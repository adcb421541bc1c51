"""deploy/k8s: every object valid against its schema (KEDA's included), the Deployments'
commands, security and wiring, and autoscaling that matches the workers' queues and time limits;
the Sentinel overlay (deploy/k8s/sentinel) applied as kustomize would, valid too, its KEDA
triggers on the sentinels and master of its IMAGEBATCH_REDIS_URL.

Schemas are vendored in tests/deploy/schemas (README.md there says from where and why not
kubeconform) and checked with jsonschema, strict: an unknown field is an error. The workers'
Celery settings and task time limits are read from the real worker app in a subprocess, so the
manifests are checked against what the code does, not against a copy.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from service.redis.client import parse_sentinel
from tests.deploy.conftest import (
    BOTO3_ENV,
    K8S,
    REPO,
    load_yaml,
    load_yaml_all,
    setting_env_names,
)

SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The Celery queue groups, each on workers of its own.
QUEUES = ("control", "collect", "sync", "webhooks")
COMMANDS = {
    "imagebatch-api": ["api"],
    **{
        f"imagebatch-worker-{q}": ["worker", "--queues", q, "--concurrency", "2", "--name", q]
        for q in QUEUES
    },
    "imagebatch-beat": ["beat"],
}


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(K8S / "kustomization.yaml")
    return data


@pytest.fixture(scope="module")
def objects(kustomization: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for resource in kustomization["resources"]:
        for doc in load_yaml_all(K8S / resource):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def deployments(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc for (kind, name), doc in objects.items() if kind == "Deployment"}


def test_kustomization_lists_every_manifest_and_sets_the_image(
    kustomization: dict[str, Any],
) -> None:
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    (image,) = kustomization["images"]
    assert image["name"] == "imagebatch" and image["newTag"]


def test_each_process_has_its_deployment_and_command(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deps = deployments(objects)
    assert set(deps) == set(COMMANDS)
    for name, doc in deps.items():
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "imagebatch", name
        assert container["args"] == COMMANDS[name], name
        assert "command" not in container, f"{name} must keep the image's ENTRYPOINT"
        assert (
            doc["spec"]["selector"]["matchLabels"].items()
            <= doc["spec"]["template"]["metadata"]["labels"].items()
        )


def test_pods_run_non_root_read_only_and_unprivileged(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for name, doc in deployments(objects).items():
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        # A read-only root needs writable data_dir (beat's schedule) and /tmp.
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/data", "/tmp"} <= mounts, name
        assert container["resources"]["limits"]["memory"], name


def test_beat_is_a_singleton(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    beat = objects[("Deployment", "imagebatch-beat")]["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"]["type"] == "Recreate"


def test_api_is_probed_and_served(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    api = objects[("Deployment", "imagebatch-api")]["spec"]["template"]
    (container,) = api["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    service = objects[("Service", "imagebatch-api")]["spec"]
    assert service["selector"].items() <= api["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] == "http"


def test_pods_read_the_config_map_the_secret_and_the_tenants_file(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    config = objects[("ConfigMap", "imagebatch-config")]["data"]
    unknown = set(config) - setting_env_names() - BOTO3_ENV
    assert not unknown, f"the ConfigMap sets variables no setting reads: {sorted(unknown)}"
    assert config["IMAGEBATCH_API_HOST"] == "0.0.0.0"
    for name, doc in deployments(objects).items():
        pod = doc["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        refs = {(k, v["name"]) for ref in container["envFrom"] for k, v in ref.items()}
        assert refs == {("configMapRef", "imagebatch-config"), ("secretRef", "imagebatch-secrets")}
        volumes = {v["name"]: v for v in pod["volumes"]}
        (tenants,) = [m for m in container["volumeMounts"] if m["name"] == "tenants"]
        assert volumes["tenants"]["secret"]["secretName"] == "imagebatch-tenants", name
        assert config["IMAGEBATCH_TENANTS_FILE"].startswith(tenants["mountPath"] + "/"), name


def test_namespace_enforces_restricted_pod_security(
    kustomization: dict[str, Any], objects: dict[tuple[str, str], dict[str, Any]]
) -> None:
    namespace = objects[("Namespace", kustomization["namespace"])]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in deployments(objects).values():
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


# --- schemas ------------------------------------------------------------------------------------


@cache
def validators() -> dict[tuple[str, str], Draft202012Validator]:
    """(apiVersion, kind) -> a validator, every vendored schema resolvable from every other."""
    schemas = [json.loads(path.read_text()) for path in sorted(SCHEMAS.glob("*/*.json"))]
    registry: Registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas
    )
    found = {}
    for schema in schemas:
        props = schema.get("properties", {})
        if "apiVersion" in props and "kind" in props:
            (api_version,) = props["apiVersion"]["enum"]
            (kind,) = props["kind"]["enum"]
            found[(api_version, kind)] = Draft202012Validator(schema, registry=registry)
    return found


def schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = validators().get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if validator is None:
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')} in {SCHEMAS}"]
    return [
        f"{e.json_path}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


def test_every_object_validates_against_its_schema_keda_included(
    kustomization: dict[str, Any],
) -> None:
    problems = []
    kinds = set()
    for resource in kustomization["resources"]:
        for doc in load_yaml_all(K8S / resource):
            kinds.add(doc["kind"])
            problems += [
                f"{resource} {doc['kind']}/{doc['metadata']['name']}: {error}"
                for error in schema_errors(doc)
            ]
    assert not problems, "\n".join(problems)
    assert {"ScaledObject", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds


def _first(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(doc for (k, _), doc in objects.items() if k == kind))


@pytest.mark.parametrize(
    ("kind", "break_it", "expected"),
    [
        (
            "Deployment",
            lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=60),
            "terminationGracePeriod",
        ),
        ("Deployment", lambda d: d["spec"].update(replicas="two"), "'two'"),
        (
            "PodDisruptionBudget",
            lambda d: d["spec"].update(maxUnavailabe=1),
            "maxUnavailabe",
        ),
        (
            "ScaledObject",
            lambda d: d["spec"].update(minReplicas=1),
            "minReplicas",
        ),
        (
            "ScaledObject",
            lambda d: d["spec"]["triggers"][0]["metadata"].update(listname="collect"),
            "listname",
        ),
        (
            "ScaledObject",
            lambda d: d["spec"]["triggers"][0]["metadata"].update(listLength=2),
            "2 is not of type 'string'",
        ),
        (
            "ScaledObject",
            lambda d: d["spec"]["triggers"][0]["metadata"].pop("address"),
            "is not valid under any of the given schemas",
        ),
        (
            "HorizontalPodAutoscaler",
            lambda d: d["spec"]["metrics"][0]["resource"]["target"].update(averageUtilisation=70),
            "averageUtilisation",
        ),
    ],
)
def test_the_schema_check_rejects_a_broken_manifest(
    objects: dict[tuple[str, str], dict[str, Any]], kind: str, break_it: Any, expected: str
) -> None:
    doc = _first(objects, kind)
    assert schema_errors(doc) == []
    break_it(doc)
    errors = schema_errors(doc)
    assert any(expected in e for e in errors), errors


# --- autoscaling --------------------------------------------------------------------------------


@cache
def celery_facts() -> dict[str, Any]:
    """The worker app's delivery settings and, per queue, its tasks' time limits.

    Read in a subprocess: configuring the Celery app would change it for every other test here.
    """
    code = """
import json
from service.settings import Settings
from workers.app import app, configure
configure(Settings(redis_url="redis://127.0.0.1:1/0"))
from service.queues import ROUTES
app.loader.import_default_modules()
limits = {}
for task in app.tasks.values():
    if task.name.startswith("celery."):
        continue
    # A task's queue is its route (tasks carry no queue attribute of their own).
    limits.setdefault(ROUTES[task.name], {})[task.name] = [
        task.soft_time_limit, task.time_limit, getattr(task, "handover_seconds", None)
    ]
print(json.dumps({
    "prefetch_multiplier": app.conf.worker_prefetch_multiplier,
    "acks_late": app.conf.task_acks_late,
    "tasks_acks_late": all(t.acks_late for t in app.tasks.values() if not t.name.startswith("celery.")),
    "limits": limits,
}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    facts: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return facts


def scaled_objects(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc for (kind, name), doc in objects.items() if kind == "ScaledObject"}


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def test_every_queue_the_workers_serve_has_its_own_scaled_worker_deployment(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert set(celery_facts()["limits"]) == set(QUEUES), "the tasks' queues changed"
    deps = deployments(objects)
    scaled = scaled_objects(objects)
    config = objects[("ConfigMap", "imagebatch-config")]["data"]
    redis = urlparse(config["IMAGEBATCH_REDIS_URL"])
    for queue in QUEUES:
        name = f"imagebatch-worker-{queue}"
        so = scaled[name]["spec"]
        assert so["scaleTargetRef"]["name"] == name
        assert so["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        # KEDA (through its HPA) owns the count; an applied replicas would reset it.
        assert "replicas" not in deps[name]["spec"], name
        assert 1 <= so["minReplicaCount"] < so["maxReplicaCount"], name
        (trigger,) = so["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis"
        assert meta["listName"] == queue, name
        assert int(meta["listLength"]) >= 1
        # The trigger reads the list in the Redis and database the service uses.
        assert meta["address"] == f"{redis.hostname}:{redis.port}", name
        assert meta["databaseIndex"] == redis.path.strip("/"), name


def test_queue_length_is_honest_one_reserved_task_per_process() -> None:
    facts = celery_facts()
    # With late acks and a prefetch of one, a worker process reserves only the task it runs,
    # so the list holds exactly the work nobody has started (issue 14's KEDA pitfall).
    assert facts["prefetch_multiplier"] == 1
    assert facts["acks_late"] is True and facts["tasks_acks_late"] is True


def test_grace_periods_outlast_what_a_warm_shutdown_waits_for_on_each_queue(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    limits = celery_facts()["limits"]
    deps = deployments(objects)
    for queue in QUEUES:
        grace = deps[f"imagebatch-worker-{queue}"]["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        # A task that hands over (service/handover.py) stops within its handover_seconds of
        # SIGTERM; any other runs to its end, at most its hard limit. The grace period is above
        # the longest of these: Celery's warm shutdown always gets to end or hand over a task.
        waits = [h if handover is None else handover for _, h, handover in limits[queue].values()]
        assert all(s <= h for s, h, _ in limits[queue].values()), limits[queue]
        assert grace > max(waits), (queue, grace, limits[queue])


def test_collect_and_sync_hand_over_so_their_grace_is_minutes_not_hours(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    limits = celery_facts()["limits"]
    deps = deployments(objects)
    for queue in ("collect", "sync"):
        grace = deps[f"imagebatch-worker-{queue}"]["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        longest = max(h for _, h, _ in limits[queue].values())
        assert all(ho is not None for _, _, ho in limits[queue].values()), limits[queue]
        # A scale-down no longer waits for the longest collect (4 h) or slice (1 h).
        assert grace <= 900 < longest, (queue, grace, longest)


def test_every_scaled_deployment_has_a_disruption_budget(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    budgets = {name: doc for (kind, name), doc in objects.items() if kind == "PodDisruptionBudget"}
    deps = deployments(objects)
    for name in [f"imagebatch-worker-{q}" for q in QUEUES] + ["imagebatch-api"]:
        spec = budgets[name]["spec"]
        assert spec["selector"]["matchLabels"].items() <= pod_labels(deps[name]).items(), name
        # Every other Deployment's pods fall outside it.
        for other, doc in deps.items():
            if other != name:
                assert not spec["selector"]["matchLabels"].items() <= pod_labels(doc).items()
        if name == "imagebatch-api":
            assert spec["minAvailable"] == 1
        else:
            # One pod at a time, never none: a budget that allows no eviction blocks every drain.
            assert spec["maxUnavailable"] == 1


def test_the_api_scales_on_cpu_between_two_and_more(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    hpa = objects[("HorizontalPodAutoscaler", "imagebatch-api")]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "imagebatch-api",
    }
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    api = objects[("Deployment", "imagebatch-api")]
    assert "replicas" not in api["spec"]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    # Utilization is measured against the request: without one the HPA cannot act.
    assert container["resources"]["requests"]["cpu"]


# --- the Sentinel overlay (deploy/k8s/sentinel) -------------------------------------------------

SENTINEL = K8S / "sentinel"


def _merge(base: Any, patch: Any) -> Any:
    """A strategic-merge patch as kustomize applies these: maps merge key by key, and lists are
    replaced whole (a custom resource has no merge keys; the ConfigMap patch has no lists)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return copy.deepcopy(patch)


@pytest.fixture(scope="module")
def sentinel_objects(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> dict[tuple[str, str], dict[str, Any]]:
    overlay: dict[str, Any] = load_yaml(SENTINEL / "kustomization.yaml")
    assert overlay["resources"] == [".."], "the overlay builds on deploy/k8s"
    patched = copy.deepcopy(objects)
    paths = [entry["path"] for entry in overlay["patches"]]
    assert set(paths) == {p.name for p in SENTINEL.glob("*.yaml")} - {"kustomization.yaml"}
    for path in paths:
        (patch,) = load_yaml_all(SENTINEL / path)
        target = (patch["kind"], patch["metadata"]["name"])
        assert target in patched, f"{path} patches {target}, which the base does not have"
        assert patch["apiVersion"] == patched[target]["apiVersion"], path
        patched[target] = _merge(patched[target], patch)
    return patched


def test_the_sentinel_overlay_validates_against_the_schemas(
    sentinel_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    problems = [
        f"{kind}/{name}: {error}"
        for (kind, name), doc in sentinel_objects.items()
        for error in schema_errors(doc)
    ]
    assert not problems, "\n".join(problems)


def test_the_sentinel_overlay_scales_on_the_primary_the_service_uses(
    objects: dict[tuple[str, str], dict[str, Any]],
    sentinel_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    config = sentinel_objects[("ConfigMap", "imagebatch-config")]["data"]
    target = parse_sentinel(config["IMAGEBATCH_REDIS_URL"])
    assert target is not None, "the overlay's IMAGEBATCH_REDIS_URL is not a redis+sentinel:// URL"
    # Only the Redis URL changes; every other setting is the base's.
    base_config = objects[("ConfigMap", "imagebatch-config")]["data"]
    assert {k: v for k, v in config.items() if k != "IMAGEBATCH_REDIS_URL"} == {
        k: v for k, v in base_config.items() if k != "IMAGEBATCH_REDIS_URL"
    }
    for name, doc in scaled_objects(sentinel_objects).items():
        (trigger,) = doc["spec"]["triggers"]
        (base,) = scaled_objects(objects)[name]["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-sentinel", name
        addresses = [a.strip() for a in meta["addresses"].split(",")]
        assert addresses == [f"{h}:{p}" for h, p in target.sentinels], name
        assert meta["sentinelMaster"] == target.master, name
        assert meta["databaseIndex"] == str(target.db), name
        # The same list and targets as the single-Redis trigger: only the way to Redis differs.
        for key in ("listName", "listLength", "activationListLength"):
            assert meta[key] == base["metadata"][key], (name, key)


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda m: m.pop("sentinelMaster"), "is not valid under any of the given schemas"),
        (lambda m: m.update(sentinelMasterName="mymaster"), "sentinelMasterName"),
        (lambda m: m.update(addresses="a:26379;b:26379"), "does not match"),
        (lambda m: m.update(address="a:6379"), "'address' was unexpected"),
    ],
)
def test_the_schema_check_rejects_a_broken_sentinel_trigger(
    sentinel_objects: dict[tuple[str, str], dict[str, Any]], break_it: Any, expected: str
) -> None:
    doc = copy.deepcopy(scaled_objects(sentinel_objects)["imagebatch-worker-collect"])
    assert schema_errors(doc) == []
    break_it(doc["spec"]["triggers"][0]["metadata"])
    errors = schema_errors(doc)
    assert any(expected in e for e in errors), errors
