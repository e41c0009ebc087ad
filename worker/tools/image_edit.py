"""The ``imageEdit`` tool: Qwen-Image-Edit through diffusers (``QwenImageEditPipeline``, and
``QwenImageEditPlusPipeline`` for the Plus/2509 models that take several images).

Built from a :class:`genq.tools.ToolSpec` of kind ``imageEdit``; the worker calls ``load``
once (and on ``warm``) and ``run`` per job, in a thread. Neighbours: :mod:`.pipelines`
(loading, progress/cancel, LoRAs, output encoding) and :mod:`.base` (the tool interface).

The model (``spec.model``) is a diffusers folder, an ``s3://`` copy of one, or a Hugging
Face id (``Qwen/Qwen-Image-Edit``, ``Qwen/Qwen-Image-Edit-2509``); its
``model_index.json`` says which of the two pipelines it is. It is loaded once per worker.

Variants (SPEC §4: ``4step``, ``8step``, ``40step``). Each may set:

* ``lora``: the Lightning LoRA (a path, id or ``{source, weightName, scale}``), with
  ``loraWeightName`` / ``loraScale``; loaded once, switched with ``set_adapters``;
* ``steps``: default from a ``<N>step`` name, else 40;
* ``trueCfgScale``: default 1.0 with a LoRA (Lightning is distilled for cfg 1), else 4.0;
* ``scheduler``: overrides of the model's ``FlowMatchEulerDiscreteScheduler`` config
  (Lightning's model cards give one, e.g. ``{shift: 1.0, base_shift: 1.0986,
  max_shift: 1.0986, time_shift_type: exponential}``).

Switching variant switches the LoRA adapter and scheduler; the base model stays loaded.

Params (schema in :data:`genq.tools.BUILTIN_PARAMS`): ``instruction``, ``negative_prompt``
(with true CFG above 1 and none given, a single space, as Qwen's examples do, so that CFG
runs), ``seed``, ``true_cfg_scale``, ``steps``, ``output_format``; 1 image (1–3 for a Plus
model). The result is ``result.png`` with the generation parameters in its metadata.

Options (``spec.options``) beyond :class:`.pipelines.PipelineOptions`'s, each with the reason for
its default:

* ``outputSize`` (``model``): ``model`` gives the pipeline's own size (about 1 MP at the
  first image's aspect ratio, what the model was trained for); ``input`` gives the first
  image's size (rounded down to the model's 16 px grid) for callers that want the edit in
  place.
* ``maxInputPixels`` (40 MP, the API's limit): inputs are resized to ~1 MP by the pipeline
  anyway; this only bounds decoding.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from genq.tools import ToolSpec

from . import pipelines
from .base import Tool, ToolCall, ToolError, ToolResult

log = logging.getLogger(__name__)

EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
MULTI_IMAGE_PIPELINES = ("QwenImageEditPlusPipeline",)
DEFAULT_STEPS = 40
MAX_IMAGES = 3
_STEPS_NAME = re.compile(r"^(\d+)-?steps?$")


@dataclass
class _Variant:
    name: str
    steps: int
    true_cfg_scale: float
    lora: pipelines.LoraRef | None
    scheduler: dict[str, Any]


@dataclass
class _Loaded:
    pipe: Any
    adapters: pipelines.Adapters
    multiple: int
    multi_image: bool
    load_seconds: float
    schedulers: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ImageEditTool(Tool):
    """Edit 1–3 images by an instruction; see the module docstring."""

    def __init__(self, spec: ToolSpec):
        self.spec = spec
        self.pipeline_options = pipelines.PipelineOptions.from_options(spec.options)
        self.output_size = str(spec.options.get("outputSize", "model"))
        if self.output_size not in ("model", "input"):
            raise ValueError("imageEdit options.outputSize must be 'model' or 'input'")
        self.max_input_pixels = int(spec.options.get("maxInputPixels", 40_000_000))
        self.variants = {v.name: self._variant(v.name, v.model_extra or {}) for v in spec.variants}
        self._loaded: _Loaded | None = None
        self._load_lock = threading.Lock()

    @staticmethod
    def _variant(name: str, extra: dict[str, Any]) -> _Variant:
        lora = pipelines.lora_ref(extra)
        m = _STEPS_NAME.match(name)
        steps = int(extra.get("steps") or (m.group(1) if m else DEFAULT_STEPS))
        cfg = float(extra.get("trueCfgScale", 1.0 if lora else 4.0))
        scheduler = extra.get("scheduler") or {}
        if not isinstance(scheduler, dict):
            raise ValueError(f"imageEdit variant {name!r}: scheduler must be a mapping of config overrides")
        return _Variant(name, steps, cfg, lora, scheduler)

    # -- loading -------------------------------------------------------------------

    def load(self, variant: str | None = None) -> None:
        self._ensure(variant or self.spec.default_variant)

    def _ensure(self, variant: str) -> tuple[_Loaded, _Variant]:
        v = self.variants.get(variant)
        if v is None:
            raise ToolError(f"{self.spec.name} has no variant {variant!r}", code="invalid_input")
        with self._load_lock:
            if self._loaded is None:
                self._loaded = self._load()
            loaded = self._loaded
            if v.name not in loaded.schedulers:
                base = loaded.schedulers["__base__"]
                loaded.schedulers[v.name] = type(base).from_config(base.config, **v.scheduler) if v.scheduler else base
            if v.lora is not None and not loaded.adapters.has(v.name):
                with loaded.lock:  # never while a job runs on this pipeline
                    loaded.adapters.ensure(v.name, v.lora, self.pipeline_options)
        return loaded, v

    def _load(self) -> _Loaded:
        from diffusers import DiffusionPipeline

        if not self.spec.model:
            raise ToolError(f"tool {self.spec.name} has no model: set `model` to a Qwen-Image-Edit folder or id")
        t0 = time.perf_counter()
        pipe = pipelines.load_pipeline(DiffusionPipeline, self.spec.model, self.pipeline_options)
        kind = type(pipe).__name__
        if kind not in EDIT_PIPELINES:
            raise ToolError(f"model {self.spec.model} is a {kind}; imageEdit needs one of {', '.join(EDIT_PIPELINES)}")
        pipelines.install_cancel_hooks(pipe.transformer, pipe.vae.encoder, pipe.vae.decoder)
        seconds = time.perf_counter() - t0
        log.info("%s: loaded %s (%s) in %.2fs on %s/%s", self.spec.name, self.spec.model, kind, seconds,
                 self.pipeline_options.device, self.pipeline_options.dtype)
        return _Loaded(
            pipe=pipe,
            adapters=pipelines.Adapters(pipe),
            multiple=int(pipe.vae_scale_factor) * 2,
            multi_image=kind in MULTI_IMAGE_PIPELINES,
            load_seconds=round(seconds, 3),
            schedulers={"__base__": pipe.scheduler},
        )

    # -- running -------------------------------------------------------------------

    def run(self, call: ToolCall) -> ToolResult:
        variant = call.variant or self.spec.default_variant
        m, v = self._ensure(variant)
        self.pipeline_options.apply_threads()  # per run: the thread count is per OS thread (see PipelineOptions)
        n = len(call.inputs)
        if n < 1 or n > MAX_IMAGES:
            raise ToolError(f"image edit takes 1 to {MAX_IMAGES} images, got {n}", code="invalid_input")
        if n > 1 and not m.multi_image:
            raise ToolError(
                "this model edits one image at a time; a Qwen-Image-Edit Plus (2509) model takes up to 3",
                code="invalid_input",
            )
        images = [pipelines.decode_image(f.data, self.max_input_pixels) for f in call.inputs]
        call.cancel.raise_if_cancelled()
        p = call.params
        instruction = p["instruction"]
        steps = int(p.get("steps") or v.steps)
        cfg = float(p.get("true_cfg_scale", v.true_cfg_scale))
        negative = p.get("negative_prompt") or (" " if cfg > 1 else None)
        seed = pipelines.seed_for(call)
        reporter = pipelines.StepReporter(call, steps)
        kwargs: dict[str, Any] = {
            "image": images if m.multi_image else images[0],
            "prompt": instruction,
            "true_cfg_scale": cfg,
            "num_inference_steps": steps,
            "generator": pipelines.generators(seed, 1),
            "output_type": "pil",
            "callback_on_step_end": reporter.on_step_end,
        }
        if negative is not None:
            kwargs["negative_prompt"] = negative
        if self.output_size == "input":
            w, h = images[0].size
            kwargs["width"] = max(m.multiple, w // m.multiple * m.multiple)
            kwargs["height"] = max(m.multiple, h // m.multiple * m.multiple)

        pipelines.acquire(m.lock, call.cancel)
        try:
            if m.pipe.scheduler is not m.schedulers[v.name]:  # the setter rewrites the pipeline's config
                m.pipe.scheduler = m.schedulers[v.name]
            m.adapters.activate(v.name if v.lora is not None else None)
            t0 = time.perf_counter()
            with pipelines.running(call.cancel, self.pipeline_options):
                out = m.pipe(**kwargs).images[0]
            seconds = time.perf_counter() - t0
        finally:
            m.lock.release()
        call.cancel.raise_if_cancelled()

        meta = {
            "tool": self.spec.name, "model": PurePath(str(self.spec.model)).name, "variant": variant,
            "instruction": instruction, "negative_prompt": p.get("negative_prompt") or None, "steps": steps,
            "cfg_scale": cfg, "seed": seed, "size": f"{out.width}x{out.height}", "inputs": n,
        }
        files = pipelines.output_files([out], p.get("output_format", "png"), [meta], instruction, stem="result", numbered=False)
        metrics = {
            "pipeline": type(m.pipe).__name__, "device": self.pipeline_options.device, "dtype": self.pipeline_options.dtype,
            "width": out.width, "height": out.height, "steps": reporter.done, "true_cfg_scale": cfg,
            "lora": v.lora is not None, "pipeline_seconds": round(seconds, 4),
            "steps_per_second": round(reporter.done / seconds, 3) if seconds else None,
            "model_load_seconds": m.load_seconds,
        }
        return ToolResult(files=files, seed=seed, metrics=metrics)


__all__ = ["ImageEditTool"]
