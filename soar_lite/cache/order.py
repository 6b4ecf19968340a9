"""What training reads: :class:`CachedData`, its batch order, and :func:`load_cache`.

Owns the batch order (every bucket shuffled, cut into batches topped up from its start, the batch
order shuffled, all from generators seeded by (seed, epoch, bucket) alone), caption dropout drawn per
global batch, the (z0, cond, uncond) batch, and :func:`load_cache`, which reads a manifest into RAM
or, when the cache would not fit (``in_ram`` and ``_ram_budget``), serves the same rows from the
shards per batch (:class:`~soar_lite.cache.store.DiskRows`).

Why apart: a resumed run, or another number of processes, must see exactly the same batches; that
contract lives here alone, needs no encoder and no model, and imports only ``store``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from soar_lite.cache.store import TEXT_FIELDS, DiskRows, ShardReader, Store


def _generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``parts`` alone: the same draws in every process and after resume."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


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
