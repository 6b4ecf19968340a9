"""The content-addressed cache: reuse, exact invalidation, atomicity under kills, batches from it.

Runs on a stand-in model folder (config files and small "weight" files that fingerprinting reads)
and stand-in encoders that count what they encode, so every test takes milliseconds to seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from soar_lite import cache
from soar_lite.config import DataConfig
from soar_lite.data import load_items
from soar_lite.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
COLORS = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 210, 40), (150, 60, 190), (30, 30, 30)]


def fake_model(folder: Path) -> Path:
    """A pipeline folder as fingerprinting sees it: VAE factor 2 x patch 2 = multiples of 4."""
    files = {
        "model_index.json": json.dumps(
            {"vae": ["diffusers", "A"], "text_encoder": ["transformers", "B"],
             "tokenizer": ["transformers", "C"], "text_encoder_3": [None, None]}
        ),
        "vae/config.json": json.dumps({"block_out_channels": [8, 8]}),
        "vae/weights.safetensors": "vae v1",
        "text_encoder/weights.safetensors": "clip v1",
        "tokenizer/vocab.json": "{}",
        "transformer/config.json": json.dumps({"patch_size": 2, "joint_attention_dim": 4}),
    }  # fmt: skip
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def fake_data(folder: Path, n: int = 6, sizes: list[tuple[int, int]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = sizes[i % len(sizes)] if sizes else (16, 16)
        Image.new("RGB", size, COLORS[i % len(COLORS)]).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"caption {i}")
    return folder


class FakeEncoders:
    """Deterministic stand-in encoders that count what they encode (no model, microseconds)."""

    def __init__(self, counts: Counter) -> None:
        self.counts = counts

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.counts["prompts"] += len(prompts)
        rows = [
            torch.tensor(list(hashlib.sha256(p.encode()).digest()[:12]), dtype=torch.float32) for p in prompts
        ]
        embeds = torch.stack(rows).reshape(len(prompts), 3, 4)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": embeds.mean(1)}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.counts["images"] += pixels.shape[0]
        return F.avg_pool2d(pixels, 2)

    def free_encoders(self) -> None:
        self.counts["freed"] += 1


def cache_once(
    data: Path, model: Path, root: Path, encoders: type = FakeEncoders, counts: Counter | None = None, **spec
) -> cache.CacheResult:
    """Items of ``data`` through :func:`cache.prepare` with stand-in encoders; ``counts`` gets the calls."""
    counts = Counter() if counts is None else counts

    def load(images: bool, texts: bool) -> FakeEncoders:
        counts["loads"] += 1
        counts["load_images"] += images
        counts["load_texts"] += texts
        return encoders(counts)

    items = load_items(DataConfig(path=str(data))).items
    settings = {"resolution": 16, **spec}
    return cache.prepare(items, ["caption 0", "a validation prompt"], cache.CacheSpec(str(model), **settings),
                         root, load, progress=False)  # fmt: skip


def _tensors(result: cache.CacheResult) -> dict[str, torch.Tensor]:
    data = cache.load_cache(result.manifest)
    out = {f"latents{i}": z for i, z in enumerate(data.latents)}
    out.update({f"text.{k}": v for k, v in data.text.items()})
    out.update({f"empty.{k}": v for k, v in data.empty.items()})
    out.update({f"validation.{k}": v for k, v in data.validation.items()})
    return out


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    return fake_data(tmp_path / "data"), fake_model(tmp_path / "model"), tmp_path / "cache"


# ---------------------------------------------------------------- reuse and invalidation


def test_first_run_encodes_everything_once_second_run_loads_no_encoder(setup):
    data, model, root = setup
    first = Counter()
    result = cache_once(data, model, root, counts=first)
    # 6 captions + the empty prompt + 1 validation prompt that is not a caption
    assert (first["images"], first["prompts"], first["loads"], first["freed"]) == (6, 8, 1, 1)
    assert (result.items, result.encoded_images, result.encoded_texts) == (6, 6, 8)
    second = Counter()
    again = cache_once(data, model, root, counts=second)
    assert second == Counter(), "a complete cache loaded or ran an encoder"
    assert (again.reused_images, again.reused_texts, again.manifest) == (6, 8, result.manifest)
    assert [p.name for p in root.iterdir()] == [cache.STORE_NAME]


def test_touching_one_caption_reencodes_exactly_that_caption(setup):
    data, model, root = setup
    cache_once(data, model, root)
    (data / "03.txt").write_text("a brand new caption")
    counts = Counter()
    result = cache_once(data, model, root, counts=counts)
    assert (counts["prompts"], counts["images"], counts["load_images"], counts["load_texts"]) == (1, 0, 0, 1)
    assert "a brand new caption" in cache.load_cache(result.manifest).captions


def test_editing_one_image_reencodes_exactly_that_image(setup):
    data, model, root = setup
    cache_once(data, model, root)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(data / "04.png")
    counts = Counter()
    result = cache_once(data, model, root, counts=counts)
    assert (counts["images"], counts["prompts"], counts["load_images"], counts["load_texts"]) == (1, 0, 1, 0)
    fresh = cache_once(data, model, root.with_name("fresh"))
    for key, value in _tensors(fresh).items():
        assert torch.equal(value, _tensors(result)[key]), key


def test_changed_resolution_encoder_files_or_sequence_length_are_never_served_stale(setup):
    data, model, root = setup
    cache_once(data, model, root)
    counts = Counter()
    cache_once(data, model, root, counts=counts, resolution=8)
    assert (counts["images"], counts["prompts"]) == (6, 0)
    (model / "text_encoder" / "weights.safetensors").write_text("clip v2")
    counts = Counter()
    cache_once(data, model, root, counts=counts)
    assert (counts["images"], counts["prompts"]) == (0, 8)
    counts = Counter()
    cache_once(data, model, root, counts=counts, max_sequence_length=77)
    assert (counts["images"], counts["prompts"]) == (0, 8)
    (model / "vae" / "weights.safetensors").write_text("vae v2")
    counts = Counter()
    cache_once(data, model, root, counts=counts)
    assert (counts["images"], counts["prompts"]) == (6, 0)


def test_a_shared_cache_serves_another_dataset_with_the_same_images(setup, tmp_path):
    data, model, root = setup
    cache_once(data, model, root)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("00.png", "00.txt", "01.png", "01.txt"):
        (other / name).write_bytes((data / name).read_bytes())
    (other / "extra.png").write_bytes((data / "05.png").read_bytes())
    (other / "extra.txt").write_text("caption 5")
    counts = Counter()
    cache_once(other, model, root, counts=counts)
    assert counts == Counter()


# ---------------------------------------------------------------- interrupted runs


class _FailingEncoders(FakeEncoders):
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.counts["images"] >= 2:
            raise RuntimeError("injected failure mid-cache")
        return super().encode_images(pixels)


def test_exception_mid_cache_keeps_finished_shards_frees_encoders_and_rerun_completes(setup, monkeypatch):
    data, model, root = setup
    monkeypatch.setattr(cache.encode, "ENCODE_BATCH", 2)
    counts = Counter()
    with pytest.raises(RuntimeError, match="injected"):
        cache_once(data, model, root, encoders=_FailingEncoders, counts=counts)
    assert counts["freed"] == 1  # encoders freed even when encoding failed
    rerun = Counter()
    result = cache_once(data, model, root, counts=rerun)
    assert (rerun["images"], rerun["prompts"]) == (4, 0)  # 2 images and all prompts survived
    clean = cache_once(data, model, root.with_name("clean"))
    got, want = _tensors(result), _tensors(clean)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from soar_lite import cache
from tests.test_cache import FakeEncoders, cache_once

cache.encode.ENCODE_BATCH = 2
real_save = cache.store.save_file
where = sys.argv[5]

def save(tensors, path, metadata=None):
    image_shard = any(k.endswith(".latents") for k in tensors)
    if image_shard and where == "before-write" and os.path.exists(path + ".armed"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(tensors, path, metadata=metadata)
    if image_shard and where == "after-write-before-rename" and cache_once.done >= 1:
        os.kill(os.getpid(), signal.SIGKILL)  # a complete temp file that was never renamed
    cache_once.done = getattr(cache_once, "done", 0) + image_shard

cache_once.done = 0
cache.store.save_file = save

class Dying(FakeEncoders):
    def encode_images(self, pixels):
        if where == "mid-encode" and self.counts["images"] >= 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode_images(pixels)

cache_once(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), encoders=Dying)
"""


