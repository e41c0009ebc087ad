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
5. Pillow's lazy ``Image.open`` (header only, restricted to the sniffed format): failure
   -> 400 ``invalid_input``; its size is re-checked against the limit (413), and Pillow's
   own ``DecompressionBombError`` also maps to 413.
6. animated (APNG, animated WEBP)               -> 400 ``invalid_input``
7. full decode (``img.load()``): truncated or corrupt -> 400 ``invalid_input``.

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

    Blocking (it decodes the whole image): the API calls it through a thread.
    """
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

    # Header only, before any decoder runs: refuses decompression bombs cheaply.
    dims = header_size(data, fmt)
    if dims is not None and dims[0] * dims[1] > limit:
        raise _too_many_pixels(dims[0], dims[1], limit)

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
        mode = img.mode

    return CheckedImage(
        format=fmt,
        content_type=content_type,
        extension=extension,
        width=width,
        height=height,
        mode=mode,
        size_bytes=size,
    )
