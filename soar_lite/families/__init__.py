"""Model families behind one seam: ``family_class`` / ``detect_family`` / ``load_family``.

Nothing outside this package imports a concrete family module; ``model.family=auto`` reads the
folder's ``model_index.json`` (the pipeline class), else the transformer's class name.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from soar_lite.errors import UserError

FAMILIES = {
    "sd3": "soar_lite.families.sd3:SD3Family",
    "flux": "soar_lite.families.flux:FluxFamily",
    "qwen": "soar_lite.families.qwen_image:QwenImageFamily",
}
PIPELINE_CLASSES = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "QwenImagePipeline": "qwen",
}
TRANSFORMER_CLASSES = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "QwenImageTransformer2DModel": "qwen",
}


def family_class(name: str) -> Any:
    """The family class for ``name`` (imported on first use: each pulls its own diffusers classes)."""
    try:
        module, attr = FAMILIES[name].split(":")
    except KeyError:
        raise UserError(f"unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}") from None
    return getattr(importlib.import_module(module), attr)


def detect_family(path: str | Path) -> str:
    """The family of a pipeline folder, from its ``model_index.json`` or its transformer config."""
    folder = Path(path)
    for file, table in ((folder / "model_index.json", PIPELINE_CLASSES),
                        (folder / "transformer" / "config.json", TRANSFORMER_CLASSES)):  # fmt: skip
        try:
            name = json.loads(file.read_text(encoding="utf-8")).get("_class_name", "")
        except (OSError, ValueError):
            continue
        if name in table:
            return table[name]
        if name:
            raise UserError(f"{folder}: {name} is not a supported family (supported: {', '.join(FAMILIES)})")
    if not folder.exists():  # a hub id: the name is all there is before a download
        name = str(path).lower()
        return "flux" if "flux" in name else "qwen" if "qwen" in name else "sd3"
    raise UserError(
        f"{folder} has no model_index.json: is this a diffusers SD3 pipeline folder? "
        "(or a FLUX.1 or Qwen-Image one)"
    )


def resolve_family(setting: str, path: str | Path) -> str:
    """``model.family``: ``auto`` detects; an explicit name must match what the folder holds."""
    if setting == "auto":
        return detect_family(path)
    family_class(setting)
    if Path(path).exists():
        found = detect_family(path)
        if found != setting:
            raise UserError(f"model.family={setting} but {path} holds a {found} model: use model.family=auto")
    return setting


def native_resolution(path: str | Path) -> int:
    """The side a model trains and samples at unless told: its folder's ``soar_lite.json`` (the tiny
    bases' 32), else its family's native size (1024 for SD3.5 and FLUX.1). One rule for train,
    sample and the benchmarks."""
    from soar_lite.families.common import FolderSettings

    own = FolderSettings.read(path).resolution
    return own if own is not None else int(family_class(detect_family(path)).native_resolution)


def text_length(path: str | Path) -> int:
    """T5 tokens per prompt unless ``model.max_sequence_length`` says: the folder's, else the family's
    pipeline default (SD3: 256, FLUX.1: 512)."""
    from soar_lite.families.common import sequence_length

    return sequence_length(str(path), 0, int(family_class(detect_family(path)).default_max_sequence_length))


def load_family(name: str, path: str, **kwargs: Any) -> Any:
    """Load a family's parts (see each family's ``load`` for the keyword arguments)."""
    return family_class(name).load(path, **kwargs)
