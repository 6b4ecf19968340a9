"""A tiny, fully local FluxPipeline (FLUX.1-dev or -schnell layout), small enough for a CPU.

Why: the FLUX family's tests and the ``--model`` path of the FLUX presets need a real FLUX pipeline
folder (same classes, same saved layout, same ``encode_prompt``, same LoRA loader) without a
download. Shapes follow diffusers' FLUX pipeline tests (``get_dummy_components``), with:

* the CLIP tokenizer of the tiny SD3 toy (every toy word one token) and a T5 tokenizer built here
  as a ``tokenizers`` Unigram model (every toy word one piece) wrapped as ``T5TokenizerFast``;
* 16 latent channels (as FLUX.1's VAE), so the packed sequence has FLUX.1's 64 features per token;
* ``guidance_embeds`` on for dev, off for schnell: the only architectural difference of the two.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from soar_lite.toy.shapes import VOCAB_WORDS
from soar_lite.toy.tiny_sd3 import (
    CLIP_HIDDEN,
    RESOLUTION,
    SETTINGS_FILE,
    TOKENIZER_MAX_LENGTH,
    build_tokenizer,
    quiet_hub_libraries,
    tiny_vae,
    write_vocab_files,
)

T5_MAX_LENGTH = 8  # longest toy caption is 7 words + </s>
T5_WIDTH = 32
LATENT_CHANNELS = 16


def build_t5_tokenizer(words: tuple[str, ...] = VOCAB_WORDS) -> T5TokenizerFast:
    """A T5 tokenizer without the hub: a Unigram model in which each toy word is one piece."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces.append(("\u2581", -5.0))
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    with tempfile.TemporaryDirectory(prefix="soar-lite-t5tok-") as folder:
        file = Path(folder) / "tokenizer.json"
        tok.save(str(file))
        tokenizer = T5TokenizerFast(
            tokenizer_file=str(file), eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
        )
    tokenizer.model_max_length = T5_MAX_LENGTH
    return tokenizer


def _clip(vocab_size: int, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def _t5(vocab_size: int, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def tiny_flux_transformer(
    seed: int = 0, *, guidance_embeds: bool = True, **overrides: Any
) -> FluxTransformer2DModel:
    """One double and one single block, hidden 32 (2 heads x 16), 64 packed input features."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": LATENT_CHANNELS * 4,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_WIDTH,
        "pooled_projection_dim": CLIP_HIDDEN,
        "guidance_embeds": guidance_embeds,
        "axes_dims_rope": (4, 4, 8),
    }
    return FluxTransformer2DModel(**{**kwargs, **overrides})


def build_tiny_flux_pipeline(seed: int = 0, *, schnell: bool = False) -> FluxPipeline:
    """An untrained tiny FluxPipeline on CPU (dev layout, or schnell: no guidance embedding)."""
    clip_tokenizer = build_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0 if schnell else 3.0,
        use_dynamic_shifting=not schnell,  # as the published dev / schnell scheduler configs
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(seed + 3, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1 VAE constants
        text_encoder=_clip(len(clip_tokenizer.get_vocab()), seed),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5(len(t5_tokenizer), seed + 1),
        tokenizer_2=t5_tokenizer,
        transformer=tiny_flux_transformer(seed + 2, guidance_embeds=not schnell),
    )


def save_tiny_flux(folder: str | Path, seed: int = 0, *, schnell: bool = False) -> Path:
    """Build and save a tiny FLUX folder (``model_index.json`` + parts + ``soar_lite.json``)."""
    folder = Path(folder)
    pipe = build_tiny_flux_pipeline(seed, schnell=schnell)
    with quiet_hub_libraries():
        pipe.save_pretrained(folder)
    write_vocab_files(folder / "tokenizer")
    settings = {"toy": "flux-schnell-v1" if schnell else "flux-dev-v1", "resolution": RESOLUTION,
                "max_sequence_length": T5_MAX_LENGTH}  # fmt: skip
    (folder / SETTINGS_FILE).write_text(
        json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return folder
