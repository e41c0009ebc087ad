"""The ``textToImage`` tool on a tiny random Stable Diffusion pipeline, loaded from a folder
through the tool's real ``from_pretrained`` code: images, seeds, samplers, LoRA variants,
progress per step, cancel mid-run, outputs and their metadata."""

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

from diffusion_models import TEST_OPTIONS, text_to_image_dir, unet_lora_dir  # noqa: E402

from genq.tools import SAMPLER_NAMES, ToolSpec, validate_params  # noqa: E402
from genq.worker.tools import build_tool  # noqa: E402
from genq.worker.tools.base import Cancelled, CancelToken, ToolCall, ToolError  # noqa: E402

pytestmark = pytest.mark.ml


def make_spec(**extra) -> ToolSpec:
    return ToolSpec.model_validate(
        {
            "tool": {"kind": "textToImage", "name": "text-to-image"},
            "model": str(text_to_image_dir()),
            "variants": [{"name": "base"}, {"name": "lora", "lora": str(unet_lora_dir()), "steps": 3}],
            "options": {**TEST_OPTIONS, **extra.pop("options", {})},
            **extra,
        }
    )


@pytest.fixture(scope="module")
def tool():
    t = build_tool(make_spec(), isolation="thread")
    t.load("base")
    return t


def call(params: dict, *, seed: int | None = 7, variant: str = "base", progress=None, cancel=None) -> ToolCall:
    spec = make_spec()
    return ToolCall(
        job_id="job-1",
        variant=variant,
        params=validate_params(spec, {k: v for k, v in {"steps": 2, **params}.items() if v is not None}),
        inputs=[],
        seed=seed,
        progress=progress or (lambda fraction, step=None, steps=None: None),
        cancel=cancel or CancelToken(),
    )


def image(f) -> Image.Image:
    im = Image.open(io.BytesIO(f.data))
    im.load()
    return im


def test_two_images_from_a_folder_model(tool):
    result = tool.run(call({"prompt": "a photo of the cat", "num_images": 2, "negative_prompt": "blue", "cfg_scale": 5}))
    assert [f.name for f in result.files] == ["image-1.png", "image-2.png"]
    assert all(f.content_type == "image/png" for f in result.files)
    ims = [image(f) for f in result.files]
    assert all(im.size == (64, 64) and im.mode == "RGB" and im.format == "PNG" for im in ims)
    assert result.files[0].data != result.files[1].data
    assert result.seed == 7
    assert result.metrics["pipeline"] == "StableDiffusionPipeline" and result.metrics["steps"] == 2
    assert result.metrics["steps_per_second"] > 0 and result.metrics["num_images"] == 2
    # The generation parameters ride along in PNG text chunks; image i used seed + i - 1.
    meta = [json.loads(im.text["genq"]) for im in ims]
    assert [m["seed"] for m in meta] == [7, 8]
    assert meta[0]["prompt"] == "a photo of the cat" and meta[0]["negative_prompt"] == "blue"
    assert meta[0]["cfg_scale"] == 5 and meta[0]["size"] == "64x64" and meta[0]["model"] == "tiny-sd"
    assert ims[0].text["parameters"].startswith("a photo of the cat\nNegative prompt: blue\nSteps: 2, ")
    assert "Seed: 7" in ims[0].text["parameters"]


def test_same_seed_same_bytes_other_seed_other_image(tool):
    a = tool.run(call({"prompt": "red sky"}, seed=123))
    b = tool.run(call({"prompt": "red sky"}, seed=123))
    c = tool.run(call({"prompt": "red sky"}, seed=124))
    assert a.files[0].data == b.files[0].data
    assert a.files[0].data != c.files[0].data
    # Image 2 of a batch is image 1 of its own seed (up to batched float rounding).
    pair = tool.run(call({"prompt": "red sky", "num_images": 2}, seed=123))
    second = np.asarray(image(pair.files[1]), dtype=np.int16)
    alone = np.asarray(image(c.files[0]), dtype=np.int16)
    assert np.abs(second - alone).max() <= 2


