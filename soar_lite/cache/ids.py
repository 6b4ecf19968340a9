"""Content identity: the hash every cache key is made of, and the content ids of the model files.

Owns ``CACHE_VERSION`` and ``_key`` (sha256 of JSON parts: a key hashes *everything that changes* the
tensor stored under it), ``Fingerprints`` (model files hashed once, remembered by (path, size, mtime);
hub blobs named by their hash cost nothing), ``ModelIds`` and ``model_ids`` (the ids of the VAE and of
the text side, read from the files without loading a model) and ``local_model_folder`` (a path, or the
hub snapshot of only the parts the cache needs).

Why apart: these ids are what makes the cache never stale and never recomputed needlessly, and they
need no store, no encoder and no tensor; the rest of the package builds on them and this module imports
none of it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from soar_lite.errors import UserError
from soar_lite.paths import write_text_atomic

CACHE_VERSION = 2
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
