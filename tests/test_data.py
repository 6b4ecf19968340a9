"""The data stage: every bad-input case converted or skipped by name, before any model loads.

Images are made in each test (8-32 px); nothing here loads a model.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from soar_lite.config import DataConfig
from soar_lite.data import (
    decode_rgb,
    finish_caption,
    list_items,
    load_items,
    load_pixels,
    probe,
    read_image_bytes,
    verify_items,
)
from soar_lite.errors import UserError

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


def _image(path: Path, size: tuple[int, int] = (16, 16), color=RED, mode: str = "RGB", **save) -> Path:
    Image.new(mode, size, color).save(path, **save)
    return path


def _pair(folder: Path, name: str, caption: str | bytes | None = "a red square", **kwargs) -> Path:
    path = _image(folder / name, **kwargs)
    if caption is not None:
        raw = caption if isinstance(caption, bytes) else caption.encode("utf-8")
        path.with_suffix(".txt").write_bytes(raw)
    return path


def _load(folder: Path, **cfg) -> object:
    return load_items(DataConfig(path=str(folder), **cfg))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: a decompression bomb's shape, a few bytes big."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _mean_rgb(pixels: torch.Tensor) -> list[float]:
    return [round(float(c), 2) for c in ((pixels + 1) * 127.5).mean(dim=(1, 2))]


# ---------------------------------------------------------------- folder listing


def test_folder_pairs_images_with_captions_and_never_takes_txt_or_hidden_files(tmp_path):
    _pair(tmp_path, "a.png")
    _pair(tmp_path, "b.JPG", "a blue square", color=BLUE)
    (tmp_path / "sub").mkdir()
    _pair(tmp_path / "sub", "c.webp", "a green square", color=GREEN)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "readme.md").write_text("# no")
    (tmp_path / ".thumbs").mkdir()
    _pair(tmp_path / ".thumbs", "a.png")
    report = _load(tmp_path)
    assert sorted(it.name for it in report.items) == ["a.png", "b.JPG", "sub/c.webp"]
    assert {it.caption for it in report.items} == {"a red square", "a blue square", "a green square"}
    assert all(len(it.digest) == 64 and (it.width, it.height) == (16, 16) for it in report.items)
    assert len(report.skips) == 0
    assert [it.name for it in list_items(tmp_path)] == ["a.png", "b.JPG", "sub/c.webp"]  # the old entry point


def test_duplicate_names_keep_one_and_name_the_other(tmp_path, caplog):
    _pair(tmp_path, "dup.png")
    _image(tmp_path / "dup.jpg", color=BLUE)  # same stem: dup.txt cannot describe both
    with caplog.at_level(logging.WARNING):
        report = _load(tmp_path)
    assert [it.name for it in report.items] == ["dup.jpg"]
    assert "skipped dup.png: duplicate name (same name as dup.jpg" in caplog.text
    assert "1 skipped: 1 duplicate name" in caplog.text


# ---------------------------------------------------------------- damaged files


def test_zero_byte_corrupt_and_bomb_sized_images_are_skipped_by_name_with_a_summary(tmp_path, caplog):
    _pair(tmp_path, "good.png")
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "bomb.png").write_bytes(_png_header_only(20_000, 20_000))  # 400 MP claimed, 60 bytes
    for name in ("zero", "noise", "bomb"):
        (tmp_path / f"{name}.txt").write_text("a caption")
    with caplog.at_level(logging.WARNING):
        report = _load(tmp_path)
    assert [it.name for it in report.items] == ["good.png"]
    assert "skipped zero.png: empty file (0 bytes)" in caplog.text
    assert "skipped noise.jpg: not a readable image" in caplog.text
    assert "skipped bomb.png: decompression-bomb size (400 MP" in caplog.text
    summary = report.summary()
    assert "3 skipped: 1 decompression-bomb size, 1 empty file, 1 not a readable image" in summary
    assert summary in caplog.text


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_passes_the_header_check_and_fails_the_decode_check_by_name(tmp_path, fmt, caplog):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, fmt)
    data = buffer.getvalue()  # noise does not compress: the pixel data is most of the file
    path = tmp_path / ("cut.png" if fmt == "PNG" else "cut.jpg")
    path.write_bytes(data[: len(data) * 2 // 3])
    path.with_suffix(".txt").write_text("noise")
    _pair(tmp_path, "good.png")
    report = _load(tmp_path)
    assert len(report.items) == 2  # the header is intact
    with caplog.at_level(logging.WARNING):
        good, skips = verify_items(report.items)
    assert [it.name for it in good] == ["good.png"]
    assert f"skipped {path.name}: damaged image" in caplog.text and len(skips) == 1


# ---------------------------------------------------------------- conversions


def test_cmyk_palette_16bit_and_alpha_are_converted_to_the_right_rgb(tmp_path):
    _pair(tmp_path, "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0), quality=95)  # red in CMYK
    Image.new("RGB", (16, 16), BLUE).convert("P").save(tmp_path / "palette.png")
    (tmp_path / "palette.txt").write_text("blue")
    gray16 = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))
    assert gray16.mode.startswith("I")
    gray16.save(tmp_path / "gray16.png")
    (tmp_path / "gray16.txt").write_text("mid gray")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (*GREEN, 255)  # left half opaque green, right half fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    (tmp_path / "alpha.txt").write_text("green on nothing")
    report = _load(tmp_path)
    assert len(report.items) == 4
    assert report.conversions == {"CMYK": 1, "palette": 1, "16-bit": 1, "alpha": 1}
    pixels = {it.name: load_pixels(read_image_bytes(it), 16) for it in report.items}
    r, g, b = _mean_rgb(pixels["cmyk.jpg"])
    assert r > 200 and g < 40 and b < 40
    assert _mean_rgb(pixels["palette.png"]) == pytest.approx(list(BLUE), abs=3)
    assert _mean_rgb(pixels["gray16.png"]) == pytest.approx([128.0] * 3, abs=1.5)  # scaled, not clipped white
    alpha = (pixels["alpha.png"] + 1) * 127.5
    assert alpha[:, :, :6].mean(dim=(1, 2)).tolist() == pytest.approx(list(GREEN), abs=2)
    assert alpha[:, :, 10:].min() > 250  # transparent -> white, not the black hidden under it


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))
    img.save(tmp_path / "p.png", transparency=0)
    rgb = np.asarray(decode_rgb((tmp_path / "p.png").read_bytes()))
    assert rgb[:, :4].reshape(-1, 3).mean(0).tolist() == pytest.approx(list(RED), abs=1)
    assert rgb[:, 4:].min() == 255


def test_exif_orientation_is_applied_to_size_and_pixels(tmp_path):
    stored = np.zeros((8, 16, 3), dtype=np.uint8)  # 16 wide, 8 tall as stored
    stored[:, :8] = RED
    stored[:, 8:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left half ends up on top
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    (tmp_path / "phone.txt").write_text("a phone photo")
    report = _load(tmp_path)
    item = report.items[0]
    assert (item.width, item.height) == (8, 16) and report.conversions["EXIF-rotated"] == 1
    pixels = load_pixels(read_image_bytes(item), (8, 16))
    assert pixels.shape == (3, 16, 8)
    top, bottom = _mean_rgb(pixels[:, :6]), _mean_rgb(pixels[:, 10:])
    assert top[0] > 180 and top[2] < 60  # red on top
    assert bottom[2] > 180 and bottom[0] < 60  # blue below
    assert probe((tmp_path / "phone.jpg").read_bytes()).rotated


# ---------------------------------------------------------------- captions


def test_missing_empty_and_cp1252_captions(tmp_path, caplog):
    _pair(tmp_path, "none.png", caption=None)
    _pair(tmp_path, "blank.png", caption="  \n\t ")
    _pair(tmp_path, "quotes.png", caption=b"\x93smart\x94 quotes \x96 and a caf\xe9")  # cp1252
    _pair(tmp_path, "bom.png", caption="\ufeffutf-8 with a BOM")
    with caplog.at_level(logging.WARNING):
        report = _load(tmp_path)
    captions = {it.name: it.caption for it in report.items}
    assert captions == {"quotes.png": "“smart” quotes – and a café", "bom.png": "utf-8 with a BOM"}
    assert "skipped none.png: no caption (no none.txt; add one or set data.default_caption)" in caplog.text
    assert "skipped blank.png: no caption" in caplog.text
    assert report.conversions["cp1252 caption"] == 1
    with_default = _load(tmp_path, default_caption="a photo")
    assert {it.name: it.caption for it in with_default.items}["none.png"] == "a photo"
    assert {it.name: it.caption for it in with_default.items}["blank.png"] == "a photo"


def test_trigger_word_default_and_trimming():
    assert finish_caption("  a red\n circle ,  ", "", "") == "a red circle"
    assert finish_caption("a red circle", "", "sks") == "sks, a red circle"
    assert finish_caption("sks, a red circle", "", "sks") == "sks, a red circle"  # never twice
    assert finish_caption(None, "a photo", "sks") == "sks, a photo"
    assert finish_caption("", "", "sks") == ""  # trigger alone is no caption: skip, don't invent one


def test_trigger_word_reaches_every_item(tmp_path):
    _pair(tmp_path, "a.png", "a red square")
    assert _load(tmp_path, trigger_word="ohwx").items[0].caption == "ohwx, a red square"


# ---------------------------------------------------------------- whole-dataset errors


def test_empty_or_all_bad_dataset_is_one_user_error_before_any_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no usable captioned images in .*empty \(no image files\)"):
        _load(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    _pair(bad, "a.png", caption=None)
    (bad / "b.png").write_bytes(b"")
    (bad / "b.txt").write_text("a caption")
    with pytest.raises(UserError, match=r"\(2 skipped: 1 empty file, 1 no caption\)"):
        _load(bad)
    with pytest.raises(UserError, match="does not exist"):
        _load(tmp_path / "nowhere")


def test_config_validates_data_settings():
    with pytest.raises(UserError, match=r"data.format=.zip. is not valid; choose one of: auto, folder"):
        DataConfig(format="zip")
    with pytest.raises(UserError, match=r"data.caption_dropout=1.5 must be in \[0, 1\]"):
        DataConfig(caption_dropout=1.5)
    with pytest.raises(UserError, match="bucket_max_aspect"):
        DataConfig(bucket_max_aspect=0.5)
