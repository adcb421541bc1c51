"""Models as they stand today: lifecycle read from upstream, and what each model was seen to do.

:mod:`~service.models.lifecycle` merges the catalog with upstream's model list (shutdown dates,
models no longer offered); :mod:`~service.models.capability` holds what was learned per model
(batch support refused upstream, output tokens observed in ``usage``). Intake, the lanes and
``GET /v1/models`` read both; everything learned is cluster-wide, in Redis.
"""
