"""``imagebatch submit | status | download`` when something is wrong on the user's side: the
command says what in a line and exits non-zero, never with a Python traceback.

The happy path against a running stack is in tests/e2e/test_cli.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.procs import free_port
from tests.support.receiver import receiving


def imagebatch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_status_with_no_api_running_says_so(tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{free_port()}"
    out = imagebatch("status", "job_0193", "--api", api, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "cannot reach the API" in out.stderr and api in out.stderr


def test_download_with_no_api_running_says_so(tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{free_port()}"
    out = imagebatch("download", "job_0193", "--api", api, "--to", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "cannot reach the API" in out.stderr
    assert not (tmp_path / "job_0193").exists()  # no empty folder left behind


def test_submit_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with receiving([202]) as api:
        out = imagebatch("submit", "no-such-job.json", "--api", api.url, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "no-such-job.json" in out.stderr
    assert api.count() == 0  # nothing was sent


def test_an_api_error_is_shown_with_its_detail(tmp_path: Path) -> None:
    body = b'{"type":"about:blank","status":404,"detail":"There is no job \'job_x\'.","errors":[]}'
    with receiving([404], body=body) as api:
        out = imagebatch("status", "job_x", "--api", api.url, cwd=tmp_path)
    assert out.returncode == 2
    assert "error 404" in out.stderr and "There is no job 'job_x'." in out.stderr
    assert api.requests[0].path == "/v1/jobs/job_x"
