"""The ``textToImage`` tool: any diffusers text-to-image pipeline (``AutoPipelineForText2Image``).

Built from a :class:`genq.tools.ToolSpec` of kind ``textToImage``; the worker calls
``load`` once (and on ``warm``) and ``run`` per job, in a thread. Neighbours:
:mod:`.pipelines` (loading, progress/cancel, samplers, LoRAs, output encoding) and
:mod:`.base` (the tool interface).

The model (``spec.model``, or a variant's ``model``) is a diffusers pipeline folder, an
``s3://`` copy of one, or a Hugging Face id; it is loaded once per worker and kept.

Variants (all fields optional): ``lora`` (a path, id or ``{source, weightName, scale}``)
with ``loraScale`` / ``loraWeightName``, and defaults for ``steps``, ``cfgScale`` and
``sampler`` that a job's params override. Switching variant switches LoRA adapters and
the scheduler on the loaded pipeline; the base model is never reloaded.

Params (schema in :data:`genq.tools.BUILTIN_PARAMS`): ``prompt``, ``negative_prompt``,
``width``/``height`` (default: the model's native size; multiples of the model's latent
cell, 8 for Stable Diffusion, 16 for SD3/Flux), ``steps``, ``cfg_scale``, ``sampler`` (see
:data:`.pipelines.SAMPLERS`), ``seed`` (image *i* uses ``seed + i - 1``), ``num_images``
1–4 (files ``image-1.png`` …), ``output_format`` (``png`` default, ``webp``, ``jpeg``).

Options (``spec.options``) beyond :class:`.pipelines.PipelineOptions`'s: ``maxPixels``
(2048 x 2048): larger requests are refused with ``invalid_input`` — past that a
single image rarely fits a GPU and takes minutes; ``sizeMultiple`` (from the model):
override the width/height multiple.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from genq.tools import ToolSpec

from . import pipelines
from .base import Tool, ToolCall, ToolError, ToolResult

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 2048 * 2048


@dataclass
class _Loaded:
    pipe: Any
    schedulers: pipelines.Schedulers
    adapters: pipelines.Adapters
    size_multiple: int
    default_size: tuple[int, int]
    accepts: set[str]
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)


def _size_multiple(pipe: Any) -> int:
    vae_factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    denoiser = getattr(pipe, "transformer", None)
    patch = int(getattr(getattr(denoiser, "config", None), "patch_size", 1) or 1) if denoiser is not None else 1
    if "Flux" in type(pipe).__name__:  # packs 2x2 latent patches in the pipeline itself
        patch = max(patch, 2)
    return vae_factor * patch


def _default_size(pipe: Any) -> tuple[int, int]:
    vae_factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None and getattr(pipe, "unet", None) is not None:
        sample = pipe.unet.config.sample_size
    if isinstance(sample, list | tuple):
        return int(sample[1]) * vae_factor, int(sample[0]) * vae_factor
    side = int(sample or 64) * vae_factor
    return side, side


class TextToImageTool(Tool):
    """Text to 1–4 images; see the module docstring for variants, params and options."""

    def __init__(self, spec: ToolSpec):
        self.spec = spec
        self.pipeline_options = pipelines.PipelineOptions.from_options(spec.options)
        self.max_pixels = int(spec.options.get("maxPixels", DEFAULT_MAX_PIXELS))
        self.size_multiple = spec.options.get("sizeMultiple")
        self._models: dict[str, _Loaded] = {}
        self._load_lock = threading.Lock()
        for v in spec.variants:  # fail at start on a malformed variant, not on its first job
            pipelines.lora_ref(v.model_extra or {})

    # -- loading -------------------------------------------------------------------

    def _extra(self, variant: str) -> dict[str, Any]:
        v = self.spec.variant(variant)
        if v is None:
            raise ToolError(f"{self.spec.name} has no variant {variant!r}", code="invalid_input")
        return v.model_extra or {}

    def _model_ref(self, variant: str) -> str:
        ref = self._extra(variant).get("model") or self.spec.model
        if not ref:
            raise ToolError(f"tool {self.spec.name} has no model: set `model` to a diffusers pipeline folder or id")
        return str(ref)

    def load(self, variant: str | None = None) -> None:
        self._ensure(variant or self.spec.default_variant)

    def _ensure(self, variant: str) -> _Loaded:
        ref = self._model_ref(variant)
        with self._load_lock:
            loaded = self._models.get(ref)
            if loaded is None:
                loaded = self._models[ref] = self._load(ref)
            lora = pipelines.lora_ref(self._extra(variant))
            if lora is not None and not loaded.adapters.has(variant):
                with loaded.lock:  # never while a job runs on this pipeline
                    loaded.adapters.ensure(variant, lora, self.pipeline_options)
            return loaded

    def _load(self, ref: str) -> _Loaded:
        from diffusers import AutoPipelineForText2Image

        t0 = time.perf_counter()
        pipe = pipelines.load_pipeline(AutoPipelineForText2Image, ref, self.pipeline_options)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        vae = getattr(pipe, "vae", None)
        pipelines.install_cancel_hooks(denoiser, getattr(vae, "decoder", None))
        seconds = time.perf_counter() - t0
        log.info("%s: loaded %s (%s) in %.2fs on %s/%s", self.spec.name, ref, type(pipe).__name__, seconds,
                 self.pipeline_options.device, self.pipeline_options.dtype)
        return _Loaded(
            pipe=pipe,
            schedulers=pipelines.Schedulers(pipe.scheduler),
            adapters=pipelines.Adapters(pipe),
            size_multiple=int(self.size_multiple or _size_multiple(pipe)),
            default_size=_default_size(pipe),
            accepts=pipelines.accepted_kwargs(pipe),
            load_seconds=round(seconds, 3),
        )

    # -- running -------------------------------------------------------------------

    def run(self, call: ToolCall) -> ToolResult:
        if call.inputs:
            raise ToolError("text-to-image takes no input images", code="invalid_input")
        variant = call.variant or self.spec.default_variant
        extra = self._extra(variant)
        m = self._ensure(variant)
        self.pipeline_options.apply_threads()  # per run: the thread count is per OS thread (see PipelineOptions)
        p = call.params
        prompt = p["prompt"]
        width = int(p.get("width") or m.default_size[0])
        height = int(p.get("height") or m.default_size[1])
        if width % m.size_multiple or height % m.size_multiple:
            raise ToolError(
                f"width and height must be multiples of {m.size_multiple} for this model, not {width}x{height}",
                code="invalid_input",
            )
        if width * height > self.max_pixels:
            raise ToolError(f"{width}x{height} is over this tool's {self.max_pixels}-pixel limit", code="invalid_input")
        steps = int(p.get("steps") or extra.get("steps") or self._default(m, "num_inference_steps", 30))
        cfg = p.get("cfg_scale", extra.get("cfgScale"))
        sampler = p.get("sampler") or extra.get("sampler") or "default"
        scheduler = m.schedulers.get(sampler)
        count = int(p.get("num_images", 1))
        seed = pipelines.seed_for(call)
        reporter = pipelines.StepReporter(call, steps)

        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "num_images_per_prompt": count,
            "generator": pipelines.generators(seed, count),
            "output_type": "pil",
        }
        if p.get("negative_prompt"):
            self._require(m, "negative_prompt")
            kwargs["negative_prompt"] = p["negative_prompt"]
        if cfg is not None:
            self._require(m, "guidance_scale", "cfg_scale")
            kwargs["guidance_scale"] = float(cfg)
        if "callback_on_step_end" in m.accepts:
            kwargs["callback_on_step_end"] = reporter.on_step_end
        elif "callback" in m.accepts:
            kwargs["callback"], kwargs["callback_steps"] = reporter.legacy, 1

        pipelines.acquire(m.lock, call.cancel)
        try:
            if m.pipe.scheduler is not scheduler:  # the setter rewrites the pipeline's config
                m.pipe.scheduler = scheduler
            m.adapters.activate(variant)
            t0 = time.perf_counter()
            with pipelines.running(call.cancel, self.pipeline_options):
                images = m.pipe(**kwargs).images
            seconds = time.perf_counter() - t0
        finally:
            m.lock.release()
        call.cancel.raise_if_cancelled()

        model_name = PurePath(self._model_ref(variant)).name
        used_cfg = float(cfg) if cfg is not None else self._default(m, "guidance_scale", None)
        metas = [
            {
                "tool": self.spec.name, "model": model_name, "variant": variant, "prompt": prompt,
                "negative_prompt": p.get("negative_prompt") or None, "steps": steps, "sampler": sampler,
                "cfg_scale": used_cfg, "seed": (seed + i) & pipelines.SEED_MAX, "size": f"{width}x{height}",
                "image": i + 1, "num_images": count,
            }
            for i in range(len(images))
        ]
        files = pipelines.output_files(images, p.get("output_format", "png"), metas, prompt)
        metrics = {
            "pipeline": type(m.pipe).__name__, "device": self.pipeline_options.device, "dtype": self.pipeline_options.dtype,
            "width": width, "height": height, "steps": reporter.done, "sampler": sampler, "num_images": count,
            "pipeline_seconds": round(seconds, 4), "steps_per_second": round(reporter.done / seconds, 3) if seconds else None,
            "model_load_seconds": m.load_seconds,
        }
        return ToolResult(files=files, seed=seed, metrics=metrics)

    @staticmethod
    def _default(m: _Loaded, name: str, fallback: Any) -> Any:
        import inspect

        param = inspect.signature(m.pipe.__call__).parameters.get(name)
        if param is None or param.default is inspect.Parameter.empty or param.default is None:
            return fallback
        return param.default

    @staticmethod
    def _require(m: _Loaded, name: str, public: str | None = None) -> None:
        if name not in m.accepts:
            raise ToolError(f"this model ({type(m.pipe).__name__}) does not take {public or name}", code="invalid_input")


__all__ = ["TextToImageTool"]
