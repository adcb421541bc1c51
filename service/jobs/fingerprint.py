"""Item fingerprints: one hash over everything that decides an item's image.

Two items with the same fingerprint ask upstream for the same thing, so a stored image of one
can stand for the other (result reuse, :mod:`service.jobs.reuse`). The fingerprint covers:

* the resolved model snapshot (``gpt-image-2`` -> its newest dated snapshot in the catalog, so
  a catalog that moves an alias to a new snapshot regenerates instead of reusing),
* the endpoint, and every field of the request body that upstream reads: prompt, size,
  quality, output_format, output_compression, background, moderation, input_fidelity, ``n``,
  and any field added later (the body is hashed whole, less the model and the references, so a
  new output-affecting field can never be silently left out),
* the content of each reference image and mask (``sha256`` of the bytes), never its URL: the
  same photo under two names reuses, a changed photo under the same name regenerates.

Absent fields count as upstream's defaults (``quality`` absent = ``"auto"``), so a job that
spells a default out reuses the images of one that left it implicit.

A reference is identified by content when its bytes can be had: ``s3://`` and ``file://``
(read through storage), ``data:`` (decoded), upstream ``file-…`` ids (upstream files never
change). ``https://`` references are not read here: an item with one has no fingerprint and is
always generated.

Failure semantics: pure functions; :func:`ref_identity` raises ``ValueError`` on a malformed
``data:`` URL (intake refuses those anyway).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import orjson
import pybase64

from service.catalog import Catalog

# Bumped when the hashed form changes: old index entries then simply stop matching.
VERSION = 1
# Upstream's defaults for fields a body may leave out (facts §3.1).
DEFAULTS: dict[str, Any] = {
    "size": "auto",
    "quality": "auto",
    "background": "auto",
    "moderation": "auto",
    "output_format": "png",
    "n": 1,
}
COMPRESSIBLE = ("jpeg", "webp")
# Body fields that never change the image (who asked, how it is delivered).
NOT_OUTPUT = frozenset({"user", "stream", "partial_images"})
REFERENCE_FIELDS = ("images", "mask")


def snapshot(catalog: Catalog, model_id: str) -> str:
    """The dated snapshot a model id resolves to: itself when it is a snapshot or has none, else
    the newest snapshot the catalog lists for it."""
    model = catalog.get(model_id)
    if model is None or model.snapshot_of is not None:
        return model_id
    snaps = [m for m in catalog.models.values() if m.snapshot_of == model_id]
    if not snaps:
        return model_id
    return max(snaps, key=lambda m: (m.created, m.id)).id


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ref_identity(value: str) -> str | None:
    """A reference's identity when it is known without storage: ``data:`` URLs by content,
    upstream file ids by id; None when the bytes must be read (``s3://``, ``file://``) or cannot
    be (``https://``; see :func:`readable`)."""
    if value.startswith("data:"):
        _, sep, payload = value.partition(",")
        if not sep:
            raise ValueError("a data: URL without a comma")
        return digest(pybase64.b64decode(payload, validate=False))
    if value.startswith("file-"):
        return f"file:{value}"
    return None


def readable(value: str) -> bool:
    """Whether storage can read the reference to learn its content (``s3://``, ``file://``)."""
    return value.startswith(("s3://", "file://"))


def fingerprint(
    endpoint: str,
    body: dict[str, Any],
    model_snapshot: str,
    image_ids: Sequence[str] = (),
    mask_id: str | None = None,
) -> str:
    """The item's fingerprint (64 hex digits). ``image_ids`` / ``mask_id`` are the identities of
    its references (:func:`digest` of their bytes, or :func:`ref_identity`), in order."""
    canon: dict[str, Any] = dict(DEFAULTS)
    for name, value in body.items():
        if name == "model" or name in REFERENCE_FIELDS or name in NOT_OUTPUT or value is None:
            continue
        canon[name] = value
    if canon["output_format"] in COMPRESSIBLE:
        canon.setdefault("output_compression", 100)
    canon["~v"] = VERSION
    canon["~model"] = model_snapshot
    canon["~endpoint"] = endpoint
    if image_ids:
        canon["~images"] = list(image_ids)
    if mask_id is not None:
        canon["~mask"] = mask_id
    return hashlib.sha256(orjson.dumps(canon, option=orjson.OPT_SORT_KEYS)).hexdigest()


def references(body: dict[str, Any]) -> list[str]:
    """The item's references in fingerprint order: its images, then its mask."""
    refs = [v for v in body.get("images") or () if isinstance(v, str)]
    mask = body.get("mask")
    if isinstance(mask, str):
        refs.append(mask)
    return refs


def with_identities(
    endpoint: str, body: dict[str, Any], model_snapshot: str, ids: Sequence[str]
) -> str:
    """:func:`fingerprint` from the identities of :func:`references` (same order)."""
    n_images = len(body.get("images") or ())
    mask = ids[n_images] if len(ids) > n_images else None
    return fingerprint(endpoint, body, model_snapshot, ids[:n_images], mask)


def without_reading(endpoint: str, body: dict[str, Any], model_snapshot: str) -> str | None:
    """The fingerprint when no reference must be read (generations, ``data:`` and ``file-``
    references); None otherwise."""
    ids: list[str] = []
    for ref in references(body):
        identity = ref_identity(ref)
        if identity is None:
            return None
        ids.append(identity)
    return with_identities(endpoint, body, model_snapshot, ids)
