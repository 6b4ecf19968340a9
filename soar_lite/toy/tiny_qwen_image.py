"""A tiny, fully local QwenImagePipeline, small enough for a CPU.

Why: the Qwen-Image family's tests need a real Qwen-Image folder (same classes, same saved layout,
same ``encode_prompt`` with its chat template, same LoRA loader) without a download. Shapes follow
diffusers' own Qwen-Image pipeline tests (``get_dummy_components``: a two-layer Qwen2.5-VL text
encoder of width 16, a 3-level ``AutoencoderKLQwenImage``, a two-block transformer), with:

* a Qwen2 tokenizer built here: a byte-level BPE trained in code on the pipeline's prompt template
  and the toy's words, so that, as with Qwen's own tokenizer, every template word is one token and
  the template's prefix is exactly the 34 tokens the pipeline drops (``prompt_template_encode_start_idx``);
* 16 latent channels (as Qwen-Image's VAE), so the packed sequence has its 64 features per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from soar_lite.toy.shapes import VOCAB_WORDS
from soar_lite.toy.tiny_sd3 import RESOLUTION, SETTINGS_FILE, quiet_hub_libraries

LATENT_CHANNELS = 16
TEXT_WIDTH = 16
MAX_SEQUENCE_LENGTH = 16  # longest toy caption is 7 words + the template's 5 closing tokens
TEMPLATE_PREFIX_TOKENS = 34  # what QwenImagePipeline drops: the system prompt and "user\n"
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_qwen_tokenizer(words: tuple[str, ...] = VOCAB_WORDS) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer without the hub: byte-level BPE trained on the template and the toy words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # QwenImagePipeline.prompt_template_encode (an instance attribute: the tests compare them)
    text = (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
        "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
        "{}<|im_end|>\n<|im_start|>assistant\n"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(SPECIAL),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([text.format(" ".join(words)), *words, *(" " + w for w in words)], trainer)
    model = json.loads(tok.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tokenizer.add_tokens(list(SPECIAL[1:]), special_tokens=True)
    return tokenizer


def _text_encoder(vocab_size: int, eos: int, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": TEXT_WIDTH, "intermediate_size": TEXT_WIDTH, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": vocab_size,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
        },
        vision_config={
            "depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
        },
        hidden_size=TEXT_WIDTH, vocab_size=vocab_size,
        # vision tokens (unused by text prompts) get the last ids of the vocabulary
        vision_start_token_id=vocab_size - 4, vision_end_token_id=vocab_size - 3,
        vision_token_id=vocab_size - 2, image_token_id=vocab_size - 1, video_token_id=vocab_size - 1,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _vae(seed: int) -> AutoencoderKLQwenImage:
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4], num_res_blocks=1,
        temperal_downsample=[False, True],  # spatial factor 4: 32 px -> 8x8 latents -> 4x4 packed tokens
        latents_mean=[0.05 * i for i in range(LATENT_CHANNELS)],  # non-trivial, so the tests see them
        latents_std=[1.0 + 0.1 * i for i in range(LATENT_CHANNELS)],
    )  # fmt: skip


def tiny_qwen_transformer(seed: int = 0, **overrides: Any) -> QwenImageTransformer2DModel:
    """Two blocks, hidden 48 (3 heads x 16), 64 packed input features, 16 output channels."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {
        "patch_size": 2,
        "in_channels": LATENT_CHANNELS * 4,
        "out_channels": LATENT_CHANNELS,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 3,
        "joint_attention_dim": TEXT_WIDTH,
        "guidance_embeds": False,
        "axes_dims_rope": (8, 4, 4),
    }
    return QwenImageTransformer2DModel(**{**kwargs, **overrides})


def build_tiny_qwen_pipeline(seed: int = 0) -> QwenImagePipeline:
    """An untrained tiny QwenImagePipeline on CPU, with Qwen-Image's scheduler settings."""
    tokenizer = build_qwen_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )  # fmt: skip
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=_vae(seed + 3),
        text_encoder=_text_encoder(len(tokenizer) + 4, eos, seed),
        tokenizer=tokenizer,
        transformer=tiny_qwen_transformer(seed + 2),
    )


def save_tiny_qwen_image(folder: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny Qwen-Image folder (``model_index.json`` + parts + ``soar_lite.json``)."""
    folder = Path(folder)
    pipe = build_tiny_qwen_pipeline(seed)
    with quiet_hub_libraries():
        pipe.save_pretrained(folder)
    settings = {"toy": "qwen-image-v1", "resolution": RESOLUTION, "max_sequence_length": MAX_SEQUENCE_LENGTH}
    (folder / SETTINGS_FILE).write_text(
        json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return folder
