"""Dataset sources: captioned images in, checked (image path, caption) items out.

This is the basic source (a kohya-style folder: ``name.png`` + ``name.txt``); the data issue adds
the other formats, buckets and the full set of bad-input cases. Images are read here only to
check them; pixels are produced for the cache stage by :func:`load_pixels`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from soar_lite.errors import UserError

log = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUILTIN_DATA_SIZE = 256
BUILTIN_DATA_SEED = 1234


@dataclass(frozen=True)
class Item:
    """One training example: where the image is and its caption (never modified by dropout)."""

    image: Path
    caption: str


def read_caption(path: Path, default: str) -> str:
    """A caption file's text, UTF-8 or (for Windows 'smart quotes') cp1252; ``default`` if none."""
    if not path.is_file():
        return default
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        text = raw.decode("utf-8", errors="replace")
    return " ".join(text.split()) or default


def builtin_data_folder() -> Path:
    """The built-in captioned shapes set (made once under the soar-lite home, no download)."""
    from soar_lite.paths import home_dir
    from soar_lite.toy import write_shapes_folder

    folder = home_dir() / "data" / f"shapes-{BUILTIN_DATA_SIZE}-{BUILTIN_DATA_SEED}"
    return write_shapes_folder(folder, BUILTIN_DATA_SIZE, BUILTIN_DATA_SEED)


def list_items(folder: str | Path, caption_ext: str = ".txt", default_caption: str = "") -> list[Item]:
    """Images of a folder (recursively) with their same-name captions; bad files skipped with a warning."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"data folder {str(folder)!r} does not exist")
    items: list[Item] = []
    skipped: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
        caption = read_caption(path.with_suffix(caption_ext), default_caption)
        if not caption:
            skipped.append(f"{path.name}: no caption (add {path.stem}{caption_ext} or set default_caption)")
            continue
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            skipped.append(f"{path.name}: unreadable image ({exc.__class__.__name__})")
            continue
        items.append(Item(path, caption))
    for reason in skipped:
        log.warning("skipped %s", reason)
    if not items:
        raise UserError(f"no usable captioned images in {root} ({len(skipped)} skipped)")
    return items


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """An image as (3, res, res) in [-1, 1]: EXIF-rotated, RGB, short side resized, centre-cropped."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA") else img.convert("RGB")
        scale = resolution / min(img.size)
        size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
