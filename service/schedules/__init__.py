"""Schedules: cron slots that make jobs, each slot exactly once.

:mod:`~service.schedules.model` (a schedule and how it looks), :mod:`~service.schedules.define`
(validating what callers write, and the job of a run), :mod:`~service.schedules.slots` (cron and
time zones, by cronsim), :mod:`~service.schedules.store` (Redis) and
:mod:`~service.schedules.runner` (the tick beat drives, and runs made on request).
"""
