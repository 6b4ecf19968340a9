"""Which base model a run means, and the image size it trains at: shared by train, sample, export.

Kept apart from :mod:`soar_lite.train` so that sampling and exporting do not import the training
loop (and the loop does not import them back) just to resolve ``builtin`` or a resolution.
"""

from __future__ import annotations

from typing import Any

from soar_lite.config import BUILTIN
from soar_lite.errors import UserError


def resolve_model(path: str) -> str:
    """``builtin`` -> the tiny trained toy base (built once, cached); anything else as given."""
    if path != BUILTIN:
        return path
    from soar_lite.toy import ensure_tiny_base

    return str(ensure_tiny_base())


def resolve_resolution(cfg: Any, model_path: str) -> int:
    """The preset's resolution, else the model's native one (the tiny default's 32, SD3.5 / FLUX.1
    1024: :func:`soar_lite.families.native_resolution`)."""
    from soar_lite.families import native_resolution

    return cfg.data.resolution or native_resolution(model_path)


def check_resolution(resolution: int, multiple: int) -> None:
    """Validation and sampling draw squares of side ``resolution``: the model only takes sides that
    are multiples of its family's size multiple (VAE factor x patch), so say so before any step."""
    if resolution % multiple:
        lower = max(multiple, resolution // multiple * multiple)
        raise UserError(
            f"data.resolution={resolution} is not a multiple of {multiple}, the size multiple of this "
            f"model: use {lower} or {lower + multiple}"
        )
