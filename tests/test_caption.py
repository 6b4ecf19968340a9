"""Auto-captioning with a tiny BLIP built in code: only missing captions are written, existing ones
kept, damaged images skipped by name, nothing loaded when nothing is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from soar_lite import caption
from soar_lite.cli import main

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "red",
    "blue",
    "circle",
    "square",
    "on",
    "the",
    "photo",
]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer BLIP captioner whose decoder never ends early, so every caption has words."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny-blip")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), model_max_length=32)
    ids = {"bos_token_id": 2, "sep_token_id": 3, "eos_token_id": 3, "pad_token_id": 0}
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
    torch.manual_seed(0)
    config = BlipConfig(
        text_config={
            "vocab_size": len(WORDS),
            "max_position_embeddings": 128,
            "encoder_hidden_size": 32,
            **ids,
            **small,
        },
        vision_config={"image_size": 32, "patch_size": 8, **small},
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # no special token is ever the likeliest next one: captions are words
        model.text_decoder.cls.predictions.bias[:5] = -1e4
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


def _images(folder: Path) -> Path:
    folder.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (40, 30), color).save(folder / f"{i}.png")
    (folder / "1.txt").write_text("my own caption")
    (folder / "2.txt").write_text("  \n")  # empty: counts as missing
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def test_captions_only_what_is_missing_and_skips_damaged_images(tiny_blip, tmp_path):
    data = _images(tmp_path / "data")
    report = caption.caption_folder(data, str(tiny_blip), prefix="ohwx, ", max_new_tokens=6, progress=False)
    assert sorted(report.written) == ["0.png", "2.png"] and report.kept == 1
    assert [name for name, _ in report.failed] == ["broken.jpg"]
    assert (data / "1.txt").read_text() == "my own caption"
    for name in ("0", "2"):
        text = (data / f"{name}.txt").read_text().strip()
        words = text.removeprefix("ohwx, ").split()
        assert text.startswith("ohwx, ") and 1 <= len(words) <= 6 and set(words) <= set(WORDS[5:])
    assert sorted(p.name for p in data.iterdir()) == [  # no temp file left behind
        "0.png", "0.txt", "1.png", "1.txt", "2.png", "2.txt", "broken.jpg"
    ]  # fmt: skip


def test_nothing_missing_loads_no_model_and_overwrite_recaptions(tiny_blip, tmp_path, monkeypatch):
    data = _images(tmp_path / "data")
    (data / "broken.jpg").unlink()
    caption.caption_folder(data, str(tiny_blip), max_new_tokens=4, progress=False)
    monkeypatch.setattr(caption, "_load", lambda *a: pytest.fail("loaded a model with nothing to caption"))
    assert caption.caption_folder(data, "no/such-model", progress=False).written == []
    monkeypatch.undo()
    again = caption.caption_folder(data, str(tiny_blip), overwrite=True, prompt="a photo", progress=False)
    assert sorted(again.written) == ["0.png", "1.png", "2.png"]
    assert (data / "1.txt").read_text().startswith("a photo")  # BLIP continues the prompt


def test_cli_captions_and_a_missing_model_is_one_line(tiny_blip, tmp_path, capsys):
    data = _images(tmp_path / "data")
    assert main(["caption", "--data", str(data), "--model", str(tiny_blip), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("caption: wrote 2, kept 1 existing; skipped 1: broken.jpg")
    (data / "0.txt").unlink()
    assert main(["caption", "--data", str(data), "--model", str(tmp_path / "nope"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("soar-lite: error: cannot load captioning model") and err.count("\n") == 1


def test_florence_models_get_their_task_token():
    assert caption.default_prompt("florence-community/Florence-2-base") == "<MORE_DETAILED_CAPTION>"
    assert caption.default_prompt("Salesforce/blip-image-captioning-large") == ""


def test_the_app_captions_the_dataset_in_use(tiny_blip, tmp_path):
    from app.main import caption_missing
    from soar_lite.app_guard import Roots

    data = _images(tmp_path / "data")
    (data / "broken.jpg").unlink()
    roots = Roots.of(tmp_path / "runs", [data, tiny_blip])  # the app may use only allowed folders
    text, gallery, table = caption_missing(str(data), str(tiny_blip), roots)
    assert text.startswith("caption: wrote 2, kept 1 existing") and len(gallery) == 3
    assert all(str(c).strip() for c in table["caption"])


def test_a_table_dataset_is_refused_with_the_reason(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(caption.UserError, match="plain folder of images"):
        caption.caption_folder(tmp_path, "unused", progress=False)
