"""genq.images.check_image: every sample is built here with Pillow or raw bytes."""

from __future__ import annotations

import io
import random
import time

import pytest
from PIL import Image, PngImagePlugin

from genq import images
from genq.images import CheckedImage, ImageRejected, check_image
from helpers import encode, jpeg_with_size, noise, png_bomb, webp_patched, webp_vp8x

MB = 1024 * 1024
MAX_BYTES = 20 * MB
MAX_PIXELS = 40_000_000


def check(data: bytes, **kw) -> CheckedImage:
    return check_image(data, max_bytes=kw.get("max_bytes", MAX_BYTES), max_pixels=kw.get("max_pixels", MAX_PIXELS))


def rejected(data: bytes, **kw) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        check(data, **kw)
    return info.value


# --- process memory ----------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM (the peak RSS) where the kernel lets us; True when it did."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- accepted ----------------------------------------------------------------------------

VALID = [
    ("png", "RGB", {}),
    ("png", "RGBA", {}),
    ("png", "L", {}),
    ("png", "LA", {}),
    ("png", "P", {}),
    ("png", "1", {}),
    ("png", "I;16", {}),
    ("jpeg", "RGB", {}),
    ("jpeg", "RGB", {"progressive": True}),
    ("jpeg", "L", {}),
    ("jpeg", "CMYK", {}),
    ("webp", "RGB", {}),
    ("webp", "RGB", {"lossless": True}),
    ("webp", "RGBA", {}),
    ("webp", "RGBA", {"lossless": True}),
]


def valid_sample(fmt: str, mode: str, params: dict) -> bytes:
    if mode == "I;16":
        img = Image.frombytes("I;16", (64, 48), random.Random(1).randbytes(64 * 48 * 2))
    elif mode == "P":
        img = noise("L", (64, 48)).convert("P")
        img.putpalette(list(range(256)) * 3)
    else:
        img = noise(mode)
    return encode(img, fmt.upper(), **params)


@pytest.mark.parametrize(("fmt", "mode", "params"), VALID, ids=[f"{f}-{m}-{'-'.join(p) or 'default'}" for f, m, p in VALID])
def test_valid_images_are_accepted(fmt, mode, params):
    data = valid_sample(fmt, mode, params)
    checked = check(data)
    assert checked.format == fmt
    assert checked.content_type == f"image/{fmt}"
    assert checked.extension == {"png": "png", "jpeg": "jpg", "webp": "webp"}[fmt]
    assert (checked.width, checked.height) == (64, 48)
    assert checked.size_bytes == len(data)
    with Image.open(io.BytesIO(data)) as ref:
        assert checked.mode == ref.mode
    # The hand-written header parser agrees with Pillow on every real file.
    assert images.header_size(data, fmt) == (64, 48)


def test_mode_is_reported_not_converted():
    assert check(valid_sample("jpeg", "CMYK", {})).mode == "CMYK"
    assert check(valid_sample("png", "P", {})).mode == "P"
    assert check(valid_sample("png", "I;16", {})).mode.startswith("I")


def test_mpo_from_a_camera_is_accepted_as_jpeg():
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    checked = check(data)
    assert (checked.format, checked.extension, checked.width) == ("jpeg", "jpg", 32)


def test_filename_and_content_type_play_no_part():
    # The API passes bytes only; a JPEG is a JPEG whatever the client said.
    checked = check(valid_sample("jpeg", "RGB", {}))
    assert (checked.format, checked.content_type) == ("jpeg", "image/jpeg")


