"""Quantized frozen bases: which backend runs where, and a clear error before any long work.

bitsandbytes NF4 / int8: the denoiser loads block by block (:mod:`soar_lite.blockload`) and each
block's linears become bitsandbytes ones where the block will live (``quantize_bnb_linears``), on
the CPU and the GPU alike, so the NF4 / int8 path the tests train is the one a card runs; only a
model whose safetensors cannot be read that way loads through diffusers' ``BitsAndBytesConfig``
(CUDA). torchao int8 weight-only runs on CPU and GPU; torchao float8 needs a GPU with compute
capability >= 8.9. LoRA weights stay in full precision on top of the quantized linears, and the
same quantized base serves the training passes and the rollout.
"""

from __future__ import annotations

from typing import Any

import torch

from soar_lite.errors import UserError

RUNS_ON_CPU = ("none", "torchao-int8", "nf4", "int8")
# Outside the transformer blocks (embedders, final norm and projection: <1 % of the weights) stays in
# the base dtype on both paths, so the CPU-tested layout is the CUDA one.
KEEP_DENSE = (
    "pos_embed", "x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out",
    "img_in", "txt_in",  # Qwen-Image's embedders
)  # fmt: skip
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold: bitsandbytes' and diffusers' default


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


def diffusers_config(quant: str, compute_dtype: torch.dtype, device: torch.device | str) -> Any:
    """The diffusers ``quantization_config`` for ``from_pretrained`` (None: unquantized, or bnb on CPU)."""
    if quant == "none":
        return None
    if quant in ("nf4", "int8"):
        if torch.device(device).type != "cuda":
            return None  # diffusers refuses bnb without a GPU: quantize_bnb_linears after loading
        from diffusers import BitsAndBytesConfig

        if quant == "nf4":
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=compute_dtype,
                llm_int8_skip_modules=list(KEEP_DENSE),  # (also the 4-bit skip list in diffusers)
            )
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=list(KEEP_DENSE)
        )
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if quant == "torchao-int8" else Float8WeightOnlyConfig())


def quantize_bnb_linears(
    model: torch.nn.Module, quant: str, compute_dtype: torch.dtype, device: torch.device | str | None = None
) -> int:
    """Swap the transformer blocks' ``nn.Linear`` layers for bitsandbytes NF4 / int8 ones (every
    block list: FLUX's single blocks too; given one block, that block's).

    Quantization happens when the module is moved to a device (``Params4bit`` / ``Int8Params``);
    embedders and the output layer (``KEEP_DENSE``) stay in the base dtype, as the CUDA path's
    ``llm_int8_skip_modules`` keeps them; int8 uses the same outlier threshold.
    ``device``: where each new layer goes, quantized on the way (default: where its weight is). The
    weights must still be on the CPU when a GPU is the target: bitsandbytes' int8 quantizes only on
    a move from the CPU, so the loader keeps a block in RAM until its linears are quantized.
    Returns the number of layers swapped.
    """
    import bitsandbytes as bnb

    from soar_lite.swap import BLOCK_LISTS

    lists = [getattr(model, name) for name in BLOCK_LISTS if hasattr(model, name)] or [model]
    swapped = 0
    for parent in [m for blocks in lists for m in blocks.modules()]:
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            weight = child.weight.data.to(compute_dtype)
            bias = child.bias is not None
            if quant == "nf4":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias,
                                          compute_dtype=compute_dtype, quant_type="nf4")  # fmt: skip
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=bias, has_fp16_weights=False,
                    threshold=INT8_THRESHOLD,
                )  # fmt: skip
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if bias:
                layer.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, layer.to(child.weight.device if device is None else device))
            swapped += 1
    return swapped
