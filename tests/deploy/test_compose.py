"""deploy/docker-compose.yml (and its tenants overlay): the services, their wiring and settings.

No Docker engine runs here, so the structure is checked from the YAML, and the one-shot bucket
setup script is run for real against a stand-in ``mc``. When a ``docker compose`` CLI is on
PATH, ``docker compose config`` validates the files too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.deploy.conftest import (
    BOTO3_ENV,
    COMPOSE_FILE,
    DEPLOY,
    IMAGEBATCH_SERVICES,
    REPO,
    TENANTS_OVERLAY,
    load_yaml,
    setting_env_names,
)

EXPECTED_SERVICES = {
    "redis",
    "minio",
    "minio-setup",
    "api",
    "worker",
    "worker-sync",
    "worker-webhooks",
    "beat",
    "simulator",
    "prometheus",
    "grafana",
}
# Values for the compose variables, as an operator's deploy/.env would give them.
COMPOSE_ENV = {
    "MINIO_ROOT_USER": "minio-admin",
    "MINIO_ROOT_PASSWORD": "root-password-123",
    "MINIO_IMAGEBATCH_USER": "imagebatch",
    "MINIO_IMAGEBATCH_PASSWORD": "app-password-123",
    "OPENAI_API_KEY": "sk-test",
    "GRAFANA_ADMIN_PASSWORD": "grafana-password",
}
_VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} interpolation ($$ is a literal $)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return _VARIABLE.sub(sub, value).replace("$$", "$")


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_every_service_of_the_stack_is_defined(services: dict[str, Any]) -> None:
    assert set(services) == EXPECTED_SERVICES


def test_imagebatch_services_are_one_image_built_from_deploy_dockerfile(
    services: dict[str, Any],
) -> None:
    images = set()
    for name in IMAGEBATCH_SERVICES:
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == REPO, f"{name}: the build context must be the repo root"
        assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        images.add(services[name]["image"])
    assert len(images) == 1, f"api, workers, beat and simulator must share one image: {images}"


def test_each_process_runs_its_command(services: dict[str, Any]) -> None:
    assert services["api"]["command"] == ["api"]
    assert services["worker"]["command"] == ["worker", "--queues", "control,collect"]
    assert services["worker-sync"]["command"] == ["worker", "--queues", "sync"]
    assert services["worker-webhooks"]["command"] == ["worker", "--queues", "webhooks"]
    assert services["beat"]["command"] == ["beat"]
    sim = services["simulator"]["command"]
    assert sim[0] == "simulator"
    assert sim[sim.index("--host") + 1] == "0.0.0.0"
    assert sim[sim.index("--port") + 1] == "8100"
    # Every queue the service routes to has a worker consuming it.
    from service.queues import QUEUES

    consumed = {
        q
        for name in ("worker", "worker-sync", "worker-webhooks")
        for q in services[name]["command"][2].split(",")
    }
    assert consumed == set(QUEUES)


def test_redis_keeps_its_data(compose: dict[str, Any], services: dict[str, Any]) -> None:
    redis = services["redis"]
    cmd = redis["command"]
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    # An evicted job or budget key would be silent data loss.
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    volume = redis["volumes"][0]
    assert volume.endswith(":/data") and volume.split(":")[0] in compose["volumes"]
    assert redis["image"].startswith("redis:7")
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_app_services_wait_for_redis_and_the_bucket(services: dict[str, Any]) -> None:
    for name in ("api", "worker", "worker-sync", "beat"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["minio-setup"]["condition"] == "service_completed_successfully", name
    assert services["minio-setup"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["minio"]["healthcheck"]["test"]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert services["prometheus"]["healthcheck"]["test"]


def test_only_the_simulator_is_behind_a_profile(services: dict[str, Any]) -> None:
    assert services["simulator"]["profiles"] == ["simulator"]
    assert [n for n, s in services.items() if s.get("profiles")] == ["simulator"]


def test_only_the_api_keeps_the_images_healthcheck(services: dict[str, Any]) -> None:
    # The image's HEALTHCHECK probes /healthz, which only the api process serves.
    assert "healthcheck" not in services["api"]
    for name in ("worker", "worker-sync", "beat", "simulator"):
        assert services[name]["healthcheck"] == {"disable": True}, name


def test_environment_uses_only_real_setting_names(services: dict[str, Any]) -> None:
    allowed = setting_env_names() | BOTO3_ENV
    overlay = load_yaml(TENANTS_OVERLAY)["services"]
    for name in IMAGEBATCH_SERVICES:
        unknown = set(env_of(services[name])) - allowed
        assert not unknown, f"{name} sets variables no setting reads: {sorted(unknown)}"
    for name, service in overlay.items():
        unknown = set(env_of(service)) - allowed
        assert not unknown, f"compose.tenants.yml {name}: {sorted(unknown)}"


def test_environment_points_at_the_stacks_own_services(services: dict[str, Any]) -> None:
    env = {k: interpolate(v, COMPOSE_ENV) for k, v in env_of(services["api"]).items()}
    assert urlparse(env["IMAGEBATCH_REDIS_URL"]).hostname == "redis"
    assert urlparse(env["IMAGEBATCH_S3_ENDPOINT_URL"]).hostname == "minio"
    assert env["IMAGEBATCH_S3_PATH_STYLE"] == "true"
    storage = urlparse(env["IMAGEBATCH_STORAGE_URL"])
    assert storage.scheme == "s3" and storage.netloc == "imagebatch"
    # The service stores as its own bucket-scoped MinIO user, never as MinIO's root.
    assert env["AWS_ACCESS_KEY_ID"] == COMPOSE_ENV["MINIO_IMAGEBATCH_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == COMPOSE_ENV["MINIO_IMAGEBATCH_PASSWORD"]
    # Every value Settings can parse, as the processes in the containers will.
    from service.settings import Settings

    settings = Settings.model_validate(
        {
            k.removeprefix("IMAGEBATCH_").lower(): v
            for k, v in env.items()
            if k.startswith("IMAGEBATCH_")
        }
    )
    assert settings.s3_path_style is True


def test_secrets_are_required_never_written_in(compose: dict[str, Any]) -> None:
    secret = re.compile(r"PASSWORD|SECRET|_KEY(_ID)?$")
    for name, service in compose["services"].items():
        for key, value in env_of(service).items():
            if secret.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), (
                    f"{name}: {key} must come from deploy/.env as a required ${{VAR:?…}}, "
                    f"not {value!r}"
                )


def test_every_compose_variable_is_in_env_example() -> None:
    example = (DEPLOY / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    for path in (COMPOSE_FILE, TENANTS_OVERLAY):
        used = {m.group(1) for m in _VARIABLE.finditer(path.read_text())}
        missing = used - documented
        assert not missing, f"{path.name} uses {sorted(missing)}, not in deploy/.env.example"


def test_required_variables_stop_compose_with_their_name() -> None:
    text = COMPOSE_FILE.read_text()
    assert interpolate(text, COMPOSE_ENV)
    for name in COMPOSE_ENV:
        env = {k: v for k, v in COMPOSE_ENV.items() if k != name}
        with pytest.raises(KeyError, match=name):
            interpolate(text, env)


def test_bind_mounts_exist_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_published_ports_listen_on_localhost_only(compose: dict[str, Any]) -> None:
    seen = set()
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name}: {port} would be reachable from the network"
            assert host_port not in seen, f"{name}: host port {host_port} is published twice"
            seen.add(host_port)
            assert container_port.isdigit()
    assert "8000" in seen


def test_tenants_overlay_reaches_every_process_that_checks_budgets() -> None:
    overlay = load_yaml(TENANTS_OVERLAY)["services"]
    assert set(overlay) == {"api", "worker", "worker-sync", "worker-webhooks", "beat"}
    for name, service in overlay.items():
        target = env_of(service)["IMAGEBATCH_TENANTS_FILE"]
        (volume,) = service["volumes"]
        assert volume["target"] == target, name
        assert volume["read_only"] is True
        assert volume["bind"]["create_host_path"] is False
        assert volume["source"] == "./tenants.toml"


def test_tenants_example_loads_with_the_services_loader() -> None:
    from service.tenants import load_tenants

    tenants = load_tenants(DEPLOY / "tenants.example.toml")
    assert {t.id for t in tenants} == {"catalog-team", "marketing"}


def test_minio_policy_scopes_the_user_to_the_bucket(services: dict[str, Any]) -> None:
    policy = json.loads((DEPLOY / "minio" / "imagebatch-policy.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::imagebatch", "arn:aws:s3:::imagebatch/*"}
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert {"s3:PutObject", "s3:GetObject", "s3:ListBucket"} <= actions
    assert not any(a.endswith("*") for a in actions)


# --- the one-shot bucket setup, run against a stand-in mc ----------------------------------

FAKE_MC = """#!/bin/sh
echo "$*" >> "$MC_LOG"
case "$*" in
  "admin policy attach"*)
    if [ -n "$MC_ATTACH_ERROR" ]; then echo "mc: <ERROR> $MC_ATTACH_ERROR" >&2; exit 1; fi ;;
