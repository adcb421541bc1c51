"""deploy/Dockerfile: stages, a non-root runtime, the entry point, and a health check that works.

These checks parse the Dockerfile and run the HEALTHCHECK's command against an HTTP server
standing in for the API, in seconds; test_container.py builds the image and runs it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.deploy.conftest import DEPLOY, REPO

DOCKERFILE = DEPLOY / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def copy_sources(stage: Stage) -> list[str]:
    """The build-context paths a stage's COPY instructions read (not --from= copies)."""
    sources = []
    for args in stage.all("COPY"):
        parts = args.split()
        if any(p.startswith("--from=") for p in parts):
            continue
        sources += [p for p in parts[:-1] if not p.startswith("--")]
    return sources


def parse_dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            if keyword == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


def test_two_stages_on_python_311_slim() -> None:
    args, stages = parse_dockerfile()
    assert [s.name for s in stages] == ["build", "runtime"]
    for stage in stages:
        base = stage.base.replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
        assert base == "python:3.11-slim"


def test_build_stage_installs_the_project_wheel_into_a_venv() -> None:
    _, (build, _) = parse_dockerfile()
    runs = " ".join(build.all("RUN"))
    assert "python -m venv /opt/venv" in runs
    assert "pip wheel --no-deps --wheel-dir /wheels ." in runs
    assert "/opt/venv/bin/pip install /wheels/*.whl" in runs
    # What the build copies exists, and is what pyproject packages.
    copied = copy_sources(build)
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: not in the repo"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= set(copied)
    assert pyproject["project"]["readme"] in copied


def test_runtime_stage_ships_only_the_venv() -> None:
    _, (_, runtime) = parse_dockerfile()
    copies = runtime.all("COPY")
    assert copies == ["--from=build /opt/venv /opt/venv"]
    env = runtime.last("ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env
    assert "IMAGEBATCH_API_HOST=0.0.0.0" in env


def test_runs_as_a_fixed_non_root_user() -> None:
    _, (_, runtime) = parse_dockerfile()
    user = runtime.last("USER")
    uid, _, gid = user.partition(":")
    assert uid == "10001" and gid == "10001"
    setup = " ".join(runtime.all("RUN"))
    assert "--uid 10001" in setup and "--gid 10001" in setup
    # The user must own the one writable place (data_dir: beat's schedule, local files).
    assert "chown imagebatch:imagebatch /data" in setup
    assert "IMAGEBATCH_DATA_DIR=/data" in runtime.last("ENV")
    # USER comes after every RUN, so nothing in the final image runs as root at start.
    kinds = [kw for kw, _ in runtime.instructions]
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")


def test_entrypoint_is_the_console_script_and_the_default_is_the_api() -> None:
    _, (_, runtime) = parse_dockerfile()
    assert json.loads(runtime.last("ENTRYPOINT")) == ["imagebatch"]
    assert json.loads(runtime.last("CMD")) == ["api"]
    assert runtime.last("EXPOSE") == "8000"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "imagebatch" in scripts


def test_dockerignore_keeps_out_venv_and_git_but_not_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern[1:] if negate else pattern
            pat = pat.rstrip("/")
            if (
                pat == "**"
                or fnmatch.fnmatch(path, pat)
                or path.startswith(pat + "/")
                or (pat.startswith("**/") and fnmatch.fnmatch(path.rsplit("/", 1)[-1], pat[3:]))
            ):
                keep = negate
        return keep

    _, (build, _) = parse_dockerfile()
    for src in copy_sources(build):
        assert included(src.rstrip("/")), f"{src} is copied by the build but ignored"
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".imagebatch/redis/appendonly.aof",
        ".env",
        "service/__pycache__/x.pyc",
        "tests/conftest.py",
    ):
        assert not included(path), f"{path} would be sent to the build"


# --- the HEALTHCHECK, run against a stand-in API -------------------------------------------


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def healthcheck_command() -> list[str]:
    _, (_, runtime) = parse_dockerfile()
    check = runtime.last("HEALTHCHECK")
    assert "--interval=" in check and "--timeout=" in check
    cmd = json.loads(check[check.index("CMD") + 3 :].strip())
    assert cmd[0] == "python"
    return [sys.executable, *cmd[1:]]


def run_healthcheck(port: int) -> int:
    env = {**os.environ, "IMAGEBATCH_API_PORT": str(port)}
    return subprocess.run(
        healthcheck_command(), env=env, capture_output=True, timeout=30
    ).returncode


def test_healthcheck_passes_when_healthz_answers(
    health_server: tuple[ThreadingHTTPServer, type[_Health]],
) -> None:
    server, _ = health_server
    assert run_healthcheck(server.server_address[1]) == 0


def test_healthcheck_fails_when_healthz_errors(
    health_server: tuple[ThreadingHTTPServer, type[_Health]],
) -> None:
    server, handler = health_server
    handler.status = 503
    assert run_healthcheck(server.server_address[1]) != 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    from tests.support.procs import free_port

    assert run_healthcheck(free_port()) != 0
