"""Tiny, randomly initialised diffusers model folders for demos and tests — no downloads.

Each ``write_*`` function builds a pipeline the way diffusers' own fast tests build their
``get_dummy_components`` (a few-channel UNet or transformer, a small VAE, a small text
encoder), with a tokenizer made offline from an in-memory byte-level vocabulary, and saves
it with ``save_pretrained`` into a folder laid out like the real model on the Hub. The
tools load these folders through the same ``from_pretrained`` code as a real model. The
images they make are noise, but every code path — loading, schedulers, LoRAs, progress,
cancel, outputs — is the real one, and a 64 px image takes well under a second on a CPU.

Neighbours: used by the tests and by the demo mode; loaded by :mod:`.text_to_image`,
:mod:`.sd_upscale` and :mod:`.image_edit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

def _quiet() -> None:
    from .pipelines import quiet_progress_bars

    quiet_progress_bars()


#: Words merged into single tokens so prompts are not all single bytes.
_WORDS = ("the", "a", "cat", "dog", "sky", "blue", "red", "photo", "of", "painting", "make")


def _byte_level_vocab(words: tuple[str, ...], end_of_word: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    if end_of_word:
        for c in chars:
            vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word)
        if end_of_word:
            pieces[-1] += "</w>"
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in vocab:
                merges.append((left, right))
                vocab[merged] = len(vocab)
            left = merged
    return vocab, merges


def clip_tokenizer(model_max_length: int = 77) -> Any:
    """A CLIP tokenizer (byte-level BPE with ``</w>``) from an in-memory vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = _byte_level_vocab(_WORDS, end_of_word=True)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _clip_text_encoder(vocab_size: int, seed: int, **overrides: Any) -> Any:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=vocab_size, **overrides,
    )
    return CLIPTextModel(config).eval()


def text_to_image_pipeline(seed: int = 0) -> Any:
    """A tiny Stable Diffusion 1.x pipeline (64 px native size: 8x8 latents)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16, 16], in_channels=3, out_channels=3, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
        sample_size=64,
    )
    tokenizer = clip_tokenizer()
    text_encoder = _clip_text_encoder(len(tokenizer), seed)
    return StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_text_to_image(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`text_to_image_pipeline` as a diffusers folder (``model_index.json`` …)."""
    _quiet()
    path = Path(path)
    text_to_image_pipeline(seed).save_pretrained(path)
    return path


def write_unet_lora(model: str | Path, out: str | Path, rank: int = 4, seed: int = 1, weight_name: str | None = None) -> Path:
    """A random LoRA for the UNet of the pipeline at ``model``, saved the way trainers save
    one (``pytorch_lora_weights.safetensors``), so ``load_lora_weights`` reads it."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(config)
    out = Path(out)
    kwargs = {"weight_name": weight_name} if weight_name else {}
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet), **kwargs)
    return out


def sd_upscale_pipeline(seed: int = 0) -> Any:
    """A tiny Stable Diffusion x4 upscaler: 7-channel UNet on the low-res image, x4 VAE."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=32, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
        only_cross_attention=(True, True, False), num_class_embeds=100,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16], in_channels=3, out_channels=3, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=4,
        scaling_factor=0.08333,  # the real x4 upscaler's
    )
    tokenizer = clip_tokenizer()
    text_encoder = _clip_text_encoder(len(tokenizer), seed, hidden_act="gelu", projection_dim=32)
    return StableDiffusionUpscalePipeline(
        unet=unet, low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction"),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, max_noise_level=350,
    )


def write_sd_upscaler(path: str | Path, seed: int = 0) -> Path:
    _quiet()
    path = Path(path)
    sd_upscale_pipeline(seed).save_pretrained(path)
    return path




# -- Qwen-Image-Edit ------------------------------------------------------------------------

#: The special tokens Qwen-Image-Edit's prompt template and Qwen2-VL's processor use.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)