esac
exit 0
"""


def run_setup(
    services: dict[str, Any], tmp_path: Path, attach_error: str = ""
) -> subprocess.CompletedProcess[str]:
    setup = services["minio-setup"]
    assert setup["entrypoint"][0] == "/bin/sh"
    script = interpolate(setup["command"][0], COMPOSE_ENV)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "mc").write_text(FAKE_MC)
    (bindir / "mc").chmod(0o755)
    env = {
        **os.environ,
        **COMPOSE_ENV,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "MC_LOG": str(tmp_path / "mc.log"),
        "MC_ATTACH_ERROR": attach_error,
    }
    return subprocess.run(
        [*setup["entrypoint"], script], env=env, capture_output=True, text=True, timeout=30
    )


def test_bucket_setup_creates_bucket_policy_and_user(
    services: dict[str, Any], tmp_path: Path
) -> None:
    proc = run_setup(services, tmp_path)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "mc.log").read_text().splitlines()
    assert calls == [
        "alias set local http://minio:9000 minio-admin root-password-123",
        "mb --ignore-existing local/imagebatch",
        "admin policy create local imagebatch /etc/imagebatch/imagebatch-policy.json",
        "admin user add local imagebatch app-password-123",
        "admin policy attach local imagebatch --user imagebatch",
    ]
    policy_mount = services["minio-setup"]["volumes"][0].split(":")
    assert policy_mount[1] == "/etc/imagebatch/imagebatch-policy.json"


def test_bucket_setup_reruns_when_the_policy_is_already_attached(
    services: dict[str, Any], tmp_path: Path
) -> None:
    proc = run_setup(
        services,
        tmp_path,
        "Unable to make user/group policy association. The specified policy change is already in effect.",
    )
    assert proc.returncode == 0, proc.stderr


def test_bucket_setup_fails_on_any_other_error(services: dict[str, Any], tmp_path: Path) -> None:
    proc = run_setup(services, tmp_path, "Access Denied.")
    assert proc.returncode != 0
    assert "Access Denied." in proc.stderr


# --- docker compose itself, where it is installed ------------------------------------------


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return cmd
    return None


def test_docker_compose_config_accepts_the_files(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI here; the structure is checked from the YAML above")
    # The overlay needs the operator's tenants file; the example stands in for it.
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns(".env"))
    shutil.copy(DEPLOY / "tenants.example.toml", tmp_path / "deploy" / "tenants.toml")
    env = {**os.environ, **COMPOSE_ENV}
    for files in (["docker-compose.yml"], ["docker-compose.yml", "compose.tenants.yml"]):
        args = [a for f in files for a in ("-f", f)]
        proc = subprocess.run(
            [*cli, *args, "--profile", "simulator", "config", "-q"],
            cwd=tmp_path / "deploy",
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
