"""Every Redis key imagebatch uses, in one place, with what it holds.

Job state lives in Redis; the request, images and manifest live in storage. While a job runs it
keeps one small hash entry per item; when it finishes those are dropped and the manifest in
storage is the record, so a finished job costs Redis a few small keys.

No other module writes a key name: they call the functions here, and Lua scripts get their keys
(or key prefixes) as arguments. The key strings are a contract with deployments upgraded in
place: changing one orphans the data under the old name. Budget keys share a ``{hash tag}`` so a
script touching several of them stays on one slot of a Redis Cluster.
"""

from __future__ import annotations

PREFIX = "ib"


# --- jobs ----------------------------------------------------------------------------------
# HASH: the job's fields (tenant, status, model, mode, labels JSON, estimate JSON, counts of
# items and images, created/finished times, reason). Kept after the job finishes.
def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


# HASH: item index -> packed item state "status|attempts|chunk|id" while the job runs.
# status: p pending (to plan), q in chunk `chunk`, s succeeded, f failed, x cancelled.
def job_items(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:items"


# HASH: per-state item counts (pending, queued, submitted, succeeded, failed, cancelled).
def job_counts(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:counts"


# HASH: item index -> JSON of the priced usage, written once (HSETNX) by the first collect that
# sees the item; the guard that makes spend count exactly once.
def job_usage(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:usage"


# HASH: item index -> JSON {code, message, ...} of the item's last error.
def job_errors(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:errors"


# HASH: the job's spend: "{kind}" -> tokens, "cost:{tier}" -> nano-USD, "images" -> count.
def job_spend(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:spend"


# HASH reference URI -> upstream file id: a job's reference images uploaded once (purpose vision).
def job_refs(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:refs"


# HASH item index -> the item's reuse fingerprint (service.jobs.fingerprint), written when the
# item is planned; read when the job finalizes, to record its images in the reuse index.
def job_fingerprints(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:fingerprints"


# HASH reference URI -> "sha256:<hex>" of its bytes: each reference of a job is read once to
# fingerprint the items that use it.
def job_ref_digests(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:refdigests"


# STRING counter: how many times the job was retried in place (its request's version).
def job_retry_seq(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:retryseq"


# STRING counter: the job's last chunk number.
def job_chunk_seq(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:chunkseq"


# HASH: one chunk (one upstream batch attempt): status, endpoint, lines, bytes, estimated
# tokens and cost, input_file_id, batch_id, upstream status and counts, timestamps.
def chunk(job_id: str, n: int | str) -> str:
    return f"{PREFIX}:job:{job_id}:chunk:{n}"


# LIST: the item indexes in a chunk, in input order.
def chunk_items(job_id: str, n: int | str) -> str:
    return f"{PREFIX}:job:{job_id}:chunk:{n}:items"


# SET: the job's chunk numbers.
def job_chunks(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:chunks"


# HASH item index -> JSON {id, decision, note, at}: the review of a job's images (approved or
# rejected). Kept after the job finishes, like the job hash: the manifest is served with it.
def job_review(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:review"


# HASH approved / rejected -> count of the job's items with that review decision.
def job_review_counts(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:review:counts"


# LIST of byte offsets of lines 0, 1000, 2000, ... of a job's request.jsonl or manifest.jsonl
# (``name`` "request" or "manifest"): an item page seeks instead of reading from the start.
# Derived data with a TTL, rebuilt from the object when missing or stale.
def job_line_offsets(job_id: str, name: str) -> str:
    return f"{PREFIX}:job:{job_id}:offsets:{name}"


# --- indexes ---------------------------------------------------------------------------------
# ZSET job_id -> created_at, per tenant: listing newest first.
def tenant_jobs(tenant: str) -> str:
    return f"{PREFIX}:jobs:tenant:{tenant}"


# SET of job ids not yet finished: the sweep's safety net for lost plan/finalize tasks.
ACTIVE_JOBS = f"{PREFIX}:jobs:active"


# --- forecasts and deadlines (service.jobs.eta, service.lanes.deadline) -------------------------
# LIST of JSON {"lines", "seconds", "scaled", "at"}, newest first, capped (LTRIM) and expiring:
# how long recent upstream batches of a model at a size took from when they could first go
# upstream to their images stored ("scaled": the part that grows with the lines, when upstream's
# timestamps say so).
def eta_samples(model: str, size: str) -> str:
    return f"{PREFIX}:eta:samples:{model}:{size}"


# STRING unix time the model's enqueued-token budget last had a batch's tokens back (a batch
# collected): when a chunk waiting for it could start. EX 1 day.
def eta_released(model: str) -> str:
    return f"{PREFIX}:eta:released:{model}"


# HASH job_id -> JSON {"p50", "p90", "basis", "deadline", "on_deadline", "at"}: each live job's
# forecast as the sweep last computed it (unix times), read by /metrics; a finished job's entry
# is dropped by the next scrape.
JOB_ETAS = f"{PREFIX}:eta:jobs"

# ZSET "job_id:chunk" -> time it was submitted upstream: what the sweep polls.
ACTIVE_CHUNKS = f"{PREFIX}:chunks:active"

# ZSET "job_id:chunk" -> time it started waiting: planned chunks not yet submitted (new, or
# waiting for budget). The sweep re-enqueues their submit.
WAITING_CHUNKS = f"{PREFIX}:chunks:waiting"

# ZSET job_id -> finished_at (+inf while running): jobs whose per-job series /metrics shows.
METRICS_JOBS = f"{PREFIX}:metrics:jobs"


# STRING job_id, SET NX with a TTL: a tenant's Idempotency-Key.
def idempotency(tenant: str, key: str) -> str:
    return f"{PREFIX}:idem:{tenant}:{key}"


# STRING "job_id:chunk", EX a week: which chunk an upstream batch belongs to, set when submit
# records the batch id; how an inbound OpenAI webhook (it names only the batch) finds the chunk.
def batch_chunk(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


# STRING retry number, SET NX with a TTL: the Idempotency-Key of a retry of one job.
def retry_idempotency(tenant: str, job_id: str, key: str) -> str:
    return f"{PREFIX}:idem:retry:{tenant}:{job_id}:{key}"


# --- result reuse (service.jobs.reuse) ---------------------------------------------------------
def reuse_index(tenant: str) -> tuple[str, str]:
    """A tenant's reuse index: never shared between tenants, bounded by entries and age."""
    base = f"{PREFIX}:reuse:{{{tenant}}}"
    return (
        f"{base}:entries",  # HASH fingerprint -> JSON {j: job, i: item, k: [keys], c: nano-USD}
        f"{base}:used",  # ZSET fingerprint -> when it was last recorded (ms): the LRU order
    )


# --- schedules (service.schedules) -------------------------------------------------------------
# HASH: a schedule's fields (tenant, name, cron, timezone, template JSON, labels JSON, budget,
# enabled, catch_up, next_run_at, last run). Kept until the schedule is deleted.
def schedule(schedule_id: str) -> str:
    return f"{PREFIX}:schedule:{schedule_id}"


# ZSET job_id -> slot time: the jobs a schedule created, newest kept (GET /v1/jobs?schedule=).
def schedule_runs(schedule_id: str) -> str:
    return f"{PREFIX}:schedule:{schedule_id}:runs"


# STRING lease (token, PX): one process is creating this slot's job.
def schedule_slot_lock(schedule_id: str, slot: int) -> str:
    return f"{PREFIX}:lock:schedule:{schedule_id}:{slot}"


# ZSET schedule_id -> created_at, per tenant: listing.
def tenant_schedules(tenant: str) -> str:
    return f"{PREFIX}:schedules:tenant:{tenant}"


# ZSET schedule_id -> next run (unix seconds), enabled schedules only: what the tick scans.
SCHEDULES_DUE = f"{PREFIX}:schedules:due"

# STRING counter: ticks of the schedule runner (tests and operators see that it runs).
SCHEDULE_TICKS = f"{PREFIX}:schedules:ticks"


# STRING SHA-256 hex of the body an Idempotency-Key was first used with (same TTL as the key), so
# the same key with another body is refused instead of answered with the first job.
def idempotency_digest(tenant: str, key: str) -> str:
    return f"{PREFIX}:idem:{tenant}:{key}:sha256"


# --- outbound webhooks (service.webhooks) -----------------------------------------------------
# HASH: the delivery of a job's webhook: event_id, url, status (pending | delivered | failed),
# attempts, first_at, next_at, last outcome. Expires some days after the delivery ends.
def job_webhook(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:webhook"


# LIST of JSON attempts (number, time, outcome, status code, duration, address, error), oldest
# first, capped: what GET /v1/jobs/{id}/webhooks shows.
def job_webhook_attempts(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:webhook:attempts"


# ZSET job_id -> when its webhook's next attempt is due: what the webhook sweep enqueues.
WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"


# STRING lease (SET NX EX): a worker is sending this job's webhook now.
def webhook_lock(job_id: str) -> str:
    return f"{PREFIX}:lock:webhook:{job_id}"


# --- leases and markers (SET NX EX) -----------------------------------------------------------
def plan_lock(job_id: str) -> str:
    return f"{PREFIX}:lock:plan:{job_id}"


def finalize_lock(job_id: str) -> str:
    return f"{PREFIX}:lock:finalize:{job_id}"


def retry_lock(job_id: str) -> str:
    return f"{PREFIX}:lock:retry:{job_id}"


def collect_lease(job_id: str, n: int | str) -> str:
    return f"{PREFIX}:lease:collect:{job_id}:{n}"


# STRING "<output file id> <lines>" (TTL): how many leading lines of a chunk's output file are
# stored and recorded; a collect handed over mid-file (service/handover.py) resumes after them.
def collect_cursor(job_id: str, n: int | str) -> str:
    return f"{PREFIX}:cursor:collect:{job_id}:{n}"


def submit_lock(job_id: str, n: int | str) -> str:
    return f"{PREFIX}:lock:submit:{job_id}:{n}"


# Short marker so a sweep does not enqueue the same task again while one is queued.
def enqueued(task: str, ref: str) -> str:
    return f"{PREFIX}:enq:{task}:{ref}"


SWEEP_LOCK = f"{PREFIX}:lock:sweep"


# STRING lease (token, PX): a worker is sending this sync slice's items.
def sync_slice_lease(job_id: str, start: int) -> str:
    return f"{PREFIX}:job:{job_id}:sync:slice:{start}"


# --- budgets (service.budgets) -----------------------------------------------------------------
def queue_budget(model: str) -> tuple[str, str, str, str]:
    """The enqueued-token budget of one model."""
    base = f"{PREFIX}:qbudget:{{{model}}}"
    return (
        f"{base}:held",  # HASH reservation key -> input tokens held
        f"{base}:total",  # STRING: sum of :held, kept beside it so a check is O(1)
        f"{base}:effective",  # STRING: the shrunk limit; absent = configured; expires = recovery
        f"{base}:waiter",  # STRING "tokens|key": the oldest refused reservation, expires
    )


# SET of models that ever held a queue reservation: what the gauges list.
QUEUE_BUDGET_MODELS = f"{PREFIX}:qbudget:models"
# ZSET member -> server time (µs) of each upstream batch creation in the last hour, and the
# STRING counter that makes members unique.
BATCH_CREATES = f"{PREFIX}:creates:{{window}}"
BATCH_CREATES_SEQ = f"{PREFIX}:creates:{{window}}:seq"


def job_spend_budget(job_id: str) -> tuple[str, str, str]:
    """A job's max_cost_usd budget."""
    base = f"{PREFIX}:jspend:{{{job_id}}}"
    return (
        base,  # HASH reserved, spent (nano-USD), cap (nano-USD; absent = none)
        f"{base}:held",  # HASH reservation key -> reserved nano-USD
        f"{base}:settled",  # HASH reservation key -> actual nano-USD: settles count once
    )


def _tenant_spend(tenant_id: str) -> str:
    return f"{PREFIX}:tspend:{{{tenant_id}}}"


# HASH reserved, spent (nano-USD) for one UTC day "YYYY-MM-DD"; expires 2 days after it ends.
def tenant_spend_day(tenant_id: str, day: str) -> str:
    return f"{_tenant_spend(tenant_id)}:day:{day}"


# HASH reserved, spent (nano-USD) for one UTC month "YYYY-MM"; expires 7 days after it ends.
def tenant_spend_month(tenant_id: str, month: str) -> str:
    return f"{_tenant_spend(tenant_id)}:month:{month}"


# HASH reservation key -> "nanousd|day|month": where the reservation was counted.
def tenant_spend_held(tenant_id: str) -> str:
    return f"{_tenant_spend(tenant_id)}:held"


# STRING marker, EX 40 days: this reservation key has been settled.
def tenant_spend_settled(tenant_id: str, key: str) -> str:
    return f"{_tenant_spend(tenant_id)}:settled:{key}"


# HASH "campaign|model|tier" -> nano-USD settled that UTC day "YYYY-MM-DD" (what the console's
# spend page draws), added in the same Lua call that counts an item's usage once, so it is
# exact. Expires DAILY_SPEND_TTL_SECONDS after it was last written.
def tenant_spend_daily(tenant_id: str, day: str) -> str:
    return f"{_tenant_spend(tenant_id)}:daily:{day}"


DAILY_SPEND_TTL_SECONDS = 40 * 86400


# HASH per sync-lane limiter: at (µs, server clock) and per dimension d in r, i, t (requests,
# images, tokens) lvl_d what its bucket held then, sum_d units ever granted; learned from
# upstream's headers cap_d, rate_d, f_d (others' use), valid until until_d (µs), and the answers
# they came from (seen_*, anc_*); out_d units in flight; hold (µs) nobody sends before it.
# Expires when idle an hour. See service/redis/scripts/ratelimit_bucket.lua.
def rate_limiter(name: str) -> str:
    return f"{PREFIX}:ratelimit:{{{name}}}"


# ZSET per sync-lane limiter: the calls granted and not answered yet, member
# "<requests mark>:<images>:<tokens>", score the grant's time (µs); their sums are out_r / out_i /
# out_t in the limiter's hash. Members older than the limiter's in-flight limit are dropped
# (their worker died). Expires with the hash.
def rate_limiter_flight(name: str) -> str:
    return f"{PREFIX}:ratelimit:{{{name}}}:flight"


# --- metrics (read by the API at scrape time) --------------------------------------------------
# HASH "tenant|model|kind|tier" -> tokens; never expires.
TOTAL_TOKENS = f"{PREFIX}:m:tokens"
# HASH "tenant|model|tier|campaign" -> nano-USD; never expires.
TOTAL_COST = f"{PREFIX}:m:cost"
# HASH "model|status" -> images.
TOTAL_IMAGES = f"{PREFIX}:m:images"
# HASH "name|labels-json" -> value: counters any process increments.
COUNTERS = f"{PREFIX}:m:counters"
# HASH "name|labels-json|le" -> count, "name|labels-json|sum" -> float: histograms.
HISTOGRAMS = f"{PREFIX}:m:hist"
# HASH worker name -> unix time of its last heartbeat.
HEARTBEATS = f"{PREFIX}:m:heartbeats"


# --- models (service.models) -------------------------------------------------------------------
# STRING JSON {"fetched_at": unix, "models": {id: "YYYY-MM-DD" | null}}: upstream's model list as
# last read (GET /v1/models), image models and others alike. No expiry: when upstream cannot be
# read this last known list stands.
UPSTREAM_MODELS = f"{PREFIX}:models:upstream"


# STRING JSON {"since", "batch_id", "message"}, EX IMAGEBATCH_BATCH_UNSUPPORTED_TTL: upstream
# refused a batch of this model because the model does not support the Batch API.
def batch_unsupported(model: str) -> str:
    return f"{PREFIX}:models:batch-unsupported:{model}"


# HASH "size|quality" -> "average|samples": output image tokens per image observed in `usage`, a
# decaying average, for models whose token counts OpenAI does not publish.
def learned_tokens(model: str) -> str:
    return f"{PREFIX}:models:tokens:{model}"


# --- inbound webhooks (service.upstream.webhooks) ------------------------------------------------
# STRING marker, SET NX, EX 4 days (longer than OpenAI's 72 h of retries): a webhook-id taken.
def openai_webhook_seen(webhook_id: str) -> str:
    return f"{PREFIX}:webhook-in:{webhook_id}"


# --- the web console (service.console) --------------------------------------------------------
# HASH tenant, csrf, created: a signed-in browser, by the SHA-256 of its session cookie (a copy
# of Redis gives nobody a usable cookie). Expires with the session.
def console_session(digest: str) -> str:
    return f"{PREFIX}:ui:session:{digest}"


# --- the sweep's chunk audit (service.lanes.orphans) --------------------------------------------
# Marker (SET NX PX): this job's chunks were checked for an owner recently.
def chunk_audit(job_id: str) -> str:
    return f"{PREFIX}:audit:chunks:{job_id}"


# --- duplicate upstream batches (service.lanes.duplicates) --------------------------------------
# HASH batch id -> "open" (found, not yet accounted) or the JSON of what it billed (accounted).
def job_duplicates(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:duplicates"


# ZSET "job_id:chunk:batch_id" -> when found: duplicates still to cancel and account (the sweep).
DUPLICATE_BATCHES = f"{PREFIX}:batches:duplicates"


# Marker (SET NX PX): the sweep removed abandoned temporary files recently.
TEMP_SWEEP = f"{PREFIX}:lock:temp-sweep"


# --- failpoints (service.failpoints) ----------------------------------------------------------
# STRING pid, SET NX, EX 7 days: the failpoint `name` has fired in this stack (it fires once per
# stack, so a process restarted after a failpoint killed it goes on past it).
def failpoint_fired(name: str) -> str:
    return f"{PREFIX}:failpoint:{name}"