@pytest.mark.parametrize("where", ["mid-encode", "after-write-before-rename"])
def test_killed_cache_process_leaves_nothing_trusted_and_rerun_is_complete_and_correct(setup, where):
    data, model, root = setup
    args = [sys.executable, "-c", KILL_SCRIPT, str(data), str(model), str(root), str(ROOT), where]
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    shards = root / cache.STORE_NAME / "shards"
    leftovers = list(shards.glob(".tmp-*"))
    assert bool(leftovers) == (where == "after-write-before-rename")
    counts = Counter()
    result = cache_once(data, model, root, counts=counts)
    assert counts["images"] == (2 if where == "mid-encode" else 4)  # finished shards are reused
    assert counts["prompts"] == 0
    assert not list(shards.glob(".tmp-*")), "the dead process's temp file was not cleaned up"
    clean = cache_once(data, model, root.with_name("clean"))
    got, want = _tensors(result), _tensors(clean)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_damaged_shard_is_set_aside_and_only_its_items_reencoded(setup, monkeypatch, caplog):
    data, model, root = setup
    monkeypatch.setattr(cache.encode, "ENCODE_BATCH", 2)
    cache_once(data, model, root)
    store = cache.Store(root / cache.STORE_NAME)
    image_shard = next(s for s in sorted(set(store.index.values())) if s in _image_shards(store))
    path = store.shards / image_shard
    path.write_bytes(path.read_bytes()[:-7])  # cut short, as by a full disk
    counts = Counter()
    result = cache_once(data, model, root, counts=counts)
    assert (counts["images"], counts["prompts"]) == (2, 0)
    assert (path.parent / (path.name + ".bad")).is_file() and "is damaged" in caplog.text
    assert len(cache.load_cache(result.manifest)) == 6


