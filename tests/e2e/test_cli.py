"""The `imagebatch` client commands against a running stack, as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.support.stack import job_body

pytestmark = pytest.mark.slow


def imagebatch(api: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--api", api],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_submit_wait_status_download(make_simulator, make_stack, tmp_path: Path) -> None:
    stack = make_stack(make_simulator()).start()
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job_body(4, fmt="webp")))
    done = imagebatch(stack.api, "submit", str(job_file), "--wait", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert "succeeded" in done.stderr and "4 succeeded" in done.stderr

    status = imagebatch(stack.api, "status", job_id, cwd=tmp_path)
    assert status.returncode == 0 and "succeeded" in status.stderr

    got = imagebatch(stack.api, "download", job_id, "--to", str(tmp_path / "out"), cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    folder = tmp_path / "out" / job_id
    assert len((folder / "manifest.jsonl").read_text().splitlines()) == 4
    images = sorted((folder / "images").iterdir())
    assert [p.name for p in images] == [f"sku-{i}.webp" for i in range(4)]
    with Image.open(images[0]) as img:
        assert img.format == "WEBP"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"items": [{"id": "a", "prompt": "x", "size": "7x7"}]}))
    refused = imagebatch(stack.api, "submit", str(bad), cwd=tmp_path)
    assert refused.returncode == 2
    assert "items[0].size" in refused.stderr and "id a" in refused.stderr.replace("'", "")


def test_retry_and_schedules_from_the_shell(make_simulator, make_stack, tmp_path: Path) -> None:
    stack = make_stack(make_simulator(moderation_words="forbidden")).start()
    body = job_body(3)
    body["items"][1]["prompt"] = "A forbidden scene"
    job_id = stack.submit(body)["id"]
    assert stack.wait_job(job_id)["status"] == "partially_failed"
    items = tmp_path / "fix.json"
    items.write_text(json.dumps([{"id": "sku-1", "prompt": "A calm scene"}]))
    done = imagebatch(stack.api, "retry", job_id, "--items", str(items), "--wait", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 items sent again" in done.stderr and "3 succeeded" in done.stderr
    again = imagebatch(stack.api, "retry", job_id, cwd=tmp_path)
    assert again.returncode == 2 and "no failed items" in again.stderr

    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job_body(2)))
    made = imagebatch(
        stack.api,
        *("schedules", "create", "--name", "nightly", "--cron", "0 3 * * *"),
        *("--timezone", "Europe/Riga", "--job", str(job_file), "--label", "team=catalog"),
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    schedule_id = made.stdout.split()[0]
    assert schedule_id.startswith("sch_") and "At 03:00" in made.stdout
    paused = imagebatch(stack.api, "schedules", "pause", schedule_id, cwd=tmp_path)
    assert "[paused]" in paused.stdout and "next -" in paused.stdout
    resumed = imagebatch(stack.api, "schedules", "resume", schedule_id, cwd=tmp_path)
    assert "[paused]" not in resumed.stdout
    listed = imagebatch(stack.api, "schedules", "list", cwd=tmp_path)
    assert schedule_id in listed.stdout and "not run yet" in listed.stdout
    bad = imagebatch(
        stack.api,
        *("schedules", "create", "--name", "x", "--cron", "0 3 * *", "--job", str(job_file)),
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "cron" in bad.stderr and "five fields" in bad.stderr
    gone = imagebatch(stack.api, "schedules", "delete", schedule_id, cwd=tmp_path)
    assert gone.returncode == 0
    assert schedule_id not in imagebatch(stack.api, "schedules", "list", cwd=tmp_path).stdout
