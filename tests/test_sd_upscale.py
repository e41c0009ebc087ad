"""The ``upscale`` tool's ``diffusers`` backend: a tiny random Stable Diffusion x4 upscaler
loaded from a folder through ``StableDiffusionUpscalePipeline.from_pretrained``."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from diffusion_models import TEST_OPTIONS, sd_upscaler_dir  # noqa: E402

from genq.tools import ToolSpec  # noqa: E402
from genq.worker.tools import build_tool  # noqa: E402
from genq.worker.tools.base import Cancelled, CancelToken, InputFile, ToolCall, ToolError  # noqa: E402

pytestmark = pytest.mark.ml


def make_spec(**options) -> ToolSpec:
    return ToolSpec.model_validate(
        {
            "tool": {"kind": "upscale", "name": "upscale"},
            "model": str(sd_upscaler_dir()),
            "variants": [
                {"name": "sd-x4", "backend": "diffusers", "steps": 3},
                {"name": "sd-prompted", "backend": "diffusers", "steps": 2, "prompt": "a photo", "seed": 5},
                {"name": "lanczos"},
            ],
            "options": {**TEST_OPTIONS, **options},
        }
    )


@pytest.fixture(scope="module")
def tool():
    t = build_tool(make_spec(), isolation="thread")
    t.load("sd-x4")
    return t


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def sample(w: int = 20, h: int = 12, mode: str = "RGB") -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 12 % 256, y * 20 % 256, (x + y) * 7 % 256], -1).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        im.putalpha(Image.linear_gradient("L").resize((w, h)))
    return png(im)


def call(data: bytes, scale: int = 4, variant: str = "sd-x4", progress=None, cancel=None) -> ToolCall:
    return ToolCall(
        job_id="job-1", variant=variant, params={"scale": scale}, inputs=[InputFile("image.png", "image/png", data)],
        seed=None, progress=progress or (lambda f, step=None, steps=None: None), cancel=cancel or CancelToken(),
    )


def decode(result) -> Image.Image:
    assert [f.name for f in result.files] == ["result.png"] and result.files[0].content_type == "image/png"
    return Image.open(io.BytesIO(result.files[0].data))


@pytest.mark.parametrize("scale", [4, 2, 3])
def test_sizes_for_every_scale(tool, scale):
    result = tool.run(call(sample(), scale))
    im = decode(result)
    assert im.size == (20 * scale, 12 * scale) and im.mode == "RGB"
    assert result.metrics["backend"] == "diffusers" and result.metrics["model_scale"] == 4
    assert result.metrics["pipeline"] == "StableDiffusionUpscalePipeline" and result.metrics["steps"] == 3


def test_alpha_is_kept(tool):
    im = decode(tool.run(call(sample(mode="RGBA"))))
    assert im.mode == "RGBA" and im.size == (80, 48)
    alpha = np.asarray(im.getchannel("A"), dtype=np.int16)
    assert alpha[:8].mean() + 100 < alpha[-8:].mean()  # the top-to-bottom gradient survived


def test_deterministic_and_seeded_by_the_variant(tool):
    a = tool.run(call(sample()))
    b = tool.run(call(sample()))
    assert a.files[0].data == b.files[0].data
    other = tool.run(call(sample(), variant="sd-prompted"))
    assert decode(other).size == (80, 48) and other.metrics["steps"] == 2
    assert other.files[0].data != a.files[0].data


def test_progress_every_step(tool):
    seen = []
    tool.run(call(sample(), progress=lambda f, step=None, steps=None: seen.append((step, steps))))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_cancel_mid_run(tool):
    token = CancelToken()

    def progress(f, step=None, steps=None):
        if step == 1:
            token.cancel()

    with pytest.raises(Cancelled):
        tool.run(call(sample(), progress=progress, cancel=token))
    assert decode(tool.run(call(sample()))).size == (80, 48)  # usable afterwards


def test_input_limit_and_missing_model():
    small = build_tool(make_spec(sdMaxInputPixels=100), isolation="thread")
    with pytest.raises(ToolError) as e:
        small.run(call(sample()))
    assert e.value.code == "invalid_input"
    spec = make_spec().model_copy(update={"model": None})
    with pytest.raises(ToolError, match="needs a model"):
        build_tool(spec, isolation="thread").load("sd-x4")
    # Other variants of the same tool keep working without it.
    assert decode(build_tool(spec, isolation="thread").run(call(sample(), variant="lanczos"))).size == (80, 48)
