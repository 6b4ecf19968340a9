"""Image bytes in, oriented RGB out: every odd file a user's folder holds is converted or refused here.

Why one place: trainers that open images in several spots handle EXIF rotation in one and not the
other (sd-scripts#1316: images trained rotated against their captions), or crash mid-run on the one
CMYK or 16-bit file. :func:`probe` is the cheap header check run on every item before any model
loads; :func:`decode_rgb` is the full decode (truncated files fail here) used before encoding.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from soar_lite.data.buckets import cover_crop

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white, not whatever RGB they hid
EXIF_ORIENTATION = 0x0112
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")
_READ_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)


class BadImage(Exception):
    """An image that cannot be trained on; the message is the reason shown next to the file name."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: size as displayed (after EXIF rotation) and what converting it takes."""

    width: int
    height: int
    mode: str
    rotated: bool
    transparency: bool

    def conversions(self) -> list[str]:
        """Names of the conversions this image needs (for the data summary), e.g. ``["CMYK"]``."""
        notes = []
        if self.mode == "CMYK":
            notes.append("CMYK")
        if self.mode in ("P", "PA"):
            notes.append("palette")
        if self.mode in _HIGH_DEPTH:
            notes.append("16-bit")
        if self.mode in _ALPHA or self.transparency:
            notes.append("alpha")
        if self.rotated:
            notes.append("EXIF-rotated")
        return notes


def _open(data: bytes) -> Image.Image:
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large but legal: allowed
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels", str(exc))
        pixels = f"{int(found.group(1)) / 1e6:.0f} MP" if found else "size"
        raise BadImage(f"decompression-bomb size ({pixels}, over Pillow's limit)") from None
    except _READ_ERRORS as exc:
        raise BadImage(f"not a readable image ({exc.__class__.__name__})") from None


def probe(data: bytes) -> ImageInfo:
    """The header of an image (no pixel decode): displayed size, mode; :class:`BadImage` if unusable.

    Images over Pillow's decompression-bomb limit (~179 MP) are refused here, from the header, before
    any memory is spent on their pixels.
    """
    img = _open(data)
    with img:
        width, height = img.size
        if width < 1 or height < 1:
            raise BadImage(f"empty image ({width}x{height})")
        try:
            orientation = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
        except _READ_ERRORS:
            orientation = 1  # a broken EXIF block is not a broken image
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        return ImageInfo(width, height, img.mode, orientation not in (1, 2), "transparency" in img.info)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16-bit scaled (not clipped), alpha composited on white, CMYK converted."""
    if img.mode in _HIGH_DEPTH:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))  # mode L
    if img.mode in ("P", "PA") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in _ALPHA:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode an image as displayed: EXIF orientation applied, RGB; :class:`BadImage` if truncated."""
    img = _open(data)
    try:
        img.load()
        with contextlib.suppress(*_READ_ERRORS):  # unreadable EXIF: keep the pixels as stored
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except _READ_ERRORS as exc:
        detail = str(exc).split("(")[0].strip() or exc.__class__.__name__
        raise BadImage(f"damaged image ({detail})") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as (3, H, W) float32 in [-1, 1], the range the VAE encodes."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_pixels(source: Path | bytes, size: int | tuple[int, int]) -> torch.Tensor:
    """An image as (3, H, W) in [-1, 1] for ``size`` = (width, height) or a square side.

    EXIF-rotated, converted to RGB, resized to cover the size and centre-cropped (no distortion).
    """
    width, height = (size, size) if isinstance(size, int) else size
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return to_tensor(cover_crop(decode_rgb(data), (width, height)))
