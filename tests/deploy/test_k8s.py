"""deploy/k8s: the kustomization, the Deployments' commands, security and wiring."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.conftest import BOTO3_ENV, K8S, load_yaml, load_yaml_all, setting_env_names

COMMANDS = {
    "imagebatch-api": ["api"],
    "imagebatch-worker": ["worker", "--queues", "control,collect"],
    "imagebatch-worker-sync": ["worker", "--queues", "sync"],
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
