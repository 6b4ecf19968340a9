"""Atomic, complete checkpoints: adapter, optimizer, LR schedule, every RNG, step and data position.

A checkpoint is written into a temporary folder and renamed into place only when complete, so
``--resume latest`` can never pick a half-written one; the oldest beyond ``keep`` are deleted.
Resuming restores everything that influences the next step, so N steps straight and N/2 steps +
resume + N/2 steps give the same adapter.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from soar_lite import lora
from soar_lite.ema import LoraEMA
from soar_lite.errors import UserError
from soar_lite.run_folder import STEP_DIR, TMP_STEP_PREFIX, checkpoints

__all__ = ["STEP_DIR", "TrainState", "checkpoints", "load", "resolve", "save"]


@dataclass
class TrainState:
    """The loop's position: optimizer steps done and micro-batches consumed (the data position)."""

    step: int = 0
    batches: int = 0


def resolve(root: Path, which: str) -> Path:
    """``latest`` or a checkpoint folder path -> the folder, or a clear error."""
    if which == "latest":
        found = checkpoints(root)
        if not found:
            raise UserError(f"--resume latest: no complete checkpoint under {root}")
        return found[-1]
    path = Path(which)
    if not (path / "state.pt").is_file():
        raise UserError(f"--resume {which}: not a complete checkpoint folder (no state.pt)")
    return path


def _rng_states(generator: torch.Generator) -> dict[str, Any]:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save(
    root: Path,
    state: TrainState,
    transformer: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    generator: torch.Generator,
    keep: int,
    ema: LoraEMA | None = None,
) -> Path:
    """Write ``root/step-NNNNNN`` atomically, then prune to the newest ``keep``. A failed write
    (a full disk) removes its temporary folder and leaves every earlier checkpoint as it was."""
    final = root / f"step-{state.step:06d}"
    tmp = root / f"{TMP_STEP_PREFIX}{state.step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        lora.atomic_save(lora.adapter_state(transformer), tmp / "adapter.safetensors")
        if ema is not None:
            lora.atomic_save(ema.state_dict(), tmp / "ema.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(
            {"step": state.step, "batches": state.batches, "rng": _rng_states(generator)}, tmp / "state.pt"
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(
    path: Path,
    transformer: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    generator: torch.Generator,
    ema: LoraEMA | None = None,
) -> TrainState:
    """Restore a checkpoint written by :func:`save` into live objects; returns the loop position."""
    lora.restore_adapter(transformer, load_file(str(path / "adapter.safetensors")))
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise UserError(f"--resume {path}: this checkpoint has no EMA (was ema_decay=0 then?)")
        ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    # map to the CPU: rank 0 saved cuda:0 tensors; the optimizers move their state to each parameter's
    # device, and a GPU checkpoint then also resumes on a machine without that GPU
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False, map_location="cpu"))
    saved = torch.load(path / "state.pt", weights_only=False, map_location="cpu")
    rng = saved["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(step=saved["step"], batches=saved["batches"])
