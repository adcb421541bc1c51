"""The Lua scripts: each file loads into a real Redis with its includes expanded, every script the
code names exists (and every file is used), and a script survives Redis forgetting it."""

from __future__ import annotations

import hashlib
import re

import pytest
import redis

from service.redis import keys, lua

REPO = lua.SCRIPTS.parents[2]
SCRIPT_NAMES = sorted(p.stem for p in lua.SCRIPTS.glob("*.lua"))
_NAMED_IN_CODE = re.compile(r"""lua\.script\(\s*[\w.]+\s*,\s*["'](\w+)["']\s*\)""")
_INCLUDED = re.compile(r"^--! include (\w+)\(", re.MULTILINE)


def test_the_scripts_directory_is_found() -> None:
    assert len(SCRIPT_NAMES) > 15


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_loads_with_its_includes_expanded(
    name: str, redis_client: redis.Redis
) -> None:
    text = lua.source(name)
    assert "--! include" not in text
    assert "{arg}" not in text or name == "clock"  # the clock is only ever included
    if name == "clock":
        return
    # SCRIPT LOAD compiles the script: a syntax error, or an include left unexpanded, fails here.
    sha = redis_client.script_load(text)
    assert sha == hashlib.sha1(text.encode()).hexdigest()
    assert redis_client.script_exists(sha) == [True]


def test_every_script_the_code_names_exists_and_every_file_is_used() -> None:
    named: set[str] = set()
    for root in ("service", "workers"):
        for path in (REPO / root).rglob("*.py"):
            named |= set(_NAMED_IN_CODE.findall(path.read_text()))
    included = {
        m
        for name in SCRIPT_NAMES
        for m in _INCLUDED.findall(lua.SCRIPTS.joinpath(f"{name}.lua").read_text())
    }
    assert named, "no lua.script(...) call found: the pattern no longer matches the code"
    assert named - set(SCRIPT_NAMES) == set(), "scripts named in code without a .lua file"
    assert set(SCRIPT_NAMES) - named - included == set(), "script files nothing uses"


def test_the_clock_include_reads_its_argument_or_the_server_time(
    redis_client: redis.Redis,
) -> None:
    # creates_acquire includes clock(ARGV[3]): a given time is used as is, '' means Redis's TIME.
    acquire = lua.script(redis_client, "creates_acquire")
    window_us = 3600 * 1_000_000
    assert acquire(
        keys=[keys.BATCH_CREATES, keys.BATCH_CREATES_SEQ], args=[10, window_us, "5000000"]
    ) in (b"0", "0")
    ((_, given),) = redis_client.zrange(keys.BATCH_CREATES, 0, -1, withscores=True)
    assert given == 5_000_000
    redis_client.delete(keys.BATCH_CREATES)
    sec, usec = redis_client.time()
    acquire(keys=[keys.BATCH_CREATES, keys.BATCH_CREATES_SEQ], args=[10, window_us, ""])
    ((_, server),) = redis_client.zrange(keys.BATCH_CREATES, 0, -1, withscores=True)
    assert abs(server - (sec * 1_000_000 + usec)) < 5_000_000


def test_a_script_still_runs_after_redis_forgets_it(redis_client: redis.Redis) -> None:
    # After a restart or failover Redis knows no scripts; EVALSHA's NOSCRIPT must fall back.
    drop = lua.script(redis_client, "lease_drop")
    redis_client.set("ib:test:lease", "token")
    redis_client.script_flush()
    assert drop(keys=["ib:test:lease"], args=["token"]) == 1
    assert redis_client.exists("ib:test:lease") == 0


def test_redis_caches_one_copy_of_a_script_however_many_users_register_it(
    redis_client: redis.Redis,
) -> None:
    # Every Lease, JobStore and budget registers its scripts; Redis must still hold one copy each.
    redis_client.script_flush()
    for n in range(5):
        client = redis.Redis(connection_pool=redis_client.connection_pool)
        lua.script(client, "lease_drop")(keys=[f"ib:test:lease:{n}"], args=["t"])
        lua.script(client, "lease_refresh")(keys=[f"ib:test:lease:{n}"], args=["t", 1000])
    assert redis_client.info("memory")["number_of_cached_scripts"] == 2
