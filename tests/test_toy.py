"""The built-in tiny default: shapes data, the local tiny SD3 pipeline and its build-once cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from soar_lite.toy import pretrain
from soar_lite.toy.shapes import (
    COLORS,
    NOVEL_COLORS,
    POSITIONS,
    VOCAB_WORDS,
    all_captions,
    caption_attributes,
    novel_captions,
    shapes_dataset,
    write_shapes_folder,
)
from soar_lite.toy.tiny_sd3 import (
    MAX_SEQUENCE_LENGTH,
    build_tiny_components,
    build_tiny_pipeline,
    build_tokenizer,
    build_vocab_and_merges,
    load_tiny_pipeline,
    read_toy_settings,
    save_tiny_pipeline,
)

RUN = {"num_inference_steps": 2, "height": 32, "width": 32, "max_sequence_length": 4, "output_type": "np"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(one_thread):
    return build_tiny_pipeline(seed=0)


# ---------------------------------------------------------------- shapes


def test_dataset_is_deterministic_per_seed():
    first, again, other = shapes_dataset(6, seed=3), shapes_dataset(6, seed=3), shapes_dataset(6, seed=4)
    assert [c for _, c, _ in first] == [c for _, c, _ in again]
    assert all(a.tobytes() == b.tobytes() for (a, _, _), (b, _, _) in zip(first, again, strict=True))
    assert [a.tobytes() for a, _, _ in first] != [b.tobytes() for b, _, _ in other]
    image, caption, attrs = first[0]
    assert image.size == (32, 32) and image.mode == "RGB"
    assert caption_attributes(caption) == {k: attrs[k] for k in ("color", "shape", "position")}


def test_shape_has_its_colour_at_its_place():
    """What a rule-based scorer relies on: the pixel at the attrs' centre is the named colour."""
    for image, _, attrs in shapes_dataset(20, seed=0, size=32):
        x, y = (round(v * 31) for v in attrs["center"])
        pixel = np.asarray(image)[y, x].astype(int)
        assert np.abs(pixel - np.array(COLORS[attrs["color"]])).max() < 40, attrs


def test_captions_use_only_the_fixed_vocabulary():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 5 * 3 * len(POSITIONS)
    novel = novel_captions()
    assert len(novel) == len(NOVEL_COLORS) * 3 * len(POSITIONS) and not set(novel) & set(captions)
    words = {word for caption in captions + novel for word in caption.split()}
    assert words == set(VOCAB_WORDS)
    with pytest.raises(ValueError):
        caption_attributes("a photo of a cat")


def test_write_shapes_folder_is_kohya_style_and_skips_when_complete(tmp_path):
    folder = write_shapes_folder(tmp_path / "shapes", n=5, seed=1, size=16)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{i:04d}{ext}" for i in range(5) for ext in (".png", ".txt")]
    assert (folder / "0000.txt").read_text(encoding="utf-8") == shapes_dataset(1, seed=1, size=16)[0][1]
    stamp = (folder / "0000.png").stat().st_mtime_ns
    assert write_shapes_folder(folder, n=5, seed=1, size=16) == folder
    assert (folder / "0000.png").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no temporary folder left behind


# ---------------------------------------------------------------- tokenizer and pipeline


def test_tokenizer_has_every_caption_word_as_one_known_token():
    tokenizer = build_tokenizer()
    for caption in all_captions():
        ids = tokenizer(caption).input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert tokens == ["<|startoftext|>", *(w + "</w>" for w in caption.split()), "<|endoftext|>"]
        assert len(ids) <= tokenizer.model_max_length


def test_bpe_merges_keep_overlapping_words_whole():
    """'to' inside 'bottom' or 'otto' must not break their own merge chains."""
    words = ("to", "top", "bottom", "otto", "tot", "a", "at")
    vocab, merges = build_vocab_and_merges(words)
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    from soar_lite.toy.tiny_sd3 import _bpe

    for word in words:
        assert _bpe(word, ranks) == [word + "</w>"]
        assert word + "</w>" in vocab


def test_components_follow_the_documented_shape():
    parts = build_tiny_components(seed=0)
    config = parts["transformer"].config
    assert config.attention_head_dim * config.num_attention_heads == 64 * config.num_layers  # ComfyUI
    assert config.in_channels == parts["vae"].config.latent_channels == 16
    clip = [parts[name].config for name in ("text_encoder", "text_encoder_2")]
    assert config.joint_attention_dim >= sum(c.hidden_size for c in clip)
    assert config.pooled_projection_dim == sum(c.projection_dim for c in clip)
    assert parts["text_encoder_3"] is None and parts["tokenizer_3"] is None
    again = build_tiny_components(seed=0)["transformer"].state_dict()
    assert all(torch.equal(v, again[k]) for k, v in parts["transformer"].state_dict().items())


