"""A tiny, fully local StableDiffusion3Pipeline: the architecture of SD3, small enough for a CPU.

Why: tests, the CLI's default run and the benchmarks need a real SD3-family pipeline (same classes,
same saved layout, same ``encode_prompt``) without a download. Modelled on diffusers'
``get_dummy_components`` for SD3, with three deliberate differences:

* the CLIP tokenizers are built here from a BPE over the toy captions' words
  (``shapes.VOCAB_WORDS``), each word one token, so every toy caption is in-vocabulary;
* the sizes follow the toy (32 px RGB -> 16x16x16 latents; hidden 128 = 64 x depth 2, which is what
  ComfyUI needs to recognise an SD3 transformer);
* the text sequence is short (``TOKENIZER_MAX_LENGTH`` CLIP tokens + ``MAX_SEQUENCE_LENGTH`` zero
  "T5" tokens), because text length dominates the step time of a model this small.

A saved folder carries ``soar_lite.json`` (``TOY_SETTINGS``) so that whoever loads it knows which
``max_sequence_length`` and resolution it was trained with.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from soar_lite.toy.shapes import VOCAB_WORDS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_MAX_LENGTH = 10  # longest toy caption is 7 words + BOS + EOS
MAX_SEQUENCE_LENGTH = 4  # zero "T5" tokens the pipeline appends when text_encoder_3 is None
RESOLUTION = 32
CLIP_HIDDEN = 32
CLIP_PROJECTION = 32
SETTINGS_FILE = "soar_lite.json"
# Bump "toy" when the architecture or the shapes data change: it is part of the cached base's name.
TOY_SETTINGS: dict[str, Any] = {
    "toy": "shapes-v2",
    "resolution": RESOLUTION,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
}

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP-style BPE of one word (last symbol carries ``</w>``): merge the best-ranked pair until none."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i, pair) for i, pair in enumerate(itertools.pairwise(symbols))]
        rank, _, best = min(pairs)
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_vocab_and_merges(words: tuple[str, ...] = VOCAB_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary in which every word of ``words`` is the single token ``word</w>``.

    Merges are added word by word after simulating BPE with the merges so far, so a later word's
    merges (higher rank) can never split an earlier word: each word's own chain always fires first.
    """
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for symbol in [*_ALPHABET, *(c + "</w>" for c in _ALPHABET)]:
        vocab.setdefault(symbol, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe(word, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(ranks)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab.setdefault(symbols[0], len(vocab))
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    return vocab, merges


def write_vocab_files(folder: str | Path) -> None:
    """Write ``vocab.json`` + ``merges.txt``: the files any CLIPTokenizer (slow or fast) builds from."""
    vocab, merges = build_vocab_and_merges()
    Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_tokenizer(model_max_length: int = TOKENIZER_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIPTokenizer loaded from a ``vocab.json`` + ``merges.txt`` written to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="soar-lite-tok-") as folder:
        write_vocab_files(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)
    check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer: CLIPTokenizer, words: tuple[str, ...] = VOCAB_WORDS) -> None:
    """Fail loudly if any caption word is not exactly one known token (it would silently become EOS)."""
    for word in words:
        tokens = tokenizer.tokenize(word)
        if tokens != [word + "</w>"]:
            raise ValueError(f"tiny tokenizer splits {word!r} into {tokens}; expected one token")


def _text_encoder(vocab_size: int, seed: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=CLIP_PROJECTION,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,  # not 2: with eos 2 CLIP pools at argmax(id) (legacy), here at the first EOS
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def tiny_vae(seed: int, *, scaling_factor: float = 1.0, shift_factor: float = 0.0) -> AutoencoderKL:
    """The toy's 16-channel VAE (downscale 2); the SD3 toy sets its scaling from its trained latents
    (pretrain.py), a FLUX folder takes FLUX.1's constants."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),  # two blocks: downscale factor 2, 32 px -> 16x16 latents
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        mid_block_add_attention=False,  # 3.5x cheaper to train than (32, 64) with attention, same look
        sample_size=RESOLUTION,
        scaling_factor=scaling_factor,  # SD3 toy: set from the trained encoder's latents by pretrain.py
        shift_factor=shift_factor,
        use_quant_conv=False,  # as SD3's VAE
        use_post_quant_conv=False,
    )


def _transformer(seed: int, layers: int = 2) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=RESOLUTION // 2,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=64,
        num_attention_heads=2,  # hidden 128 = 64 x depth: ComfyUI's SD3 detection rule
        joint_attention_dim=2 * CLIP_HIDDEN,  # the two CLIP hidden states, concatenated on features
        caption_projection_dim=128,
        pooled_projection_dim=2 * CLIP_PROJECTION,
        pos_embed_max_size=32,  # up to 128 px images (64 latent px / patch 2)
    )


def tiny_sd3_transformer(seed: int = 0, **overrides: Any) -> SD3Transformer2DModel:
    """A small SD3 transformer for measurements and interop tests (2 layers, hidden 128, 64-wide
    text features): the planner's coefficient checks, the step bench and the export tests each
    override only what they vary (depth, dual attention, qk-norm, widths)."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    return SD3Transformer2DModel(**{**kwargs, **overrides})


def build_tiny_components(seed: int = 0, *, layers: int = 2, shift: float = 3.0) -> dict[str, Any]:
    """The untrained components of the tiny pipeline, each from a fixed seed (same seed, same weights).

    ``layers`` and ``shift`` are the trained base's choices (pretrain.ToyRecipe: 4 and 1.0, what it
    takes to draw the shapes); the machinery tests keep the cheaper 2 layers and SD3's shift 3.
    """
    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer()
    vocab_size = len(tokenizer.get_vocab())
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift),
        "text_encoder": _text_encoder(vocab_size, seed),
        "text_encoder_2": _text_encoder(vocab_size, seed + 1),
        "text_encoder_3": None,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": None,
        "transformer": _transformer(seed + 2, layers),
        "vae": tiny_vae(seed + 3),
        "image_encoder": None,
        "feature_extractor": None,
    }


