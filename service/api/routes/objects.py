"""``/v1/objects/{key}``: objects in local storage (images, manifests), behind the same auth."""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.api.deps import ctx_of, own_job
from service.api.problems import COMMON
from service.errors import Problem
from service.storage import ObjectNotFound

router = APIRouter(prefix="/v1/objects", tags=["storage"], responses=COMMON)


@router.get("/{key:path}", summary="An object in local storage (images, manifests)")
def get_object(request: Request, key: str) -> StreamingResponse:
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != "jobs":
        raise Problem(404, "Not found", f"no object {key[:200]!r}")
    own_job(request, parts[1])
    ctx = ctx_of(request)
    try:
        info = ctx.storage.head(key)
    except (ObjectNotFound, ValueError):
        raise Problem(404, "Not found", f"no object {key[:200]!r}") from None
    ctype = info.content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"

    def body() -> Iterator[bytes]:
        with ctx.storage.open(key) as fh:
            while chunk := fh.read(256 * 1024):
                yield chunk

    return StreamingResponse(body(), media_type=ctype, headers={"Content-Length": str(info.size)})
