"""The cache stage: encode each image and caption once, keyed by content, and train from the tensors.

Training on a consumer GPU needs the VAE encoder and the text encoders (T5-XXL alone is ~9 GB) gone
while the transformer trains. This stage loads them only when something is missing, writes the
tensors, and frees them. Every tensor is stored under a key that hashes *everything that changes
it*, so a cache is never stale (kohya_ss#1629, OneTrainer#1134) and never recomputed needlessly:

* an image latent: sha256 of the image bytes, its bucket size, the pixel recipe (EXIF, alpha,
  resize, crop), the VAE's files and the dtype;
* a text embedding: the caption, the text encoders' and tokenizers' files, which encoders exist,
  the zero-T5 width, ``max_sequence_length`` and the dtype.

So an edited caption re-encodes that caption only, an edited image that image only, a new resolution
or text encoder re-encodes what it changes, and the same item in another run or dataset is reused
(one cache folder can be shared). The empty prompt (SOAR's CFG rollout) and the validation prompts
are text keys like any caption.

Layout under the cache folder (``store-v2/``)::

    shards/<name>.safetensors   immutable; tensors "<key>.<field>"; written to a temp file, fsynced,
                                then renamed: a shard exists completely or not at all
    index.jsonl                 append-only {"shard", "keys"} lines; rebuilt from shard headers for
                                any shard it misses (a run killed between rename and append)
    manifests/<hash>.json       one dataset's items -> keys, buckets, captions; what training reads
    fingerprints.json           sha256 of model files by (path, size, mtime): big files hashed once

A run killed mid-way leaves complete shards (reused next time) and at most one temp file, which no
later run trusts (and which the next run on this host deletes).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from soar_lite.data import BadImage, Item, Skips, bucket_for, load_pixels, read_image_bytes, verify_items
from soar_lite.errors import UserError
from soar_lite.paths import home_dir, write_text_atomic

log = logging.getLogger("soar_lite.cache")
CACHE_VERSION = 2
STORE_NAME = f"store-v{CACHE_VERSION}"
ENCODE_BATCH = 16
PIXEL_RECIPE = "exif-transpose/rgb-alpha-on-white/16bit-scaled/cover-bicubic/centre-crop/v1"
TEXT_FIELDS = ("prompt_embeds", "pooled_prompt_embeds")
HUB_PATTERNS = ["model_index.json", "vae/*", "text_encoder*/*", "tokenizer*/*", "transformer/config.json"]
_DIGEST_NAME = re.compile(r"^([0-9a-f]{40}|[0-9a-f]{64})$")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------- model fingerprints


class Fingerprints:
    """sha256 of model files, remembered by (path, size, mtime) so a 9 GB T5 is hashed once.

    Files in a Hugging Face hub cache are symlinks to blobs named by their content hash: that name
    is used as is, so hub models cost nothing to fingerprint.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        try:
            self.memo: dict[str, list[Any]] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.memo = {}
        self.dirty = False

    def digest(self, path: Path) -> str:
        real = path.resolve()
        if path.is_symlink() and real.parent.name == "blobs" and _DIGEST_NAME.match(real.name):
            return real.name
        stat = real.stat()
        known = self.memo.get(str(real))
        if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            return known[2]
        sha = hashlib.sha256()
        big = stat.st_size > 1 << 28  # a multi-GB encoder: show that the pause is hashing, once
        bar = tqdm(
            total=stat.st_size, desc=f"fingerprint {path.name}", unit="B", unit_scale=True, disable=not big
        )
        with real.open("rb") as f, bar:
            for block in iter(lambda: f.read(1 << 23), b""):
                sha.update(block)
                bar.update(len(block))
        self.memo[str(real)] = [stat.st_size, stat.st_mtime_ns, sha.hexdigest()]
        self.dirty = True
        return sha.hexdigest()

    def folder(self, folder: Path) -> list[tuple[str, str]]:
        """(relative name, digest) of every file under ``folder``, sorted; [] if it does not exist."""
        if not folder.is_dir():
            return []
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [(str(p.relative_to(folder)), self.digest(p)) for p in files]

    def save(self) -> None:
        if self.dirty:
            write_text_atomic(self.file, json.dumps(self.memo))
            self.dirty = False


@dataclass(frozen=True)
class ModelIds:
    """Content ids of the parts that make the cached tensors, and the image-side multiple."""

    vae: str
    text: str
    multiple: int  # VAE downscale x transformer patch: bucket sides are multiples of this


