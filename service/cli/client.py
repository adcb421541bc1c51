"""``imagebatch submit | status | download | retry | schedules``: a client of a running API.

The API is ``--api`` or ``IMAGEBATCH_API`` (default http://127.0.0.1:8000), the key
``--key`` or ``IMAGEBATCH_API_KEY`` (tenants only).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx2
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

FINAL = {"succeeded", "partially_failed", "failed", "cancelled", "budget_exhausted"}
console = Console(stderr=True)


def add_commands(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--api",
            default=os.environ.get("IMAGEBATCH_API", "http://127.0.0.1:8000"),
            help="the API's base URL",
        )
        p.add_argument(
            "--key",
            default=os.environ.get("IMAGEBATCH_API_KEY"),
            help="API key (when tenants are configured)",
        )

    p = sub.add_parser(
        "submit",
        help="submit a job from a JSON body or a CSV catalog",
        description="Submit a job from a JSON body or a CSV catalog; prints the job's id.",
    )
    common(p)
    p.add_argument("file", type=Path, help="job.json, or catalog.csv with --template")
    p.add_argument("--template", help="CSV: prompt template with {column} placeholders")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="CSV: other job fields (model=, size=, quality=, label.campaign=…)",
    )
    p.add_argument("--idempotency-key", help="a retry with the same key returns the same job")
    p.add_argument(
        "--wait", action="store_true", help="wait with a progress bar until the job finishes"
    )
    p = sub.add_parser(
        "status",
        help="show a job (or wait for it)",
        description="Show a job: its status, item counts and cost so far.",
    )
    common(p)
    p.add_argument("job_id", help="the job's id (job_…), as submit printed it")
    p.add_argument(
        "--wait", action="store_true", help="wait with a progress bar until the job finishes"
    )
    p = sub.add_parser(
        "download",
        help="download a finished job's images and manifest",
        description="Download a finished job's images and its manifest into a folder of its own.",
    )
    common(p)
    p.add_argument("job_id", help="the job's id (job_…)")
    p.add_argument(
        "--to", type=Path, default=Path("."), help="directory (a folder per job is made inside)"
    )

    p = sub.add_parser("retry", help="run a finished job's failed (or listed) items again")
    common(p)
    p.add_argument("job_id")
    p.add_argument(
        "--status",
        action="append",
        choices=("failed", "cancelled", "budget_exhausted"),
        help="which items to retry (repeat; default: failed)",
    )
    p.add_argument(
        "--items",
        type=Path,
        help='JSON file: [{"id": "sku-7", "prompt": "..."}] — only these items, with overrides',
    )
    p.add_argument("--max-cost-usd", type=float, help="a new spend cap for the job")
    p.add_argument("--idempotency-key", help="a repeat with the same key changes nothing")
    p.add_argument("--wait", action="store_true", help="wait until the job finishes again")
    _schedule_commands(sub, common)


def _schedule_commands(sub: Any, common: Any) -> None:
    p = sub.add_parser("schedules", help="list, create, pause, resume or delete schedules")
    ssub = p.add_subparsers(dest="action", required=True)
    common(ssub.add_parser("list", help="every schedule, with its next and last run"))
    c = ssub.add_parser("create", help="create a schedule")
    common(c)
    c.add_argument("--name", required=True)
    c.add_argument("--cron", required=True, help="five fields, e.g. '0 6 * * MON'")
    c.add_argument("--timezone", default="UTC", help="IANA name, e.g. Europe/Riga")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--job", type=Path, help="a job body (JSON file) to submit at each run")
    what.add_argument("--catalog-url", help="a CSV (s3://, file://, https://) read at each run")
    c.add_argument("--template", help="with --catalog-url: prompt template over its columns")
    c.add_argument("--param", action="append", default=[], metavar="K=V", help="CSV job fields")
    c.add_argument("--label", action="append", default=[], metavar="K=V", help="labels of runs")
    c.add_argument("--max-cost-usd", type=float, help="spend cap of each run")
    c.add_argument("--catch-up", choices=("none", "one"), default="none")
    c.add_argument("--paused", action="store_true", help="create it disabled")
    for action in ("pause", "resume", "delete"):
        a = ssub.add_parser(action, help=f"{action} a schedule")
        common(a)
        a.add_argument("schedule_id")


def _client(args: argparse.Namespace) -> httpx2.Client:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    return httpx2.Client(base_url=args.api, headers=headers, timeout=120)


def _check(resp: httpx2.Response) -> Any:
    if resp.status_code >= 400:
        try:
            body = resp.json()
            detail = body.get("detail") or body
        except ValueError:
            detail = resp.text
        console.print(f"[red]error {resp.status_code}[/red]: {detail}")
        for err in (body.get("errors") or [])[:20] if isinstance(body, dict) else []:
            where = (
                f" (item {err['index']}, id {err['id']})" if err.get("index") is not None else ""
            )
            console.print(f"  {err['field']}{where}: {err['message']}")
        raise SystemExit(2)
    return resp.json()


def _wait(client: httpx2.Client, job: dict[str, Any]) -> dict[str, Any]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(job["id"], total=job["items"])
        while job["status"] not in FINAL:
            time.sleep(1)
            job = _check(client.get(f"/v1/jobs/{job['id']}"))
            c = job["counts"]
            bar.update(
                task,
                completed=c["succeeded"] + c["failed"] + c["cancelled"],
                description=f"{job['id']} {job['status']}",
            )
    return job


def _summary(job: dict[str, Any]) -> None:
    c = job["counts"]
    console.print(
        f"{job['id']}: [bold]{job['status']}[/bold] — {c['succeeded']} succeeded "
        f"({c.get('reused', 0)} reused), {c['failed']} failed, "
        f"{c['cancelled']} cancelled, {c['pending'] + c['queued'] + c['submitted']} in progress; "
        f"cost ${job['cost_usd']['total']:.4f} (estimate ${job['estimate']['usd']['batch']:.4f} batch)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            return _run(client, args)
    except httpx2.TransportError as exc:
        # Connection refused, DNS, timeouts: the user's fix is the address or the server.
        console.print(
            f"[red]cannot reach the API at {args.api}[/red]: {exc or type(exc).__name__}. "
            "Is `imagebatch api` (or `imagebatch up`) running there? Set --api or IMAGEBATCH_API."
        )
        return 2


def _read_job_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        console.print(f"[red]cannot read {path}[/red]: {exc.strerror or exc}")
        raise SystemExit(2) from None


def _run(client: httpx2.Client, args: argparse.Namespace) -> int:
    if args.command == "submit":
        content = _read_job_file(args.file)
        headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
        if args.file.suffix.lower() == ".csv":
            params = dict(p.split("=", 1) for p in args.param)
            if args.template:
                params["template"] = args.template
            headers["Content-Type"] = "text/csv"
            job = _check(client.post("/v1/jobs", content=content, params=params, headers=headers))
        else:
            headers["Content-Type"] = "application/json"
            job = _check(client.post("/v1/jobs", content=content, headers=headers))
        print(job["id"])
        if args.wait:
            job = _wait(client, job)
        _summary(job)
        return 0 if job["status"] in {"succeeded", "queued", "running"} else 1
    if args.command == "status":
        job = _check(client.get(f"/v1/jobs/{args.job_id}"))
        if args.wait:
            job = _wait(client, job)
        _summary(job)
        return 0
    if args.command == "download":
        return _download(client, args.job_id, args.to)
    if args.command == "retry":
        return _retry(client, args)
    if args.command == "schedules":
        return _schedules(client, args)
    return 2


def _retry(client: httpx2.Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.items:
        body["items"] = _json_file(args.items)
    elif args.status:
        body["statuses"] = args.status
    if args.max_cost_usd is not None:
        body["max_cost_usd"] = args.max_cost_usd
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    job = _check(client.post(f"/v1/jobs/{args.job_id}/retry", json=body, headers=headers))
    console.print(f"{job['id']}: {job['retried']} items sent again")
    if args.wait:
        job = _wait(client, job)
    _summary(job)
    return 0 if job["status"] in {"succeeded", "queued", "running"} else 1


def _json_file(path: Path) -> Any:
    try:
        return json.loads(_read_job_file(path))
    except ValueError as exc:
        console.print(f"[red]{path} is not JSON[/red]: {exc}")
        raise SystemExit(2) from None


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep:
            raise SystemExit(f"{what} {value!r} is not KEY=VALUE")
        out[key] = val
    return out


def _schedules(client: httpx2.Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        for s in _check(client.get("/v1/schedules"))["data"]:
            _schedule_line(s)
        return 0
    if args.action == "create":
        body: dict[str, Any] = {
            "name": args.name,
            "cron": args.cron,
            "timezone": args.timezone,
            "labels": _pairs(args.label, "--label"),
            "catch_up": args.catch_up,
            "enabled": not args.paused,
        }
        if args.job:
            body["job"] = _json_file(args.job)
        else:
            body["catalog_url"] = args.catalog_url
            body["params"] = _pairs(args.param, "--param")
            if args.template:
                body["template"] = args.template
        if args.max_cost_usd is not None:
            body["max_cost_usd"] = args.max_cost_usd
        _schedule_line(_check(client.post("/v1/schedules", json=body)))
        return 0
    path = f"/v1/schedules/{args.schedule_id}"
    if args.action == "delete":
        resp = client.delete(path)
        if resp.status_code != 204:
            _check(resp)
        console.print(f"{args.schedule_id}: deleted (its jobs are kept)")
        return 0
    enabled = args.action == "resume"
    _schedule_line(_check(client.patch(path, json={"enabled": enabled})))
    return 0


def _schedule_line(s: dict[str, Any]) -> None:
    last = s["last_run"]
    state = "" if s["enabled"] else " [paused]"
    ran = f"last {last['job_id']} ({last['status']})" if last["job_id"] else "not run yet"
    if last["error"]:
        ran += f"; error: {last['error']}"
    print(
        f"{s['id']}  {s['name']}{state}  '{s['cron']}' {s['timezone']} ({s['description']})  "
        f"next {s['next_run_at'] or '-'}  {ran}"
    )


def _download(client: httpx2.Client, job_id: str, to: Path) -> int:
    target = to / job_id
    with client.stream("GET", f"/v1/jobs/{job_id}/manifest") as resp:
        if resp.status_code >= 400:
            resp.read()
            _check(resp)
        (target / "images").mkdir(parents=True, exist_ok=True)
        with (target / "manifest.jsonl").open("wb") as fh:
            for chunk in resp.iter_bytes():
                fh.write(chunk)
    cursor: int | None = 0
    count = 0
    while cursor is not None:
        page = _check(
            client.get(
                f"/v1/jobs/{job_id}/items",
                params={"status": "succeeded", "cursor": cursor, "limit": 500},
            )
        )
        for item in page["data"]:
            for key, url in zip(item["keys"], item["urls"], strict=True):
                dest = target / "images" / key.rsplit("/", 1)[-1]
                with client.stream("GET", url) as img, dest.open("wb") as fh:
                    for chunk in img.iter_bytes():
                        fh.write(chunk)
                count += 1
        cursor = page["next_cursor"]
    console.print(f"{count} images and the manifest in {target}")
    return 0
