"""A real :class:`~service.context.Context` for tests that call domain functions directly.

Redis is the test session's server, storage a directory under the test's ``tmp_path`` (or moto's
S3), upstream the simulator; only the broker is replaced, by :class:`Recorder`, so a test sees what
would have been enqueued and runs the next step itself, as a worker's task adapter would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.context import Context, build_context
from service.settings import Settings


class Recorder:
    """Stands in for the broker: remembers what would have been enqueued, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def __call__(self, name: str, *args: Any) -> None:
        self.sent.append((name, *args))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        """The arguments of every task ``name`` enqueued so far."""
        return [tuple(rest) for task, *rest in self.sent if task == name]

    def take(self, name: str) -> list[tuple[Any, ...]]:
        """Like :meth:`named`, and forget them: the test has run those steps itself."""
        mine = self.named(name)
        self.sent = [sent for sent in self.sent if sent[0] != name]
        return mine


def make_context(
    tmp_path: Path, redis_url: str, upstream_url: str | None = None, **settings: Any
) -> Context:
    """A Context on the test Redis, local storage under ``tmp_path`` and ``upstream_url``.

    Without ``upstream_url`` upstream is a port nothing listens on (a test that must not call
    upstream fails loudly if it does). ``settings`` are :class:`Settings` fields.
    """
    fields: dict[str, Any] = {
        "redis_url": redis_url,
        "storage_url": (tmp_path / "storage").as_uri(),
        "data_dir": tmp_path,
        "openai_base_url": upstream_url or "http://127.0.0.1:9/v1",
        "openai_api_key": "sk-test",
        **settings,
    }
    return build_context(Settings(**fields), enqueue=Recorder())


def recorder(ctx: Context) -> Recorder:
    assert isinstance(ctx.enqueue, Recorder)
    return ctx.enqueue
