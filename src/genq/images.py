"""Input image checker: every uploaded file passes :func:`check_image` before anything is stored.

Called by ``genq.api``'s submit route (``POST /v1/jobs``, SPEC §3 "Inputs are checked before
anything is stored") for each multipart file and each ``data:`` URI, in a worker thread since
it decodes. A refusal is an :class:`ImageRejected` whose ``code``/``status``/``details`` the
API turns into the usual error body; the limits come from :mod:`genq.settings`
(``max_file_bytes``, ``max_pixels``). The worker's tools later re-open the stored bytes and
convert modes themselves; this module only says whether the bytes are a safe, complete
PNG, JPEG or WEBP and what they are.

Order of checks, and the answer each gives:

1. zero bytes                                   -> 400 ``invalid_input`` ("the file is empty")
2. more than ``max_bytes``                      -> 413 ``payload_too_large``
3. magic bytes not PNG / JPEG / WEBP            -> 415 ``unsupported_media_type``
   (GIF, BMP, TIFF, AVIF, text...; the filename and declared content type are never read)
4. width x height from the header, parsed here by hand before Pillow sees the bytes,
   over the pixel limit                          -> 413 ``payload_too_large``
   with details ``{width, height, max_pixels}``. A 20000x20000 PNG bomb is refused in
   microseconds without decoding anything.
5. metadata, walked by hand over the chunk/segment headers (PNG chunks, JPEG segments up
   to the first scan, WEBP RIFF chunks) before Pillow parses any of it: more than
   :data:`MAX_METADATA_BYTES` of non-pixel data, or more than :data:`MAX_CHUNKS`
   chunks/segments                              -> 400 ``invalid_input``. A 3 MB PNG of
   200,000 empty text chunks cost Pillow ~1 s of CPU to parse, 250 JPEG APP1 segments of
   64 KB each ~0.2 s; real files carry kilobytes (an ICC profile, EXIF, XMP, a
   generation-parameters text chunk), far under the limits.
6. Pillow's lazy ``Image.open`` (header only, restricted to the sniffed format): failure
   -> 400 ``invalid_input``; its size is re-checked against the limit (413), and Pillow's
   own ``DecompressionBombError`` also maps to 413.
7. animated (APNG, animated WEBP)               -> 400 ``invalid_input``
8. full decode (``img.load()``): truncated or corrupt -> 400 ``invalid_input``; so is EXIF
   metadata Pillow cannot parse (the tools apply the EXIF orientation, and would fail on it
   after the job was accepted).

The pixel limit is ``min(max_pixels, PIL.Image.MAX_IMAGE_PIXELS)``: checking Pillow's own
bomb threshold ourselves, before ``Image.open``, has the effect of turning its
``DecompressionBombWarning`` into an error without touching the process-wide warnings
filters (``warnings.catch_warnings`` is not thread-safe before Python 3.14, and this runs
in a thread pool). Likewise ``ImageFile.LOAD_TRUNCATED_IMAGES`` is a process global that
genq never sets; it must stay False for truncation to be detected.

JPEG files that Pillow reads as MPO (multi-picture, common from phone cameras) are accepted
as JPEG; only the primary picture is decoded. Any Pillow failure on bytes that passed the
magic check - whatever exception class a plugin raises - becomes 400, never a 500.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import Any

from PIL import Image

__all__ = ["ACCEPTED_CONTENT_TYPES", "CheckedImage", "ImageRejected", "check_image"]

log = logging.getLogger(__name__)

#: Accepted formats: name -> (content type, file extension, Pillow format names).
_FORMATS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "png": ("image/png", "png", ("PNG",)),
    "jpeg": ("image/jpeg", "jpg", ("JPEG", "MPO")),
    "webp": ("image/webp", "webp", ("WEBP",)),
}
ACCEPTED_CONTENT_TYPES: tuple[str, ...] = tuple(v[0] for v in _FORMATS.values())

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers (all SOFn except DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length field.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})

#: Non-pixel bytes (PNG ancillary chunks, JPEG APPn/COM segments, WEBP EXIF/XMP/ICCP and
#: unknown chunks) one image may carry. 4 MB holds the largest ICC profiles and XMP
#: packets seen in practice with room to spare, and keeps a 20 MB upload of metadata
#: from costing parse time and memory in the API and then in every tool.
MAX_METADATA_BYTES = 4 * 1024 * 1024
#: Chunks (PNG, WEBP) or segments before the first scan (JPEG) one image may have. A 20 MB
#: PNG written with libpng's 8 KB IDAT chunks has ~2,600; Pillow's parse of each costs
#: ~4 us, so this bounds it at ~40 ms.
MAX_CHUNKS = 10_000
_PNG_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND", b"fdAT"})
_WEBP_PIXEL_CHUNKS = frozenset({b"VP8X", b"VP8 ", b"VP8L", b"ALPH", b"ANIM", b"ANMF"})


class ImageRejected(Exception):
    """An input file refused; the API renders it as ``{"error": {code, message, details}}``."""

    def __init__(self, code: str, message: str, status: int, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.details = details or {}

    def __repr__(self) -> str:
        return f"ImageRejected({self.code!r}, {self.message!r}, {self.status}, {self.details!r})"


@dataclass(frozen=True)
class CheckedImage:
    """What an accepted file is, by content."""

    format: str  # "png" | "jpeg" | "webp"
    content_type: str  # "image/png" | "image/jpeg" | "image/webp"
    extension: str  # "png" | "jpg" | "webp"
    width: int
    height: int
    mode: str  # Pillow mode as decoded: L, LA, P, RGB, RGBA, CMYK, I;16, ...
    size_bytes: int


def _invalid(message: str, **details: Any) -> ImageRejected:
    return ImageRejected("invalid_input", message, 400, details)


def sniff_format(data: bytes) -> str | None:
    """The format named by the magic bytes ("png", "jpeg", "webp"), or None."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) read straight from the header bytes, without Pillow.

    None when the header is not where it should be; Pillow then has the last word (and a
    malformed header is refused there as 400).
    """
    try:
        if fmt == "png":
            return _png_size(data)
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "webp":
            return _webp_size(data)
    except (struct.error, IndexError):
        return None
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    # Signature (8), then the IHDR chunk: length (4) == 13, b"IHDR", width (4), height (4).
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos, n = 2, len(data)
    while pos < n:
        if data[pos] != 0xFF:
            return None
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if marker in _JPEG_SOF:
            # length (2), precision (1), height (2), width (2)
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            return width, height
        if length < 2:
            return None
        pos += length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        # flags (1), reserved (3), canvas width - 1 (24 bits LE), canvas height - 1 (24 bits LE)
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return (width, height) if len(data) >= 30 else None
    if chunk == b"VP8L":
        # signature 0x2F, then 14 bits width - 1, 14 bits height - 1
        if len(data) < 25 or data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        # frame tag (3), start code 9D 01 2A, width (14 bits LE), height (14 bits LE)
        if len(data) < 30 or data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def metadata_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(non-pixel bytes, chunks or segments) of a file, from its chunk headers alone.

    Stops counting once past either limit; a malformed structure ends the walk (the
    decoder then has the last word on it)."""
    meta = count = 0
    n = len(data)
    if fmt == "png":
        pos = 8
        while pos + 8 <= n and count <= MAX_CHUNKS and meta <= MAX_METADATA_BYTES:
            length = int.from_bytes(data[pos : pos + 4], "big")
            kind = data[pos + 4 : pos + 8]
            count += 1
            if kind not in _PNG_PIXEL_CHUNKS:
                meta += length
            if kind == b"IEND":
                break
            pos += 12 + length
    elif fmt == "jpeg":
        pos = 2
        while pos + 4 <= n and count <= MAX_CHUNKS and meta <= MAX_METADATA_BYTES:
            if data[pos] != 0xFF:
                break
            while pos < n and data[pos] == 0xFF:
                pos += 1
            if pos + 3 > n:
                break
            marker = data[pos]
            pos += 1
            count += 1
            if marker in _JPEG_STANDALONE:
                continue
            if marker in (0xD9, 0xDA):  # end, or the first scan: metadata comes before it
                break
            length = int.from_bytes(data[pos : pos + 2], "big")
            if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn, COM
                meta += length
            pos += max(length, 2)
    elif fmt == "webp":
        pos = 12
        while pos + 8 <= n and count <= MAX_CHUNKS and meta <= MAX_METADATA_BYTES:
            kind = data[pos : pos + 4]
            length = int.from_bytes(data[pos + 4 : pos + 8], "little")
            count += 1
            if kind not in _WEBP_PIXEL_CHUNKS:
                meta += length
            pos += 8 + length + (length & 1)
    return meta, count