def local_model_folder(model_path: str) -> Path:
    """A model folder on disk: the path itself, or the hub snapshot of the parts the cache needs."""
    if Path(model_path).expanduser().exists():
        return Path(model_path).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_path, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network, auth, unknown repo: one line, not a traceback
        raise UserError(f"cannot fetch the encoders of {model_path!r}: {str(exc).splitlines()[0]}") from None


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path} is missing or not JSON: is this a diffusers SD3 pipeline folder?") from None


def model_ids(model_path: str, fingerprints: Fingerprints, family: str = "sd3") -> ModelIds:
    """Fingerprint the VAE and the text side of a pipeline folder (or hub id) without loading it;
    which folders make the text side, and the bucket multiple, are the family's (its layout)."""
    from soar_lite.families import family_class

    folder = local_model_folder(model_path)
    _json(folder / "model_index.json")
    layout = family_class(family).read_layout(folder)
    present = list(layout.text_parts)
    text = _key(present, [fingerprints.folder(folder / p) for p in present], *layout.text_extra)
    vae = _key(fingerprints.folder(folder / "vae"))
    fingerprints.save()
    return ModelIds(vae, text, layout.multiple)


# ---------------------------------------------------------------- the store


class Store:
    """Content-addressed tensors in immutable safetensors shards (see the module docstring)."""

    def __init__(self, root: Path, *, readonly: bool = False) -> None:
        self.root = root
        self.shards = root / "shards"
        self.manifests = root / "manifests"
        self.readonly = readonly  # readers (training processes) never clean, index or set aside
        if not readonly:
            for folder in (self.shards, self.manifests):
                folder.mkdir(parents=True, exist_ok=True)
            self._clean_temp_files()
        self.index: dict[str, str] = {}
        self._checked: set[str] = set()
        self._load_index()

    def _clean_temp_files(self) -> None:
        """Delete temp shards left by dead processes of this host (never trusted either way)."""
        for tmp in self.shards.glob(".tmp-*.part"):
            parts = tmp.name.removesuffix(".part").split("-", 3)  # .tmp, pid, nonce, host
            ours = len(parts) == 4 and parts[1].isdigit() and parts[3] == socket.gethostname()
            if ours and not _alive(int(parts[1])):
                tmp.unlink(missing_ok=True)

    def _load_index(self) -> None:
        present = {p.name for p in self.shards.glob("*.safetensors") if not p.name.startswith(".")}
        indexed: set[str] = set()
        path = self.root / "index.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        for line in lines:
            try:
                entry = json.loads(line)
                shard, keys = entry["shard"], entry["keys"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill: its shard is rescanned below
            if shard in present:
                indexed.add(shard)
                self.index.update(dict.fromkeys(keys, shard))
        for shard in sorted(present - indexed):
            keys = self._scan(shard)
            if keys is not None:
                self.index.update(dict.fromkeys(keys, shard))
                if not self.readonly:
                    self._append_index(shard, keys)

    def _scan(self, shard: str) -> list[str] | None:
        """The keys of a shard from its header; a shard that does not open is set aside."""
        path = self.shards / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
        except Exception as exc:  # safetensors raises its own error types for damaged files
            if not self.readonly:
                log.warning("cache shard %s is damaged (%s): set aside, its items are re-encoded", path, exc)
                os.replace(path, path.with_name(path.name + ".bad"))
            return None
        self._checked.add(shard)
        return sorted({name.split(".", 1)[0] for name in names})

    def _append_index(self, shard: str, keys: list[str]) -> None:
        with (self.root / "index.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"shard": shard, "keys": keys}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def missing(self, keys: Iterable[str]) -> set[str]:
        """The keys not (validly) in the store; each shard still needed is header-checked once."""
        wanted = set(keys)
        for shard in {self.index[k] for k in wanted if k in self.index} - self._checked:
            if self._scan(shard) is None:
                self.index = {k: s for k, s in self.index.items() if s != shard}
        return {k for k in wanted if k not in self.index}

    def write_shard(self, tensors: dict[str, Tensor]) -> str:
        """Write ``{"<key>.<field>": tensor}`` as one new shard, atomically; returns its name."""
        names = sorted(tensors)
        shard = hashlib.sha256("\n".join(names).encode()).hexdigest()[:32] + ".safetensors"
        tmp = self.shards / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}.part"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"soar_lite": "2"})
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.shards / shard)
        keys = sorted({name.split(".", 1)[0] for name in names})
        self._append_index(shard, keys)
        self.index.update(dict.fromkeys(keys, shard))
        self._checked.add(shard)
        return shard

    def read(self, keys: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, Tensor]]:
        """``{key: {field: tensor}}`` for ``keys``, read shard by shard (memory-mapped, then copied)."""
        by_shard: dict[str, list[str]] = {}
        for key in dict.fromkeys(keys):
            if key not in self.index:
                raise UserError(f"cache entry {key} is missing from {self.root}: run `soar-lite cache` again")
            by_shard.setdefault(self.index[key], []).append(key)
        out: dict[str, dict[str, Tensor]] = {}
        for shard, shard_keys in by_shard.items():
            with safe_open(str(self.shards / shard), framework="pt") as f:
                for key in shard_keys:
                    out[key] = {name: f.get_tensor(f"{key}.{name}") for name in fields}
        return out

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        text = json.dumps(manifest, indent=1, sort_keys=True)
        path = self.manifests / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
        if not path.is_file():
            write_text_atomic(path, text)
        return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- planning and encoding


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


