"""Shared diffusers plumbing for the generation tools (text-to-image, image edit, SD upscale).

The only module of genq, with the tools that use it, that imports torch and diffusers (at
call time, never at import time). Neighbours: :mod:`.text_to_image`, :mod:`.image_edit`
and :mod:`.sd_upscale` build on it; :mod:`.base` defines what they receive and return.

What lives here:

* :class:`PipelineOptions` — the device, dtype and thread settings of a tool (``spec.options``).
* :func:`load_pipeline` — ``from_pretrained`` of a local folder, an ``s3://`` folder
  (copied once into a cache folder) or a Hugging Face id.
* :class:`StepReporter` — the per-step callback: progress for every step, the cancel
  token checked at every step *and* before every block of the denoiser and VAE decoder,
  so a cancel frees the worker within one block, not one whole step.
* :func:`running` — the scope a pipeline call runs in: the job's cancel token, and
  ``torch.inference_mode`` (see :class:`PipelineOptions`).
* :class:`Adapters` — variant LoRAs, loaded once each and switched with ``set_adapters``
  (switching a variant never reloads the base model).
* :data:`SAMPLERS` / :class:`Schedulers` — ``sampler`` names to diffusers schedulers.
* :func:`generators`, :func:`encode_image`, :func:`decode_image` — seeds, outputs with
  their generation parameters in the file's metadata, inputs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .base import CancelToken, LazyFile, ToolCall, ToolError

log = logging.getLogger(__name__)

#: ``dtype`` option names to torch dtype attribute names.
DTYPES = {
    "float32": "float32", "fp32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}

#: ``sampler`` names (the ``textToImage`` schema's enum) -> (scheduler class name, config
#: overrides). ``default`` keeps the model's own scheduler. A model only accepts samplers
#: its scheduler lists as compatible (flow-matching models such as SD3 and Flux take
#: ``default`` and ``euler``, which maps to their flow-matching Euler).
SAMPLERS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "default": (None, {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}

#: Output formats: name -> (Pillow format, content type, file extension).
FORMATS = {"png": ("PNG", "image/png", "png"), "webp": ("WEBP", "image/webp", "webp"), "jpeg": ("JPEG", "image/jpeg", "jpg")}


#: Held while any model is built or loaded in this process. ``from_pretrained`` (accelerate's
#: ``init_empty_weights``) patches ``nn.Module`` globally to create parameters on the meta
#: device; a model built in another thread at the same time would get meta parameters too
#: ("Cannot copy out of meta tensor"). Tools that load models take this lock.
LOAD_LOCK = threading.RLock()


def _torch():
    import torch

    return torch


# -- pipeline options ---------------------------------------------------------------------


@dataclass
class PipelineOptions:
    """Where and how a tool's pipeline runs, from ``spec.options``.

    * ``device`` (``cpu``): torch device; ``auto`` picks CUDA when available. ``cpu`` is
      the default because it always works; a GPU pool sets ``cuda``.
    * ``dtype`` (``float32``): weights' dtype; ``bfloat16`` on a GPU halves memory and
      time. float32 is the default because half precision on CPU is slow or unsupported.
    * ``threads`` (unset): ``torch.set_num_threads``; torch's default uses every core.
    * ``cpuOffload`` (false): ``enable_model_cpu_offload`` — only the module in use sits on
      the GPU; for models larger than the GPU's memory, at some cost in speed.
    * ``cacheDir`` (``$XDG_CACHE_HOME/genq/models``): where ``s3://`` models are copied.
    * ``revision`` / ``modelVariant`` (unset): Hugging Face revision and weight-file
      variant (``fp16``) passed to ``from_pretrained``.
    * ``inferenceMode`` (true): pipeline calls run in ``torch.inference_mode`` rather than
      only the ``no_grad`` diffusers' pipelines set: no autograd bookkeeping per tensor
      (version counters, view tracking): 3–8 % of a small model's call on CPU, where
      per-op overhead is the cost (BENCHMARKS §4). Off with ``cpuOffload``: the offload
      hooks move weights between devices inside the call, and a weight moved in
      inference mode becomes an inference tensor that a later LoRA load or device move
      outside it may not update. Set false for a custom pipeline that needs gradients
      (gradient guidance under ``torch.enable_grad``).
    """

    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    cpu_offload: bool = False
    cache_dir: str | None = None
    revision: str | None = None
    model_variant: str | None = None
    inference_mode: bool = True

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> PipelineOptions:
        dtype = str(options.get("dtype", "float32")).lower()
        if dtype not in DTYPES:
            raise ValueError(f"options.dtype must be one of {', '.join(sorted(set(DTYPES.values())))}, not {dtype!r}")
        threads = options.get("threads")
        return cls(
            device=str(options.get("device", "cpu")),
            dtype=DTYPES[dtype],
            threads=int(threads) if threads else None,
            cpu_offload=bool(options.get("cpuOffload", False)),
            cache_dir=options.get("cacheDir"),
            revision=options.get("revision"),
            model_variant=options.get("modelVariant"),
            inference_mode=bool(options.get("inferenceMode", True)),
        )

    def torch_device(self) -> Any:
        torch = _torch()
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> Any:
        return getattr(_torch(), self.dtype)

    def apply_threads(self) -> None:
        """Set torch's intra-op thread count. OpenMP keeps it per OS thread, and tools run
        on whichever executor thread is free, so tools call this at the start of every
        run, not only at load: a different count changes the reduction order, and with
        it the output bytes (same seed, different image)."""
        if self.threads:
            _torch().set_num_threads(self.threads)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "genq" / "models"


# -- model sources ------------------------------------------------------------------------

_S3_RE = re.compile(r"^s3://([^/]+)/?(.*)$")


def resolve_model(ref: str, options: PipelineOptions) -> str:
    """What ``from_pretrained`` gets for ``ref``: a local folder as is, an ``s3://bucket/prefix``
    copied once into the cache folder (reused while every object's ETag matches), or a
    Hugging Face id as is (downloaded and cached by huggingface_hub)."""
    m = _S3_RE.match(ref)
    if not m:
        path = Path(ref).expanduser()
        if path.exists() or ref.startswith((".", "/", "~")):
            if not (path / "model_index.json").is_file() and not path.is_file():
                raise ToolError(f"model folder {ref} has no model_index.json (a diffusers pipeline folder is expected)")
            return str(path)
        return ref
    return str(_fetch_s3(m.group(1), m.group(2).rstrip("/"), options))


def _fetch_s3(bucket: str, prefix: str, options: PipelineOptions) -> Path:
    import boto3  # brought in by aioboto3

    client = boto3.client("s3", endpoint_url=os.environ.get("GENQ_S3_ENDPOINT_URL") or None)
    objects: list[dict[str, Any]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
        objects.extend(page.get("Contents", []))
    if not objects:
        raise ToolError(f"s3://{bucket}/{prefix} holds no objects")
    digest = hashlib.sha256(json.dumps(sorted((o["Key"], o.get("ETag", "")) for o in objects)).encode()).hexdigest()
    root = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    out = root / "s3" / bucket / (prefix or "_") / digest[:16]
    if (out / ".complete").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    for o in objects:
        rel = o["Key"][len(prefix) + 1 if prefix else 0 :]
        if not rel or rel.endswith("/"):
            continue
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, o["Key"], str(dest))
    (tmp / ".complete").write_text(digest)
    with contextlib.suppress(OSError):
        tmp.rename(out)  # another process may have won the race: either copy is complete
    return out if (out / ".complete").is_file() else tmp


def quiet_progress_bars() -> None:
    """No tqdm bars from diffusers/transformers loading and saving: a worker's stderr is a
    log, and job progress has its own channel."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(loader: Any, model: str, options: PipelineOptions, **kwargs: Any) -> Any:
    """``loader.from_pretrained(model)`` on ``options``'s device and dtype, progress bars off."""
    quiet_progress_bars()
    options.apply_threads()
    source = resolve_model(model, options)
    extra: dict[str, Any] = {"dtype": options.torch_dtype(), **kwargs}
    if options.revision:
        extra["revision"] = options.revision
    if options.model_variant:
        extra["variant"] = options.model_variant
    with LOAD_LOCK:
        try:
            pipe = loader.from_pretrained(source, **extra)
        except ToolError:
            raise
        except (OSError, ValueError) as exc:
            raise ToolError(f"cannot load model {model}: {exc}"[:500]) from exc
        if options.cpu_offload:
            pipe.enable_model_cpu_offload(device=options.torch_device())
        else:
            pipe.to(options.torch_device())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def accepted_kwargs(pipe: Any) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)


