"""The ``imageEdit`` tool on a tiny random Qwen-Image-Edit pipeline (and the Plus/2509
multi-image one), loaded from folders through ``from_pretrained``, with random stand-ins
for the Lightning LoRAs loaded through ``load_lora_weights``."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("torchvision")  # the Qwen2-VL processor needs it

from diffusion_models import TEST_OPTIONS, image_edit_config, qwen_edit_dir, text_to_image_dir  # noqa: E402

from genq.tools import ToolSpec, validate_params  # noqa: E402
from genq.worker.tools import build_tool  # noqa: E402
from genq.worker.tools.base import Cancelled, CancelToken, InputFile, ToolCall, ToolError  # noqa: E402

pytestmark = pytest.mark.ml


@pytest.fixture(scope="module")
def spec() -> ToolSpec:
    return ToolSpec.model_validate(image_edit_config())


@pytest.fixture(scope="module")
def tool(spec):
    t = build_tool(spec, isolation="thread")
    t.load("4step")
    return t


def photo(w: int = 128, h: int = 64, shift: int = 0) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 2 + shift) % 256, (y * 4) % 256, np.full_like(x, 90)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "PNG")
    return buf.getvalue()


def call(spec: ToolSpec, params: dict, *, variant: str = "4step", images=None, seed: int | None = 11, progress=None, cancel=None):
    return ToolCall(
        job_id="job-1", variant=variant, params=validate_params(spec, {"instruction": "make the sky blue", **params}),
        inputs=[InputFile(f"image-{i}.png", "image/png", d) for i, d in enumerate(images or [photo()])],
        seed=seed, progress=progress or (lambda f, step=None, steps=None: None), cancel=cancel or CancelToken(),
    )


def decode(result) -> Image.Image:
    assert [f.name for f in result.files] == ["result.png"] and result.files[0].content_type == "image/png"
    im = Image.open(io.BytesIO(result.files[0].data))
    im.load()
    return im


def test_each_variant(tool, spec):
    results = {}
    for variant, steps, cfg, lora in (("4step", 4, 1.0, True), ("8step", 8, 1.0, True), ("40step", 40, 4.0, False)):
        seen = []
        r = tool.run(call(spec, {}, variant=variant, progress=lambda f, step=None, steps=None: seen.append((step, steps))))
        im = decode(r)
        assert im.size == (128, 64) and im.mode == "RGB"
        assert r.seed == 11 and r.metrics["steps"] == steps and r.metrics["true_cfg_scale"] == cfg
        assert r.metrics["lora"] is lora and r.metrics["pipeline"] == "QwenImageEditPipeline"
        assert seen == [(i, steps) for i in range(1, steps + 1)]
        meta = json.loads(im.text["genq"])
        assert meta["instruction"] == "make the sky blue" and meta["variant"] == variant and meta["seed"] == 11
        results[variant] = r.files[0].data
    assert len(set(results.values())) == 3


def test_variant_switching_keeps_the_model_and_is_deterministic(tool, spec):
    first = tool.run(call(spec, {}, variant="4step")).files[0].data
    pipe = tool._loaded.pipe
    base = tool.run(call(spec, {"steps": 4}, variant="40step")).files[0].data
    assert tool.run(call(spec, {}, variant="4step")).files[0].data == first
    assert tool.run(call(spec, {"steps": 4}, variant="40step")).files[0].data == base
    assert tool.run(call(spec, {}, variant="4step", seed=12)).files[0].data != first
    assert tool._loaded.pipe is pipe
    assert set(tool._loaded.adapters.loaded) == {"genq_4step", "genq_8step"}


def test_params_override_the_variant(tool, spec):
    r = tool.run(call(spec, {"steps": 2, "true_cfg_scale": 3.0, "negative_prompt": "red"}, variant="4step"))
    assert r.metrics["steps"] == 2 and r.metrics["true_cfg_scale"] == 3.0
    meta = json.loads(decode(r).text["genq"])
    assert meta["negative_prompt"] == "red" and meta["cfg_scale"] == 3.0
    assert "Negative prompt: red" in decode(r).text["parameters"]


def test_cancel_mid_run(tool, spec):
    token = CancelToken()

    def progress(f, step=None, steps=None):
        if step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        tool.run(call(spec, {}, variant="8step", progress=progress, cancel=token))
    assert decode(tool.run(call(spec, {}))).size == (128, 64)


def test_cancel_while_encoding_the_image_is_quick(tool, spec):
    """The pipeline encodes the ~1 MP condition image before its first step; the block
    hooks make even that stop at once."""
    token = CancelToken()
    at: list[float] = []

    def cancel_soon():
        time.sleep(0.3)
        at.append(time.perf_counter())
        token.cancel()

    threading.Thread(target=cancel_soon).start()
    with pytest.raises(Cancelled):
        tool.run(call(spec, {}, variant="40step", cancel=token))
    assert time.perf_counter() - at[0] < 0.5


def test_one_image_only_on_a_single_image_model(tool, spec):
    with pytest.raises(ToolError) as e:
        tool.run(call(spec, {}, images=[photo(), photo(shift=50)]))
    assert e.value.code == "invalid_input" and "Plus" in str(e.value)


def test_plus_model_takes_several_images():
    spec = ToolSpec.model_validate(
        {"tool": {"kind": "imageEdit", "name": "edit-plus"}, "model": str(qwen_edit_dir(plus=True)),
         "variants": [{"name": "40step", "steps": 2}], "options": {**TEST_OPTIONS, "outputSize": "input"}}
    )
    t = build_tool(spec, isolation="thread")
    one = t.run(call(spec, {}, variant="40step", images=[photo()]))
    two = t.run(call(spec, {}, variant="40step", images=[photo(), photo(shift=80)]))
    assert decode(two).size == (128, 64) and two.metrics["pipeline"] == "QwenImageEditPlusPipeline"
    assert one.files[0].data != two.files[0].data
    with pytest.raises(ToolError, match="1 to 3"):
        t.run(call(spec, {}, variant="40step", images=[photo()] * 4))


def test_model_size_output_and_webp():
    spec = ToolSpec.model_validate(image_edit_config(outputSize="model"))
    t = build_tool(spec, isolation="thread")
    r = t.run(call(spec, {"steps": 1, "output_format": "webp"}, variant="40step"))
    f = r.files[0]
    assert f.name == "result.webp" and f.content_type == "image/webp"
    im = Image.open(io.BytesIO(f.data))
    # About 1 MP at the input's 2:1 aspect, on the model's grid: what the model was trained for.
    assert im.width == 2 * im.height and 0.8e6 < im.width * im.height < 1.2e6
    assert json.loads(im.getexif()[0x010E])["variant"] == "40step"


def test_wrong_model_kind_is_a_clear_error():
    spec = ToolSpec.model_validate(
        {"tool": {"kind": "imageEdit", "name": "edit"}, "model": str(text_to_image_dir()), "options": TEST_OPTIONS}
    )
    with pytest.raises(ToolError, match="StableDiffusionPipeline; imageEdit needs"):
        build_tool(spec, isolation="thread").load()
