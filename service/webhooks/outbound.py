"""Webhooks: tell the caller's ``webhook_url`` that a job finished.

The body is ``{"event": "job.finished", "job": <the job as GET /v1/jobs/{id} shows it>}``,
sent as JSON with ``User-Agent: imagebatch`` and ``Imagebatch-Event: job.finished``. A connection
error, a timeout, a 429 or a 5xx raises :class:`WebhookRetry` so the task retries with backoff;
any other answer is final (logged). Delivery is at least once: receivers should key on the job id.
"""

from __future__ import annotations

import logging

import httpx2

from service.context import Context
from service.errors import TransientError
from service.jobs.views import job_view

log = logging.getLogger("imagebatch.webhooks")


class WebhookRetry(TransientError):
    """The receiver could not take the webhook now; try again later."""


def send_job_finished(ctx: Context, job_id: str, *, timeout: float = 10.0) -> int | None:
    job = ctx.store.job(job_id)
    if job is None or not job.webhook_url:
        return None
    url = job.webhook_url
    body = {"event": "job.finished", "job": job_view(ctx, job)}
    try:
        resp = httpx2.post(
            url,
            json=body,
            timeout=timeout,
            headers={"User-Agent": "imagebatch", "Imagebatch-Event": "job.finished"},
        )
    except httpx2.HTTPError as exc:
        raise WebhookRetry(f"webhook for {job_id} to {url} failed: {exc}") from exc
    if resp.status_code == 429 or resp.status_code >= 500:
        raise WebhookRetry(f"webhook for {job_id} answered {resp.status_code}")
    if resp.status_code >= 400:
        log.warning(
            "webhook for %s to %s refused with %s; not retrying",
            job_id,
            url,
            resp.status_code,
        )
    return resp.status_code