def build_tiny_pipeline(seed: int = 0, *, layers: int = 2, shift: float = 3.0) -> StableDiffusion3Pipeline:
    """An untrained tiny StableDiffusion3Pipeline on CPU (see ``ensure_tiny_base`` for a trained one)."""
    return StableDiffusion3Pipeline(**build_tiny_components(seed, layers=layers, shift=shift))


def save_tiny_pipeline(
    pipe: StableDiffusion3Pipeline, folder: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """``save_pretrained`` plus ``soar_lite.json`` (``TOY_SETTINGS`` and ``extra``) in the folder root.

    The tokenizer folders also get ``vocab.json`` + ``merges.txt``: transformers 5 saves only
    ``tokenizer.json``, which the slow CLIPTokenizer of transformers 4 cannot read.
    """
    folder = Path(folder)
    with quiet_hub_libraries():
        pipe.save_pretrained(folder)
    for name in ("tokenizer", "tokenizer_2"):
        if (folder / name).is_dir():
            write_vocab_files(folder / name)
    settings = {**TOY_SETTINGS, **(extra or {})}
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    (folder / SETTINGS_FILE).write_text(text, encoding="utf-8")
    return folder


def load_tiny_pipeline(folder: str | Path) -> StableDiffusion3Pipeline:
    """Reload a saved tiny pipeline (no T5: ``text_encoder_3`` and ``tokenizer_3`` stay None)."""
    with quiet_hub_libraries():
        return StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)


def read_toy_settings(folder: str | Path) -> dict[str, Any]:
    """The ``soar_lite.json`` of a saved tiny pipeline (max_sequence_length, resolution, toy version)."""
    return json.loads((Path(folder) / SETTINGS_FILE).read_text(encoding="utf-8"))


@contextlib.contextmanager
def quiet_hub_libraries() -> Iterator[None]:
    """Silence diffusers/transformers for a block: their per-part bars and the expected
    "text_encoder_3=None cannot be saved" warning are noise for a model this small.
    The previous verbosity and progress-bar settings are restored afterwards."""
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in _HUB_LOGGING]
    for lib in _HUB_LOGGING:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


_HUB_LOGGING = (diffusers_logging, transformers_logging)
