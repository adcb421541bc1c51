"""Image requests: checking a generations or edits body, counting its tokens, making its images.

The sync endpoints and the batch engine share this module, so an image line in a batch is judged,
billed and drawn exactly as the same body sent to ``/v1/images/generations`` would be. What a model
accepts and what it costs come only from the catalog (``service.catalog``) and the token counters
(``service.tokens``), the same ones the service estimates with.

Failure semantics: :meth:`ImageMaker.parse` raises :class:`~simulator.errors.APIError` (400
``invalid_request_error`` naming the parameter, 404 ``model_not_found`` for unknown or shut-down
models); reading a reference image (:func:`probe_image`) raises a 400 ``invalid_image_format`` for
what is not a PNG, JPEG or WebP and ``invalid_image`` for one over :data:`MAX_INPUT_PIXELS`, from
its header alone; :meth:`ImageMaker.moderate` raises the 400 ``moderation_blocked`` OpenAI sends; making
images of a parsed request never fails.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from PIL import Image, UnidentifiedImageError

from service.catalog import EDITS, GENERATIONS, Catalog, Model
from service.tokens import input_image_tokens, output_image_tokens, prompt_tokens
from simulator.errors import APIError, invalid, not_found
from simulator.images import Picture, Renderer

MAX_PROMPT_CHARS = 32_000
MAX_N = 10
MAX_EDIT_IMAGES = 16
# OpenAI publishes no pixel limit for input images (only 50 MB per file); Pillow's
# decompression-bomb threshold (~89.5 MP, far above any real reference) stands in for it.
MAX_INPUT_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485

# Parameters OpenAI accepts on each endpoint (SDK image_generate_params / image_edit_params and
# the JSON edit body of the spec); anything else is refused as OpenAI does ("Unknown parameter").
_COMMON = {
    "model",
    "prompt",
    "n",
    "size",
    "quality",
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "response_format",
    "user",
    "safety_identifier",
    "stream",
    "partial_images",
}
GENERATION_PARAMS = frozenset(_COMMON | {"style", "complexity"})
EDIT_PARAMS = frozenset(_COMMON | {"images", "image", "mask", "input_fidelity"})

_IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@dataclass(frozen=True)
class InputImage:
    """A reference image of an edit: its pixel size, and what identifies its content."""

    width: int
    height: int
    digest: str
    has_alpha: bool = False


@dataclass(frozen=True)
class ImageRequest:
    """A checked image request: what to draw and what it bills."""

    endpoint: str
    model: Model
    prompt: str
    n: int
    width: int
    height: int
    quality: str
    output_format: str
    background: str
    compression: int
    text_tokens: int
    image_tokens: int
    output_tokens: int
    inputs: tuple[InputImage, ...]
    seed: bytes

    @property
    def input_tokens(self) -> int:
        return self.text_tokens + self.image_tokens

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def usage(self) -> dict[str, Any]:
        """The ``usage`` object of the response (facts §3.3): what this request is billed."""
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {
                "text_tokens": self.text_tokens,
                "image_tokens": self.image_tokens,
            },
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"image_tokens": self.output_tokens, "text_tokens": 0},
            "total_tokens": self.input_tokens + self.output_tokens,
        }


def _too_many_pixels(param: str, size: str) -> APIError:
    return invalid(
        f"Invalid image in '{param}': {size} is more than the {MAX_INPUT_PIXELS:,} pixels an input "
        "image may have.",
        param=param,
        code="invalid_image",
    )


def probe_image(source: bytes | BinaryIO, param: str, digest: str | None = None) -> InputImage:
    """Read an input image's header (never its pixels): size, alpha, and a content digest.

    An image over :data:`MAX_INPUT_PIXELS` (a decompression bomb) is refused from its header
    alone with a 400 ``invalid_image``, so it costs the same as a small one.
    """
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(stream) as img:
            fmt = img.format or ""
            width, height = img.size
            has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    except Image.DecompressionBombError as exc:
        # Pillow refuses outright at twice its limit, before we see the size.
        raise _too_many_pixels(param, "the image") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise invalid(
            f"Invalid image in '{param}': the file is not a PNG, JPEG or WebP image.",
            param=param,
            code="invalid_image_format",
        ) from exc
    if fmt not in _IMAGE_FORMATS:
        raise invalid(
            f"Invalid image in '{param}': format must be one of "
            f"{sorted(_IMAGE_FORMATS.values())}, got {fmt.lower() or 'unknown'}.",
            param=param,
            code="invalid_image_format",
        )
    if width * height > MAX_INPUT_PIXELS:
        # Between one and two times Pillow's limit it only warns: refuse here, pixels unread.
        raise _too_many_pixels(param, f"{width}x{height}")
    if digest is None:
        if isinstance(source, bytes):
            digest = hashlib.sha256(source).hexdigest()
        else:
            source.seek(0)
            h = hashlib.sha256()
            for chunk in iter(lambda: source.read(1 << 20), b""):
                h.update(chunk)
            digest = h.hexdigest()
    return InputImage(width, height, digest, has_alpha)


def decode_data_url(url: str, param: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise invalid(
            f"Invalid '{param}': expected a data URL like 'data:image/png;base64,...'.",
            param=param,
            code="invalid_image_url",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(
            f"Invalid '{param}': the data URL is not valid base64.",
            param=param,
            code="invalid_image_url",
        ) from exc


def resolve_image_ref(ref: object, param: str, file_path: Callable[[str], Path]) -> InputImage:
    """One ``{"image_url": …}`` / ``{"file_id": …}`` of a JSON edit, read as far as its header.

    ``file_path`` maps a file id to its bytes on disk (raising the 404 for unknown ids). The
    simulator is offline, so an http(s) URL cannot be fetched and is refused with a 400 that says so.
    """
    if not isinstance(ref, dict) or len(ref) != 1 or not ({"image_url", "file_id"} & ref.keys()):
        raise invalid(
            f"Invalid '{param}': expected an object with exactly one of 'image_url' or 'file_id'.",
            param=param,
            code="invalid_value",
        )
    if "file_id" in ref:
        file_id = ref["file_id"]
        if not isinstance(file_id, str):
            raise invalid(
                f"Invalid type for '{param}.file_id': expected a string.",
                param=param,
                code="invalid_type",
            )
        try:
            path = file_path(file_id)
        except APIError as exc:
            raise invalid(
                f"Invalid '{param}.file_id': no such file '{file_id}'.",
                param=f"{param}.file_id",
                code="invalid_value",
            ) from exc
        with path.open("rb") as f:
            return probe_image(f, f"{param}.file_id", digest=f"file:{file_id}")
    url = ref["image_url"]
    if not isinstance(url, str):
        raise invalid(
            f"Invalid type for '{param}.image_url': expected a string.",
            param=param,
            code="invalid_type",
        )
    if url.startswith(("http://", "https://")):
        raise invalid(
            f"Invalid '{param}.image_url': the simulator is offline and cannot download {url[:100]}; "
            "send a data URL or a file_id instead.",
            param=f"{param}.image_url",
            code="invalid_image_url",
        )
    return probe_image(decode_data_url(url, f"{param}.image_url"), f"{param}.image_url")


def resolve_edit_refs(
    body: Mapping[str, Any], file_path: Callable[[str], Path]
) -> tuple[tuple[InputImage, ...], InputImage | None]:
    """The reference images and mask of a JSON edit body (``images`` and ``mask``)."""
    images = body.get("images")
    inputs: tuple[InputImage, ...] = ()
    if images is not None:
        if not isinstance(images, list):
            raise invalid(
                "Invalid type for 'images': expected an array.", param="images", code="invalid_type"
            )
        if len(images) > MAX_EDIT_IMAGES:
            raise invalid(
                f"Invalid 'images': at most {MAX_EDIT_IMAGES} images, got {len(images)}.",
                param="images",
                code="array_above_max_length",
            )
        inputs = tuple(
            resolve_image_ref(r, f"images[{i}]", file_path) for i, r in enumerate(images)
        )
    mask_ref = body.get("mask")
    mask = resolve_image_ref(mask_ref, "mask", file_path) if mask_ref is not None else None
    return inputs, mask


def _int_param(
    body: Mapping[str, Any], name: str, default: int, lo: int, hi: int, form: bool
) -> int:
    raw = body.get(name)
    if raw is None:
        return default
    value: int
    if form and isinstance(raw, str):
        try:
            value = int(raw)
        except ValueError as exc:
            raise invalid(
                f"Invalid type for '{name}': expected an integer, but got a string instead.",
                param=name,
                code="invalid_type",
            ) from exc
    elif isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    else:
        raise invalid(
            f"Invalid type for '{name}': expected an integer, but got {type(raw).__name__} instead.",
            param=name,
            code="invalid_type",
        )
    if value < lo:
        raise invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {lo}, but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if value > hi:
        raise invalid(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {hi}, but got {value} instead.",
            param=name,
            code="integer_above_max_value",
        )
    return value


def _str_param(body: Mapping[str, Any], name: str, default: str | None) -> str | None:
    raw = body.get(name)
    if raw is None:
        return default
    if not isinstance(raw, str):
        raise invalid(
            f"Invalid type for '{name}': expected a string, but got {type(raw).__name__} instead.",
            param=name,
            code="invalid_type",
        )
    return raw


def _choice(value: str, allowed: tuple[str, ...] | frozenset[str], name: str, why: str = "") -> str:
    if value not in allowed:
        supported = ", ".join(f"'{a}'" for a in allowed)
        raise invalid(
            f"Invalid value: '{value}'. Supported values are: {supported}{why}.",
            param=name,
            code="invalid_value",
        )
    return value


class ImageMaker:
    """Checks image requests against the catalog, bills them and draws their images."""

    def __init__(
        self,
        catalog: Catalog,
        renderer: Renderer,
        moderation_rules: Mapping[str, str],
        today: Callable[[], dt.date] = dt.date.today,
    ) -> None:
        self.catalog = catalog
        self.renderer = renderer
        self.moderation_rules = dict(moderation_rules)
        self.today = today

    # --- models -------------------------------------------------------------------------------

    def model(self, model_id: object, endpoint: str) -> Model:
        """The catalog model a request names, refusing unknown and shut-down ones."""
        if model_id is None:
            raise invalid(
                "Missing required parameter: 'model'. (The API's default, dall-e-2, is retired; "
                f"name a model such as '{self.catalog.default_model}'.)",
                param="model",
                code="missing_required_parameter",
            )
        if not isinstance(model_id, str):
            raise invalid(
                "Invalid type for 'model': expected a string.", param="model", code="invalid_type"
            )
        model = self.catalog.get(model_id)
        if model is None:
            raise not_found(
                f"The model '{model_id}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        if model.is_shut_down(self.today()):
            raise not_found(
                f"The model '{model_id}' has been shut down: {model.shutdown_message()}.",
                param="model",
                code="model_not_found",
            )
        if endpoint not in model.endpoints:
            raise invalid(
                f"The model '{model_id}' does not support {endpoint}.",
                param="model",
                code="unsupported_model",
            )
        return model

    # --- parsing ------------------------------------------------------------------------------

    def parse(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        *,
        inputs: tuple[InputImage, ...] = (),
        mask: InputImage | None = None,
        form: bool = False,
    ) -> ImageRequest:
        """Check ``body`` (JSON, or multipart fields when ``form``) and work out what it bills.

        For edits the caller resolves the reference images (multipart parts, data URLs or file
        ids) into ``inputs`` and ``mask`` first; this checks how many there are and that the mask
        fits the first image.
        """
        allowed = GENERATION_PARAMS if endpoint == GENERATIONS else EDIT_PARAMS
        for key in body:
            if key not in allowed and not (form and key.rstrip("[]") in allowed):
                raise invalid(f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter")
        model = self.model(body.get("model"), endpoint)

        prompt = _str_param(body, "prompt", None)
        if prompt is None:
            raise invalid(
                "Missing required parameter: 'prompt'.",
                param="prompt",
                code="missing_required_parameter",
            )
        if not prompt.strip():
            raise invalid(
                "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an "
                "empty string instead.",
                param="prompt",
                code="empty_string",
            )
        if len(prompt) > MAX_PROMPT_CHARS:
            raise invalid(
                f"Invalid 'prompt': string too long. Expected a string with maximum length "
                f"{MAX_PROMPT_CHARS}, but got a string with length {len(prompt)} instead.",
                param="prompt",
                code="string_above_max_length",
            )

        n = _int_param(body, "n", 1, 1, MAX_N, form)

        size = _str_param(body, "size", "auto") or "auto"
        problem = model.size_problem(size)
        if problem:
            raise invalid(
                f"Invalid value for 'size': {problem}.", param="size", code="invalid_value"
            )
        width, height = model.resolve_size(size)

        quality_in = _str_param(body, "quality", model.default_quality) or model.default_quality
        _choice(quality_in, model.qualities, "quality", f" for {model.id}")
        quality = model.resolve_quality(quality_in)

        fmt = _str_param(body, "output_format", "png") or "png"
        _choice(fmt, model.formats, "output_format", f" for {model.id}")

        background = _str_param(body, "background", "auto") or "auto"
        _choice(background, ("auto", "opaque", "transparent"), "background")
        if background == "transparent":
            if fmt == "jpeg":
                raise invalid(
                    "Transparent background is not supported for output_format 'jpeg'; use 'png' or 'webp'.",
                    param="background",
                    code="invalid_value",
                )
            if not model.transparent_background:
                raise invalid(
                    f"The model '{model.id}' does not support a transparent background.",
                    param="background",
                    code="invalid_value",
                )
        resolved_background = "transparent" if background == "transparent" else "opaque"

        compression = _int_param(body, "output_compression", 100, 0, 100, form)
        if compression < 100 and fmt == "png":
            raise invalid(
                "output_compression is only supported for output_format 'jpeg' and 'webp'.",
                param="output_compression",
                code="invalid_value",
            )

        moderation = _str_param(body, "moderation", "auto") or "auto"
        _choice(moderation, ("auto", "low"), "moderation")

        response_format = _str_param(body, "response_format", None)
        if response_format not in (None, "b64_json"):
            raise invalid(
                f"Invalid value: '{response_format}'. GPT image models always return 'b64_json'.",
                param="response_format",
                code="invalid_value",
            )
        stream = body.get("stream")
        if stream not in (None, False, "false"):
            raise invalid(
                "Streaming image responses are not supported by the simulator.",
                param="stream",
                code="unsupported_parameter",
            )

        high_fidelity = False
        if endpoint == EDITS:
            fidelity = _str_param(body, "input_fidelity", "low") or "low"
            high_fidelity = _choice(fidelity, ("low", "high"), "input_fidelity") == "high"
            if not inputs:
                raise invalid(
                    "Missing required parameter: 'images' (or 'image' in a multipart request).",
                    param="images",
                    code="missing_required_parameter",
                )
            if len(inputs) > MAX_EDIT_IMAGES:
                raise invalid(
                    f"Invalid 'images': at most {MAX_EDIT_IMAGES} images, got {len(inputs)}.",
                    param="images",
                    code="array_above_max_length",
                )
            if mask is not None:
                first = inputs[0]
                if (mask.width, mask.height) != (first.width, first.height):
                    raise invalid(
                        f"Invalid 'mask': its size {mask.width}x{mask.height} must match the first "
                        f"image's {first.width}x{first.height}.",
                        param="mask",
                        code="invalid_value",
                    )
                if not mask.has_alpha:
                    raise invalid(
                        "Invalid 'mask': it must be a PNG with an alpha channel (transparent pixels "
                        "mark where to edit).",
                        param="mask",
                        code="invalid_value",
                    )

        text = prompt_tokens(prompt, self.catalog.prompt_overhead_tokens)
        image_in = sum(input_image_tokens(model, i.width, i.height, high_fidelity) for i in inputs)
        out = output_image_tokens(model, width, height, quality) * n
        seed = hashlib.sha256(
            orjson.dumps(
                [
                    endpoint,
                    model.id,
                    prompt,
                    width,
                    height,
                    quality,
                    fmt,
                    resolved_background,
                    compression,
                    [i.digest for i in inputs],
                    mask.digest if mask else None,
                ]
            )
        ).digest()
        return ImageRequest(
            endpoint=endpoint,
            model=model,
            prompt=prompt,
            n=n,
            width=width,
            height=height,
            quality=quality,
            output_format=fmt,
            background=resolved_background,
            compression=compression,
            text_tokens=text,
            image_tokens=image_in,
            output_tokens=out,
            inputs=inputs,
            seed=seed,
        )

    # --- moderation ---------------------------------------------------------------------------

    def moderate(self, prompt: str, request_id: str) -> None:
        """Refuse a prompt containing a blocked word, as OpenAI's safety system does."""
        if not self.moderation_rules:
            return
        lowered = prompt.lower()
        categories = sorted({cat for word, cat in self.moderation_rules.items() if word in lowered})
        if not categories:
            return
        raise APIError(
            400,
            "Your request was rejected by the safety system. If you believe this is an error, "
            f"contact us at help.openai.com and include the request ID {request_id}. "
            f"safety_violations=[{', '.join(categories)}].",
            type="image_generation_user_error",
            code="moderation_blocked",
            extra={"moderation_details": {"moderation_stage": "input", "categories": categories}},
        )

    # --- making -------------------------------------------------------------------------------

    def _items(self, req: ImageRequest) -> list[tuple[Picture, str, str, bytes]]:
        pic = Picture(
            req.width,
            req.height,
            req.output_format,
            req.background == "transparent",
            req.compression,
        )
        kind = f"edit of {len(req.inputs)}" if req.inputs else "image"
        out = []
        for k in range(req.n):
            seed = hashlib.sha256(req.seed + k.to_bytes(2, "big")).digest()
            label = (
                f"{kind} {k + 1}/{req.n} {req.model.id} {req.size} {req.quality} {seed.hex()[:8]}"
            )
            out.append((pic, req.prompt, label, seed))
        return out

    def images(self, req: ImageRequest) -> list[bytes]:
        """The ``n`` encoded images of a request: deterministic, and different from each other."""
        return [self.renderer.render(*item) for item in self._items(req)]

    def response_parts(self, req: ImageRequest, created: int | None = None) -> list[bytes]:
        """The ``ImagesResponse`` body as JSON, in parts to join or write out (no big copies)."""
        meta = orjson.dumps(
            {
                "created": int(time.time()) if created is None else created,
                "background": req.background,
                "output_format": req.output_format,
                "quality": req.quality,
                "size": req.size,
                "usage": req.usage(),
            }
        )
        parts = [b'{"data":[']
        for k, item in enumerate(self._items(req)):
            parts.append(b'{"b64_json":"' if k == 0 else b'},{"b64_json":"')
            parts.extend(self.renderer.render_b64(*item))
            parts.append(b'"')
        parts.append(b"}],")
        parts.append(meta[1:])
        return parts

    def response_json(self, req: ImageRequest, created: int | None = None) -> bytes:
        return b"".join(self.response_parts(req, created))