def test_random_seed_is_drawn_and_returned(tool):
    result = tool.run(call({"prompt": "a dog"}, seed=None))
    assert isinstance(result.seed, int) and 0 <= result.seed < 2**32
    assert json.loads(image(result.files[0]).text["genq"])["seed"] == result.seed


def test_progress_every_step(tool):
    seen = []
    tool.run(call({"prompt": "a cat", "steps": 4}, progress=lambda f, step=None, steps=None: seen.append((f, step, steps))))
    assert seen == [(0.25, 1, 4), (0.5, 2, 4), (0.75, 3, 4), (1.0, 4, 4)]


def test_width_height_and_model_constraints(tool):
    result = tool.run(call({"prompt": "a cat", "width": 96, "height": 64}))
    assert image(result.files[0]).size == (96, 64)
    # The schema refuses non-multiples of 8 at submit; the tool also checks on its own.
    bad = call({"prompt": "a cat"})
    bad.params["width"] = 60
    with pytest.raises(ToolError) as e:
        tool.run(bad)
    assert e.value.code == "invalid_input" and "multiples of 8" in str(e.value)
    small = build_tool(make_spec(options={"maxPixels": 64 * 64}), isolation="thread")
    with pytest.raises(ToolError) as e:
        small.run(call({"prompt": "a cat", "width": 128, "height": 64}))
    assert e.value.code == "invalid_input" and "limit" in str(e.value)


def test_samplers(tool):
    assert set(tool._ensure("base").schedulers.names) >= {"default", "euler", "euler_a", "dpm++", "ddim", "unipc"}
    outputs = {}
    for sampler in ("euler", "euler_a", "dpm++", "ddim", "unipc", "default"):
        result = tool.run(call({"prompt": "a cat", "sampler": sampler}, seed=5))
        assert image(result.files[0]).size == (64, 64)
        assert json.loads(image(result.files[0]).text["genq"])["sampler"] == sampler
        outputs[sampler] = result.files[0].data
    assert len(set(outputs.values())) >= 4  # different schedulers, different images
    # Switching schedulers leaves no state behind: the model's own gives the same bytes again.
    assert tool.run(call({"prompt": "a cat", "sampler": "default"}, seed=5)).files[0].data == outputs["default"]
    assert tool.run(call({"prompt": "a cat", "sampler": "ddim"}, seed=5)).files[0].data == outputs["ddim"]


def test_sampler_names_match_the_schema():
    from genq.worker.tools.pipelines import SAMPLERS

    assert tuple(SAMPLERS) == SAMPLER_NAMES


def test_lora_variant_switches_adapters_without_reloading(tool):
    base = tool.run(call({"prompt": "a cat", "steps": 3}, seed=9))
    pipe = tool._ensure("base").pipe
    lora = tool.run(call({"prompt": "a cat", "steps": None}, seed=9, variant="lora"))  # the variant's steps: 3
    assert lora.metrics["steps"] == 3
    assert lora.files[0].data != base.files[0].data
    assert tool.run(call({"prompt": "a cat", "steps": 3}, seed=9)).files[0].data == base.files[0].data
    assert tool.run(call({"prompt": "a cat", "steps": None}, seed=9, variant="lora")).files[0].data == lora.files[0].data
    assert tool._ensure("lora").pipe is pipe and len(tool._models) == 1
    assert list(tool._ensure("lora").adapters.loaded) == ["genq_lora"]


def test_cancel_between_steps(tool):
    token = CancelToken()
    steps = []

    def progress(f, step=None, steps_=None):
        steps.append(step)
        if step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        tool.run(call({"prompt": "a cat", "steps": 50}, progress=progress, cancel=token))
    assert steps == [1, 2]