def _image_shards(store: cache.Store) -> set[str]:
    from safetensors import safe_open

    out = set()
    for shard in set(store.index.values()):
        with safe_open(str(store.shards / shard), framework="pt") as f:
            if any(k.endswith(".latents") for k in f.keys()):  # noqa: SIM118 (safe_open is not a dict)
                out.add(shard)
    return out


def test_lost_index_is_rebuilt_from_shard_headers(setup):
    data, model, root = setup
    cache_once(data, model, root)
    (root / cache.STORE_NAME / "index.jsonl").write_text('{"shard": "cut sh')  # a line cut by a kill
    counts = Counter()
    cache_once(data, model, root, counts=counts)
    assert counts == Counter()


# ---------------------------------------------------------------- bad images at cache time


def test_image_damaged_after_listing_is_skipped_before_any_encoder_loads(setup, caplog):
    data, model, root = setup
    items = load_items(DataConfig(path=str(data))).items
    (data / "02.png").write_bytes((data / "02.png").read_bytes()[:40])  # truncated after the checks
    counts = Counter()
    result = cache.prepare(
        items, [], cache.CacheSpec(str(model), resolution=16), root,
        lambda i, t: FakeEncoders(counts), progress=False,
    )  # fmt: skip
    assert result.items == 5 and counts["images"] == 5
    assert "skipped 02.png" in caplog.text


def test_nothing_decodable_is_a_user_error_before_encoders_load(setup):
    data, model, root = setup
    items = load_items(DataConfig(path=str(data))).items
    for item in items:
        item.image.write_bytes(item.image.read_bytes()[:40])

    def never(images: bool, texts: bool) -> None:
        raise AssertionError("encoders loaded for a dataset that cannot train")

    with pytest.raises(UserError, match="no image of the dataset could be decoded"):
        cache.prepare(items, [], cache.CacheSpec(str(model), resolution=16), root, never, progress=False)


# ---------------------------------------------------------------- batches from the cache


def _cached(sizes: list[int], captions: int = 3, dropout: float = 0.0) -> cache.CachedData:
    """Rows in buckets of the given sizes: bucket b's latents have spatial size (1 + b)."""
    latents, text_rows = [], []
    for b, n in enumerate(sizes):
        for _ in range(n):
            latents.append(torch.full((2, 1 + b, 1 + b), float(len(latents))))
            text_rows.append(len(text_rows) % captions)
    per_caption = torch.arange(captions, dtype=torch.float32)[:, None, None] + 1
    text = {
        "prompt_embeds": per_caption.expand(captions, 2, 3),
        "pooled_prompt_embeds": torch.ones(captions, 3),
    }
    empty = {"prompt_embeds": torch.zeros(1, 2, 3), "pooled_prompt_embeds": torch.zeros(1, 3)}
    return cache.CachedData.from_rows(
        latents, text_rows, text, empty, {k: v[:0] for k, v in empty.items()},
        [f"c{i}" for i in range(len(latents))], [], caption_dropout=dropout,
    )  # fmt: skip


