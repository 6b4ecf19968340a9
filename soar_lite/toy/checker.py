"""A rule-based scorer for toy-shapes images: is the requested colour and shape where the caption says?

Why a rule and not a learned classifier: the quality benchmark must run on a CPU in minutes, with
nothing to download and nothing to train that could itself be biased towards one fine-tune. The
toy images are one saturated shape on a flat light background (``shapes.py``), so plain pixel
rules read them back: foreground = pixels far from the background colour; colour = the palette
entry nearest to the foreground's core; place = the nearest of the 3x3 named centres to the
centre of the foreground's bounding box; shape = how much of its bounding box the foreground fills (square ~1,
circle ~pi/4) and how much of it lies in the top half (an apex-up triangle ~1/4, the others 1/2).
``tests/test_quality.py`` checks the rules on real drawn shapes.

Also here: two set-level distances between generated and real images (colour histograms and
Fréchet distance of small pooled images), so "looks like the data" is measured without a network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from soar_lite.toy.shapes import BACKGROUND, PALETTE, POSITIONS, caption_attributes

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel is "shape"
MIN_PIXELS = 4  # fewer foreground pixels than this: nothing was drawn
# An apex-up triangle has ~1/4 of its area in the top half of its box (circle, square: 1/2); real
# drawn shapes measure 0.25-0.32 against >= 0.45. Square fills its box (>= 0.95), circle ~pi/4 (<= 0.88).
TRIANGLE_TOP_SHARE_BELOW = 0.38
SQUARE_FILL_ABOVE = 0.92


@dataclass
class Reading:
    """What the rules read from one image (``None`` everywhere when no shape was found)."""

    color: str | None
    shape: str | None
    position: str | None
    center: tuple[float, float] | None  # fractions of (width, height)
    pixels: int


def _foreground(rgb: np.ndarray) -> np.ndarray:
    distance = np.linalg.norm(rgb - np.asarray(BACKGROUND, dtype=np.float32), axis=-1)
    return distance > FOREGROUND_DISTANCE


def _nearest(value: np.ndarray, table: dict[str, tuple[float, ...]]) -> str:
    names = list(table)
    points = np.asarray([table[name] for name in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(points - value, axis=-1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the biggest 4-connected blob: stray specks must not move the centre or the box."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        current += 1
        stack, size = [(y, x)], 0
        labels[y, x] = current
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if (
                    0 <= ny < mask.shape[0]
                    and 0 <= nx < mask.shape[1]
                    and mask[ny, nx]
                    and not labels[ny, nx]
                ):
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else mask


def _prune_spurs(mask: np.ndarray) -> np.ndarray:
    """Drop pixels with at most one 4-neighbour in the mask: Lanczos ringing leaves such one-pixel
    spurs beside a straight edge (seen on orange squares at 32 px: fill 0.85, read as a circle)."""
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    pruned = mask & (neighbours >= 2)
    return pruned if pruned.sum() >= MIN_PIXELS else mask


def _shape_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    middle = (ys.min() + ys.max() + 1) / 2
    top_share = ((ys + 0.5 < middle).sum() + 0.5 * (ys + 0.5 == middle).sum()) / len(ys)
    if top_share < TRIANGLE_TOP_SHARE_BELOW:
        return "triangle"
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > SQUARE_FILL_ABOVE else "circle"


def read_image(image: Image.Image) -> Reading:
    """Colour, shape and named place of the one shape in ``image`` (any size)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = _foreground(rgb)
    if mask.sum() < MIN_PIXELS:
        return Reading(None, None, None, None, int(mask.sum()))
    mask = _prune_spurs(_largest_component(mask))
    height, width = mask.shape
    distance = np.linalg.norm(rgb - np.asarray(BACKGROUND, dtype=np.float32), axis=-1)
    core = mask & (distance >= np.percentile(distance[mask], 50))  # anti-aliased edges blend with grey
    color = _nearest(rgb[core].mean(axis=0), PALETTE)
    ys, xs = np.nonzero(mask)
    center = ((xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height)
    # A triangle's pixel centroid sits below its drawing centre; the box centre does not.
    box_center = ((xs.min() + xs.max() + 1) / 2 / width, (ys.min() + ys.max() + 1) / 2 / height)
    position = _nearest(np.asarray(box_center, dtype=np.float32), POSITIONS)
    return Reading(color, _shape_of(mask), position, center, int(mask.sum()))


def score(image: Image.Image, caption: str) -> dict[str, bool]:
    """Per attribute, did the image get it right; ``all`` = colour, shape and place together."""
    want = caption_attributes(caption)
    got = read_image(image)
    marks = {
        "color": got.color == want["color"],
        "shape": got.shape == want["shape"],
        "position": got.position == want["position"],
    }
    marks["all"] = all(marks.values())
    return marks


def accuracy(images: Sequence[Image.Image], captions: Sequence[str]) -> dict[str, float]:
    """Share of images right per attribute (and all three), over a set."""
    marks = [score(image, caption) for image, caption in zip(images, captions, strict=True)]
    return {key: float(np.mean([m[key] for m in marks])) for key in ("color", "shape", "position", "all")}


# ---------------------------------------------------------------- set-level distances


def color_histogram(images: Sequence[Image.Image], bins: int = 8) -> np.ndarray:
    """Joint RGB histogram of all pixels of a set, normalised to sum 1 (``bins`` per channel)."""
    pixels = np.concatenate([np.asarray(im.convert("RGB")).reshape(-1, 3) for im in images])
    index = (pixels.astype(np.int64) * bins // 256) @ np.asarray([bins * bins, bins, 1])
    hist = np.bincount(index, minlength=bins**3).astype(np.float64)
    return hist / hist.sum()


def histogram_distance(a: Sequence[Image.Image], b: Sequence[Image.Image], bins: int = 8) -> float:
    """Total-variation distance (0 = same colour distribution, 1 = disjoint) between two sets."""
    return float(0.5 * np.abs(color_histogram(a, bins) - color_histogram(b, bins)).sum())


def pooled_features(images: Sequence[Image.Image], side: int = 8) -> np.ndarray:
    """Each image box-downsampled to ``side`` x ``side`` RGB in [0, 1]: a small feature vector."""
    return np.stack(
        [
            np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BOX), dtype=np.float64).ravel()
            / 255
            for im in images
        ]
    )


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, own features)."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # trace sqrt(cov_x cov_y) = sum of sqrt of the eigenvalues of sqrt(cov_x) cov_y sqrt(cov_x)
    values, vectors = np.linalg.eigh(cov_x)
    root_x = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_x @ cov_y @ root_x)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * trace_sqrt)


def pixel_fd(a: Sequence[Image.Image], b: Sequence[Image.Image], side: int = 8) -> float:
    """Fréchet distance of 8x8-pooled RGB images between two sets (lower = closer to the data)."""
    return frechet_distance(pooled_features(a, side), pooled_features(b, side))
