"""A deterministic synthetic captioned dataset: one coloured shape on a plain background.

Why this exists: the built-in tiny default needs a *trained* base whose fine-tunes can be told
apart, without any download. Images of "a red circle at the top left" are cheap to draw, have a
small fixed vocabulary (so a tiny local CLIP tokenizer covers every caption) and can be scored by a
rule (is the requested colour at the requested place?). The attribute dict of each sample, or
``caption_attributes(caption)`` for a generated image, is what such a checker needs.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Saturated, well-separated colours so a rule can tell them apart after a lossy tiny VAE.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
}

# Colours the built-in base never sees in pretraining (their words are in the vocabulary, so their
# captions tokenize, but no training image has them): the built-in fine-tuning task teaches one.
# Orange sits between red and yellow, so a model that drifts off its trajectory falls back to a
# colour it knows: the exposure-bias case the quality benchmark needs (README, "Quality benchmark").
NOVEL_COLORS: dict[str, tuple[int, int, int]] = {"orange": (245, 140, 30)}
PALETTE: dict[str, tuple[int, int, int]] = {**COLORS, **NOVEL_COLORS}  # what the checker can read

# Shape centre as a fraction of (width, height): a 3x3 grid of named places.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top": (0.5, 0.27),
    "top right": (0.73, 0.27),
    "left": (0.27, 0.5),
    "center": (0.5, 0.5),
    "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73),
    "bottom": (0.5, 0.73),
    "bottom right": (0.73, 0.73),
}

BACKGROUND: tuple[int, int, int] = (235, 235, 235)
CAPTION_TEMPLATE = "a {color} {shape} at the {position}"

# Every word a caption can contain, in a fixed order (the tiny tokenizer's vocabulary is built from it).
VOCAB_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "at", "the", *PALETTE, *SHAPES, *(word for place in POSITIONS for word in place.split())]
    )
)

_SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges look like real images, not pixel art


def caption_for(color: str, shape: str, position: str) -> str:
    """The one caption of a (colour, shape, position) triple: the template keeps the vocabulary fixed."""
    return CAPTION_TEMPLATE.format(color=color, shape=shape, position=position)


def all_captions() -> list[str]:
    """Every caption the dataset can produce (135), e.g. to pre-encode or to sample an eval set."""
    return [caption_for(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


def novel_captions(colors: tuple[str, ...] = tuple(NOVEL_COLORS)) -> list[str]:
    """Every caption of the colours the base never saw (27 per colour): the fine-tuning task's."""
    return [caption_for(c, s, p) for c in colors for s in SHAPES for p in POSITIONS]


def caption_attributes(caption: str) -> dict[str, str]:
    """Parse a toy caption back into {"color", "shape", "position"}, so generated images can be scored."""
    for color in PALETTE:
        for shape in SHAPES:
            prefix = caption_for(color, shape, "")
            if caption.startswith(prefix) and caption[len(prefix) :] in POSITIONS:
                return {"color": color, "shape": shape, "position": caption[len(prefix) :]}
    raise ValueError(f"not a toy shapes caption: {caption!r}")


def draw_shape(
    color: str, shape: str, position: str, size: int = 32, *, jitter: tuple[float, float, float] = (0, 0, 1)
) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one sample; ``jitter`` = (dx, dy) in fractions of the side, and a radius multiplier."""
    big = size * _SUPERSAMPLE
    fx, fy = POSITIONS[position]
    cx, cy = (fx + jitter[0]) * big, (fy + jitter[1]) * big
    radius = 0.17 * big * jitter[2]
    rgb = PALETTE[color]
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=rgb)
    elif shape == "square":
        half = radius * 0.85  # same visual area as the circle, roughly
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=rgb)
    elif shape == "triangle":
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)], fill=rgb
        )
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    attrs = {
        "color": color,
        "shape": shape,
        "position": position,
        "rgb": rgb,
        "center": (cx / big, cy / big),  # fractions of the side, after jitter
        "radius": radius / big,
    }
    return image, attrs


def make_shape_sample(
    rng: random.Random, size: int = 32, novel_share: float = 0.0
) -> tuple[Image.Image, str, dict[str, Any]]:
    """One random sample from ``rng``: uniform over colours, shapes and places, with a little jitter;
    with probability ``novel_share`` the colour is one the base never saw (``NOVEL_COLORS``)."""
    novel = novel_share > 0 and rng.random() < novel_share  # no draw at 0: the base's data stays as it was
    color = rng.choice(list(NOVEL_COLORS if novel else COLORS))
    shape = rng.choice(SHAPES)
    position = rng.choice(list(POSITIONS))
    jitter = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(0.85, 1.15))
    image, attrs = draw_shape(color, shape, position, size, jitter=jitter)
    return image, caption_for(color, shape, position), attrs


def shapes_dataset(
    n: int, seed: int, size: int = 32, novel_share: float = 0.0
) -> list[tuple[Image.Image, str, dict[str, Any]]]:
    """``n`` samples, the same for the same arguments: a private RNG, never the global one."""
    rng = random.Random(seed)
    return [make_shape_sample(rng, size, novel_share) for _ in range(n)]


def _is_complete(folder: Path, n: int) -> bool:
    digits = _digits(n)
    return all((folder / f"{i:0{digits}d}{ext}").is_file() for i in range(n) for ext in (".png", ".txt"))


def _digits(n: int) -> int:
    return max(4, len(str(max(n - 1, 0))))


def write_shapes_folder(
    folder: str | os.PathLike[str], n: int, seed: int, size: int = 32, novel_share: float = 0.0
) -> Path:
    """Write ``n`` samples as kohya-style ``0000.png`` + ``0000.txt`` pairs and return the folder.

    Written into a temporary sibling and renamed at the end, so an interrupted write never leaves a
    half folder that looks complete; a folder that already holds all ``n`` pairs is left as it is.
    """
    folder = Path(folder)
    if folder.is_dir() and _is_complete(folder, n):
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not a complete shapes folder of {n} samples")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        digits = _digits(n)
        for i, (image, caption, _) in enumerate(shapes_dataset(n, seed, size, novel_share)):
            image.save(tmp / f"{i:0{digits}d}.png")
            (tmp / f"{i:0{digits}d}.txt").write_text(caption, encoding="utf-8")
        if folder.exists():
            folder.rmdir()  # empty (checked above); os.replace cannot overwrite a directory portably
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_complete(folder, n):  # a concurrent writer finished first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