def qwen_tokenizer() -> Any:
    """A Qwen2 tokenizer (byte-level BPE) with Qwen2-VL's special tokens, from memory."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_vocab(_WORDS, end_of_word=False)
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tok


def qwen_image_edit_pipeline(seed: int = 0, plus: bool = False) -> Any:
    """A tiny Qwen-Image-Edit pipeline (or the Plus/2509 multi-image one), the components of
    diffusers' ``QwenImageEditPipelineFastTests`` with an offline tokenizer and a VAE that
    downsamples x32, so the pipeline's fixed ~1 MP condition image stays cheap on a CPU."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if plus:
        from diffusers import QwenImageEditPlusPipeline as Pipeline
    else:
        from diffusers import QwenImageEditPipeline as Pipeline

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=z_dim, dim_mult=[1, 2, 2, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, False, False, False], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )
    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tok), "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tok),
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    # The vision tower sees at most 56x56 px (4 patches of 14 px, one token after merging 2x2).
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tok,
    )
    return Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tok,
        processor=processor, transformer=transformer,
    )


def write_qwen_image_edit(path: str | Path, seed: int = 0, plus: bool = False) -> Path:
    _quiet()
    path = Path(path)
    qwen_image_edit_pipeline(seed, plus).save_pretrained(path)
    return path


def write_transformer_lora(model: str | Path, out: str | Path, rank: int = 4, seed: int = 1, weight_name: str | None = None) -> Path:
    """A random LoRA for the transformer of the Qwen-Image pipeline at ``model``, in the
    layout Lightning LoRAs ship in (``transformer.``-prefixed keys in one safetensors file)."""
    import torch
    from diffusers import QwenImageEditPipeline, QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = QwenImageTransformer2DModel.from_pretrained(str(model), subfolder="transformer")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    torch.manual_seed(seed)
    transformer.add_adapter(config)
    out = Path(out)
    kwargs = {"weight_name": weight_name} if weight_name else {}
    QwenImageEditPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer), **kwargs)
    return out


def write_demo_models(root: str | Path) -> dict[str, Any]:
    """Write tiny models for all three diffusers tools under ``root`` (once; reused when
    present) and return a ``genq.yaml`` ``tools:`` config that runs them on a CPU — what a
    ``genq up --demo`` needs to show the whole flow on a laptop."""
    root = Path(root)
    t2i, up, edit = root / "tiny-sd", root / "tiny-sd-x4-upscaler", root / "tiny-qwen-image-edit"
    if not (t2i / "model_index.json").is_file():
        write_text_to_image(t2i)
    if not (up / "model_index.json").is_file():
        write_sd_upscaler(up)
    if not (edit / "model_index.json").is_file():
        write_qwen_image_edit(edit)
    loras = {}
    for steps in (4, 8):
        out = root / f"tiny-lightning-{steps}step"
        name = f"Qwen-Image-Edit-Lightning-{steps}steps-V1.0.safetensors"
        if not (out / name).is_file():
            write_transformer_lora(edit, out, seed=steps, weight_name=name)
        loras[steps] = {"source": str(out), "weightName": name}
    cpu = {"device": "cpu", "dtype": "float32", "threads": 1}
    return {
        "tools": [
            {"tool": {"kind": "imageEdit", "name": "image-edit"}, "label": "Image edit (tiny random Qwen-Image-Edit)",
             "model": str(edit), "options": {**cpu, "outputSize": "input"},
             "variants": [{"name": "4step", "lora": loras[4]}, {"name": "8step", "lora": loras[8]}, {"name": "40step"}]},
            {"tool": {"kind": "textToImage", "name": "text-to-image"}, "label": "Text to image (tiny random SD)",
             "model": str(t2i), "options": cpu, "variants": [{"name": "default", "steps": 20}]},
            {"tool": {"kind": "upscale", "name": "upscale"}, "label": "Upscale (Real-ESRGAN, tiny random SD x4, Lanczos)",
             "options": cpu,
             "variants": [{"name": "realesrgan"}, {"name": "sd-x4", "backend": "diffusers", "model": str(up), "steps": 10},
                          {"name": "lanczos"}]},
        ]
    }


__all__ = [
    "write_demo_models",
    "clip_tokenizer", "qwen_tokenizer", "write_qwen_image_edit", "write_sd_upscaler", "write_text_to_image",
    "write_transformer_lora", "write_unet_lora",
]