def test_cancel_from_another_thread_stops_within_a_step(tool):
    token = CancelToken()
    started = threading.Event()
    cancelled_at: list[float] = []

    def progress(f, step=None, steps=None):
        started.set()

    def cancel_soon():
        started.wait(30)
        time.sleep(0.2)
        cancelled_at.append(time.perf_counter())
        token.cancel()

    t = threading.Thread(target=cancel_soon)
    t.start()
    with pytest.raises(Cancelled):
        tool.run(call({"prompt": "a cat", "steps": 150, "num_images": 4}, progress=progress, cancel=token))
    freed = time.perf_counter() - cancelled_at[0]
    t.join()
    assert freed < 1.0, freed
    # The pipeline is usable at once afterwards.
    assert tool.run(call({"prompt": "a cat"})).files


def test_cancel_checks_wrap_block_forwards_and_stop_a_call_inside_a_step(tool):
    """The cancel checks wrap the blocks' ``forward`` (no module hooks, so every other
    module keeps nn.Module's fast path; the signature pipelines inspect is the model's),
    and a cancel that lands inside a block stops the call at the next block, before the
    step it is in ends."""
    import inspect

    from genq.worker.tools import pipelines

    unet = tool._ensure("base").pipe.unet
    checked = [n for n, m in unet.named_modules() if getattr(m.forward, "genq_cancel_check", False)]
    assert "" in checked and "down_blocks.0" in checked and "mid_block.resnets.0" in checked
    assert not any(n.count(".") >= pipelines.CANCEL_HOOK_DEPTH for n in checked)
    assert not any(m._forward_pre_hooks for m in unet.modules())
    assert "encoder_hidden_states" in inspect.signature(unet.forward).parameters
    assert pipelines.install_cancel_hooks(unet) == 0  # already checked: nothing wrapped twice

    token = CancelToken()
    steps: list[int | None] = []
    handle = unet.down_blocks[0].register_forward_hook(lambda *a: token.cancel("mid-step"))
    try:
        with pytest.raises(Cancelled, match="mid-step"):
            tool.run(call({"prompt": "a cat", "steps": 3}, progress=lambda f, step=None, steps_=None: steps.append(step),
                          cancel=token))
    finally:
        handle.remove()
    assert steps == []  # the first step never ended
    assert tool.run(call({"prompt": "a cat"})).files


def test_calls_run_in_inference_mode_unless_turned_off(tool):
    """``torch.inference_mode`` around every pipeline call (``inferenceMode``, default on);
    off with ``cpuOffload``, whose hooks move weights inside the call. The mode changes no
    number: the same seed gives the same bytes either way."""
    import torch

    from genq.worker.tools import pipelines

    def modes(t) -> tuple[list[bool], bytes]:
        seen: list[bool] = []
        result = t.run(call({"prompt": "a cat"}, seed=11, progress=lambda *a: seen.append(torch.is_inference_mode_enabled())))
        return seen, result.files[0].data

    on, on_bytes = modes(tool)
    off_tool = build_tool(make_spec(options={"inferenceMode": False}), isolation="thread")
    off, off_bytes = modes(off_tool)
    assert on and all(on)
    assert off and not any(off)
    assert on_bytes == off_bytes
    assert not torch.is_inference_mode_enabled()  # the scope ends with the call

    with pipelines.running(CancelToken(), pipelines.PipelineOptions(cpu_offload=True)):
        assert not torch.is_inference_mode_enabled()
    with pipelines.running(CancelToken(), pipelines.PipelineOptions()):
        assert torch.is_inference_mode_enabled()


def test_webp_and_jpeg_outputs_carry_the_params(tool):
    for fmt, content_type, ext in (("webp", "image/webp", "webp"), ("jpeg", "image/jpeg", "jpg")):
        result = tool.run(call({"prompt": "a cat", "output_format": fmt}, seed=3))
        f = result.files[0]
        assert f.name == f"image-1.{ext}" and f.content_type == content_type
        im = image(f)
        assert im.format == fmt.upper() and im.size == (64, 64)
        assert json.loads(im.getexif()[0x010E])["seed"] == 3


def test_unsupported_inputs_and_missing_model():
    t = build_tool(make_spec(model=None), isolation="thread")
    with pytest.raises(ToolError, match="no model"):
        t.load()
    with pytest.raises(ToolError, match="model_index.json"):
        build_tool(make_spec(model="/nonexistent/folder"), isolation="thread").load()