def test_pipeline_runs_two_steps_at_32px(pipe):
    images = pipe(["a red circle at the top left", "a blue square at the center"], **RUN).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt="a red circle",
        prompt_2=None,
        prompt_3=None,
        device="cpu",
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    assert embeds.shape == (1, pipe.tokenizer.model_max_length + MAX_SEQUENCE_LENGTH, 64)
    assert pooled.shape == (1, 64)


def test_save_and_reload_roundtrip(pipe, tmp_path):
    folder = save_tiny_pipeline(pipe, tmp_path / "tiny")
    assert read_toy_settings(folder) == {"max_sequence_length": 4, "resolution": 32, "toy": "shapes-v2"}
    assert (folder / "tokenizer" / "vocab.json").is_file() and (
        folder / "tokenizer_2" / "merges.txt"
    ).is_file()
    reloaded = load_tiny_pipeline(folder)
    assert reloaded.text_encoder_3 is None and reloaded.tokenizer_3 is None
    assert reloaded.tokenizer_max_length == pipe.tokenizer_max_length
    prompt = "a green triangle at the bottom right"
    before = pipe(prompt, generator=torch.Generator().manual_seed(0), **RUN).images
    after = reloaded(prompt, generator=torch.Generator().manual_seed(0), **RUN).images
    np.testing.assert_allclose(before, after, atol=1e-6)


# ---------------------------------------------------------------- build once, cache, never trust half


TINY = {"vae_steps": 5, "transformer_steps": 5, "num_images": 48, "progress": False}


def test_ensure_tiny_base_builds_once_and_reuses(tmp_path, monkeypatch):
    folder = pretrain.ensure_tiny_base(tmp_path, **TINY)
    assert pretrain.is_complete(folder) and folder.parent.parent == tmp_path
    settings = read_toy_settings(folder)
    assert settings["max_sequence_length"] == 4 and settings["recipe"]["transformer_steps"] == 5
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 1.0 and vae["shift_factor"] != 0.0  # set from the trained encoder
    images = load_tiny_pipeline(folder)("a red circle at the top", **RUN).images
    assert np.isfinite(images).all()

    def fail(*args, **kwargs):
        raise AssertionError("a complete base must not be rebuilt")

    monkeypatch.setattr(pretrain, "build_tiny_base", fail)
    assert pretrain.ensure_tiny_base(tmp_path, **TINY) == folder
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # no temporary folder left


def test_changed_settings_name_a_new_base(tmp_path):
    base = pretrain.ToyRecipe()
    folders = {
        pretrain.tiny_base_folder(tmp_path, r)
        for r in (base, pretrain.ToyRecipe(vae_steps=7), pretrain.ToyRecipe(seed=1))
    }
    assert len(folders) == 3
    assert pretrain.tiny_base_folder(tmp_path, pretrain.ToyRecipe()) == pretrain.tiny_base_folder(
        tmp_path, base
    )


def _fake_build(calls: list[Path]):
    def build(folder: Path, recipe, *, progress=True):
        calls.append(folder)
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        return {"fake": True}

    return build


def test_interrupted_build_is_not_trusted(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(pretrain, "build_tiny_base", _fake_build(calls))
    recipe = pretrain.ToyRecipe(vae_steps=5, transformer_steps=5, num_images=48)
    final = pretrain.tiny_base_folder(tmp_path, recipe)
    final.mkdir(parents=True)
    (final / "model_index.json").write_text("{}")  # looks like a pipeline, but no completion marker
    stale = final.parent / f".{final.name}.tmp-{2**22 + 17}-dead00"  # a pid above Linux's pid_max
    stale.mkdir()

    assert pretrain.ensure_tiny_base(tmp_path, **TINY) == final
    assert len(calls) == 1 and calls[0] != final and not calls[0].exists()  # built aside, then renamed
    assert pretrain.is_complete(final) and not stale.exists()
    assert pretrain.ensure_tiny_base(tmp_path, **TINY) == final and len(calls) == 1


def test_failed_build_leaves_nothing_to_trust(tmp_path, monkeypatch):
    def crash(folder: Path, recipe, *, progress=True):
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "build_tiny_base", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain.ensure_tiny_base(tmp_path, **TINY)
    assert [p.suffix for p in (tmp_path / "toy").iterdir()] in ([], [".lock"])


def test_default_home_is_soar_lite_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SOAR_LITE_HOME", str(tmp_path))
    calls: list[Path] = []
    monkeypatch.setattr(pretrain, "build_tiny_base", _fake_build(calls))
    folder = pretrain.ensure_tiny_base(**TINY)
    assert folder.is_relative_to(tmp_path) and os.path.isdir(folder)
