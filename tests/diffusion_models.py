"""Tiny diffusers model folders for the tests, built once per test process (seconds each)
by :mod:`genq.worker.tools.tiny_models`, the same builders the demo mode uses."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="genq-tiny-models-"))

#: Tools on these tiny models run with one thread: their ops are so small that a second
#: OpenMP thread only adds synchronisation (and on a busy 2-core machine, a lot of it).
TEST_OPTIONS = {"threads": 1}


@functools.cache
def text_to_image_dir() -> Path:
    from genq.worker.tools import tiny_models

    return tiny_models.write_text_to_image(_ROOT / "tiny-sd")


@functools.cache
def unet_lora_dir() -> Path:
    from genq.worker.tools import tiny_models

    return tiny_models.write_unet_lora(text_to_image_dir(), _ROOT / "tiny-sd-lora")


@functools.cache
def sd_upscaler_dir() -> Path:
    from genq.worker.tools import tiny_models

    return tiny_models.write_sd_upscaler(_ROOT / "tiny-sd-x4-upscaler")


@functools.cache
def qwen_edit_dir(plus: bool = False) -> Path:
    from genq.worker.tools import tiny_models

    return tiny_models.write_qwen_image_edit(_ROOT / ("tiny-qwen-image-edit-plus" if plus else "tiny-qwen-image-edit"), plus=plus)


@functools.cache
def lightning_lora_dir(steps: int) -> Path:
    """A random stand-in for a Qwen-Image-Edit Lightning LoRA (one file, as shipped)."""
    from genq.worker.tools import tiny_models

    return tiny_models.write_transformer_lora(
        qwen_edit_dir(), _ROOT / f"lightning-{steps}step", seed=steps,
        weight_name=f"Qwen-Image-Edit-Lightning-{steps}steps-V1.0.safetensors",
    )


def image_edit_config(name: str = "image-edit", **options) -> dict:
    """The SPEC's image-edit tool: 4step and 8step with their LoRAs, 40step the base model."""
    return {
        "tool": {"kind": "imageEdit", "name": name},
        "model": str(qwen_edit_dir()),
        "variants": [
            {"name": "4step", "lora": {"source": str(lightning_lora_dir(4)), "weightName": "Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors"},
             "scheduler": {"shift": 1.0}},
            {"name": "8step", "lora": str(lightning_lora_dir(8)), "loraWeightName": "Qwen-Image-Edit-Lightning-8steps-V1.0.safetensors"},
            {"name": "40step"},
        ],
        "options": {**TEST_OPTIONS, "outputSize": "input", **options},
    }
