"""``soar-lite plan``: estimated peak GPU memory of a preset on a model, from the config alone.

The transformer is built on the meta device (no weights, no download: SD3.5-Medium/Large configs
ship with the package), its linears counted, and each part of the peak estimated:

* base weights at the chosen quantization (linears quantized, the rest at the base dtype);
* LoRA weights, their gradients and the optimizer's states (fp32 adapter);
* activations kept for backward at the preset's resolution and batch, with or without gradient
  checkpointing. Coefficients were measured on tiny SD3 transformers with the saved-tensor meter of
  ``soar-lite bench step`` (every joint block keeps ~14.3 values per token per hidden unit; a dual-
  attention block ~7.3 more per *image* token; a checkpointed block keeps its input, 1 value per
  token per hidden unit) and are re-checked by ``tests/test_plan.py`` against fresh measurements;
* SOAR extras: with per-term backward only one term's graph is alive at a time, so SOAR adds just
  its few latent-sized tensors (z1, the rollout state, the CFG velocity) over SFT, for any K;
* fixed costs: CUDA context and the VAE decoder kept for validation images.

Real peaks also depend on the allocator and kernels: a 20 % margin is added to activations and the
numbers are labelled estimates until measured on a GPU (the CUDA preflight does that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soar_lite.config import BUILTIN, TrainConfig
from soar_lite.errors import UserError

CONFIGS = Path(__file__).resolve().parent / "model_configs"
ALIASES = {
    "sd3.5-medium": "sd3.5-medium",
    "stabilityai/stable-diffusion-3.5-medium": "sd3.5-medium",
    "sd3.5-large": "sd3.5-large",
    "stabilityai/stable-diffusion-3.5-large": "sd3.5-large",
}
GIB = 2**30
TOKEN_COEF_JOINT = 14.33  # saved values per token per hidden unit, one joint block, no checkpointing
TOKEN_COEF_DUAL_IMAGE = 7.3  # extra per image token in a dual-attention (attn2) block
CONST_COEF = 16  # per-sample, per-block values independent of tokens, in hidden-unit multiples
ACTIVATION_MARGIN = 1.2
CUDA_CONTEXT_GB = 0.6
VAE_DECODER_GB = 0.1
QUANT_BYTES = {
    "none": None,
    "nf4": 0.5 + 4 / 64,
    "int8": 1.0 + 4 / 4096,
    "torchao-int8": 1.0,
    "torchao-fp8": 1.0,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def transformer_config(model: str) -> dict[str, Any]:
    """The transformer config of a known model name/id, a diffusers folder, or the built-in tiny base."""
    if model in ALIASES:
        return json.loads((CONFIGS / f"{ALIASES[model]}.json").read_text())
    if model == BUILTIN:
        from soar_lite.toy.tiny_sd3 import build_tiny_components

        return dict(build_tiny_components()["transformer"].config)
    file = Path(model) / "transformer" / "config.json"
    if not file.is_file():
        raise UserError(
            f"plan: no transformer config for {model!r}; use a pipeline folder or one of: "
            f"{', '.join(sorted(set(ALIASES)))}"
        )
    return json.loads(file.read_text())


@dataclass
class Plan:
    """Estimated GiB per part of the peak, and the verdict for a tier."""

    model: str
    parts: dict[str, float]
    tier_gb: float | None

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.tier_gb is None else self.total <= self.tier_gb * 0.95

    def render(self) -> str:
        lines = [f"memory plan for {self.model} (estimate, GiB)"]
        lines += [f"  {name:38s} {value:7.2f}" for name, value in self.parts.items()]
        lines.append(f"  {'total':38s} {self.total:7.2f}")
        if self.tier_gb is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} a {self.tier_gb:g} GB card (95 % usable)")
        return "\n".join(lines)


def _count(config: dict[str, Any], targets: list[str], rank: int) -> tuple[int, int, int]:
    """(params in linears, other params, LoRA params) of the transformer built on the meta device."""
    from diffusers import SD3Transformer2DModel

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = SD3Transformer2DModel(**kwargs)
    linear = other = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            if any(name == t or name.endswith("." + t) for t in targets):
                lora += rank * (module.in_features + module.out_features)
    other = sum(p.numel() for p in model.parameters()) - linear
    return linear, other, lora


def activation_values(
    config: dict[str, Any], resolution: int, text_tokens: int, checkpointing: bool
) -> float:
    """Values (per sample) kept for backward by the transformer at ``resolution`` (see module doc)."""
    image_tokens = (resolution // 8 // config["patch_size"]) ** 2
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    layers, dual = config["num_layers"], len(config.get("dual_attention_layers") or ())
    tokens = image_tokens + text_tokens
    full_block = (TOKEN_COEF_JOINT * tokens + CONST_COEF) * hidden
    dual_extra = TOKEN_COEF_DUAL_IMAGE * image_tokens * hidden
    if checkpointing:
        return layers * tokens * hidden + full_block + dual_extra
    return layers * full_block + dual * dual_extra


def plan(cfg: TrainConfig, model: str, tier_gb: float | None = None) -> Plan:
    """The estimated peak of training ``cfg`` on ``model`` (a name, id or folder)."""
    config = transformer_config(model)
    linear, other, lora = _count(config, list(cfg.lora.targets), cfg.lora.rank)
    base_bytes = DTYPE_BYTES[cfg.model.dtype]
    per_linear = QUANT_BYTES[cfg.model.quant] or base_bytes
    optim_bytes = {"adamw8bit": 2, "adafactor": 1}.get(cfg.optim.optimizer, 8)  # adafactor: factored, ~0
    seq = cfg.model.max_sequence_length or 256
    text_tokens = 77 + seq if config.get("joint_attention_dim", 4096) >= 4096 else 10 + seq
    resolution = cfg.data.resolution or 1024
    act_elem = 2 if cfg.mixed_precision in ("bf16", "fp16") or cfg.model.dtype != "float32" else 4
    acts = activation_values(config, resolution, text_tokens, cfg.model.gradient_checkpointing)
    latents = cfg.batch_size * 16 * (resolution // 8) ** 2 * 4
    parts = {
        f"base weights ({cfg.model.quant}, {cfg.model.dtype})": (linear * per_linear + other * base_bytes)
        / GIB,
        f"LoRA r{cfg.lora.rank} + grads + {cfg.optim.optimizer} states": lora * (4 + 4 + optim_bytes) / GIB,
        f"activations (batch {cfg.batch_size}, {resolution}px, ckpt "
        f"{'on' if cfg.model.gradient_checkpointing else 'off'})": cfg.batch_size
        * acts
        * act_elem
        * ACTIVATION_MARGIN
        / GIB,
        "SOAR extras (per-term backward, any K)": 0.0 if cfg.effective_lambda_aux == 0 else 6 * latents / GIB,
        "CUDA context + VAE decoder": CUDA_CONTEXT_GB + VAE_DECODER_GB,
    }
    return Plan(model, parts, tier_gb)


def tier_of(preset: str) -> float | None:
    """``24gb`` -> 24.0; presets without a VRAM tier in their name -> None."""
    name = Path(preset).stem
    return float(name[:-2]) if name.endswith("gb") and name[:-2].isdigit() else None
