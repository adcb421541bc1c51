"""A real API process with two tenants (``acme`` with daily and monthly caps, ``rival``), and a
Context on the same Redis and storage to make jobs with (tests/support/jobs.py): what the API's
and the console's HTTP tests run against."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
import redis

from service.context import Context
from service.tenants import digest_key, new_key
from tests.support.context import make_context
from tests.support.procs import Proc, free_port, start_server

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Console:
    url: str
    ctx: Context
    keys: dict[str, str]  # tenant -> API key
    proc: Proc

    def client(self) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, timeout=30, follow_redirects=False)

    @contextmanager
    def signed_in(self, tenant: str) -> Iterator[httpx2.Client]:
        with self.client() as client:
            form = client.get("/ui/sign-in")
            token = csrf_of(form.text)
            resp = client.post("/ui/sign-in", data={"key": self.keys[tenant], "csrf": token})
            assert resp.status_code == 303, resp.text
            yield client


def csrf_of(html: str) -> str:
    m = CSRF.search(html)
    assert m, "no CSRF token on the page"
    return m.group(1)


@contextmanager
def two_tenant_api(tmp: Path, redis_url: str, db: int = 5) -> Iterator[Console]:
    keys = {"acme": new_key(), "rival": new_key()}
    tenants = tmp / "tenants.toml"
    tenants.write_text(
        "\n".join(
            f'[tenants.{t}]\nkey_sha256 = ["{digest_key(k)}"]\n'
            + ("daily_usd = 50.0\nmonthly_usd = 400.0\n" if t == "acme" else "")
            for t, k in keys.items()
        )
    )
    catalogs = tmp / "catalogs"
    catalogs.mkdir()
    (catalogs / "products.csv").write_text("id,title\nsku-1,red mug\nsku-2,blue cup\n")
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    port = free_port()
    env = {
        "IMAGEBATCH_REDIS_URL": url,
        "IMAGEBATCH_STORAGE_URL": (tmp / "storage").as_uri(),
        "IMAGEBATCH_DATA_DIR": str(tmp / "data"),
        "IMAGEBATCH_TENANTS_FILE": str(tenants),
        # Schedules read their catalogs from here (file://).
        "IMAGEBATCH_LOCAL_REF_ROOTS": f'["{catalogs}"]',
        "IMAGEBATCH_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "OPENAI_API_KEY": "sk-test",
    }
    proc = start_server(
        [sys.executable, "-m", "service.cli", "api", "--port", str(port)],
        port,
        tmp / "api.log",
        env=env,
    )
    ctx = make_context(tmp, url, tenants_file=tenants, local_ref_roots=[catalogs])
    try:
        yield Console(f"http://127.0.0.1:{port}", ctx, keys, proc)
    finally:
        proc.stop()
        ctx.redis.close()