# -- progress and cancel ------------------------------------------------------------------

_current = threading.local()


def _check_cancel() -> None:
    token: CancelToken | None = getattr(_current, "token", None)
    if token is not None:
        token.raise_if_cancelled()


#: How deep below a denoiser or VAE root the cancel checks go: blocks and their resnets
#: and attentions, not every conv and norm inside them.
CANCEL_HOOK_DEPTH = 3


def _checked_forward(forward: Any) -> Any:
    @functools.wraps(forward)  # the signature stays the model's: pipelines inspect it
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_cancel()
        return forward(*args, **kwargs)

    checked.genq_cancel_check = True  # type: ignore[attr-defined]
    return checked


def install_cancel_hooks(*modules: Any) -> int:
    """Check the running job's cancel token before each block of ``modules`` (a denoiser,
    a VAE encoder or decoder) runs, so a cancel stops a pipeline within one block, not one
    step — a step of a large model, or a VAE pass over a megapixel image, takes seconds.

    Only modules at most ``CANCEL_HOOK_DEPTH`` levels below the root get a check: a Python
    check on every leaf layer cost ~15 % of a small model's run time for no faster cancel
    that matters. Containers (ModuleList/ModuleDict) are never called, so they get none.

    The check wraps the module's ``forward`` (as accelerate's hooks do), not a
    ``register_forward_pre_hook``: any hook sends every call of its module down
    ``nn.Module``'s slow path, which cost ~1 % of the tiny model's call for its 31 hooked
    blocks (BENCHMARKS §4); the wrapper is one Python call. Returns how many modules got
    a check; installing twice adds none."""
    import torch

    containers = (torch.nn.ModuleList, torch.nn.ModuleDict)
    count = 0
    for root in modules:
        if root is None:
            continue
        for name, m in root.named_modules():
            if isinstance(m, containers) or (name and name.count(".") >= CANCEL_HOOK_DEPTH):
                continue
            if getattr(m.forward, "genq_cancel_check", False):
                continue
            m.forward = _checked_forward(m.forward)
            count += 1
    return count


