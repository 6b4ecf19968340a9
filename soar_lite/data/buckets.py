"""Aspect-ratio buckets: train each image near its own shape at the preset's pixel budget.

A square centre crop throws away the sides of every landscape photo. Instead each image goes to the
bucket (width, height) whose aspect ratio is nearest its own, where every bucket has about
``resolution**2`` pixels and sides that are multiples of the family's ``resolution_multiple``
(VAE factor x patch size: 16 for SD3). The image is resized to cover the bucket and centre-cropped.
Batches are drawn from one bucket at a time (``cache.CachedData.rows``), so tensors stack.
A dataset of same-shaped images (the toy default: all 32x32) stays in one bucket.
"""

from __future__ import annotations

import functools
import math

from PIL import Image


@functools.lru_cache(maxsize=16)
def make_buckets(resolution: int, multiple: int, max_aspect: float = 2.5) -> tuple[tuple[int, int], ...]:
    """Every (width, height), multiples of ``multiple``, with at most ``resolution**2`` pixels and
    aspect within ``[1/max_aspect, max_aspect]``: for each width the tallest height that fits, and
    its transpose."""
    if resolution < multiple:
        raise ValueError(f"resolution {resolution} is below the size multiple {multiple}")
    budget = resolution * resolution
    buckets = set()
    width = multiple
    while width <= math.sqrt(budget * max_aspect) + multiple:
        height = (budget // width) // multiple * multiple
        if height >= multiple and 1 / max_aspect <= width / height <= max_aspect:
            buckets.update({(width, height), (height, width)})  # portrait mirrors landscape
        width += multiple
    square = resolution // multiple * multiple
    buckets.add((square, square))
    return tuple(sorted(buckets))


def nearest_bucket(aspect: float, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket whose width/height is nearest ``aspect`` (in log ratio); ties go to more pixels."""
    target = math.log(aspect)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1], b))


def bucket_for(
    width: int,
    height: int,
    resolution: int,
    multiple: int,
    *,
    enabled: bool = True,
    max_aspect: float = 2.5,
    aspect: float = 0.0,
) -> tuple[int, int]:
    """The training size of an image of ``width`` x ``height`` (or of a requested ``aspect`` > 0).

    With buckets off, every image is the centre square of side ``resolution`` (a multiple of
    ``multiple``, rounded down).
    """
    if not enabled:
        side = resolution // multiple * multiple
        return side, side
    return nearest_bucket(aspect or width / height, make_buckets(resolution, multiple, max_aspect))


def cover_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``img`` (keeping its aspect) to cover ``size`` = (width, height), then centre-crop it."""
    width, height = size
    scale = max(width / img.width, height / img.height)
    new = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    if new != img.size:
        img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))
