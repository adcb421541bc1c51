"""Token counts: prompt text (o200k_base), output images and input images.

The o200k_base ranks ship with the code (``data/o200k_base.tiktoken.gz``, byte-identical to
OpenAI's published file: its sha256 is checked on load), so counting never needs the network.
Both the estimator and the simulator count with these functions.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import math
from functools import lru_cache
from pathlib import Path

import tiktoken

from service.catalog import Model

_O200K_FILE = Path(__file__).parent / "data" / "o200k_base.tiktoken.gz"
# tiktoken_ext.openai_public's expected hash for o200k_base.tiktoken.
_O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Planning effort per quality in the gpt-image-2 output formula (facts §4.1). Qualities with no
# published point (xhigh, max on the 2.5 models) are estimated as high; actuals come from usage.
_GPT_IMAGE_2_FACTOR = {"low": 16, "medium": 48, "high": 96}


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    raw = gzip.decompress(_O200K_FILE.read_bytes())
    if hashlib.sha256(raw).hexdigest() != _O200K_SHA256:
        raise RuntimeError(f"{_O200K_FILE} is corrupt: its sha256 does not match o200k_base")
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in raw.splitlines() if line)
    }
    return tiktoken.Encoding(
        name="o200k_base",
        pat_str=_O200K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    )


def text_tokens(text: str) -> int:
    """Tokens of ``text`` in o200k_base (special-token strings count as plain text)."""
    return len(encoding().encode_ordinary(text))


def prompt_tokens(prompt: str, overhead: int) -> int:
    """Text input tokens billed for a prompt: its o200k_base count plus the API's overhead."""
    return text_tokens(prompt) + overhead


def output_image_tokens(model: Model, width: int, height: int, quality: str) -> int:
    """Output tokens of one image of ``width``x``height`` at a resolved ``quality``."""
    if model.output_tokens == "table":
        table = model.output_tokens_table.get(quality) or model.output_tokens_table["high"]
        return int(table[f"{width}x{height}"])
    if model.output_tokens == "gpt-image-2":
        f = _GPT_IMAGE_2_FACTOR.get(quality, _GPT_IMAGE_2_FACTOR["high"])
        long_side, short_side = max(width, height), min(width, height)
        a = (2 * f * short_side + long_side) // (2 * long_side)
        return math.ceil(f * a * (2_000_000 + width * height) / 4_000_000)
    raise ValueError(f"unknown output token method {model.output_tokens!r} for {model.id}")


def input_image_tokens(model: Model, width: int, height: int, high_fidelity: bool = False) -> int:
    """Input tokens of one reference image of ``width``x``height`` (edits)."""
    if model.input_images == "tiles":
        # Fit in 2048x2048, then scale so the shortest side is 512, count 512-px tiles.
        scale = min(1.0, 2048 / max(width, height))
        w, h = width * scale, height * scale
        scale = 512 / min(w, h)
        w, h = w * scale, h * scale
        tiles = math.ceil(w / 512) * math.ceil(h / 512)
        tokens = 65 + 129 * tiles
        if high_fidelity:
            tokens += 4160 if width == height else 6240
        return tokens
    if model.input_images == "patches":
        # 32-px patches within a 1,536-patch budget; small images magnified up to 2x toward a
        # 1024-px longest side; aspect clamped to 1:3..3:1 (facts §4.2, community-derived).
        w, h = float(width), float(height)
        if max(w, h) < 1024:
            grow = min(2.0, 1024 / max(w, h))
            w, h = w * grow, h * grow
        if w > 3 * h:
            w = 3 * h
        elif h > 3 * w:
            h = 3 * w
        patches = math.ceil(w / 32) * math.ceil(h / 32)
        if patches > 1536:
            shrink = math.sqrt(1536 / patches)
            patches = math.floor(w * shrink / 32) * math.floor(h * shrink / 32)
        return int(patches)
    raise ValueError(f"unknown input image method {model.input_images!r} for {model.id}")
