"""Disk hygiene: what a store holds, and pruning what no kept dataset needs (``soar-lite cache --prune``).

Owns :class:`Usage`, :func:`usage` and ``_referenced_keys`` (the keys a set of manifests protects).
Pruning never touches what a kept dataset or a recent cache stage may need; a crash at any point loses
nothing needed, at worst leaving a duplicate shard.

Why apart: it is the one part that deletes from a shared store, run on its own and with its own
rules (manifest age, partial-shard rewrite); it reads the store and imports only ``store``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from soar_lite.cache.store import STORE_NAME, Store
from soar_lite.paths import write_text_atomic


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