def test_rows_come_from_one_bucket_cover_every_item_and_depend_on_arguments_only():
    data = _cached([5, 3, 1])
    size = 2
    per_epoch = data.batches_per_epoch(size)
    assert per_epoch == 3 + 2 + 1
    seen = Counter()
    for number in range(per_epoch):
        rows = data.rows(number, size, seed=7)
        assert rows.shape == (size,) and len(set(data.row_bucket[rows].tolist())) == 1
        assert data.latents_of(rows).shape[0] == size  # stacks: same spatial size
        seen.update(rows.tolist())
    assert set(seen) == set(range(9)), "an item never appeared in its epoch"
    fresh = _cached([5, 3, 1])
    for number in (0, 4, per_epoch + 1, 10 * per_epoch + 3):  # order of calls does not matter
        assert torch.equal(fresh.rows(number, size, 7), data.rows(number, size, 7))
    assert not all(torch.equal(data.rows(n, size, 7), data.rows(n, size, 8)) for n in range(per_epoch))


def test_dataset_smaller_than_the_batch_repeats_items_and_drops_none():
    data = _cached([3])
    rows = data.rows(0, 8, seed=0)
    assert rows.shape == (8,) and set(rows.tolist()) == {0, 1, 2}


def test_caption_dropout_is_drawn_at_batch_time_deterministically():
    data = _cached([40], dropout=0.5)
    drops = data.caption_drops(3, 40, seed=1)
    assert torch.equal(drops, _cached([40], dropout=0.5).caption_drops(3, 40, seed=1))
    assert 5 < int(drops.sum()) < 35
    rows = data.rows(3, 40, seed=1)
    _, cond, uncond = data.batch(rows, torch.device("cpu"), drops)
    assert torch.equal(cond["prompt_embeds"][drops], uncond["prompt_embeds"][drops])
    assert (cond["prompt_embeds"][~drops] > 0).all()
    _, kept, _ = data.batch(rows, torch.device("cpu"))  # the cached rows were not modified
    assert (kept["prompt_embeds"] > 0).all()
    assert not _cached([4]).caption_drops(0, 4, 0).any()


def test_manifest_holds_empty_and_validation_prompts(setup):
    data, model, root = setup
    result = cache_once(data, model, root)
    loaded = cache.load_cache(result.manifest, caption_dropout=0.25)
    assert loaded.validation_prompts == ["caption 0", "a validation prompt"]
    assert loaded.validation["prompt_embeds"].shape == (2, 3, 4)
    assert loaded.empty["prompt_embeds"].shape == (1, 3, 4) and loaded.caption_dropout == 0.25
    assert torch.equal(
        loaded.validation["prompt_embeds"][0], loaded.text["prompt_embeds"][loaded.row_text[0]]
    )


def test_mixed_aspect_dataset_is_bucketed_and_cropped(tmp_path):
    data = fake_data(tmp_path / "data", 6, sizes=[(16, 16), (32, 12), (12, 32)])
    result = cache_once(data, fake_model(tmp_path / "model"), tmp_path / "cache")
    manifest = json.loads(result.manifest.read_text())
    # 256-pixel budget in multiples of 4, at most 2.5:1: 32x12 (2.67:1) goes to the widest, 20x12
    assert {tuple(it["size"]) for it in manifest["items"]} == {(16, 16), (20, 12), (12, 20)}
    loaded = cache.load_cache(result.manifest)
    assert sorted(z.shape[2:] for z in loaded.latents) == [(6, 10), (8, 8), (10, 6)]  # /2 by the fake VAE
    assert loaded.bucket_sizes == [2, 2, 2]


def test_reading_from_disk_gives_the_same_batches_as_ram(tmp_path, monkeypatch):
    data = fake_data(tmp_path / "data", 7, sizes=[(16, 16), (32, 12), (12, 32)])
    result = cache_once(data, fake_model(tmp_path / "model"), tmp_path / "cache")
    ram = cache.load_cache(result.manifest, caption_dropout=0.3, in_ram="always")
    disk = cache.load_cache(result.manifest, caption_dropout=0.3, in_ram="never")
    assert isinstance(disk.latents[0], cache.DiskRows) and isinstance(ram.latents[0], torch.Tensor)
    assert len(disk) == len(ram) == 7 and disk.bucket_sizes == ram.bucket_sizes
    assert [z.shape for z in disk.latents] == [z.shape for z in ram.latents]
    for batch_number in range(6):
        rows = ram.rows(batch_number, 2, seed=3)
        assert torch.equal(rows, disk.rows(batch_number, 2, seed=3))
        drops = ram.caption_drops(batch_number, 2, seed=3)
        cpu = torch.device("cpu")
        for a, b in zip(ram.batch(rows, cpu, drops), disk.batch(rows, cpu, drops), strict=True):
            a, b = (a, b) if isinstance(a, dict) else ({"z": a}, {"z": b})
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # auto: in RAM while the cache is small next to the memory available, else from disk
    monkeypatch.setattr(cache.order, "_ram_budget", lambda: 1e12)
    assert isinstance(cache.load_cache(result.manifest).latents[0], torch.Tensor)
    monkeypatch.setattr(cache.order, "_ram_budget", lambda: 100.0)
    assert isinstance(cache.load_cache(result.manifest).latents[0], cache.DiskRows)


