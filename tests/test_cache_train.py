"""The cache stage with the real tiny SD3 pipeline, and training from it (buckets, caption dropout)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from soar_lite import config, train
from soar_lite.errors import UserError
from soar_lite.families.sd3 import SD3Family
from soar_lite.lora import LORA_FILE
from tests.conftest import ctrl_c_at, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts SD3Family loads (and which parts), prompts and images encoded, encoder frees."""
    counts: Counter = Counter()
    real_load, real_prompts = SD3Family.load, SD3Family.encode_prompts
    real_images, real_free = SD3Family.encode_images, SD3Family.free_encoders

    def load(*args, **kwargs):
        counts["loads"] += 1
        counts["text_encoders"] += kwargs.get("text_encoders", True)
        return real_load(*args, **kwargs)

    def prompts(self, batch):
        counts["prompts"] += len(batch)
        return real_prompts(self, batch)

    def images(self, pixels):
        counts["images"] += pixels.shape[0]
        return real_images(self, pixels)

    def free(self):
        counts["freed"] += 1
        return real_free(self)

    monkeypatch.setattr(SD3Family, "load", load)
    monkeypatch.setattr(SD3Family, "encode_prompts", prompts)
    monkeypatch.setattr(SD3Family, "encode_images", images)
    monkeypatch.setattr(SD3Family, "free_encoders", free)
    return counts


def _prepare(model: Path, data: Path, cache_dir: Path, **extra) -> object:
    overrides = tiny_overrides(
        **{"model.path": model, "data.path": data, "data.cache_dir": cache_dir, **extra}
    )
    cfg = config.load_config("cpu-tiny", overrides)
    return train.prepare_data(cfg, str(model), cache_dir, train.make_accelerator(cfg), False)


def test_tiny_pipeline_cache_reuse_and_one_touched_caption(tiny_model_dir, tiny_data_dir, tmp_path, counted):
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    first = _prepare(tiny_model_dir, data, tmp_path / "cache", **{"validation.num_prompts": 2})
    assert (counted["loads"], counted["images"], counted["freed"]) == (1, 12, 1)
    assert len(first) == 12 and first.latents[0].shape[1:] == (16, 16, 16)
    counted.clear()
    again = _prepare(tiny_model_dir, data, tmp_path / "cache", **{"validation.num_prompts": 2})
    assert counted == Counter(), "a complete cache loaded a model or ran an encoder"
    for a, b in zip(first.latents, again.latents, strict=True):
        assert torch.equal(a, b)
    (data / "0005.txt").write_text("a blue circle at the center")
    _prepare(tiny_model_dir, data, tmp_path / "cache", **{"validation.num_prompts": 2})
    assert (counted["loads"], counted["text_encoders"], counted["prompts"], counted["images"]) == (1, 1, 1, 0)
    assert counted["freed"] == 1


def test_unusable_dataset_fails_before_any_model_loads(tiny_model_dir, tmp_path, counted):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    (tmp_path / "bad" / "a.txt").write_text("a caption")
    with pytest.raises(UserError, match=r"no usable captioned images .*\(1 skipped: 1 empty file\)"):
        _prepare(tiny_model_dir, tmp_path / "bad", tmp_path / "cache")
    assert counted["loads"] == 0


def _mixed_data(folder: Path) -> Path:
    """Eight shapes: four square, four 2:1 landscape (two buckets at 32 px)."""
    folder.mkdir()
    colors = [(220, 40, 40), (40, 80, 220), (40, 180, 60), (235, 210, 40)]
    for i in range(8):
        size = (32, 32) if i < 4 else (64, 32)
        img = Image.new("RGB", size, (235, 235, 235))
        img.paste(colors[i % 4], (8, 8, 20, 20))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(
            f"a {['red', 'blue', 'green', 'yellow'][i % 4]} square at the top left"
        )
    return folder


def test_buckets_and_caption_dropout_train_and_resume_exactly(tiny_model_dir, tmp_path):
    """Two buckets (batches never mix them), caption dropout drawn per batch: resume is still exact."""
    data = _mixed_data(tmp_path / "mixed")
    knobs = {
        "model.path": tiny_model_dir, "data.path": data, "data.cache_dir": tmp_path / "cache",
        "batch_size": 2, "caption_dropout": 0.5, "trigger_word": "ohwx", "steps": 4,
    }  # fmt: skip
    cfg = config.load_config("cpu-tiny", tiny_overrides(**knobs))
    straight = load_file(str(train.train(cfg, tmp_path / "a", progress=False) / LORA_FILE))
    data_ = train.prepare_data(cfg, str(tiny_model_dir), tmp_path, train.make_accelerator(cfg), False)
    assert sorted(z.shape[2:] for z in data_.latents) == [(10, 22), (16, 16)]  # 44x20 and 32x32 px
    assert all(c.startswith("ohwx, ") for c in data_.captions)
    with ctrl_c_at(2), pytest.raises(UserError, match="interrupted at step 2"):
        train.train(cfg, tmp_path / "b", progress=False)
    resumed = load_file(str(train.train(cfg, tmp_path / "b", resume="latest", progress=False) / LORA_FILE))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_cache_command_caches_into_output_and_bad_data_is_one_line(
    tiny_model_dir, tiny_data_dir, tmp_path, capsys
):
    from soar_lite.cli import main

    args = ["cache", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--quiet"]
    assert main([*args, "--output", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "cached 12 items in 1 bucket(s); manifest: " in out
    assert (tmp_path / "c" / "store-v2" / "manifests").is_dir()
    (tmp_path / "empty").mkdir()
    assert main(["cache", "--model", str(tiny_model_dir), "--data", str(tmp_path / "empty"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"soar-lite: error: no usable captioned images in {tmp_path / 'empty'} (no image files)"]
