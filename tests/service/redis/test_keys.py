"""Every Redis key imagebatch writes comes from service/redis/keys.py: prefixed, unambiguous, and
on one Redis Cluster slot wherever one script touches several of them.

The key strings are a contract with deployments upgraded in place, so the few literal checks
below fail loudly if one changes by accident.
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from service.redis import keys

# Arguments as production passes them: job ids "job_<hex>", tenant ids [A-Za-z0-9._-], model
# ids, chunk numbers, task names "jobs.plan", days "2026-12-02". None holds a ':' or braces.
STRING_SAMPLES = ("job_0193a1b2c3d4e5f6", "acme.dev-2")
INT_SAMPLES = (0, 7)


def key_functions() -> dict[str, Callable[..., Any]]:
    return {
        name: fn
        for name, fn in inspect.getmembers(keys, inspect.isfunction)
        if fn.__module__ == keys.__name__
    }


def key_constants() -> dict[str, str]:
    return {
        name: value
        for name, value in vars(keys).items()
        if name.isupper() and isinstance(value, str) and name != "PREFIX"
    }


def _samples(param: inspect.Parameter) -> tuple[Any, ...]:
    # `n: int | str` is a chunk number; its str form is the same key, so only ints are sampled.
    return INT_SAMPLES if "int" in str(param.annotation) else STRING_SAMPLES


def calls() -> Iterator[tuple[str, tuple[Any, ...], tuple[str, ...]]]:
    """Every key function over every combination of sample arguments: (name, args, keys)."""
    for name, fn in key_functions().items():
        params = list(inspect.signature(fn).parameters.values())
        for args in itertools.product(*(_samples(p) for p in params)):
            out = fn(*args)
            yield name, args, tuple(out) if isinstance(out, tuple) else (out,)


def test_there_are_key_functions_and_constants_to_check() -> None:
    assert len(key_functions()) > 20
    assert len(key_constants()) > 8


@pytest.mark.parametrize("name", sorted(key_constants()))
def test_every_constant_key_has_the_prefix(name: str) -> None:
    assert key_constants()[name].startswith("ib:")


def test_every_built_key_has_the_prefix() -> None:
    wrong = [(name, args, k) for name, args, out in calls() for k in out if not k.startswith("ib:")]
    assert not wrong


def test_no_two_calls_build_the_same_key() -> None:
    seen: dict[str, str] = {}
    for name, value in key_constants().items():
        assert value not in seen, f"{name} and {seen[value]} are both {value}"
        seen[value] = name
    for name, args, out in calls():
        assert len(set(out)) == len(out), f"{name}{args} returns one key twice: {out}"
        for k in out:
            where = f"{name}{args}"
            assert k not in seen, f"{where} and {seen[k]} both build {k}"
            seen[k] = where


_TAG = re.compile(r"\{([^}]*)\}")


def slot_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: the first non-empty {tag}, else the whole key."""
    m = _TAG.search(key)
    return m.group(1) if m and m.group(1) else key


def test_keys_one_budget_script_touches_share_one_cluster_slot() -> None:
    model, job, tenant = "gpt-image-2", "job_0193a1b2c3d4e5f6", "acme"
    groups = {
        "queue budget": keys.queue_budget(model),
        "job spend": keys.job_spend_budget(job),
        "tenant spend": (
            keys.tenant_spend_day(tenant, "2026-12-02"),
            keys.tenant_spend_month(tenant, "2026-12"),
            keys.tenant_spend_held(tenant),
            keys.tenant_spend_settled(tenant, f"{job}:3"),
        ),
        "batch creations": (keys.BATCH_CREATES, keys.BATCH_CREATES_SEQ),
    }
    for what, group in groups.items():
        assert len({slot_tag(k) for k in group}) == 1, f"{what}: {group}"
    # Different models, jobs and tenants spread over the cluster instead of one hot slot.
    assert slot_tag(keys.queue_budget("a")[0]) != slot_tag(keys.queue_budget("b")[0])
    assert slot_tag(keys.tenant_spend_held("a")) != slot_tag(keys.tenant_spend_held("b"))


def test_key_strings_deployments_depend_on_are_unchanged() -> None:
    # A deployment upgraded in place finds its jobs, budgets and totals under these names.
    job = "job_0193a1b2c3d4e5f6"
    assert keys.job(job) == f"ib:job:{job}"
    assert keys.job_items(job) == f"ib:job:{job}:items"
    assert keys.chunk(job, 3) == f"ib:job:{job}:chunk:3"
    assert keys.chunk(job, "") == f"ib:job:{job}:chunk:"  # the prefix Lua scripts append to
    assert keys.tenant_jobs("acme") == "ib:jobs:tenant:acme"
    assert keys.ACTIVE_JOBS == "ib:jobs:active"
    assert keys.queue_budget("gpt-image-2")[0] == "ib:qbudget:{gpt-image-2}:held"
    assert keys.TOTAL_TOKENS == "ib:m:tokens"