@contextlib.contextmanager
def cancel_scope(token: CancelToken) -> Iterator[None]:
    """Make ``token`` the one the block cancel checks test on this thread."""
    previous = getattr(_current, "token", None)
    _current.token = token
    try:
        yield
    finally:
        _current.token = previous


@contextlib.contextmanager
def running(token: CancelToken, options: PipelineOptions) -> Iterator[None]:
    """The scope of one pipeline call: ``token`` is the one the block cancel checks test,
    and the call runs in ``torch.inference_mode`` unless ``options`` turns it off (see
    :class:`PipelineOptions`: ``inferenceMode``, ``cpuOffload``)."""
    with cancel_scope(token):
        if options.inference_mode and not options.cpu_offload:
            with _torch().inference_mode():
                yield
        else:
            yield


class StepReporter:
    """The per-step callback: progress ``(step/steps, step, steps)`` after every step and a
    cancel check. Works as ``callback_on_step_end`` (modern pipelines) and as the legacy
    ``callback(step, timestep, latents)``."""

    def __init__(self, call: ToolCall, steps: int):
        self.call = call
        self.steps = max(1, steps)
        self.done = 0
        self.t0 = time.perf_counter()

    def _step(self, index: int, pipe: Any = None) -> None:
        self.call.cancel.raise_if_cancelled()
        total = int(getattr(pipe, "num_timesteps", 0) or 0) or self.steps
        self.steps = max(total, index + 1)
        self.done = index + 1
        self.call.progress(self.done / self.steps, self.done, self.steps)

    def on_step_end(self, pipe: Any, index: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        self._step(index, pipe)
        return callback_kwargs

    def legacy(self, index: int, _timestep: Any, _latents: Any) -> None:
        self._step(index)

    @property
    def steps_per_second(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return round(self.done / elapsed, 3) if elapsed > 0 else 0.0


def acquire(lock: threading.Lock, token: CancelToken) -> None:
    """Take ``lock`` (one pipeline runs one job at a time) unless the job is cancelled first."""
    while not lock.acquire(timeout=0.05):
        token.raise_if_cancelled()


# -- seeds --------------------------------------------------------------------------------

SEED_MAX = 2**32 - 1


def seed_for(call: ToolCall) -> int:
    import secrets

    return int(call.seed) if call.seed is not None else secrets.randbelow(SEED_MAX + 1)


def generators(seed: int, count: int) -> Any:
    """One CPU generator per image, seeded ``seed + i``: the noise, and so the image, is the
    same on every device, and image ``i`` of a batch can be remade alone with its own seed.

    One image gets the generator itself, not a list of one: diffusers draws the same noise
    from either (``randn_tensor`` draws a list's items one by one, each with the batch's
    shape but 1), and the list costs a per-call split and ``torch.cat``."""
    torch = _torch()
    made = [torch.Generator("cpu").manual_seed((seed + i) & SEED_MAX) for i in range(count)]
    return made[0] if count == 1 else made


# -- schedulers ---------------------------------------------------------------------------


class Schedulers:
    """The model's scheduler and the samplers it is compatible with, built once each."""

    def __init__(self, base: Any):
        self.base = base
        compatible = {c.__name__ for c in getattr(base, "compatibles", [])} | {type(base).__name__}
        self.flow_matching = "FlowMatch" in type(base).__name__
        self.names = [
            name for name, (cls, _) in SAMPLERS.items()
            if cls is None or cls in compatible or (self.flow_matching and name == "euler")
        ]
        self._built: dict[str, Any] = {}

    def get(self, name: str | None) -> Any:
        name = name or "default"
        if name not in SAMPLERS or name not in self.names:
            raise ToolError(
                f"sampler {name!r} is not supported by this model; choose one of {', '.join(self.names)}",
                code="invalid_input",
            )
        if name == "default" or (self.flow_matching and name == "euler"):
            return self.base
        if name not in self._built:
            import diffusers

            cls_name, overrides = SAMPLERS[name]
            self._built[name] = getattr(diffusers, cls_name).from_config(self.base.config, **overrides)
        return self._built[name]


# -- LoRA adapters ------------------------------------------------------------------------


@dataclass
class LoraRef:
    source: str
    weight_name: str | None = None
    scale: float = 1.0


class Adapters:
    """Variant LoRAs on one pipeline: each loaded once (``load_lora_weights`` with the
    variant as adapter name), then switched with ``set_adapters`` / ``disable_lora``."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.loaded: dict[str, LoraRef] = {}
        self.active: str | None = None

    @staticmethod
    def adapter_name(variant: str) -> str:
        return "genq_" + re.sub(r"\W", "_", variant)

    def has(self, variant: str) -> bool:
        return self.adapter_name(variant) in self.loaded

    def ensure(self, variant: str, ref: LoraRef, options: PipelineOptions) -> None:
        name = self.adapter_name(variant)
        if name in self.loaded:
            return
        source = ref.source
        if _S3_RE.match(source):
            source = str(_fetch_s3(*_S3_RE.match(source).groups(), options))  # type: ignore[union-attr]
        kwargs: dict[str, Any] = {"adapter_name": name}
        if ref.weight_name:
            kwargs["weight_name"] = ref.weight_name
        t0 = time.perf_counter()
        try:
            with LOAD_LOCK:
                self.pipe.load_lora_weights(source, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ToolError(f"cannot load LoRA {ref.source} for variant {variant!r}: {exc}"[:500]) from exc
        self.loaded[name] = ref
        self.active = None  # loading makes the new adapter active; set it explicitly per call
        log.info("loaded LoRA %s as %s in %.2fs", ref.source, name, time.perf_counter() - t0)

    def activate(self, variant: str | None) -> None:
        """Make ``variant``'s LoRA the only active one (None: the base model alone)."""
        name = self.adapter_name(variant) if variant is not None else None
        if name is not None and name not in self.loaded:
            name = None
        if name == self.active and (name is not None or not self.loaded):
            return
        if name is None:
            if self.loaded:
                self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name], adapter_weights=[self.loaded[name].scale])
        self.active = name