# ---------------------------------------------------------------- what training reads


def _generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``parts`` alone: the same draws in every process and after resume."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class ShardReader:
    """Single tensors read from the store's shards on demand, keeping the most recently used
    shards open (memory-mapped: the OS page cache, not this process, holds what is hot)."""

    def __init__(self, store: Store, max_open: int = 64) -> None:
        self.store = store
        self.max_open = max_open
        self.handles: OrderedDict[str, Any] = OrderedDict()

    def _handle(self, key: str) -> Any:
        shard = self.store.index.get(key)
        if shard is None:
            root = self.store.root
            raise UserError(f"cache entry {key} is missing from {root}: run `soar-lite cache` again")
        if shard in self.handles:
            self.handles.move_to_end(shard)
        else:
            self.handles[shard] = safe_open(str(self.store.shards / shard), framework="pt")
            while len(self.handles) > self.max_open:
                self.handles.popitem(last=False)
        return self.handles[shard]

    def get(self, key: str, field: str) -> Tensor:
        return self._handle(key).get_tensor(f"{key}.{field}")

    def shape(self, key: str, field: str) -> tuple[int, ...]:
        """A tensor's shape from the shard header, without reading the tensor."""
        return tuple(self._handle(key).get_slice(f"{key}.{field}").get_shape())


class DiskRows:
    """Rows of one cached field, read when indexed: ``rows[index_tensor]`` stacks fresh tensors,
    as indexing a stacked in-RAM tensor would, so :class:`CachedData` serves both alike."""

    def __init__(self, reader: ShardReader, keys: Sequence[str], field: str) -> None:
        self.reader, self.keys, self.field = reader, list(keys), field
        row = reader.shape(self.keys[0], field) if self.keys else ()
        self.shape = torch.Size((len(self.keys), *row))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int | Tensor) -> Tensor:
        if isinstance(index, int) or (isinstance(index, Tensor) and index.dim() == 0):
            return self.reader.get(self.keys[int(index)], self.field)
        return torch.stack([self.reader.get(self.keys[int(i)], self.field) for i in index])


