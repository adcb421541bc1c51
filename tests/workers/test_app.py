"""The Celery app as configured: every task the contract in service/queues.py names is registered,
on its queue, delivered at least once (acks_late), with no result backend and a soft time limit
before the hard one; the worker settings and the beat schedule are what ARCHITECTURE.md promises.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from celery import Task

from service import queues
from service.cli import processes
from service.settings import Settings
from workers.app import app, configure


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    app.loader.import_default_modules()  # the `include` list, as a worker imports it
    return {name: t for name, t in app.tasks.items() if not name.startswith("celery.")}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(redis_url="redis://127.0.0.1:6390/4", data_dir=tmp_path, poll_seconds=7.5)


def test_the_registered_tasks_are_exactly_the_contract(tasks: dict[str, Task]) -> None:
    assert set(tasks) == set(queues.ROUTES)


@pytest.mark.parametrize("name", sorted(queues.ROUTES))
def test_each_task_is_at_least_once_on_its_queue_with_time_limits(
    tasks: dict[str, Task], name: str, settings: Settings
) -> None:
    task: Any = tasks[name]
    # And where the configured router sends it (what .delay(), retries and beat use).
    configure(settings)
    assert app.amqp.router.route({}, name, args=(), kwargs={})["queue"].name == queues.ROUTES[name]
    assert task.acks_late is True
    assert task.ignore_result is True
    assert task.soft_time_limit is not None and task.time_limit is not None
    assert 0 < task.soft_time_limit < task.time_limit


def test_every_queue_has_work_and_the_worker_takes_all_of_them_by_default() -> None:
    assert set(queues.ROUTES.values()) == set(queues.QUEUES)
    parser = argparse.ArgumentParser()
    processes.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["worker"])
    assert set(args.queues.split(",")) == set(queues.QUEUES)


def test_configure_makes_delivery_at_least_once_one_message_at_a_time(
    settings: Settings,
) -> None:
    conf = configure(settings).conf
    assert conf.broker_url == settings.redis_url
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.task_ignore_result is True
    assert conf.task_default_queue == queues.CONTROL
    # A task waiting in a countdown must not be redelivered while it waits, nor a long collect.
    assert conf.broker_transport_options["visibility_timeout"] >= 3600


def test_a_sentinel_url_makes_celery_use_its_sentinel_transport(tmp_path: Path) -> None:
    url = "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0"
    conf = configure(Settings(redis_url=url, data_dir=tmp_path)).conf
    try:
        assert conf.broker_url == "sentinel://10.0.0.1:26379/0;sentinel://10.0.0.2:26379/0"
        assert conf.broker_transport_options["master_name"] == "mymaster"
        assert conf.broker_transport_options["visibility_timeout"] >= 3600
        # The API's producer publishes to the same place, the same way.
        producer = queues.producer(url).conf
        assert producer.broker_url == conf.broker_url
        assert producer.broker_transport_options == conf.broker_transport_options
        assert producer.task_publish_retry_policy == conf.task_publish_retry_policy
    finally:
        configure(Settings(redis_url="redis://127.0.0.1:6390/4", data_dir=tmp_path))


def test_beat_sweeps_every_poll_seconds_on_the_control_queue(settings: Settings) -> None:
    conf = configure(settings).conf
    entry = conf.beat_schedule["sweep"]
    assert entry["task"] == queues.SWEEP
    assert entry["schedule"] == 7.5
    assert entry["options"]["queue"] == queues.CONTROL
    # A sweep not taken within two periods is dropped: the next one does its work.
    assert entry["options"]["expires"] == 15.0


def test_beat_reads_upstreams_model_list_every_refresh_period(settings: Settings) -> None:
    conf = configure(settings.model_copy(update={"models_refresh_seconds": 900.0})).conf
    assert set(conf.beat_schedule) == {"sweep", "models-refresh", "schedules", "webhooks"}
    entry = conf.beat_schedule["models-refresh"]
    assert entry["task"] == queues.MODELS_REFRESH and entry["schedule"] == 900.0
    assert entry["options"] == {"queue": queues.CONTROL, "expires": 900.0}


def test_beat_wakes_the_schedules_runner_every_tick_period(settings: Settings) -> None:
    conf = configure(settings.model_copy(update={"schedule_tick_seconds": 10.0})).conf
    entry = conf.beat_schedule["schedules"]
    assert entry["task"] == queues.SCHEDULES_TICK and entry["schedule"] == 10.0
    # A tick not taken within two periods is dropped: the next one finds the same due slots.
    assert entry["options"] == {"queue": queues.CONTROL, "expires": 20.0}


def test_beat_queues_the_webhook_retries_that_are_due(settings: Settings) -> None:
    conf = configure(settings.model_copy(update={"poll_seconds": 0.5})).conf
    entry = conf.beat_schedule["webhooks"]
    assert entry["task"] == queues.WEBHOOK_SWEEP and entry["schedule"] == 0.5
    # On the webhooks queue: a slow receiver delays the retries of webhooks, nothing else.
    assert entry["options"] == {"queue": queues.WEBHOOKS, "expires": 10}


def test_the_apis_producer_routes_tasks_as_the_workers_expect(settings: Settings) -> None:
    worker_routes = configure(settings).conf.task_routes
    producer = queues.producer(settings.redis_url or "")
    assert producer.conf.task_routes == worker_routes
    assert worker_routes == {name: {"queue": q} for name, q in queues.ROUTES.items()}


def test_only_the_long_tasks_hand_over_and_sooner_than_they_could_run(
    tasks: dict[str, Task],
) -> None:
    bounds = {name: getattr(t, "handover_seconds", None) for name, t in tasks.items()}
    assert {name for name, b in bounds.items() if b is not None} == {
        queues.COLLECT_TASK,
        queues.SYNC_ITEMS,
        queues.DUPLICATE,
    }
    for name in (queues.COLLECT_TASK, queues.SYNC_ITEMS):
        bound = bounds[name]
        assert bound is not None and 0 < bound < (tasks[name].soft_time_limit or 0)


def test_a_shutting_down_worker_asks_its_own_process_to_hand_over() -> None:
    # With the threads or solo pool, tasks run in the main process itself: the flag is set here
    # (the prefork pool's processes get the signal; tests/e2e/test_handover.py).
    from celery.signals import worker_shutting_down

    from service import handover

    handover.reset()
    try:
        worker_shutting_down.send(sender="test@host", sig="SIGTERM", how="Warm", exitcode=0)
        assert handover.requested()
    finally:
        handover.reset()


def test_no_task_may_run_longer_than_the_temp_sweep_waits() -> None:
    from service.queues import LONGEST_TASK_SECONDS, ROUTES
    from workers.app import app

    for name in ROUTES:
        task = app.tasks[name]
        assert task.time_limit <= LONGEST_TASK_SECONDS, name