def lora_ref(extra: dict[str, Any]) -> LoraRef | None:
    """A variant's ``lora`` field: a path/id string, or ``{source, weightName, scale}``."""
    lora = extra.get("lora")
    if not lora:
        return None
    if isinstance(lora, str):
        return LoraRef(lora, extra.get("loraWeightName"), float(extra.get("loraScale", 1.0)))
    if isinstance(lora, dict) and lora.get("source"):
        return LoraRef(str(lora["source"]), lora.get("weightName"), float(lora.get("scale", 1.0)))
    raise ValueError("a variant's lora must be a path or {source, weightName, scale}")


# -- images in and out --------------------------------------------------------------------


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """An input image as RGB (EXIF-rotated); ``invalid_input`` if unreadable or too large."""
    try:
        im = Image.open(io.BytesIO(data))
        if max_pixels and im.width * im.height > max_pixels:
            raise ToolError(f"a {im.width}x{im.height} input is over this tool's {max_pixels}-pixel limit", code="invalid_input")
        im.load()
        im = ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ToolError(f"the input is not a readable image: {exc}", code="invalid_input") from exc
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def a1111_parameters(prompt: str, meta: dict[str, Any]) -> str:
    """The ``parameters`` text most image tools read (AUTOMATIC1111's layout)."""
    lines = [prompt]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields = {
        "Steps": meta.get("steps"), "Sampler": meta.get("sampler"), "CFG scale": meta.get("cfg_scale"),
        "Seed": meta.get("seed"), "Size": meta.get("size"), "Model": meta.get("model"), "Variant": meta.get("variant"),
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def encode_image(image: Image.Image, fmt: str, meta: dict[str, Any], prompt: str = "") -> tuple[bytes, str, str]:
    """(bytes, content type, extension). PNG carries ``parameters`` and ``genq`` (JSON) text
    chunks; WEBP and JPEG carry the JSON as the EXIF ImageDescription."""
    fmt = fmt or "png"
    if fmt not in FORMATS:
        raise ToolError(f"output_format must be png, webp or jpeg, not {fmt!r}", code="invalid_input")
    pil_format, content_type, ext = FORMATS[fmt]
    blob = json.dumps(meta, sort_keys=True, default=str)
    buf = io.BytesIO()
    if pil_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", a1111_parameters(prompt, meta))
        info.add_text("genq", blob)
        image.save(buf, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif[0x010E] = blob  # ImageDescription
        exif[0x0131] = "genq"  # Software
        image.save(buf, format=pil_format, quality=95, exif=exif.tobytes())
    return buf.getvalue(), content_type, ext


class ImageFile(LazyFile):
    """A result image, encoded (PNG/WEBP/JPEG with its metadata) when ``data`` is first
    read. The tool returns it as soon as the pipeline is done; the worker reads ``data``
    in a thread while the slot's next job already computes, so the encode (tens of ms for
    a megapixel PNG) is off the tool's path, and, with ``isolation: process``, off the
    tool's process: what crosses the socket is the raw image. Same bytes either way."""

    def __init__(self, name: str, image: Image.Image, fmt: str, meta: dict[str, Any], prompt: str = ""):
        if fmt not in FORMATS:
            raise ToolError(f"output_format must be png, webp or jpeg, not {fmt!r}", code="invalid_input")
        self.name = name
        self.content_type = FORMATS[fmt][1]
        self.image, self.fmt, self.meta, self.prompt = image, fmt, meta, prompt

    @cached_property
    def data(self) -> bytes:
        return encode_image(self.image, self.fmt, self.meta, self.prompt)[0]

    def __repr__(self) -> str:
        return f"ImageFile({self.name!r}, {self.content_type!r}, {self.image.size})"


def output_files(
    images: list[Image.Image], fmt: str, metas: list[dict[str, Any]], prompt: str, stem: str = "image", numbered: bool = True
) -> list[ImageFile]:
    """Results named ``<stem>-1.png`` … (or ``<stem>.png`` when not ``numbered``), encoded
    when first read (:class:`ImageFile`)."""
    fmt = fmt or "png"
    ext = FORMATS[fmt][2] if fmt in FORMATS else fmt
    return [
        ImageFile(f"{stem}-{i}.{ext}" if numbered else f"{stem}.{ext}", im, fmt, meta, prompt)
        for i, (im, meta) in enumerate(zip(images, metas, strict=True), start=1)
    ]


__all__ = [
    "Adapters", "FORMATS", "ImageFile", "LOAD_LOCK", "LoraRef", "PipelineOptions", "SAMPLERS", "Schedulers", "StepReporter",
    "accepted_kwargs", "acquire", "cancel_scope", "decode_image", "encode_image", "generators",
    "install_cancel_hooks", "load_pipeline", "lora_ref", "output_files", "resolve_model", "running", "seed_for",
]
