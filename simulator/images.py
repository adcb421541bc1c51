"""Real pictures, cheaply: every image decodes at the requested size and format and shows its prompt.

A picture is a cached background (a soft gradient, or fully transparent for
``background=transparent``) with a band across the middle that shows the prompt, a per-image
label and a colour swatch drawn from the image's seed, so items differ and the same request gives
the same bytes.

Speed is what shapes this module: the simulator must make hundreds of 1024x1024 PNGs a second on
one core, and a full Pillow PNG encode takes ~12 ms. So:

* Text is drawn with Pillow's built-in bitmap font at 1/scale and enlarged with NEAREST (a few
  hundred microseconds; FreeType costs ~0.6 ms per line).
* A PNG is spliced: the rows above and below the band are deflated once per (size, background,
  band position) with a full flush, which makes each segment a self-contained run of deflate
  blocks; per image only the band's rows are deflated and the three segments are joined, with the
  zlib Adler-32 of the whole computed by combining the segments' checksums (as zlib's
  ``adler32_combine`` does).
* JPEG and WebP are encoded by Pillow from the cached background with the band pasted in
  (libjpeg-turbo is fast; WebP is slow, ~10 ms, and is not on any hot path we measure).

``pad_to`` (``--image-bytes``) grows each image toward a realistic size with a metadata chunk of
incompressible filler: a private ancillary PNG chunk, JPEG COM segments, WebP XMP. Decoders skip
them. Rendering never fails for a validated request; a size or format the caller did not validate
raises ``ValueError``.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import textwrap
import threading
import unicodedata
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

FORMATS = ("png", "jpeg", "webp")

# The bitmap font's glyph cell (Pillow's load_default_imagefont is a 6x11 monospace font).
_CHAR_W = 6
_LINE_H = 13
_PAD = 4
_MAX_PROMPT_LINES = 8

# Palette indices of the band (drawn in "P" mode, coloured at conversion).
_PANEL, _TEXT, _LABEL, _SWATCH = 0, 1, 2, 3

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A private, ancillary, safe-to-copy chunk name (lowercase/lowercase/UPPER/lowercase): decoders
# that do not know it skip it, which is what padding needs.
_PNG_PAD_CHUNK = b"ibPa"
_ADLER_BASE = 65521
# Padding grows in steps of this many bytes, so images of one size share a cached padded head.
_PAD_QUANTUM = 4096


@dataclass(frozen=True)
class Picture:
    """What one image looks like on the outside: its size, container and background."""

    width: int
    height: int
    fmt: str
    transparent: bool = False
    compression: int = 100

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown image format {self.fmt!r}")
        if self.transparent and self.fmt == "jpeg":
            raise ValueError("jpeg has no alpha channel")
        if self.width < 16 or self.height < 16:
            raise ValueError(f"image size {self.width}x{self.height} is too small")


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


@lru_cache(maxsize=1)
def _filler() -> bytes:
    # Deterministic and incompressible (deflate's window is 32 KiB, so repeating 1 MiB stays so).
    return random.Random(0x1B).randbytes(1 << 20)


def filler(n: int) -> bytes:
    block = _filler()
    if n <= len(block):
        return block[:n]
    return (block * (n // len(block) + 1))[:n]


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """The Adler-32 of A+B from those of A and B and the length of B (zlib's adler32_combine)."""
    rem = len2 % _ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % _ADLER_BASE
    sum1 += (adler2 & 0xFFFF) + _ADLER_BASE - 1
    sum2 += ((adler1 >> 16) & 0xFFFF) + ((adler2 >> 16) & 0xFFFF) + _ADLER_BASE - rem
    sum1 %= _ADLER_BASE
    sum2 %= _ADLER_BASE
    return sum1 | (sum2 << 16)


def _printable(text: str) -> str:
    """The text in the bitmap font's Latin-1 repertoire ('?' for what it cannot show)."""
    text = unicodedata.normalize("NFKC", " ".join(text.split()))
    return text.encode("latin-1", "replace").decode("latin-1")


def _scale(width: int) -> int:
    # About 56 characters across a 1024-px image; wider images get bigger letters.
    return max(1, round(width / 340))


def _swatch(seed: bytes) -> tuple[int, int, int]:
    r, g, b = seed[0], seed[1], seed[2]
    # Keep it saturated enough to see against the white panel.
    return (r // 2 + 40, g // 2 + 40, b // 2 + 40)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
    )


def _with_filter_bytes(raw: bytes, stride: int, rows: int) -> bytes:
    """PNG scanlines: each row prefixed with filter type 0 (None)."""
    mv = memoryview(raw)
    parts: list[bytes | memoryview] = []
    zero = b"\x00"
    for i in range(rows):
        parts.append(zero)
        parts.append(mv[i * stride : (i + 1) * stride])
    return b"".join(parts)


@dataclass(frozen=True)
class _Segment:
    """Deflate blocks (no zlib header) for some scanlines, their Adler-32 and raw length."""

    data: bytes
    adler: int
    length: int


def _deflate(raw: bytes, level: int, final: bool) -> _Segment:
    comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
    out = comp.compress(raw) + comp.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)
    return _Segment(out, zlib.adler32(raw), len(raw))


