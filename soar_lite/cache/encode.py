"""The cache stage proper: plan what a dataset needs, encode only what is missing, write its manifest.

Owns :class:`CacheSpec` (the run settings that decide the tensors), ``image_key`` / ``text_key`` (what
each key hashes; ``PIXEL_RECIPE`` names the image preprocessing), :func:`prepare` and
:class:`CacheResult`, and the encode stage: images checked before any encoder loads, encoders loaded
only for the side that is missing, one shard per ``ENCODE_BATCH`` chunk, encoders always freed.

Why apart: this is the only part of the cache that runs encoders; training reads through ``order``
without it. The module is ``encode``, not ``prepare``, so that ``cache.prepare`` stays the function
(a submodule of that name would be shadowed by it, and patching ``ENCODE_BATCH`` on it would miss).
"""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from soar_lite.cache.ids import CACHE_VERSION, Fingerprints, ModelIds, _key, model_ids
from soar_lite.cache.store import STORE_NAME, TEXT_FIELDS, Store
from soar_lite.data import BadImage, Item, Skips, bucket_for, load_pixels, read_image_bytes, verify_items
from soar_lite.errors import UserError

log = logging.getLogger("soar_lite.cache")
ENCODE_BATCH = 16
PIXEL_RECIPE = "exif-transpose/rgb-alpha-on-white/16bit-scaled/cover-bicubic/centre-crop/v1"


@dataclass(frozen=True)
class CacheSpec:
    """The run settings that decide the cached tensors (the model files decide the rest)."""

    model_path: str
    dtype: str = "float32"
    max_sequence_length: int = 256
    resolution: int = 512
    buckets: bool = True
    max_aspect: float = 2.5
    family: str = "sd3"  # which family reads the folder (text parts, bucket multiple)


def image_key(item: Item, size: tuple[int, int], ids: ModelIds, dtype: str) -> str:
    """Key of an image latent: image bytes, bucket size, pixel recipe, VAE files, dtype."""
    return _key("image", CACHE_VERSION, item.digest, list(size), PIXEL_RECIPE, ids.vae, dtype)


def text_key(caption: str, ids: ModelIds, spec: CacheSpec) -> str:
    """Key of a text embedding: caption, text encoders + tokenizers, sequence length, dtype."""
    return _key("text", CACHE_VERSION, caption, ids.text, spec.max_sequence_length, spec.dtype)


@dataclass
class CacheResult:
    """What :func:`prepare` did: the manifest training reads and how much was encoded or reused."""

    manifest: Path
    items: int
    encoded_images: int
    encoded_texts: int
    reused_images: int
    reused_texts: int
    skips: Skips = field(default_factory=Skips)

    def summary(self) -> str:
        line = (
            f"cache: {self.items} items ready; encoded {self.encoded_images} images and "
            f"{self.encoded_texts} prompts, reused {self.reused_images} images and "
            f"{self.reused_texts} prompts"
        )
        return line + (f"; {self.skips.summary()}" if len(self.skips) else "")


# (images, texts) -> a loaded family with encode_images / encode_prompts / free_encoders
EncoderLoader = Callable[[bool, bool], Any]


def prepare(
    items: Sequence[Item],
    validation_prompts: Sequence[str],
    spec: CacheSpec,
    root: str | Path,
    load_encoders: EncoderLoader,
    *,
    progress: bool = True,
) -> CacheResult:
    """Make sure every latent and embedding ``items`` need is in the store under ``root``; write the
    manifest. Encoders are loaded (by ``load_encoders``) only if something is missing, and only the
    side that is missing; images that fail to decode are skipped before anything loads."""
    store = Store(Path(root).expanduser() / STORE_NAME)
    ids = model_ids(spec.model_path, Fingerprints(store.root / "fingerprints.json"), spec.family)
    sizes = [
        bucket_for(
            it.width, it.height, spec.resolution, ids.multiple,
            enabled=spec.buckets, max_aspect=spec.max_aspect, aspect=it.aspect,
        )
        for it in items
    ]  # fmt: skip
    image_keys = [image_key(it, size, ids, spec.dtype) for it, size in zip(items, sizes, strict=True)]
    todo_images, failed, skips = _images_to_encode(items, sizes, image_keys, store)
    keep = [i for i, key in enumerate(image_keys) if key not in failed]
    if not keep:
        raise UserError(f"no image of the dataset could be decoded ({skips.summary()})")
    prompts = {
        text_key(p, ids, spec): p for p in ["", *validation_prompts, *(items[i].caption for i in keep)]
    }
    missing_texts = store.missing(prompts)
    todo_texts = {k: p for k, p in prompts.items() if k in missing_texts}
    if todo_images or todo_texts:
        failed |= _encode(load_encoders, todo_images, todo_texts, store, skips, progress)
        keep = [i for i in keep if image_keys[i] not in failed]
        if not keep:
            raise UserError(f"no image of the dataset could be encoded ({skips.summary()})")
    if skips:
        log.warning("cache: %s", skips.summary())
    manifest = {
        "version": CACHE_VERSION,
        "spec": asdict(spec),
        "ids": asdict(ids),
        "items": [
            {"name": items[i].label, "caption": items[i].caption, "image": image_keys[i],
             "text": text_key(items[i].caption, ids, spec), "size": list(sizes[i])}
            for i in keep
        ],
        "empty": text_key("", ids, spec),
        "validation": [{"prompt": p, "text": text_key(p, ids, spec)} for p in validation_prompts],
    }  # fmt: skip
    encoded_images = len(set(todo_images) - failed)
    reused_images = len({image_keys[i] for i in keep} - set(todo_images))
    return CacheResult(
        store.write_manifest(manifest), len(keep), encoded_images, len(todo_texts),
        reused_images, len(prompts) - len(todo_texts), skips,
    )  # fmt: skip


