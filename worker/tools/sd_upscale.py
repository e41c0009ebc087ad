"""The ``diffusers`` backend of the ``upscale`` tool: Stable Diffusion x4 upscaler
(``StableDiffusionUpscalePipeline``).

:class:`genq.worker.tools.upscale.UpscaleTool` dispatches a variant with
``backend: diffusers`` here; it decodes the input, keeps its alpha channel aside and
encodes the result, so this module only turns an RGB image into one ``scale`` times larger.
Neighbours: :mod:`.pipelines` (loading, progress, cancel).

The model is the variant's ``model``, else the tool's ``model`` (a diffusers folder, an
``s3://`` copy of one, or a Hugging Face id such as ``stabilityai/stable-diffusion-x4-upscaler``).

Variant fields, each with the reason for its default:

* ``prompt`` (empty): what the image shows; the upscaler was trained with captions and
  sharpens text-described content better, but an empty prompt works for any image.
* ``steps`` (25): denoising steps; the pipeline's 75 is slow and 20–30 look alike.
* ``guidanceScale`` (0 without a prompt, else 9): classifier-free guidance; with no
  prompt it only doubles the cost.
* ``noiseLevel`` (20): noise added to the low-res input (the pipeline's default).
* ``seed`` (0): the upscaler adds noise; a fixed seed makes the same input give the same
  output (the ``upscale`` kind has no seed param).

The model upscales x4; for x2 and x3 its output is resized down with Lanczos. Input
sides are padded (reflected) to a multiple of the UNet's downsampling and the padding is
cut off the result. Tool options ``device``/``dtype``/``threads`` apply (see
:class:`.pipelines.PipelineOptions`); ``sdMaxInputPixels`` (512 x 512) refuses larger inputs — the
x4 upscaler's attention is quadratic in the input's area, and 512² already needs a large
GPU.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from PIL import Image

from . import pipelines
from .base import ToolCall, ToolError

log = logging.getLogger(__name__)

DEFAULT_MAX_INPUT_PIXELS = 512 * 512
DEFAULT_STEPS = 25


class SDUpscaler:
    """One loaded x4 upscaler pipeline and its variant's settings."""

    def __init__(self, model: str, options: dict[str, Any], extra: dict[str, Any]):
        self.model = model
        self.pipeline_options = pipelines.PipelineOptions.from_options(options)
        self.max_input_pixels = int(options.get("sdMaxInputPixels", DEFAULT_MAX_INPUT_PIXELS))
        self.prompt = str(extra.get("prompt", ""))
        self.steps = int(extra.get("steps", DEFAULT_STEPS))
        self.guidance = float(extra.get("guidanceScale", 9.0 if self.prompt else 0.0))
        self.noise_level = int(extra.get("noiseLevel", 20))
        self.seed = int(extra.get("seed", 0))
        self._lock = threading.Lock()
        t0 = time.perf_counter()
        from diffusers import StableDiffusionUpscalePipeline

        self.pipe = pipelines.load_pipeline(StableDiffusionUpscalePipeline, model, self.pipeline_options)
        unet = self.pipe.unet
        self.multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        pipelines.install_cancel_hooks(unet, self.pipe.vae.decoder)
        self.load_seconds = round(time.perf_counter() - t0, 3)
        log.info("loaded SD x4 upscaler %s in %.2fs", model, self.load_seconds)

    def check_size(self, width: int, height: int) -> None:
        if width * height > self.max_input_pixels:
            raise ToolError(
                f"a {width}x{height} input is over the SD upscaler's {self.max_input_pixels}-pixel input limit",
                code="invalid_input",
            )

    def upscale(self, rgb: Image.Image, scale: int, call: ToolCall) -> tuple[Image.Image, dict[str, Any]]:
        self.pipeline_options.apply_threads()  # per run: the thread count is per OS thread (see PipelineOptions)
        self.check_size(rgb.width, rgb.height)
        w, h = rgb.size
        pw, ph = -w % self.multiple, -h % self.multiple
        src = rgb
        if pw or ph:
            arr = np.pad(np.asarray(rgb), ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(w, h) > max(pw, ph) else "edge")
            src = Image.fromarray(arr, "RGB")
        reporter = pipelines.StepReporter(call, self.steps)
        kwargs = {
            "prompt": self.prompt,
            "image": src,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "noise_level": self.noise_level,
            "generator": pipelines.generators(self.seed, 1),
            "output_type": "pil",
            "callback": reporter.legacy,
            "callback_steps": 1,
        }
        pipelines.acquire(self._lock, call.cancel)
        try:
            t0 = time.perf_counter()
            with pipelines.running(call.cancel, self.pipeline_options):
                out = self.pipe(**kwargs).images[0]
            seconds = time.perf_counter() - t0
        finally:
            self._lock.release()
        out = out.crop((0, 0, w * 4, h * 4))
        if scale != 4:
            out = out.resize((w * scale, h * scale), Image.Resampling.LANCZOS)
        metrics = {
            "backend": "diffusers", "pipeline": type(self.pipe).__name__, "model_scale": 4, "steps": reporter.done,
            "steps_per_second": round(reporter.done / seconds, 3) if seconds else None,
            "pipeline_seconds": round(seconds, 4), "model_load_seconds": self.load_seconds,
            "device": self.pipeline_options.device, "dtype": self.pipeline_options.dtype,
        }
        return out, metrics


__all__ = ["SDUpscaler"]
