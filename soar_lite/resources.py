"""The data files that ship inside the package: presets (YAML) and model configs (JSON).

They are found through :mod:`importlib.resources`, never through paths next to the source tree, so
an install from a wheel (``pip install soar-lite``, ``pip install .``, ``pip install git+...``) finds
the same files as an editable checkout. ``pyproject.toml`` declares every ``*.yaml`` / ``*.json`` in
these folders as package data: a preset or model config dropped into the folder ships and is listed
with no change to the code.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; only the type checker needs the name
    from importlib.resources.abc import Traversable

PRESETS = "presets"
MODEL_CONFIGS = "model_configs"


def data_files(folder: str, suffix: str) -> dict[str, Traversable]:
    """The package's data files in ``folder`` that end with ``suffix``, by file stem, sorted.

    A ``Traversable`` rather than a ``Path`` because that is all ``importlib.resources`` promises (a
    zipped install has no real paths); callers only need ``read_text``.
    """
    root = resources.files("soar_lite").joinpath(folder)
    if not root.is_dir():
        return {}
    found = {p.name[: -len(suffix)]: p for p in root.iterdir() if p.is_file() and p.name.endswith(suffix)}
    return dict(sorted(found.items()))