def _pixel_limit(max_pixels: int) -> int:
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow_limit is None else min(max_pixels, int(pillow_limit))


def _too_many_pixels(width: int, height: int, limit: int) -> ImageRejected:
    return ImageRejected(
        "payload_too_large",
        f"The image is {width}x{height} pixels, more than the limit of {limit} pixels.",
        413,
        {"width": width, "height": height, "max_pixels": limit},
    )


def check_image(data: bytes, *, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Check one uploaded file; return what it is or raise :class:`ImageRejected`.

    Blocking (it decodes the whole image): the API calls it through a thread. The cheap
    checks come first (size, format by content, header dimensions, metadata), so no
    decoder runs on a file they refuse.
    """
    size = _check_size(data, max_bytes)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(
            "unsupported_media_type",
            "The file is not a PNG, JPEG or WEBP image.",
            415,
            {"accepted": list(ACCEPTED_CONTENT_TYPES)},
        )
    content_type, extension, pil_formats = _FORMATS[fmt]
    limit = _pixel_limit(max_pixels)
    _check_before_decoding(data, fmt, limit)
    width, height, mode = _decode(data, fmt, pil_formats, limit)
    return CheckedImage(
        format=fmt,
        content_type=content_type,
        extension=extension,
        width=width,
        height=height,
        mode=mode,
        size_bytes=size,
    )


def _check_size(data: bytes, max_bytes: int) -> int:
    size = len(data)
    if size == 0:
        raise _invalid("The file is empty.")
    if size > max_bytes:
        raise ImageRejected(
            "payload_too_large",
            f"The file is {size} bytes, more than the limit of {max_bytes} bytes.",
            413,
            {"size_bytes": size, "max_bytes": max_bytes},
        )
    return size


def _check_before_decoding(data: bytes, fmt: str, limit: int) -> None:
    """Header only, before any decoder runs: refuses decompression bombs and metadata
    floods cheaply."""
    dims = header_size(data, fmt)
    if dims is not None and dims[0] * dims[1] > limit:
        raise _too_many_pixels(dims[0], dims[1], limit)
    meta, chunks = metadata_size(data, fmt)
    if meta > MAX_METADATA_BYTES or chunks > MAX_CHUNKS:
        raise _invalid(
            f"The {fmt.upper()} file carries too much metadata (more than {MAX_METADATA_BYTES} bytes "
            f"or {MAX_CHUNKS} chunks besides the pixels).",
            format=fmt, max_metadata_bytes=MAX_METADATA_BYTES, max_chunks=MAX_CHUNKS,
        )


def _decode(data: bytes, fmt: str, pil_formats: tuple[str, ...], limit: int) -> tuple[int, int, str]:
    """Decode the whole image with Pillow (its own plugin only): width, height, mode."""
    try:
        img = Image.open(io.BytesIO(data), formats=[pil_formats[0]])
    except Image.DecompressionBombError as exc:
        # Only reachable when our header parse disagreed with Pillow's.
        log.debug("pillow refused a decompression bomb: %s", exc)
        raise ImageRejected("payload_too_large", "The image has too many pixels.", 413, {"max_pixels": limit}) from None
    except Exception as exc:  # noqa: BLE001 - any plugin error on bad bytes is the client's
        log.debug("cannot open %s: %r", fmt, exc)
        raise _invalid(f"The file is not a valid {fmt.upper()} image: its header or metadata is corrupt or too large.", format=fmt) from None

    with img:
        if img.format not in pil_formats:  # pragma: no cover - formats= makes this impossible
            raise _invalid(f"The file is not a valid {fmt.upper()} image.", format=fmt)
        width, height = img.size
        if width <= 0 or height <= 0:
            raise _invalid("The image has no pixels.", format=fmt)
        if width * height > limit:
            raise _too_many_pixels(width, height, limit)
        # MPO is a JPEG with extra pictures (depth maps, previews): not an animation.
        if img.format != "MPO" and getattr(img, "is_animated", False):
            raise _invalid("Animated images are not supported.", format=fmt)
        try:
            img.load()
        except Image.DecompressionBombError:  # pragma: no cover - checked above
            raise _too_many_pixels(width, height, limit) from None
        except Exception as exc:  # noqa: BLE001 - truncation, bad data, oversize text chunks...
            log.debug("cannot decode %s: %r", fmt, exc)
            raise _invalid(
                f"The {fmt.upper()} image could not be decoded: it is truncated or corrupt.", format=fmt
            ) from None
        if img.size != (width, height):  # pragma: no cover - defensive
            raise _invalid("The image changed size while decoding.", format=fmt)
        try:
            img.getexif().get(0x0112)  # the orientation every tool applies
        except Exception as exc:  # noqa: BLE001 - a corrupt EXIF block, whatever the parser raised
            log.debug("cannot parse the EXIF of a %s: %r", fmt, exc)
            raise _invalid(f"The {fmt.upper()} image's EXIF metadata is corrupt.", format=fmt) from None
        return width, height, img.mode
