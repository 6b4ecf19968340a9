"""What every family's loader shares: model-folder checks, the transformer load with quantization,
placing the encoders, and the typed layout a folder's configs give without loading any weight."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soar_lite import offload
from soar_lite.errors import UserError

log = logging.getLogger("soar_lite.cache")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FamilyLayout:
    """A model folder as the cache and the planner see it, read from its JSON configs only.

    ``multiple``: image sides must be multiples of this (VAE factor x patch or packing);
    ``text_parts``: the folders whose files decide the text embeddings (their content id);
    ``text_extra``: config values that also change them (SD3's zero-T5 width when T5 is absent)."""

    multiple: int
    text_parts: tuple[str, ...]
    text_extra: tuple[Any, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path} is missing or not JSON: is this a diffusers pipeline folder?") from None


def model_settings(path: str) -> dict[str, Any]:
    """Settings a model folder carries for soar-lite (``soar_lite.json``: a tiny default's sizes)."""
    file = Path(path) / "soar_lite.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


@dataclass(frozen=True)
class FolderSettings:
    """A model folder's ``soar_lite.json``, typed: the sizes a tiny base was built and trained at.
    ``None`` = not set there (the family's own default applies, see ``families.native_resolution``)."""

    resolution: int | None = None
    max_sequence_length: int | None = None
    toy: str | None = None

    @classmethod
    def read(cls, path: str | Path) -> FolderSettings:
        raw = model_settings(str(path))
        try:
            return cls(
                resolution=int(raw["resolution"]) if "resolution" in raw else None,
                max_sequence_length=int(raw["max_sequence_length"]) if "max_sequence_length" in raw else None,
                toy=str(raw["toy"]) if "toy" in raw else None,
            )
        except (TypeError, ValueError):
            raise UserError(f"{Path(path) / 'soar_lite.json'} holds a non-integer size") from None


def check_model_path(path: str) -> None:
    folder = Path(path)
    if folder.exists() and not (folder / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    if not folder.exists() and path.count("/") != 1:
        raise UserError(f"model {path!r} is neither a local folder nor a hub id like org/name")


def transformer_folder(path: str) -> Path | None:
    """The folder holding the denoiser's config and safetensors: a local pipeline's ``transformer``,
    or a hub id's, fetched into the hub cache (only those files; None where that fails: the plain
    ``from_pretrained`` then gives its own error)."""
    if Path(path).exists():
        local = Path(path) / "transformer"
        return local if local.is_dir() else None
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(path, allow_patterns=["transformer/*.json", "transformer/*.safetensors"])
    except Exception as exc:  # offline, gated, unknown id: from_pretrained says it in its own words
        log.info("load: cannot fetch %s/transformer (%s): loading through from_pretrained", path, exc)
        return None
    folder = Path(snapshot) / "transformer"
    return folder if folder.is_dir() else None


def load_transformer(
    cls: Any, path: str, dtype: torch.dtype, quant: str, device: torch.device | str, swap_blocks: int = 0
) -> Any:
    """The frozen denoiser, quantized as ``quant`` says, on ``device`` but for the last ``swap_blocks``
    blocks, which stay in system RAM for the block swap (the same path for every family).

    A local folder's safetensors load block by block (:mod:`soar_lite.blockload`: the GPU never
    holds the swapped blocks, RAM never a second copy); hub ids, ``.bin`` weights and torchao load
    whole through ``from_pretrained`` and the swap moves its blocks out afterwards."""
    from soar_lite import blockload
    from soar_lite import quant as quantization

    folder = transformer_folder(path) if quant in ("none", "nf4", "int8") else None
    if folder is not None and blockload.has_checkpoint(folder):
        return blockload.load_blockwise(cls, folder, dtype, quant, device, swap_blocks)
    if swap_blocks:
        log.warning("load: %s loads whole onto %s before the swap moves %d blocks out (block-by-block "
                    "loading reads safetensors, quant none/nf4/int8)", path, device, swap_blocks)  # fmt: skip
    model = cls.from_pretrained(
        path,
        subfolder="transformer",
        dtype=dtype,
        quantization_config=quantization.diffusers_config(quant, dtype, device),
    )
    model.requires_grad_(False)
    bnb_loaded_by_diffusers = quant in ("nf4", "int8") and torch.device(device).type == "cuda"
    if not bnb_loaded_by_diffusers:
        if quant in ("nf4", "int8"):
            quantization.quantize_bnb_linears(model, quant, dtype)
        model.to(device)
    return model


def load_pipeline(
    pipeline_cls: Any,
    transformer_cls: Any,
    path: str,
    text_parts: tuple[str, ...],
    *,
    device: torch.device | str,
    dtype: str,
    quant: str,
    transformer: bool,
    text_encoders: bool,
    vae: bool,
    encoder_offload: str,
    absent: Callable[[], dict[str, None]] | None = None,
    swap_blocks: int = 0,
) -> tuple[Any, Any, torch.dtype]:
    """Every family's load: the pipeline without its denoiser (and without the VAE or the text side,
    ``text_parts``, when not asked for), the frozen denoiser quantized as ``quant`` says, the
    encoders placed by ``encoder_offload``. ``absent()`` names more parts to leave out (read inside
    the same error guard: SD3 without T5). Returns (pipeline, denoiser or None, torch dtype)."""
    from soar_lite import quant as quantization

    check_model_path(path)
    quantization.check_backend(quant, device)
    torch_dtype = DTYPES[dtype]
    parts: dict[str, Any] = {"transformer": None}
    if not vae:
        parts["vae"] = None
    if not text_encoders:
        parts.update(dict.fromkeys(text_parts))
    try:
        parts.update(absent() if absent is not None else {})
        pipe = pipeline_cls.from_pretrained(path, dtype=torch_dtype, **parts)
        model = None
        if transformer:
            model = load_transformer(transformer_cls, path, torch_dtype, quant, device, swap_blocks)
    except OSError as exc:
        raise UserError(f"cannot load model {path!r}: {str(exc).splitlines()[0]}") from None
    names = [name for name in text_parts if name.startswith("text_encoder")]
    encoders = [m for m in (getattr(pipe, name, None) for name in names) if m is not None]
    place_parts(pipe.vae, encoders, torch.device(device), encoder_offload)
    return pipe, model, torch_dtype


def sequence_length(path: str, requested: int, default: int) -> int:
    """Text tokens per prompt: as requested, else the folder's ``soar_lite.json``, else ``default``."""
    return requested or (FolderSettings.read(path).max_sequence_length or default)


def place_parts(
    vae: Any, encoders: list[torch.nn.Module], device: torch.device, encoder_offload: str
) -> None:
    """VAE onto ``device``; the text encoders as ``encoder_offload`` says (auto: by free memory)."""
    mode = encoder_offload
    sizes = [offload.module_bytes(m) for m in encoders]
    if mode == "auto":
        budget = offload.free_device_bytes(device)  # read before the VAE moves, then its size taken off
        if budget is not None and vae is not None:
            budget -= offload.module_bytes(vae)
        mode = offload.choose(sizes, budget)
        if mode != "none":
            log.warning(
                "cache: the text encoders (%.1f GB) do not all fit the GPU's %.1f GB free: "
                "encoder_offload=%s (%s)", sum(sizes) / 1e9, (budget or 0) / 1e9, mode,
                "one encoder on the GPU at a time" if mode == "model" else "layers streamed through the GPU",
            )  # fmt: skip
    if vae is not None:
        vae.to(device)
    offload.place(encoders, mode, device)
