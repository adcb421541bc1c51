"""The api process as the image runs it: the HEALTHCHECK passes, and /metrics is what Prometheus
and the rules expect.

The API runs as the container's command does (the ``imagebatch`` console script, ``api``), with
the compose environment's settings, local storage instead of MinIO and the example tenants file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.deploy.conftest import DEPLOY, METRICS
from tests.deploy.test_image import healthcheck_command
from tests.support.procs import free_port, start_server

METRICS_TOKEN = (DEPLOY / "prometheus" / "metrics-token").read_text().strip()


@pytest.fixture(scope="module")
def api_port(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("deploy-api")
    port = free_port()
    env = {
        # A database of its own: other tests flush db 0.
        "IMAGEBATCH_REDIS_URL": redis_url.rsplit("/", 1)[0] + "/6",
        "IMAGEBATCH_STORAGE_URL": (tmp / "storage").as_uri(),
        "IMAGEBATCH_DATA_DIR": str(tmp / "data"),
        "IMAGEBATCH_TENANTS_FILE": str(DEPLOY / "tenants.example.toml"),
        "IMAGEBATCH_API_HOST": "127.0.0.1",
        "IMAGEBATCH_API_PORT": str(port),
        "OPENAI_API_KEY": "sk-test",
        # Nothing listens there: the API must start and answer without reaching upstream.
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        # With tenants /metrics needs the token Prometheus sends from prometheus/metrics-token.
        "IMAGEBATCH_METRICS_TOKEN": METRICS_TOKEN,
    }
    console_script = Path(sys.executable).parent / "imagebatch"
    proc = start_server([str(console_script), "api"], port, tmp / "api.log", env=env, cwd=tmp)
    yield port
    proc.stop()


def test_the_images_healthcheck_passes_against_the_real_api(api_port: int) -> None:
    env = {**os.environ, "IMAGEBATCH_API_PORT": str(api_port)}
    proc = subprocess.run(
        healthcheck_command(), env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


def test_readyz_reports_redis_and_storage(api_port: int) -> None:
    resp = httpx2.get(f"http://127.0.0.1:{api_port}/readyz", timeout=10)
    assert resp.status_code == 200, resp.text


def test_metrics_expose_every_series_deploy_uses_and_pass_promtools_lint(
    api_port: int, promtool: str, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{api_port}/metrics"
    assert httpx2.get(url, timeout=10).status_code == 401  # tenants: never without the token
    resp = httpx2.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert resp.status_code == 200
    types = {
        parts[2]: parts[3]
        for parts in (line.split() for line in resp.text.splitlines())
        if parts[:2] == ["#", "TYPE"]
    }
    for name, (kind, _) in METRICS.items():
        # prometheus_client names a counter's TYPE line with or without _total by version.
        exposed = types.get(name) or types.get(name.removesuffix("_total"))
        assert exposed == kind, f"/metrics has no {kind} {name}"
    exposition = tmp_path / "metrics.txt"
    exposition.write_text(resp.text)
    proc = subprocess.run(
        [promtool, "check", "metrics"],
        stdin=exposition.open(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
