"""Failpoints: the spec, firing once per stack, each action, and the registry against the code."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from service import failpoints
from service.failpoints import REGISTRY, FailpointError, Spec, arm, failpoint, fired, parse
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    yield
    arm("", None)


def test_parse_reads_every_action_and_option() -> None:
    specs = parse("plan.chunk_planned=kill, submit.batch_created=sleep:2.5,collect.line=raise@3*")
    specs |= parse("submit.create_started=stop:40@2")
    assert specs == {
        "plan.chunk_planned": Spec("kill"),
        "submit.batch_created": Spec("sleep", seconds=2.5),
        "collect.line": Spec("raise", nth=3, every=True),
        "submit.create_started": Spec("stop", seconds=40, nth=2),
    }
    assert parse("") == {} and parse(None) == {}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("plan.nope=kill", "plan.nope"),
        ("plan.chunk_planned", "plan.chunk_planned"),
        ("plan.chunk_planned=explode", "explode"),
        ("plan.chunk_planned=sleep", "sleep"),
        ("plan.chunk_planned=kill@0", "kill@0"),
    ],
)
def test_a_wrong_spec_is_refused_naming_the_part(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        parse(text)


def test_settings_refuse_a_wrong_spec_at_startup() -> None:
    with pytest.raises(ValidationError, match=r"no failpoint named 'plan\.typo'"):
        Settings(failpoints="plan.typo=kill")
    assert Settings(failpoints="sweep.pass=raise").failpoints == "sweep.pass=raise"


def test_unarmed_failpoints_do_nothing() -> None:
    arm("", None)
    for fp in REGISTRY:
        failpoint(fp.name)


def test_raise_fires_once_per_stack(redis_client: redis.Redis) -> None:
    arm("sweep.pass=raise", redis_client)
    failpoint("plan.chunk_planned")  # not armed
    with pytest.raises(FailpointError) as caught:
        failpoint("sweep.pass")
    assert caught.value.transient
    assert fired(redis_client, "sweep.pass")
    failpoint("sweep.pass")  # this process goes on
    arm("sweep.pass=raise", redis_client)  # as a restarted process would
    failpoint("sweep.pass")


def test_the_nth_hit_and_every_hit_after(redis_client: redis.Redis) -> None:
    arm("collect.line=raise@3", redis_client)
    failpoint("collect.line")
    failpoint("collect.line")
    with pytest.raises(FailpointError):
        failpoint("collect.line")
    failpoint("collect.line")

    arm("collect.line=raise@2*", redis_client)
    failpoint("collect.line")
    for _ in range(3):
        with pytest.raises(FailpointError):
            failpoint("collect.line")


def test_without_redis_the_failpoint_does_not_fire() -> None:
    dead = redis.Redis(port=1, socket_connect_timeout=0.2)
    arm("sweep.pass=raise", dead)
    failpoint("sweep.pass")


def test_sleep_pauses_the_calling_thread(redis_client: redis.Redis) -> None:
    arm("sweep.pass=sleep:0.3", redis_client)
    start = time.monotonic()
    failpoint("sweep.pass")
    assert time.monotonic() - start >= 0.3


def _child(redis_url: str, spec: str, name: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(f"""
        import time, redis
        from service.failpoints import arm, failpoint
        arm({spec!r}, redis.Redis.from_url({redis_url!r}))
        start = time.monotonic()
        failpoint({name!r})
        print("went on after", round(time.monotonic() - start, 1))
    """)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_kill_kills_the_process_once_and_the_restart_goes_on(redis_client, redis_url) -> None:
    first = _child(redis_url, "plan.chunk_planned=kill", "plan.chunk_planned")
    assert first.returncode == -9, first.stderr
    assert "went on" not in first.stdout
    again = _child(redis_url, "plan.chunk_planned=kill", "plan.chunk_planned")
    assert again.returncode == 0, again.stderr
    assert "went on" in again.stdout


def test_stop_freezes_the_whole_process(redis_client, redis_url) -> None:
    # A thread ticking in the background must not tick while the process is stopped.
    code = textwrap.dedent(f"""
        import threading, time, redis
        from service.failpoints import arm, failpoint
        ticks = []
        def tick():
            while True:
                ticks.append(time.monotonic()); time.sleep(0.05)
        threading.Thread(target=tick, daemon=True).start()
        arm("submit.batch_created=stop:1.5", redis.Redis.from_url({redis_url!r}))
        time.sleep(0.2)
        failpoint("submit.batch_created")
        time.sleep(0.2)
        print(max(b - a for a, b in zip(ticks, ticks[1:])))
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) >= 1.4


def _calls_in_code() -> Counter[str]:
    """Every ``failpoint("<name>")`` call in service/ and workers/, by name."""
    names: Counter[str] = Counter()
    for root in ("service", "workers"):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id == "failpoint"
                ):
                    arg = node.args[0] if node.args else None
                    assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), (
                        f"{path}:{node.lineno}: a failpoint's name must be a string literal"
                    )
                    names[arg.value] += 1
    return names


def test_every_registered_name_is_unique_and_placed_once_in_the_code() -> None:
    registered = Counter(fp.name for fp in REGISTRY)
    assert [n for n, c in registered.items() if c > 1] == []
    calls = _calls_in_code()
    assert sorted(set(registered) - set(calls)) == [], "registered but never reached"
    assert sorted(set(calls) - set(registered)) == [], "called but not registered"
    assert [n for n, c in calls.items() if c > 1] == [], "one name, one place"
    assert all(fp.description for fp in REGISTRY)


def test_the_cli_lists_every_name_one_per_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "failpoints"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [fp.name for fp in REGISTRY]
    assert set(done.stdout.split()) == failpoints.NAMES
