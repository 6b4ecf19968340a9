"""Checked items: every source's records go through the same caption and image checks.

Nothing here loads a model, so a dataset that cannot train (no usable image, a wrong column name)
is a one-line :class:`~soar_lite.errors.UserError` before any GPU work, and a file that cannot be
used is skipped with a warning naming it, never a crash mid-run. One summary line says how many
items were skipped and why, and which conversions (CMYK, 16-bit, alpha, EXIF rotation, cp1252
captions) were applied.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from soar_lite.config import BUILTIN, DataConfig
from soar_lite.data.captions import finish_caption
from soar_lite.data.images import BadImage, decode_rgb, probe
from soar_lite.data.sources import Record, hf_image_bytes, list_records, open_hf
from soar_lite.errors import UserError

log = logging.getLogger("soar_lite.data")
BUILTIN_DATA_SIZE = 256
BUILTIN_DATA_SEED = 1234
BUILTIN_NOVEL_SHARE = 2 / 3  # of the built-in fine-tuning set in the colour the base never saw
WARNINGS_PER_REASON = 20  # a folder of 10,000 broken files gets 20 lines per reason, then a count


@dataclass(frozen=True)
class Item:
    """One training example: where its image bytes are, its final caption (never dropped out here),
    its displayed size and content digest (the cache key's image part)."""

    image: Path  # the image file, or the saved dataset folder of an HF row
    caption: str
    name: str = ""
    row: int = -1  # row of a saved HF dataset (-1: ``image`` is a file)
    split: str = ""
    column: str = ""
    width: int = 0  # as displayed (EXIF rotation applied)
    height: int = 0
    aspect: float = 0.0  # a requested width/height (SOAR jsonl bw/bh); 0 = the image's own
    digest: str = ""  # sha256 of the image bytes

    @property
    def label(self) -> str:
        return self.name or str(self.image)


class Skips:
    """Skipped items by reason: each one warned (up to a cap per reason) and summed up in one line."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = {}

    def add(self, name: str, reason: str) -> None:
        category = reason.split(" (")[0]
        names = self.by_reason.setdefault(category, [])
        names.append(name)
        if len(names) <= WARNINGS_PER_REASON:
            log.warning("skipped %s: %s", name, reason)

    def __len__(self) -> int:
        return sum(len(names) for names in self.by_reason.values())

    def summary(self) -> str:
        parts = [f"{len(names)} {reason}" for reason, names in sorted(self.by_reason.items())]
        return f"{len(self)} skipped: {', '.join(parts)}" if parts else "none skipped"


@dataclass
class DataReport:
    """The usable items of a dataset and what the checks did to the rest."""

    items: list[Item]
    path: Path
    fmt: str
    skips: Skips
    conversions: Counter = field(default_factory=Counter)
    repeated: dict[str, int] = field(default_factory=dict)  # kohya folder -> its repeats

    def summary(self) -> str:
        line = f"data: {len(self.items)} items from {self.path} ({self.fmt}); {self.skips.summary()}"
        if self.repeated:
            folders = ", ".join(f"'{name}' x{n}" for name, n in sorted(self.repeated.items()))
            line += f"; kohya folder repeats: {folders}"
        if self.conversions:
            line += "; converted: " + ", ".join(f"{n} {what}" for what, n in sorted(self.conversions.items()))
        return line


def builtin_data_folder() -> Path:
    """The built-in fine-tuning set (made once under the soar-lite home, no download): captioned
    shapes, two thirds of them in a colour the built-in base never saw (orange), the rest from the
    base's own world so that the LoRA learns the new colour without forgetting the old ones."""
    from soar_lite.paths import home_dir
    from soar_lite.toy import write_shapes_folder

    folder = home_dir() / "data" / f"shapes-novel-{BUILTIN_DATA_SIZE}-{BUILTIN_DATA_SEED}"
    return write_shapes_folder(folder, BUILTIN_DATA_SIZE, BUILTIN_DATA_SEED, novel_share=BUILTIN_NOVEL_SHARE)


def read_image_bytes(item: Item | Record) -> bytes:
    """The raw bytes of an item's image, from a file or a saved HF dataset row ("" if missing)."""
    if item.row < 0:
        return item.image.read_bytes() if item.image.is_file() else b""
    ds = open_hf(str(item.image), item.split, item.column)
    return hf_image_bytes(ds[item.row][item.column], item.image)


def _no_caption(record: Record, fmt: str, cfg: DataConfig) -> str:
    if fmt == "folder" and record.caption is None:
        return f"no caption (no {record.image.stem}{cfg.caption_ext}; add one or set data.default_caption)"
    return "no caption (empty or missing; add one or set data.default_caption)"


def load_items(cfg: DataConfig, path: str | Path | None = None) -> DataReport:
    """The checked items of the dataset ``cfg`` names (``path`` overrides ``cfg.path``).

    Raises :class:`UserError` when no item is usable; otherwise warns once per skipped file and
    logs the summary line when anything was skipped.
    """
    where = Path(path) if path is not None else None
    if where is None:
        where = builtin_data_folder() if cfg.path == BUILTIN else Path(cfg.path).expanduser()
    options = {
        "caption_ext": cfg.caption_ext,
        "image_column": cfg.image_column,
        "caption_column": cfg.caption_column,
        "split": cfg.split,
        "image_dir": cfg.image_dir,
        "kohya_folders": cfg.kohya_folders,
    }
    listing = list_records(where, cfg.format, options)
    skips, conversions = Skips(), Counter()
    for name, reason in listing.skipped:
        skips.add(name, reason)
    items: list[Item] = []
    repeated: dict[str, int] = {}
    first_of: dict[str, str] = {}
    for record in listing.records:
        if record.dup_key and record.dup_key in first_of:
            skips.add(record.name, f"duplicate name (same name as {first_of[record.dup_key]}, which is kept)")
            continue
        first_of.setdefault(record.dup_key or f"#{len(first_of)}", record.name)
        caption = finish_caption(
            record.caption, cfg.default_caption or record.class_caption, cfg.trigger_word
        )
        if not caption:
            skips.add(record.name, _no_caption(record, listing.fmt, cfg))
            continue
        data = read_image_bytes(record)
        try:
            info = probe(data)
        except BadImage as exc:
            skips.add(record.name, str(exc))
            continue
        conversions.update(info.conversions())
        if record.encoding == "cp1252":
            conversions["cp1252 caption"] += 1
        item = _item(record, caption, info.width, info.height, hashlib.sha256(data).hexdigest())
        items.extend([item] * record.repeats)  # the same content key: encoded and cached once
        if record.repeats > 1:
            repeated[f"{record.repeats}_{record.class_caption}"] = record.repeats
    report = DataReport(items, where, listing.fmt, skips, conversions, repeated)
    if not items:
        found = "no image files" if not listing.records and not listing.skipped else skips.summary()
        raise UserError(f"no usable captioned images in {where} ({found})")
    if skips:
        log.warning(report.summary())
    return report


def _item(record: Record, caption: str, width: int, height: int, digest: str) -> Item:
    return Item(
        image=record.image,
        caption=caption,
        name=record.name,
        row=record.row,
        split=record.split,
        column=record.column,
        width=width,
        height=height,
        aspect=record.aspect,
        digest=digest,
    )


def verify_items(items: Iterable[Item]) -> tuple[list[Item], Skips]:
    """Fully decode each item (truncated or damaged files fail only here); the good ones and the skips.

    The cache runs this on the items it must encode, before it loads any encoder.
    """
    good, skips = [], Skips()
    for item in items:
        try:
            decode_rgb(read_image_bytes(item))
        except BadImage as exc:
            skips.add(item.label, str(exc))
            continue
        good.append(item)
    return good, skips


def list_items(folder: str | Path, caption_ext: str = ".txt", default_caption: str = "") -> list[Item]:
    """Checked items of a kohya-style folder (images + same-name captions); bad files warned and skipped."""
    cfg = DataConfig(
        path=str(folder), format="folder", caption_ext=caption_ext, default_caption=default_caption
    )
    return load_items(cfg).items


__all__ = [
    "DataReport",
    "Item",
    "Skips",
    "builtin_data_folder",
    "list_items",
    "load_items",
    "read_image_bytes",
    "verify_items",
]