@dataclass(frozen=True)
class _Band:
    """The middle of the picture, each row of ``image`` standing for ``repeat`` rows."""

    image: Image.Image
    repeat: int

    @property
    def height(self) -> int:
        return self.image.height * self.repeat

    def full(self) -> Image.Image:
        return self.image.resize((self.image.width, self.height), Image.Resampling.NEAREST)

    def scanlines(self) -> bytes:
        """PNG scanlines: each row once with filter None, then repeats as Up with zero deltas."""
        img = self.image
        stride = img.width * len(img.mode)
        raw = memoryview(img.tobytes())
        repeat = b"\x02" + bytes(stride)
        parts: list[bytes | memoryview] = []
        for i in range(img.height):
            parts.append(b"\x00")
            parts.append(raw[i * stride : (i + 1) * stride])
            parts.extend([repeat] * (self.repeat - 1))
        return b"".join(parts)


class Renderer:
    """Makes the bytes of one image; thread-safe, caches backgrounds and PNG segments."""

    def __init__(self, *, draw_prompt: bool = True, pad_to: int = 0) -> None:
        self.draw_prompt = draw_prompt
        self.pad_to = pad_to
        self._lock = threading.Lock()
        self._backgrounds: OrderedDict[tuple[int, int, bool], Image.Image] = OrderedDict()
        self._segments: OrderedDict[tuple[int, int, bool, int, int], tuple[_Segment, _Segment]] = (
            OrderedDict()
        )

    # --- public -------------------------------------------------------------------------------

    def render(self, pic: Picture, prompt: str, label: str, seed: bytes) -> bytes:
        """The encoded image for ``pic`` showing ``prompt`` and ``label``; same inputs, same bytes."""
        natural = self._natural(pic, prompt, label, seed)
        split = self._padding(pic, natural)
        if split is None:
            return natural
        head, prefix, _ = split
        return prefix + natural[head:]

    def render_b64(self, pic: Picture, prompt: str, label: str, seed: bytes) -> list[bytes]:
        """The same image base64-encoded, as parts to concatenate.

        Padding is megabytes of constant filler, so the head of the file up to the end of the
        padding is laid out to a multiple of 3 bytes and its base64 is cached: per image only the
        natural part (tens of kB) is encoded.
        """
        natural = self._natural(pic, prompt, label, seed)
        split = self._padding(pic, natural)
        if split is None:
            return [base64.b64encode(natural)]
        head, _, prefix_b64 = split
        return [prefix_b64, base64.b64encode(natural[head:])]

    def _natural(self, pic: Picture, prompt: str, label: str, seed: bytes) -> bytes:
        band = self._band(pic, prompt, label, seed)
        top = (pic.height - band.height) // 2
        if pic.fmt == "png":
            return self._png(pic, band, top, label)
        data = self._encoded(pic, band, top)
        if pic.fmt == "webp" and self.pad_to and len(data) < self.pad_to:
            # WebP's RIFF header holds the file size, so its padding cannot be a cached prefix.
            return _pad_webp(data, self.pad_to - len(data), pic.width, pic.height)
        return data

    # --- drawing ------------------------------------------------------------------------------

    def _band(self, pic: Picture, prompt: str, label: str, seed: bytes) -> _Band:
        s = _scale(pic.width)
        small_w = pic.width // s
        cols = max(8, (small_w - 2 * _PAD) // _CHAR_W)
        max_lines = max(0, min(_MAX_PROMPT_LINES, (pic.height // s - 3 * _PAD) // _LINE_H - 1))
        lines: list[str] = []
        if self.draw_prompt and max_lines:
            lines = textwrap.wrap(_printable(prompt), cols, max_lines=max_lines, placeholder="...")
        label_text = _printable(label)[: cols - 4]
        small_h = _PAD + _LINE_H * (len(lines) + 1) + _PAD
        small_h = min(small_h, pic.height // s)
        band = Image.new("P", (small_w, small_h), _PANEL)
        draw = ImageDraw.Draw(band)
        font = _font()
        for i, line in enumerate(lines):
            draw.text((_PAD, _PAD + i * _LINE_H), line, font=font, fill=_TEXT)
        y = _PAD + len(lines) * _LINE_H
        draw.text((_PAD, y), label_text, font=font, fill=_LABEL)
        sw = _LINE_H - 3
        draw.rectangle((small_w - _PAD - 2 * sw, y, small_w - _PAD - 1, y + sw - 1), fill=_SWATCH)
        panel_alpha = 235 if pic.transparent else 255
        palette = [
            (250, 250, 247, panel_alpha),
            (20, 24, 32, 255),
            (90, 96, 110, 255),
            (*_swatch(seed), 255),
        ]
        if pic.transparent:
            band.putpalette([c for rgba in palette for c in rgba], rawmode="RGBA")
        else:
            band.putpalette([c for rgba in palette for c in rgba[:3]])
        # Widen only: the rows are repeated ``s`` times when the scanlines are laid out.
        wide = band.resize((small_w * s, small_h), Image.Resampling.NEAREST)
        mode = "RGBA" if pic.transparent else "RGB"
        if wide.width != pic.width:
            # Widths not divisible by the scale: pad the band out to the full width.
            full = Image.new(mode, (pic.width, small_h), palette[_PANEL][: len(mode)])
            full.paste(wide.convert(mode), (0, 0))
            return _Band(full, s)
        return _Band(wide.convert(mode), s)

    def _background(self, pic: Picture) -> Image.Image:
        key = (pic.width, pic.height, pic.transparent)
        with self._lock:
            bg = self._backgrounds.get(key)
            if bg is not None:
                self._backgrounds.move_to_end(key)
                return bg
        if pic.transparent:
            bg = Image.new("RGBA", (pic.width, pic.height), (0, 0, 0, 0))
        else:
            ramp = Image.linear_gradient("L").resize((pic.width, pic.height))
            # A calm blue-grey to sand gradient: clearly a picture, cheap to compress.
            top, bottom = (176, 196, 222), (238, 226, 206)
            bg = Image.merge(
                "RGB",
                [
                    ramp.point(lambda v, a=a, b=b: a + (b - a) * v // 255)
                    for a, b in zip(top, bottom, strict=True)
                ],
            )
        with self._lock:
            self._backgrounds[key] = bg
            while len(self._backgrounds) > 16:
                self._backgrounds.popitem(last=False)
        return bg

    # --- containers ---------------------------------------------------------------------------

    def _png_segments(self, pic: Picture, top: int, band_h: int) -> tuple[_Segment, _Segment]:
        key = (pic.width, pic.height, pic.transparent, top, band_h)
        with self._lock:
            seg = self._segments.get(key)
            if seg is not None:
                self._segments.move_to_end(key)
                return seg
        bg = self._background(pic)
        stride = pic.width * (4 if pic.transparent else 3)
        above = bg.crop((0, 0, pic.width, top)).tobytes()
        below = bg.crop((0, top + band_h, pic.width, pic.height)).tobytes()
        bottom_rows = pic.height - top - band_h
        seg = (
            _deflate(_with_filter_bytes(above, stride, top), 9, final=False),
            _deflate(_with_filter_bytes(below, stride, bottom_rows), 9, final=True),
        )
        with self._lock:
            self._segments[key] = seg
            while len(self._segments) > 256:
                self._segments.popitem(last=False)
        return seg

    def _png(self, pic: Picture, band: _Band, top: int, label: str) -> bytes:
        above, below = self._png_segments(pic, top, band.height)
        middle = _deflate(band.scanlines(), 1, final=False)
        adler = adler32_combine(above.adler, middle.adler, middle.length)
        adler = adler32_combine(adler, below.adler, below.length)
        idat = b"".join(
            (b"\x78\x01", above.data, middle.data, below.data, struct.pack(">I", adler))
        )
        ihdr = struct.pack(
            ">IIBBBBB", pic.width, pic.height, 8, 6 if pic.transparent else 2, 0, 0, 0
        )
        text = b"Software\x00imagebatch simulator"
        comment = b"Comment\x00" + _printable(label).encode("latin-1")
        return b"".join(
            (
                _PNG_SIGNATURE,
                _png_chunk(b"IHDR", ihdr),
                _png_chunk(b"tEXt", text),
                _png_chunk(b"tEXt", comment),
                _png_chunk(b"IDAT", idat),
                _png_chunk(b"IEND", b""),
            )
        )

    def _encoded(self, pic: Picture, band: _Band, top: int) -> bytes:
        img = self._background(pic).copy()
        img.paste(band.full(), (0, top))
        out = io.BytesIO()
        if pic.fmt == "jpeg":
            img.save(out, "JPEG", quality=max(1, min(pic.compression, 100)))
        else:
            img.save(out, "WEBP", quality=max(0, min(pic.compression, 100)), method=0)
        return out.getvalue()

    # --- padding ------------------------------------------------------------------------------

    def _padding(self, pic: Picture, natural: bytes) -> tuple[int, bytes, bytes] | None:
        """Where the filler goes in ``natural`` and the padded head: (cut, bytes, base64) or None."""
        if not self.pad_to or pic.fmt == "webp" or len(natural) >= self.pad_to:
            return None
        if pic.fmt == "png":
            # After IHDR (signature 8 + IHDR chunk 25): the head is constant for a size and mode.
            cut, overhead = 33, 12
        else:
            # After SOI and the APP0 (JFIF) segment that must follow it.
            cut, overhead = 2, 0
            if natural[2:4] == b"\xff\xe0":
                cut = 4 + int.from_bytes(natural[4:6], "big")
        need = self.pad_to - len(natural) - overhead
        # Quantized so that similar images share a cached prefix ("about" the size asked for).
        need -= need % _PAD_QUANTUM
        need -= (cut + overhead + need) % 3
        if need < _PAD_QUANTUM:
            return None
        prefix, prefix_b64 = _padded_head(pic.fmt, natural[:cut], need)
        return cut, prefix, prefix_b64


@lru_cache(maxsize=16)
def _padded_head(fmt: str, head: bytes, need: int) -> tuple[bytes, bytes]:
    pad = _png_chunk(_PNG_PAD_CHUNK, filler(need)) if fmt == "png" else _jpeg_comments(need)
    prefix = head + pad
    assert len(prefix) % 3 == 0
    return prefix, base64.b64encode(prefix)


def _jpeg_comments(total: int) -> bytes:
    """COM segments (FF FE, 2-byte length counting itself) of exactly ``total`` bytes."""
    segments: list[bytes] = []
    remaining = total
    while remaining:
        body = min(65533, remaining - 4)
        if remaining - (body + 4) in (1, 2, 3):
            body -= 4  # leave room for a last segment of at least its 4-byte header
        segments.append(b"\xff\xfe" + struct.pack(">H", body + 2) + filler(body))
        remaining -= body + 4
    return b"".join(segments)


def _pad_webp(data: bytes, need: int, width: int, height: int) -> bytes:
    # Extended WebP (VP8X) with an XMP chunk of filler appended; readers ignore its content.
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a WebP file")
    chunks = data[12:]
    if chunks[:4] == b"VP8X":
        flags = chunks[8] | 0x04  # the XMP flag
        chunks = chunks[:8] + bytes([flags]) + chunks[9:]
    else:
        vp8x = (
            bytes([0x04, 0, 0, 0])
            + (width - 1).to_bytes(3, "little")
            + (height - 1).to_bytes(3, "little")
        )
        chunks = b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x + chunks
    body = filler(max(2, need - 8) & ~1)
    chunks += b"XMP " + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks
