"""The built-in base's weights as the package ships them: fp16 safetensors, recipe and hashes beside.

Why ship them: building the base (``pretrain.build_tiny_base``) takes ~30 minutes on a 2-core CPU,
and a new user's first ``soar-lite train`` should start fine-tuning within seconds, not pretrain
first. The package carries the build of the default :class:`~soar_lite.toy.pretrain.ToyRecipe`
(``soar_lite/toy/base/``, a few MB); ``ensure_tiny_base`` unpacks it into the soar-lite home (fp16
back to fp32, the dtype the toy trains in) when the requested recipe is the shipped one and every
file's SHA-256 matches ``manifest.json``. Any other recipe, or a damaged file, is built from the
recipe as before, so the shipped weights are a cache of the recipe, never a replacement for it.

Rebuild after changing the recipe (the test ``test_shipped_base_is_the_default_recipe`` fails until
then): ``python -m soar_lite.toy.shipped`` builds the default recipe in a temporary home and
writes ``soar_lite/toy/base/``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

SHIPPED_DIR = Path(__file__).with_name("base")
MANIFEST = "manifest.json"
_SKIP = {MANIFEST, ".soar_lite_complete"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in _SKIP)


def shipped_manifest(folder: Path = SHIPPED_DIR) -> dict[str, Any] | None:
    """The shipped base's manifest (recipe, recipe key, file hashes, build stats), or None."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def damaged_files(folder: Path = SHIPPED_DIR, manifest: dict[str, Any] | None = None) -> list[str]:
    """Files whose SHA-256 differs from the manifest, or that are missing or not listed."""
    manifest = manifest if manifest is not None else shipped_manifest(folder)
    if manifest is None:
        return [MANIFEST]
    listed = manifest.get("files", {})
    present = {p.relative_to(folder).as_posix() for p in _files(folder)}
    bad = sorted(present ^ set(listed))
    bad += [name for name in sorted(present & set(listed)) if _sha256(folder / name) != listed[name]]
    return bad


def _convert(source: Path, target: Path, dtype: torch.dtype) -> None:
    """Copy a safetensors file with its floating tensors cast to ``dtype`` (others as they are)."""
    tensors = load_file(str(source))
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in cast.items()}, str(target))


def _copy_tree(source: Path, target: Path, dtype: torch.dtype) -> None:
    for path in _files(source):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            _convert(path, out, dtype)
        else:
            shutil.copy2(path, out)


def pack_base(built: Path, target: Path = SHIPPED_DIR, stats: dict[str, Any] | None = None) -> Path:
    """Write a built base folder as the package ships it: fp16 weights, manifest with hashes."""
    from soar_lite.toy.tiny_sd3 import read_toy_settings

    settings = read_toy_settings(built)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    _copy_tree(built, target, torch.float16)
    manifest = {
        "recipe": settings.get("recipe"),
        "recipe_key": settings.get("recipe_key"),
        "build_stats": stats or {},
        "files": {p.relative_to(target).as_posix(): _sha256(p) for p in _files(target)},
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target


def unpack_base(target: Path, source: Path = SHIPPED_DIR) -> dict[str, Any]:
    """Copy the shipped base into ``target`` with fp32 weights; returns the manifest's build stats."""
    manifest = shipped_manifest(source) or {}
    _copy_tree(source, target, torch.float32)
    return {**manifest.get("build_stats", {}), "unpacked_from": "package (soar_lite/toy/base)"}


def shipped_for(recipe_key: str, source: Path = SHIPPED_DIR) -> bool:
    """Whether the package ships an intact build of the recipe with this key."""
    manifest = shipped_manifest(source)
    if manifest is None or manifest.get("recipe_key") != recipe_key:
        return False
    bad = damaged_files(source, manifest)
    if bad:
        print(
            f"soar-lite: the shipped tiny base is damaged ({', '.join(bad[:3])}); building it instead",
            file=sys.stderr,
        )
    return not bad


def main() -> None:
    """Build the default recipe in a temporary home and write it into ``soar_lite/toy/base``."""
    from soar_lite.toy.pretrain import ToyRecipe, build_tiny_base

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="soar-lite-base-") as tmp:
        folder = Path(tmp) / "base"
        stats = build_tiny_base(folder, ToyRecipe())
        print(pack_base(folder, SHIPPED_DIR, stats))


if __name__ == "__main__":
    main()