# --- 415: not one of our formats ----------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: b"\x00" + valid_sample("png", "RGB", {})[1:], id="png-first-byte-changed"),
        pytest.param(lambda: b"hello, this is a text file\n" * 10, id="text"),
        pytest.param(lambda: encode(noise("P"), "GIF"), id="gif"),
        pytest.param(lambda: encode(noise("RGB"), "BMP"), id="bmp"),
        pytest.param(lambda: encode(noise("RGB"), "TIFF"), id="tiff"),
        pytest.param(lambda: b"RIFF\x10\x00\x00\x00WAVEfmt ", id="riff-not-webp"),
        pytest.param(lambda: b"\xff\xd8", id="jpeg-magic-too-short"),
        pytest.param(lambda: b"\0", id="one-zero-byte"),
    ],
)
def test_unsupported_formats_are_415(make):
    err = rejected(make())
    assert (err.code, err.status) == ("unsupported_media_type", 415)
    assert err.details["accepted"] == ["image/png", "image/jpeg", "image/webp"]


def test_empty_file_is_400():
    err = rejected(b"")
    assert (err.code, err.status) == ("invalid_input", 400)
    assert "empty" in err.message


# --- 413: too big -------------------------------------------------------------------------


def test_over_max_bytes_is_413():
    data = valid_sample("png", "RGB", {})
    assert check(data, max_bytes=len(data)).size_bytes == len(data)
    err = rejected(data, max_bytes=len(data) - 1)
    assert (err.code, err.status) == ("payload_too_large", 413)
    assert err.details == {"size_bytes": len(data), "max_bytes": len(data) - 1}


def test_over_max_pixels_is_413_with_details():
    data = valid_sample("png", "RGB", {})  # 64 x 48 = 3072
    assert check(data, max_pixels=3072).width == 64
    err = rejected(data, max_pixels=3071)
    assert (err.code, err.status) == ("payload_too_large", 413)
    assert err.details == {"width": 64, "height": 48, "max_pixels": 3071}


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = png_bomb()
    assert len(data) < 200_000  # small on disk, 400 MP decoded
    return data


def test_png_bomb_refused_from_header_fast_and_without_memory(bomb):
    reset = reset_peak_rss()
    peak_before = _status_kb("VmHWM")
    rss_before = _status_kb("VmRSS")
    started = time.perf_counter()
    err = rejected(bomb)
    elapsed = time.perf_counter() - started
    assert (err.code, err.status) == ("payload_too_large", 413)
    assert err.details == {"width": 20_000, "height": 20_000, "max_pixels": MAX_PIXELS}
    assert elapsed < 0.2
    assert _status_kb("VmRSS") - rss_before < 20 * 1024
    if reset:
        assert _status_kb("VmHWM") - peak_before < 20 * 1024


def test_bomb_never_reaches_pillow(bomb, monkeypatch):
    def boom(*a, **kw):  # pragma: no cover - must not be called
        raise AssertionError("Image.open called on a bomb")

    monkeypatch.setattr(images.Image, "open", boom)
    assert rejected(bomb).status == 413


def test_pillow_size_is_rechecked_when_header_parse_gives_up(bomb, monkeypatch):
    monkeypatch.setattr(images, "header_size", lambda data, fmt: None)
    started = time.perf_counter()
    err = rejected(bomb)
    assert time.perf_counter() - started < 0.2
    assert (err.code, err.status) == ("payload_too_large", 413)  # Pillow's own bomb error or our recheck
    small = valid_sample("webp", "RGB", {})
    err = rejected(small, max_pixels=100)
    assert err.details == {"width": 64, "height": 48, "max_pixels": 100}


