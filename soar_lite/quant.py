"""Quantized frozen bases: which backend runs where, and a clear error before any long work.

bitsandbytes NF4 / int8 load through diffusers only with CUDA; torchao int8 weight-only runs on
CPU too; torchao float8 needs a GPU with compute capability >= 8.9. LoRA weights stay in full
precision on top of the quantized linears.
"""

from __future__ import annotations

from typing import Any

import torch

from soar_lite.errors import UserError

RUNS_ON_CPU = ("none", "torchao-int8")


def check_backend(quant: str, device: torch.device | str) -> None:
    """Raise a one-line UserError if ``quant`` cannot run on ``device``, naming what can."""
    device = torch.device(device)
    if quant in RUNS_ON_CPU:
        return
    if device.type != "cuda":
        raise UserError(
            f"quant={quant} needs a CUDA GPU (this run is on {device.type}); on this machine use "
            f"one of: {', '.join(RUNS_ON_CPU)}"
        )
    if quant == "torchao-fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError(
            "quant=torchao-fp8 needs compute capability >= 8.9 (Ada/Hopper); use quant=nf4 or int8"
        )


def diffusers_config(quant: str, compute_dtype: torch.dtype) -> Any:
    """The diffusers ``quantization_config`` for ``from_pretrained`` (None for an unquantized base)."""
    if quant == "none":
        return None
    if quant in ("nf4", "int8"):
        from diffusers import BitsAndBytesConfig

        if quant == "nf4":
            return BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
            )
        return BitsAndBytesConfig(load_in_8bit=True)
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if quant == "torchao-int8" else Float8WeightOnlyConfig())
