"""LoRA adapters: attach (peft), save in the diffusers layout with the scale folded in, load back.

The saved file holds ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` with
``lora_B`` already multiplied by alpha/rank and no ``.alpha`` keys and no LoRA-config metadata:
diffusers' SD3 loader rejects ``.alpha`` keys and rescales by alpha/rank from metadata, ComfyUI
applies scale 1 when there is no alpha, so folding the scale is the one layout both load the same.
rsLoRA (alpha/sqrt(rank)) is folded the same way. LoKr and LoHa (``lora.type``) are peft's adapters
too; their file is LyCORIS-keyed and described in :mod:`soar_lite.adapters`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor

from soar_lite import adapters
from soar_lite.config import LoraConfig
from soar_lite.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"


def add_lora(transformer: torch.nn.Module, cfg: LoraConfig) -> list[torch.nn.Parameter]:
    """Attach a fresh adapter to the frozen ``transformer``; return its (fp32) trainable parameters.

    The text-query projection of a block whose text stream ends there (SD3's last block:
    ``context_pre_only``) is left out: its output is discarded, so an adapter on it would never
    get a gradient, only take optimizer state and file space."""
    dead = [
        f"{name}.add_q_proj"
        for name, module in transformer.named_modules()
        if getattr(module, "context_pre_only", False) and hasattr(module, "add_q_proj")
    ]
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights="gaussian",
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        target_modules=list(cfg.targets),
        exclude_modules=dead or None,
    )
    if cfg.type in adapters.LYCORIS_TYPES:  # LoKr / LoHa on the same modules
        peft_cfg = adapters.lycoris_config(cfg, peft_cfg)
    try:
        transformer.add_adapter(peft_cfg)
    except ValueError as exc:
        if any(
            text in str(exc) for text in ("not found in the base model", "Target modules", "No modules were")
        ):
            raise UserError(f"lora.targets {cfg.targets} match no module of this model: {exc}") from None
        raise
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # train the adapter in fp32 whatever the base dtype
    return params


def adapter_state(transformer: torch.nn.Module) -> dict[str, Tensor]:
    """The raw (unfolded) adapter weights, for exact checkpoints."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(transformer).items()}


def restore_adapter(transformer: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Load raw adapter weights saved by :func:`adapter_state` (resume)."""
    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"checkpoint adapter does not match this model/config: {unexpected[:3]}")


def lora_scale(cfg: LoraConfig) -> float:
    """peft's LoRA scale: alpha/rank, or alpha/sqrt(rank) with rsLoRA (stable across ranks)."""
    return cfg.alpha / (math.sqrt(cfg.rank) if cfg.use_rslora else cfg.rank)


def folded_state(transformer: torch.nn.Module, cfg: LoraConfig) -> dict[str, Tensor]:
    """Diffusers-layout weights with the scale folded into ``lora_B`` (see module docstring);
    LoKr/LoHa: LyCORIS keys, scale folded likewise (:mod:`soar_lite.adapters`)."""
    if cfg.type in adapters.LYCORIS_TYPES:
        return adapters.folded_state(adapter_state(transformer), cfg)
    scale = lora_scale(cfg)
    out: dict[str, Tensor] = {}
    for key, value in adapter_state(transformer).items():
        value = value.float()
        out[f"transformer.{key}"] = value * scale if ".lora_B." in key else value
    return out


def atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that a crash never leaves a half file under the final name."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_lora(
    transformer: torch.nn.Module, cfg: LoraConfig, folder: Path, record: dict, name: str = LORA_FILE
) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` (folded, diffusers layout) with a small JSON note."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    note = {"rank": cfg.rank, "type": cfg.type, "scale_folded": True, **record}
    meta = {"format": "pt", "soar_lite": json.dumps(note)}
    atomic_save(folded_state(transformer, cfg), path, meta)
    return path


def read_lora(path: str | Path) -> dict[str, Tensor]:
    """A LoRA file's tensors, with a clear error for a missing or foreign file."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise UserError(f"no LoRA file at {path}")
    return load_file(str(path))


def training_note(path: str | Path) -> dict:
    """The JSON note soar-lite wrote into a LoRA file's metadata ({} for other files)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("soar_lite", "{}"))
    except (OSError, ValueError):
        return {}
