"""A new user's path: `imagebatch up` on embedded defaults, then the README's curl example."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx2
import psutil
import pytest
from PIL import Image

from tests.support.procs import free_port, port_open, wait_until

pytestmark = pytest.mark.slow

README = (Path(__file__).parents[2] / "README.md").read_text()


def readme_job_body() -> bytes:
    """The JSON of the README's first `curl … /v1/jobs … -d '…'` example, as a user would paste it."""
    match = re.search(
        r"curl -s -X POST http://127\.0\.0\.1:8000/v1/jobs -H 'Content-Type: application/json' -d '(.*?)'\n",
        README,
        re.S,
    )
    assert match, "the README lost its curl example"
    return match.group(1).encode()


def start_up(data_dir: Path, api_port: int, sim_port: int) -> subprocess.Popen[bytes]:
    # The stack configures itself; only the machine's choice of redis-server binary is kept.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IMAGEBATCH_", "OPENAI_")) or k == "IMAGEBATCH_REDIS_SERVER"
    }
    log = (data_dir.parent / "up.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "up",
            "--data-dir",
            str(data_dir),
            "--api-port",
            str(api_port),
            "--simulator-port",
            str(sim_port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=data_dir.parent,
    )


def test_up_runs_the_readme_example_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    api_port, sim_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    up = start_up(data_dir, api_port, sim_port)
    try:
        wait_until(
            lambda: port_open(api_port) and httpx2.get(f"{api}/readyz").status_code == 200,
            timeout=90,
            message="imagebatch up to be ready",
        )
        info = httpx2.get(f"{api}/v1/info").json()
        assert info["upstream"]["simulator"] is True and "simulator" in info["upstream"]["note"]
        assert "SIMULATOR" in (tmp_path / "up.log").read_text()

        resp = httpx2.post(
            f"{api}/v1/jobs",
            content=readme_job_body(),
            headers={"Content-Type": "application/json"},
        )
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        job = wait_until(
            lambda: (
                (j := httpx2.get(f"{api}/v1/jobs/{job_id}").json())["status"] == "succeeded" and j
            ),
            timeout=60,
            interval=0.3,
            message="the README job to succeed within a minute",
        )
        images = data_dir / "storage" / "jobs" / job_id / "images"
        assert sorted(p.name for p in images.iterdir()) == ["sku-1001.png", "sku-1002.png"]
        with Image.open(images / "sku-1001.png") as img:
            assert img.size == (1024, 1024)
        assert job["cost_usd"]["batch"] > 0
        # The simulator told the API of the finished batch with a signed webhook.
        hooks = httpx2.get(f"http://127.0.0.1:{sim_port}/_simulator/stats").json()["webhooks"]
        assert hooks["enabled"] and hooks["delivered"] >= 1, hooks
        metrics = httpx2.get(f"{api}/metrics").text
        verified = re.search(r"^imagebatch_openai_webhooks_verified_total (\S+)$", metrics, re.M)
        assert verified and float(verified.group(1)) >= 1

        children = psutil.Process(up.pid).children(recursive=True)
        assert (
            len(children) >= 5
        )  # redis, simulator, two workers, beat, api (plus worker pool processes)
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running after SIGTERM: {[p.pid for p in alive]}"
        assert not port_open(sim_port)

        # The next start finds the jobs it left.
        up = start_up(data_dir, api_port, sim_port)
        wait_until(
            lambda: port_open(api_port) and httpx2.get(f"{api}/readyz").status_code == 200,
            timeout=90,
            message="imagebatch up to restart",
        )
        again = httpx2.get(f"{api}/v1/jobs/{job_id}").json()
        assert again["status"] == "succeeded" and again["counts"]["succeeded"] == 2
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(60)


def _child(up: subprocess.Popen[bytes], *words: str) -> psutil.Process | None:
    """The direct child of `up` whose command line holds every one of ``words``."""
    for proc in psutil.Process(up.pid).children():
        try:
            if all(w in proc.cmdline() for w in words):
                return proc
        except psutil.NoSuchProcess:
            continue
    return None


def _kill_tree(proc: psutil.Process, sig: int) -> None:
    for p in [*proc.children(recursive=True), proc]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def test_up_restarts_a_child_that_exits_and_the_stack_runs_on(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    api_port, sim_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    up = start_up(data_dir, api_port, sim_port)
    try:
        wait_until(
            lambda: port_open(api_port) and httpx2.get(f"{api}/readyz").status_code == 200,
            timeout=250,
            message="imagebatch up to be ready",
        )
        # The control worker is killed outright; the collect worker exits with status 0 (a
        # warm shutdown, as a worker that gave up on an error would): both come back.
        control = _child(up, "worker", "control")
        collect = _child(up, "worker", "collect")
        assert control and collect
        _kill_tree(control, signal.SIGKILL)
        collect.send_signal(signal.SIGTERM)
        collect.wait(60)  # not our child: psutil cannot tell its status; up's log does
        wait_until(
            lambda: (
                f"worker-collect (pid {collect.pid}) exited with status 0"
                in (tmp_path / "up.log").read_text()
            ),
            timeout=30,
            message="up to see the collect worker exit with status 0",
        )
        for words, old in ((("worker", "control"), control), (("worker", "collect"), collect)):
            wait_until(
                lambda w=words, o=old: (c := _child(up, *w)) is not None and c.pid != o.pid,
                timeout=30,
                message=f"{' '.join(words)} to be started again",
            )
        assert up.poll() is None  # the stack ran on

        # The API too, and then a job goes all the way through the restarted stack.
        old_api = _child(up, "api")
        assert old_api
        _kill_tree(old_api, signal.SIGKILL)
        wait_until(
            lambda: port_open(api_port) and httpx2.get(f"{api}/readyz").status_code == 200,
            timeout=240,
            message="the API to be started again",
        )
        resp = httpx2.post(
            f"{api}/v1/jobs",
            content=readme_job_body(),
            headers={"Content-Type": "application/json"},
        )
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        wait_until(
            lambda: httpx2.get(f"{api}/v1/jobs/{job_id}").json()["status"] == "succeeded",
            timeout=90,
            interval=0.3,
            message="the job to succeed on the restarted stack",
        )
        assert "restarting it in" in (tmp_path / "up.log").read_text()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(60)