@dataclass
class CachedData:
    """Everything training reads: latents grouped by bucket, caption embeddings (one row per distinct
    caption), the empty-prompt and validation embeddings.

    Batches are a pure function of (batch number, global batch size, seed): a resumed run, or
    another number of processes on the same global batch, sees exactly the same rows, and caption
    dropout is drawn the same way (never baked into the cache).
    """

    latents: list[Tensor] | list[DiskRows]  # per bucket: (n_b, C, h, w), in RAM or read on demand
    bucket_rows: list[Tensor]  # per bucket: its dataset rows, ascending
    row_bucket: Tensor  # (N,) bucket of each row
    row_pos: Tensor  # (N,) position of each row within its bucket
    text: dict[str, Tensor] | dict[str, DiskRows]  # distinct captions: (U, ...)
    row_text: Tensor  # (N,) caption row of each dataset row
    empty: dict[str, Tensor]  # (1, ...)
    validation: dict[str, Tensor]  # (V, ...)
    captions: list[str]
    validation_prompts: list[str]
    caption_dropout: float = 0.0
    manifest: Path | None = None
    _epoch_memo: dict[tuple[int, int, int], list[Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    @classmethod
    def from_rows(
        cls,
        latents: Sequence[Tensor],
        text_rows: Sequence[int],
        text: dict[str, Tensor],
        empty: dict[str, Tensor],
        validation: dict[str, Tensor],
        captions: list[str],
        validation_prompts: list[str],
        **extra: Any,
    ) -> CachedData:
        """Group per-row latents (C, h, w) into buckets by shape; ``text_rows`` index ``text``."""
        shapes = sorted({tuple(z.shape) for z in latents})
        row_bucket = torch.tensor([shapes.index(tuple(z.shape)) for z in latents], dtype=torch.long)
        bucket_rows = [torch.nonzero(row_bucket == b).flatten() for b in range(len(shapes))]
        row_pos = torch.empty(len(latents), dtype=torch.long)
        for rows in bucket_rows:
            row_pos[rows] = torch.arange(len(rows))
        stacked = [torch.stack([latents[int(r)] for r in rows]) for rows in bucket_rows]
        return cls(
            stacked, bucket_rows, row_bucket, row_pos, text, torch.tensor(list(text_rows), dtype=torch.long),
            empty, validation, captions, validation_prompts, **extra,
        )  # fmt: skip

    def __len__(self) -> int:
        return int(self.row_bucket.shape[0])

    @property
    def bucket_sizes(self) -> list[int]:
        return [len(rows) for rows in self.bucket_rows]

    def batches_per_epoch(self, size: int) -> int:
        """Each bucket gives ceil(n_b / size) batches an epoch: no image is ever dropped."""
        return sum(math.ceil(n / size) for n in self.bucket_sizes)

    def _epoch(self, epoch: int, size: int, seed: int) -> list[Tensor]:
        memo_key = (epoch, size, seed)
        if memo_key not in self._epoch_memo:
            batches = []
            for b, members in enumerate(self.bucket_rows):
                perm = members[torch.randperm(len(members), generator=_generator("rows", seed, epoch, b))]
                for k in range(math.ceil(len(perm) / size)):
                    # the last batch of a bucket is topped up from its start, never dropped or mixed
                    batches.append(perm[torch.arange(k * size, (k + 1) * size) % len(perm)])
            order = torch.randperm(len(batches), generator=_generator("order", seed, epoch))
            self._epoch_memo.clear()
            self._epoch_memo[memo_key] = [batches[int(i)] for i in order]
        return self._epoch_memo[memo_key]

    def rows(self, batch_number: int, size: int, seed: int) -> Tensor:
        """The dataset rows of global batch ``batch_number`` (``size`` rows, all processes together).

        Each epoch shuffles every bucket, cuts it into batches and shuffles the batch order, all
        from seeded generators, so the rows depend on the arguments alone, and all rows of a batch
        come from one bucket (their latents stack).
        """
        epoch, index = divmod(batch_number, self.batches_per_epoch(size))
        return self._epoch(epoch, size, seed)[index]

    def caption_drops(self, batch_number: int, size: int, seed: int) -> Tensor:
        """Which rows of global batch ``batch_number`` train on the empty prompt (caption dropout)."""
        if self.caption_dropout <= 0:
            return torch.zeros(size, dtype=torch.bool)
        return (
            torch.rand(size, generator=_generator("caption-dropout", seed, batch_number))
            < self.caption_dropout
        )

    def latents_of(self, rows: Tensor) -> Tensor:
        """Clean latents of ``rows`` (CPU); the rows must share a bucket, as :meth:`rows` guarantees."""
        buckets = self.row_bucket[rows]
        if bool((buckets != buckets[0]).any()):
            raise ValueError("the rows of one batch come from different buckets")
        return self.latents[int(buckets[0])][self.row_pos[rows]]

    def batch(
        self, rows: Tensor, device: torch.device, drops: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """(z0, cond, uncond) for ``rows`` on ``device``; rows flagged in ``drops`` get the empty
        prompt as their condition; uncond is the empty prompt repeated."""
        n = rows.shape[0]
        cond = {k: v[self.row_text[rows]] for k, v in self.text.items()}  # indexing copies
        if drops is not None and bool(drops.any()):
            for k, v in cond.items():
                v[drops] = self.empty[k][0].to(v.dtype)
        cond = {k: v.to(device) for k, v in cond.items()}
        uncond = {k: v.expand(n, *v.shape[1:]).to(device) for k, v in self.empty.items()}
        return self.latents_of(rows).to(device), cond, uncond


def cache_root(cache_dir: str) -> Path:
    """``data.cache_dir``, or the shared ``$SOAR_LITE_HOME/cache`` when it is empty."""
    return Path(cache_dir).expanduser() if cache_dir else home_dir() / "cache"


def load_cache(manifest: str | Path, caption_dropout: float = 0.0, in_ram: str = "auto") -> CachedData:
    """Read the tensors a manifest written by :func:`prepare` names (no encoder, no model).

    ``in_ram``: ``always`` loads every latent and embedding into RAM (fastest); ``never`` reads
    each batch's rows from the memory-mapped shards when it is drawn, so a dataset larger than RAM
    trains too (SD3.5 keeps ~2.7 MB of text embedding per caption: 10 k captions are ~27 GB);
    ``auto`` keeps them in RAM when they take under a quarter of the available memory. Both give
    the same batches, bit for bit."""
    manifest = Path(manifest)
    record = json.loads(manifest.read_text(encoding="utf-8"))
    with contextlib.suppress(OSError):  # last use, for `soar-lite cache --prune` (read-only: fine)
        os.utime(manifest)
    store = Store(manifest.parent.parent, readonly=True)
    items = record["items"]
    distinct = list(dict.fromkeys(it["text"] for it in items))
    validation_keys = [v["text"] for v in record["validation"]]
    if in_ram == "never" or (in_ram == "auto" and _cache_bytes(store, items, distinct) > _ram_budget()):
        return _on_disk(record, store, distinct, validation_keys, caption_dropout, manifest)
    latents = store.read([it["image"] for it in items], ("latents",))
    texts = store.read([record["empty"], *validation_keys, *distinct], TEXT_FIELDS)

    def stack(keys: Sequence[str]) -> dict[str, Tensor]:
        if not keys:
            return {name: texts[record["empty"]][name][None][:0] for name in TEXT_FIELDS}
        return {name: torch.stack([texts[k][name] for k in keys]) for name in TEXT_FIELDS}

    position = {key: i for i, key in enumerate(distinct)}
    return CachedData.from_rows(
        [latents[it["image"]]["latents"] for it in items],
        [position[it["text"]] for it in items],
        stack(distinct),
        stack([record["empty"]]),
        stack(validation_keys),
        [it["caption"] for it in items],
        [v["prompt"] for v in record["validation"]],
        caption_dropout=caption_dropout,
        manifest=manifest,
    )


def _cache_bytes(store: Store, items: Sequence[dict], distinct: Sequence[str]) -> int:
    """Bytes the cache would take in RAM, from one row of each kind (rows of a kind are alike)."""
    if not items:
        return 0
    reader = ShardReader(store, max_open=2)

    def nbytes(key: str, field: str) -> int:
        handle = reader._handle(key)
        sliced = handle.get_slice(f"{key}.{field}")
        return math.prod(sliced.get_shape()) * _DTYPE_SIZE.get(sliced.get_dtype(), 4)

    text = sum(nbytes(distinct[0], name) for name in TEXT_FIELDS)
    return len(items) * nbytes(items[0]["image"], "latents") + len(distinct) * text


_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def _ram_budget() -> float:
    """A quarter of the memory available now (MemAvailable), or unbounded where it is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 4
    except OSError:
        pass
    return math.inf


def _on_disk(
    record: dict,
    store: Store,
    distinct: list[str],
    validation_keys: list[str],
    caption_dropout: float,
    manifest: Path,
) -> CachedData:
    """A :class:`CachedData` whose latents and caption embeddings are read per batch from the shards."""
    items = record["items"]
    reader = ShardReader(store)
    shapes = [reader.shape(it["image"], "latents") for it in items]
    order = sorted(set(shapes))  # the same bucket order as CachedData.from_rows: same batches
    row_bucket = torch.tensor([order.index(shape) for shape in shapes], dtype=torch.long)
    bucket_rows = [torch.nonzero(row_bucket == b).flatten() for b in range(len(order))]
    row_pos = torch.empty(len(items), dtype=torch.long)
    for rows in bucket_rows:
        row_pos[rows] = torch.arange(len(rows))
    small = store.read([record["empty"], *validation_keys], TEXT_FIELDS)

    def stack(keys: Sequence[str]) -> dict[str, Tensor]:
        if not keys:
            return {name: small[record["empty"]][name][None][:0] for name in TEXT_FIELDS}
        return {name: torch.stack([small[k][name] for k in keys]) for name in TEXT_FIELDS}

    position = {key: i for i, key in enumerate(distinct)}
    return CachedData(
        [DiskRows(reader, [items[int(r)]["image"] for r in rows], "latents") for rows in bucket_rows],
        bucket_rows, row_bucket, row_pos,
        {name: DiskRows(reader, distinct, name) for name in TEXT_FIELDS},
        torch.tensor([position[it["text"]] for it in items], dtype=torch.long),
        stack([record["empty"]]), stack(validation_keys),
        [it["caption"] for it in items], [v["prompt"] for v in record["validation"]],
        caption_dropout=caption_dropout, manifest=manifest,
    )  # fmt: skip


# ---------------------------------------------------------------- disk hygiene


@dataclass
class Usage:
    """What a store holds on disk, and what pruning frees (or, for --info, would free: about)."""

    shards: int
    shard_bytes: int
    manifests: int
    stale_manifests: int
    prunable_shards: int  # old shards holding tensors no kept dataset needs: deleted or rewritten
    prunable_bytes: int

    def summary(self) -> str:
        gb = 1e9
        return (
            f"cache: {self.shards} shards, {self.shard_bytes / gb:.2f} GB; {self.manifests} dataset "
            f"manifests, {self.stale_manifests} unused for the age given; prunable: about "
            f"{self.prunable_bytes / gb:.2f} GB in {self.prunable_shards} shards"
        )


def _referenced_keys(manifests: Iterable[Path]) -> set[str]:
    keys: set[str] = set()
    for path in manifests:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an unreadable manifest protects nothing
        keys.update(it["image"] for it in record.get("items", []))
        keys.update(it["text"] for it in record.get("items", []))
        keys.update(v["text"] for v in record.get("validation", []))
        keys.add(record.get("empty", ""))
    return keys


def usage(root: str | Path, older_than_days: float = 30.0, *, prune: bool = False) -> Usage:
    """Sizes of the store under ``root``; with ``prune``, delete dataset manifests unused (not
    trained from, not re-cached) for ``older_than_days``, then free every tensor no remaining
    manifest needs: a shard none of whose tensors is needed is deleted, one partly needed is
    rewritten with only what is needed (new shard first, then the old one deleted).

    A training run has loaded its manifest, which marks it used, so its tensors stay; shards newer
    than the age are never touched (they may belong to a cache stage whose manifest is not written
    yet). A crash at any point loses nothing a kept dataset needs; at worst a duplicate shard.
    """
    if older_than_days < 0:
        raise ValueError("older_than_days must be >= 0 (a negative age would count every dataset as old)")
    store = Store(Path(root).expanduser() / STORE_NAME)
    cutoff = time.time() - older_than_days * 86400
    manifests = sorted(store.manifests.glob("*.json"))
    stale = [m for m in manifests if m.stat().st_mtime < cutoff]
    needed = _referenced_keys(m for m in manifests if m not in stale)
    by_shard: dict[str, list[str]] = {}
    for key, shard in store.index.items():
        by_shard.setdefault(shard, []).append(key)
    files = [p for p in store.shards.glob("*.safetensors") if not p.name.startswith(".")]
    prunable: dict[Path, list[str]] = {}  # old shard -> the keys in it still needed
    for path in files:
        keys = by_shard.get(path.name, [])
        keep = [k for k in keys if k in needed]
        if path.stat().st_mtime < cutoff and len(keep) < len(keys):
            prunable[path] = keep
    estimate = sum(
        int(path.stat().st_size * (1 - len(keep) / len(by_shard[path.name])))
        for path, keep in prunable.items()
    )
    result = Usage(
        len(files), sum(p.stat().st_size for p in files), len(manifests), len(stale), len(prunable), estimate
    )
    if prune:
        for manifest in stale:
            manifest.unlink(missing_ok=True)
        for path, keep in prunable.items():
            if keep:
                with safe_open(str(path), framework="pt") as f:
                    wanted = {name for name in f.keys() if name.split(".", 1)[0] in keep}  # noqa: SIM118
                    store.write_shard({name: f.get_tensor(name) for name in sorted(wanted)})
            path.unlink(missing_ok=True)
        present = {p.name for p in store.shards.glob("*.safetensors")}
        index: dict[str, set[str]] = {}
        for key, shard in store.index.items():
            if shard in present:
                index.setdefault(shard, set()).add(key)
        lines = "".join(json.dumps({"shard": s, "keys": sorted(k)}) + "\n" for s, k in sorted(index.items()))
        write_text_atomic(store.root / "index.jsonl", lines)
    return result
