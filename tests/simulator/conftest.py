"""Fixtures for the simulator's tests: simulators as real processes, driven with the official SDK.

``sim`` is one fast simulator for the module (batches finish in milliseconds, a moderation word
set); ``make_sim(**flags)`` starts one with its own flags (rate limits, failure rates, a key,
slow batches) and stops it after the test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle, start_simulator

FAST = {"rate": 2000, "validate_seconds": 0, "finalize_seconds": 0}
BLOCKED = "forbidden,gore=violence"
TERMINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    handle = start_simulator(tmp_path_factory.mktemp("sim"), moderation_words=BLOCKED, **FAST)
    yield handle
    handle.stop()


@pytest.fixture
def client(sim: SimulatorHandle) -> Iterator[openai.OpenAI]:
    c = sim.client(max_retries=0)
    yield c
    c.close()


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[Callable[..., SimulatorHandle]]:
    started: list[SimulatorHandle] = []

    def make(**flags: Any) -> SimulatorHandle:
        handle = start_simulator(tmp_path / f"sim{len(started)}", **{**FAST, **flags})
        started.append(handle)
        return handle

    yield make
    for handle in started:
        handle.stop()


# --- helpers the test modules share -------------------------------------------------------------


def gen_line(
    custom_id: str, prompt: str = "a red mug on a white table", **body: Any
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/images/generations",
        "body": {
            "model": "gpt-image-2",
            "prompt": prompt,
            "size": "1024x1024",
            "quality": "low",
            **body,
        },
    }


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(
        (json.dumps(x) if not isinstance(x, str) else x).encode() + b"\n" for x in lines
    )


def submit(
    client: openai.OpenAI, lines: list[Any], endpoint: str = "/v1/images/generations", **kw: Any
) -> Any:
    f = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint=endpoint, completion_window="24h", **kw
    )  # type: ignore[arg-type]


def wait_status(
    client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 30
) -> Any:
    return wait_until(
        lambda: (b := client.batches.retrieve(batch_id)).status in statuses and b,
        timeout=timeout,
        message=f"batch {batch_id} to reach {statuses}",
    )


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    """A file's JSONL lines, streamed as the service does."""
    if file_id is None:
        return []
    with client.files.with_streaming_response.content(file_id) as resp:
        return [json.loads(line) for line in resp.iter_lines() if line]
