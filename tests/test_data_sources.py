"""Each dataset format in, the same checked items out; aspect-ratio buckets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from soar_lite.config import DataConfig
from soar_lite.data import (
    bucket_for,
    cover_crop,
    detect_format,
    load_items,
    load_pixels,
    make_buckets,
    read_image_bytes,
)
from soar_lite.errors import UserError

COLORS = [(220, 20, 20), (20, 20, 220), (20, 200, 20)]


def _images(folder: Path, names: list[str], size: tuple[int, int] = (16, 16)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, color in zip(names, COLORS, strict=False):
        Image.new("RGB", size, color).save(folder / name)


def _load(path: Path, **cfg) -> object:
    return load_items(DataConfig(path=str(path), **cfg))


def test_imagefolder_metadata_jsonl(tmp_path, caplog):
    _images(tmp_path, ["a.png", "b.png", "unlisted.png"])
    rows = [
        {"file_name": "a.png", "text": "a red square"},
        {"file_name": "b.png", "text": "  a blue\nsquare "},
        {"file_name": "gone.png", "text": "missing"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n[1, 2]\n")
    assert detect_format(tmp_path) == "imagefolder"
    report = _load(tmp_path)
    assert report.fmt == "imagefolder"
    assert [(it.name, it.caption) for it in report.items] == [
        ("a.png", "a red square"),
        ("b.png", "a blue square"),
    ]
    assert "skipped gone.png: listed in metadata.jsonl but missing" in caplog.text
    assert "skipped metadata.jsonl:4: not JSON" in caplog.text
    assert "skipped metadata.jsonl:5: not a JSON object" in caplog.text


def test_imagefolder_metadata_csv_under_a_split_with_a_named_caption_column(tmp_path):
    _images(tmp_path / "train" / "img", ["a.png", "b.png"])
    (tmp_path / "train" / "metadata.csv").write_bytes(
        b"file_name,caption,other\nimg/a.png,\x93quoted\x94 red,1\nimg/b.png,blue,2\n"  # cp1252 csv
    )
    with pytest.raises(
        UserError, match=r"no caption column 'text'; set data.caption_column to one of: caption"
    ):
        _load(tmp_path)
    report = _load(tmp_path, caption_column="caption")
    assert [(it.name, it.caption) for it in report.items] == [
        ("train/img/a.png", "“quoted” red"),
        ("train/img/b.png", "blue"),
    ]


def test_saved_hf_dataset_with_named_columns_and_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (16, 8), color) for color in COLORS]
    table = {"picture": images, "caption": ["red", "blue", ""], "n": [0, 1, 2]}
    features = datasets.Features(
        {"picture": datasets.Image(), "caption": datasets.Value("string"), "n": datasets.Value("int32")}
    )
    ds = datasets.Dataset.from_dict(table, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "ds"))
    assert detect_format(tmp_path / "ds") == "hf"
    with pytest.raises(UserError, match=r"has no column 'image'; set data.image_column to one of: picture"):
        _load(tmp_path / "ds")
    report = _load(tmp_path / "ds", image_column="picture", caption_column="caption")
    assert [(it.name, it.caption, it.width, it.height) for it in report.items] == [
        ("ds[0]", "red", 16, 8),
        ("ds[1]", "blue", 16, 8),
    ]  # row 2 has an empty caption: skipped
    pixels = load_pixels(read_image_bytes(report.items[1]), (16, 8))
    assert pixels[2].mean() > 0.5 and pixels[0].mean() < -0.5  # blue
    test_split = _load(tmp_path / "ds", image_column="picture", caption_column="caption", split="test")
    assert len(test_split.items) == 1
    with pytest.raises(UserError, match=r"has no split 'val'; set data.split to one of: train, test"):
        _load(tmp_path / "ds", image_column="picture", caption_column="caption", split="val")


def test_soar_reference_jsonl(tmp_path, caplog):
    _images(tmp_path / "imgs", ["0a1b.jpg", "2c3d.jpg"], size=(24, 16))
    rows = [
        {"md5": "0a1b", "caption_en": "a red thing", "bw": 48, "bh": 20},
        {"md5": "2c3d", "caption_en": "a blue thing", "bw": 32, "bh": 32},
        {"md5": "ffff", "caption_en": "not there", "bw": 32, "bh": 32},
        {"md5": "0a1b", "caption_en": "a duplicate", "bw": 32, "bh": 32},
    ]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert detect_format(jsonl) == "soar_jsonl"
    report = _load(jsonl, image_dir=str(tmp_path / "imgs"))
    assert [(it.name, it.caption) for it in report.items] == [
        ("0a1b.jpg", "a red thing"),
        ("2c3d.jpg", "a blue thing"),
    ]
    assert report.items[0].aspect == pytest.approx(48 / 20) and report.items[1].aspect == 1.0
    assert "skipped train.jsonl:3: image missing (ffff.jpg not in" in caplog.text
    assert "skipped 0a1b.jpg: duplicate name" in caplog.text
    # the reference's bucket shape (bw/bh) picks the bucket, not the stored image's own 3:2
    first = report.items[0]
    assert bucket_for(first.width, first.height, 32, 4, aspect=first.aspect) == (48, 20)


def test_a_file_that_is_not_a_jsonl_is_a_clear_error(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(UserError, match=r"is a file: expected a folder, or a SOAR \.jsonl file"):
        _load(tmp_path / "data.zip")


# ---------------------------------------------------------------- buckets


def test_buckets_hold_the_pixel_budget_in_multiples_and_mirror():
    buckets = make_buckets(1024, 16, 2.5)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert all(w * h <= 1024 * 1024 and w * h > 0.9 * 1024 * 1024 for w, h in buckets)
    assert all((h, w) in buckets for w, h in buckets)
    assert (1024, 1024) in buckets and max(w / h for w, h in buckets) <= 2.5


def test_bucket_choice_and_crop():
    assert bucket_for(32, 32, 32, 4) == (32, 32)  # the toy default stays one square bucket
    assert bucket_for(3000, 2000, 1024, 16) == (1248, 832)
    assert bucket_for(2000, 3000, 1024, 16) == (832, 1248)
    assert bucket_for(3000, 2000, 1024, 16, enabled=False) == (1024, 1024)
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # white centre third
    out = cover_crop(img, (60, 40))
    assert out.size == (60, 40)
    assert out.getpixel((30, 20)) == (255, 255, 255) and out.getpixel((0, 20))[0] < 255  # centred


def test_kohya_repeat_folders_repeat_and_caption_like_kohya(tmp_path):
    from PIL import Image

    from soar_lite.config import DataConfig
    from soar_lite.data import load_items

    root = tmp_path / "train"
    for folder, name, caption in [
        ("10_ohwx dog", "a", None),
        ("2_cat", "b", "a cat on a mat"),
        ("2024_trip", "c", "sea"),
    ]:
        (root / folder).mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 10, 10)).save(root / folder / f"{name}.png")
        if caption:
            (root / folder / f"{name}.txt").write_text(caption)
    report = load_items(DataConfig(path=str(root)))
    counts = {}
    for item in report.items:
        counts[(item.name, item.caption)] = counts.get((item.name, item.caption), 0) + 1
    assert counts == {
        ("10_ohwx dog/a.png", "ohwx dog"): 10,  # no caption file: the class text, as kohya does
        ("2_cat/b.png", "a cat on a mat"): 2,  # a caption file wins
        ("2024_trip/c.png", "sea"): 1,  # a year is not a repeat count
    }
    assert "kohya folder repeats: '10_ohwx dog' x10, '2_cat' x2" in report.summary()
    plain = load_items(DataConfig(path=str(root), kohya_folders=False, default_caption="x"))
    assert sorted((i.name, i.caption) for i in plain.items) == [
        ("10_ohwx dog/a.png", "x"),
        ("2024_trip/c.png", "sea"),
        ("2_cat/b.png", "a cat on a mat"),
    ]