def test_pillow_bomb_threshold_is_an_error_not_a_warning(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    err = rejected(valid_sample("png", "RGB", {}), max_pixels=10**9)
    assert (err.status, err.details["max_pixels"]) == (413, 1000)


@pytest.mark.parametrize(
    ("make", "size"),
    [
        pytest.param(lambda: jpeg_with_size(30_000, 30_000), (30_000, 30_000), id="jpeg-sof0-30000"),
        pytest.param(lambda: webp_vp8x(16_383, 16_383), (16_383, 16_383), id="webp-vp8x-16383"),
        pytest.param(lambda: webp_patched(16_384, 16_384, lossless=True), (16_384, 16_384), id="webp-vp8l-16384"),
        pytest.param(lambda: webp_patched(16_383, 16_383, lossless=False), (16_383, 16_383), id="webp-vp8-16383"),
    ],
)
def test_huge_declared_dimensions_are_413_fast(make, size):
    data = make()
    started = time.perf_counter()
    err = rejected(data)
    assert time.perf_counter() - started < 0.2
    assert (err.code, err.status) == ("payload_too_large", 413)
    assert (err.details["width"], err.details["height"]) == size


# --- 400: truncated, corrupt, animated ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_truncated_images_are_400(fmt):
    data = encode(noise("RGB", (256, 256)), fmt.upper())
    assert check(data).format == fmt
    err = rejected(data[: len(data) // 2])
    assert (err.code, err.status) == ("invalid_input", 400)
    assert err.details == {"format": fmt}


def test_png_without_image_data_is_400():
    data = valid_sample("png", "RGB", {})
    err = rejected(data[:33])  # signature + IHDR only
    assert (err.code, err.status) == ("invalid_input", 400)


def test_jpeg_with_garbage_after_magic_is_400():
    err = rejected(b"\xff\xd8\xff" + b"\x00" * 500)
    assert (err.code, err.status) == ("invalid_input", 400)


def test_animated_png_is_400():
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    assert b"acTL" in data
    err = rejected(data)
    assert (err.code, err.status) == ("invalid_input", 400)
    assert "nimated" in err.message


def test_animated_webp_is_400():
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100)
    assert b"ANIM" in data
    err = rejected(data)
    assert (err.code, err.status) == ("invalid_input", 400)


@pytest.mark.parametrize("kind", ["tEXt", "zTXt", "iTXt"])
def test_png_with_huge_text_chunk_is_never_a_500(kind):
    info = PngImagePlugin.PngInfo()
    text = "x" * (10 * MB)
    if kind == "tEXt":
        info.add_text("Comment", text)
    elif kind == "zTXt":
        info.add_text("Comment", text, zip=True)
    else:
        info.add_itxt("Comment", text, lang="en", tkey="Comment", zip=False)
    data = encode(noise("RGB"), "PNG", pnginfo=info)
    assert kind.encode() in data and len(data) < MAX_BYTES
    try:
        checked = check(data)
    except ImageRejected as err:
        assert (err.code, err.status) == ("invalid_input", 400)
    else:
        assert (checked.width, checked.height) == (64, 48)


# --- robustness ---------------------------------------------------------------------------


def _only_rejections(data: bytes) -> None:
    try:
        check(data, max_pixels=1_000_000)
    except ImageRejected as err:
        assert err.status in (400, 413, 415)


def test_every_prefix_of_small_files_is_handled():
    for fmt, mode, params in [("png", "RGBA", {}), ("jpeg", "RGB", {}), ("webp", "RGB", {"lossless": True})]:
        data = encode(noise(mode, (8, 8)), fmt.upper(), **params)
        for end in range(len(data)):
            _only_rejections(data[:end])


def test_random_corruption_only_ever_raises_image_rejected():
    rng = random.Random(1234)
    samples = [valid_sample(*v) for v in VALID]
    for _ in range(600):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        _only_rejections(bytes(data))


def test_memory_stays_flat_across_the_corpus(bomb):
    corpus = [valid_sample(*v) for v in VALID]
    corpus += [bomb, jpeg_with_size(30_000, 30_000), webp_vp8x(16_383, 16_383), webp_patched(16_384, 16_384, lossless=True)]
    corpus += [encode(noise("RGB", (256, 256)), f)[:-500] for f in ("PNG", "JPEG", "WEBP")]
    reset = reset_peak_rss()
    rss_before, peak_before = _status_kb("VmRSS"), _status_kb("VmHWM")
    for _ in range(5):
        for data in corpus:
            try:
                check(data)
            except ImageRejected:
                pass
    assert _status_kb("VmRSS") - rss_before < 100 * 1024
    if reset:
        assert _status_kb("VmHWM") - peak_before < 100 * 1024
