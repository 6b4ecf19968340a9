"""The shard store: content-addressed tensors on disk, written so that a crash leaves nothing trusted.

Layout under the cache folder (``store-v2/``)::

    shards/<name>.safetensors   immutable; tensors "<key>.<field>"; written to a temp file, fsynced,
                                then renamed: a shard exists completely or not at all
    index.jsonl                 append-only {"shard", "keys"} lines; rebuilt from shard headers for
                                any shard it misses (a run killed between rename and append)
    manifests/<hash>.json       one dataset's items -> keys, buckets, captions; what training reads
    fingerprints.json           sha256 of model files by (path, size, mtime): big files hashed once

A run killed mid-way leaves complete shards (reused next time) and at most one temp file, which no
later run trusts (and which the next run on this host deletes).

Owns ``STORE_NAME`` and ``cache_root`` (where a store lives), ``TEXT_FIELDS`` (the fields a text key's
tensors are stored under), :class:`Store` (shards, index, manifests, damaged-shard handling) and the
readers that serve single tensors without loading whole shards: :class:`ShardReader` (a bounded set of
open memory-mapped shards) and :class:`DiskRows` (the rows of one field, read when indexed).

Why apart: the store's crash-safety is one concern with its own tests, and it knows nothing of images,
captions, encoders or batches: ``encode`` writes into it, ``order`` and ``prune`` read it; it imports
only ``ids``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from soar_lite.cache.ids import CACHE_VERSION
from soar_lite.errors import UserError
from soar_lite.paths import home_dir, write_text_atomic

log = logging.getLogger("soar_lite.cache")
STORE_NAME = f"store-v{CACHE_VERSION}"
TEXT_FIELDS = ("prompt_embeds", "pooled_prompt_embeds")


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


def cache_root(cache_dir: str) -> Path:
    """``data.cache_dir``, or the shared ``$SOAR_LITE_HOME/cache`` when it is empty."""
    return Path(cache_dir).expanduser() if cache_dir else home_dir() / "cache"