def _images_to_encode(
    items: Sequence[Item], sizes: list[tuple[int, int]], keys: list[str], store: Store
) -> tuple[dict[str, tuple[Item, tuple[int, int]]], set[str], Skips]:
    """Images not in the store yet (one item per key), fully decoded once so that a damaged file is
    skipped now, before any encoder loads; returns (to encode, failed keys, skips)."""
    missing = store.missing(keys)
    todo: dict[str, tuple[Item, tuple[int, int]]] = {}
    for item, size, key in zip(items, sizes, keys, strict=True):
        if key in missing:
            todo.setdefault(key, (item, size))
    good, skips = verify_items(item for item, _ in todo.values())
    usable = set(good)
    failed = {key for key, (item, _) in todo.items() if item not in usable}
    return {k: v for k, v in todo.items() if k not in failed}, failed, skips


def _chunks(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _encode(
    load_encoders: EncoderLoader,
    images: dict[str, tuple[Item, tuple[int, int]]],
    texts: dict[str, str],
    store: Store,
    skips: Skips,
    progress: bool,
) -> set[str]:
    """Load the encoders, write one shard per chunk, free them; returns image keys that failed."""
    family = load_encoders(bool(images), bool(texts))
    bar = tqdm(
        total=len(images) + len(texts), desc="cache", unit="item", disable=not progress, dynamic_ncols=True
    )
    try:
        for chunk in _chunks(list(texts.items()), ENCODE_BATCH):
            encoded = family.encode_prompts([prompt for _, prompt in chunk])
            store.write_shard(
                {f"{key}.{name}": encoded[name][i].detach().cpu().clone()
                 for i, (key, _) in enumerate(chunk) for name in TEXT_FIELDS}
            )  # fmt: skip
            bar.update(len(chunk))
        failed: set[str] = set()
        by_size: dict[tuple[int, int], list[tuple[str, Item]]] = {}
        for key, (item, size) in images.items():
            by_size.setdefault(size, []).append((key, item))
        for size in sorted(by_size):
            for chunk in _chunks(by_size[size], ENCODE_BATCH):
                failed |= _encode_images(family, chunk, size, store, skips)
                bar.update(len(chunk))
        return failed
    finally:
        bar.close()
        family.free_encoders()
        del family
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _encode_images(
    family: Any, chunk: Sequence[tuple[str, Item]], size: tuple[int, int], store: Store, skips: Skips
) -> set[str]:
    """Encode one same-size chunk into one shard; an image that changed or broke since the checks
    is skipped (with a warning), never a crash."""
    pixels, keys, failed = [], [], set()
    for key, item in chunk:
        data = read_image_bytes(item)
        if hashlib.sha256(data).hexdigest() != item.digest:
            skips.add(item.label, "changed while caching (run again to pick up the new file)")
            failed.add(key)
            continue
        try:
            pixels.append(load_pixels(data, size))
        except BadImage as exc:
            skips.add(item.label, str(exc))
            failed.add(key)
            continue
        keys.append(key)
    if keys:
        latents = family.encode_images(torch.stack(pixels)).detach().float().cpu()
        store.write_shard({f"{key}.latents": latents[i].clone() for i, key in enumerate(keys)})
    return failed
