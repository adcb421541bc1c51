"""``imagebatch submit | status | download``: a client of a running API.

The API is ``--api`` or ``IMAGEBATCH_API`` (default http://127.0.0.1:8000), the key
``--key`` or ``IMAGEBATCH_API_KEY`` (tenants only).
"""

from __future__ import annotations

import argparse
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
        f"{job['id']}: [bold]{job['status']}[/bold] — {c['succeeded']} succeeded, {c['failed']} failed, "
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
    return 2


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