def test_shard_reader_keeps_a_bounded_number_of_shards_open(tmp_path):
    store = cache.Store(tmp_path / "store")
    for i in range(5):
        store.write_shard({f"k{i}.latents": torch.full((2,), float(i))})
    reader = cache.ShardReader(store, max_open=2)
    for _ in range(2):
        for i in range(5):
            assert torch.equal(reader.get(f"k{i}", "latents"), torch.full((2,), float(i)))
            assert len(reader.handles) <= 2
    with pytest.raises(UserError, match="missing"):
        reader.get("nope", "latents")


def _age(paths, days: float) -> None:
    old = time.time() - days * 86400
    for path in paths:
        os.utime(path, (old, old))


def test_prune_drops_old_datasets_and_only_the_tensors_nobody_needs(tmp_path):
    model = fake_model(tmp_path / "model")
    root = tmp_path / "cache"
    old_data = fake_data(tmp_path / "old", 4)  # captions "caption 0..3", images 00..03
    kept_data = fake_data(tmp_path / "kept", 2)  # the same first two images and captions: shared keys
    (kept_data / "01.txt").write_text("a caption only the kept dataset has")
    old = cache_once(old_data, model, root).manifest
    kept = cache_once(kept_data, model, root).manifest
    store_root = root / cache.STORE_NAME
    shards = sorted((store_root / "shards").glob("*.safetensors"))
    before = sum(p.stat().st_size for p in shards)
    _age([old, *shards], days=40)  # the old dataset unused for 40 days; the kept one was just cached

    info = cache.usage(root, older_than_days=30)
    assert (info.manifests, info.stale_manifests) == (2, 1) and info.prunable_shards > 0
    assert sorted((store_root / "shards").glob("*.safetensors")) == shards  # --info deletes nothing

    assert cache.usage(root, older_than_days=30, prune=True) == info
    assert not old.exists()
    after = sorted((store_root / "shards").glob("*.safetensors"))
    assert sum(p.stat().st_size for p in after) < before
    store = cache.Store(store_root)
    assert set(store.index.values()) == {p.name for p in after}  # the index forgets deleted shards
    needed = cache._referenced_keys([kept])
    assert set(store.index) == needed  # exactly what the kept dataset needs is left
    data = cache.load_cache(kept, in_ram="always")
    assert len(data) == 2 and data.captions[1] == "a caption only the kept dataset has"
    again = Counter()
    cache_once(kept_data, model, root, counts=again)
    assert again["loads"] == 0  # nothing the kept dataset needs was lost: no encoder loads
    assert cache.usage(root, older_than_days=30).prunable_shards == 0


def test_prune_keeps_fresh_tensors_of_a_cache_stage_still_running(tmp_path):
    root = tmp_path / "cache"
    cache_once(fake_data(tmp_path / "d", 2), fake_model(tmp_path / "model"), root)
    for manifest in (root / cache.STORE_NAME / "manifests").glob("*.json"):
        manifest.unlink()  # as if its manifest were not written yet
    info = cache.usage(root, older_than_days=30, prune=True)
    assert info.prunable_shards == 0 and info.shards > 0
    assert len(list((root / cache.STORE_NAME / "shards").glob("*.safetensors"))) == info.shards


def test_kohya_repeats_are_rows_not_extra_encodes(tmp_path):
    root = tmp_path / "data"
    fake_data(root / "3_ohwx", 2)  # two captioned images, three times each
    fake_data(root / "plain", 1)  # the same pixels as 3_ohwx/00.png: one content key
    counts = Counter()
    result = cache_once(root, fake_model(tmp_path / "model"), tmp_path / "cache", counts=counts)
    assert counts["images"] == 2 and result.items == 7
    data = cache.load_cache(result.manifest)
    assert len(data) == 7 and sorted(data.captions).count("caption 0") == 4  # 3 repeats + the plain copy
