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

The cache stage runs before training, once per dataset, and frees its encoders before the
transformer loads: it is planned separately. SD3.5's text encoders (~11 GB in bf16, T5-XXL ~9.5)
are larger than the training stage on small cards, so the plan says which ``data.encoder_offload``
``auto`` will pick for the card (the rule of :mod:`soar_lite.offload`), the cache stage's GPU peak
under it, and the system RAM the encoders need (they load into RAM first).

Real peaks also depend on the allocator and kernels: a 20 % margin is added to activations and the
numbers are labelled estimates until measured on a GPU (the CUDA preflight does that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soar_lite.config import BUILTIN, LoraConfig, TrainConfig
from soar_lite.errors import UserError
from soar_lite.resources import MODEL_CONFIGS, data_files
from soar_lite.swap import WINDOW

ALIASES = {
    "sd3.5-medium": "sd3.5-medium",
    "stabilityai/stable-diffusion-3.5-medium": "sd3.5-medium",
    "sd3.5-large": "sd3.5-large",
    "stabilityai/stable-diffusion-3.5-large": "sd3.5-large",
    "flux.1-dev": "flux.1-dev",
    "black-forest-labs/FLUX.1-dev": "flux.1-dev",
    "flux.1-schnell": "flux.1-schnell",
    "black-forest-labs/FLUX.1-schnell": "flux.1-schnell",
    "qwen-image": "qwen-image",
    "Qwen/Qwen-Image": "qwen-image",
}
GIB = 2**30
TOKEN_COEF_JOINT = 14.33  # saved values per token per hidden unit, one joint block, no checkpointing
TOKEN_COEF_DUAL_IMAGE = 7.3  # extra per image token in a dual-attention (attn2) block
ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}
DORA_FACTOR = 1.65  # a DoRA block keeps this many times a LoRA block's values (default targets)
# FLUX.1 blocks, measured the same way on tiny FluxTransformer2DModels with a LoRA on the FLUX
# targets (1 vs 2 blocks of each kind, 80 and 272 tokens: equal to 0.3 %): a double-stream block keeps
# ~18.5 values per token per hidden unit, a single-stream block (attention + 4x MLP in parallel) ~12.3
TOKEN_COEF_FLUX_DOUBLE = 18.5
TOKEN_COEF_FLUX_SINGLE = 12.3
# Qwen-Image's dual-stream block, measured the same way (1 vs 2 blocks, LoRA on the family's targets,
# 32/80/112 tokens): ~18.5 values per token per hidden unit + 16, as a FLUX double block
TOKEN_COEF_QWEN = 18.5
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
# Public parameter counts of SD3.5's text encoders (CLIP-L and OpenCLIP bigG text towers with their
# projections, the T5 v1.1 XXL encoder) and of its VAE: the same for Medium and Large.
SD35_ENCODER_PARAMS = {"CLIP-L": 123.7e6, "CLIP-G": 695.0e6, "T5-XXL": 4762.3e6}
SD35_VAE_PARAMS = 83.7e6
# FLUX.1 (dev and schnell): CLIP-L text tower (no projection) and the T5 v1.1 XXL encoder; its VAE
FLUX_ENCODER_PARAMS = {"CLIP-L": 123.1e6, "T5-XXL": 4762.3e6}
FLUX_VAE_PARAMS = 83.8e6
# Qwen-Image: the whole Qwen2.5-VL-7B (language model, vision tower, head: the pipeline loads all of it)
# and its video VAE (public counts, rounded)
QWEN_ENCODER_PARAMS = {"Qwen2.5-VL-7B": 8292.2e6}
QWEN_VAE_PARAMS = 126.9e6
ENCODE_WORKSPACE_GB = 0.3  # activations of one chunk of prompts through T5-XXL
STREAMED_LAYERS = 24  # sequential offload holds about one of T5-XXL's 24 blocks at a time
PROCESS_RAM_GB = 1.5  # Python, torch and the libraries, before any weights
# Host-to-device copies from pinned memory: ~12 GB/s is what PCIe 3.0 x16 (or a shared 4.0 x8 slot)
# sustains; PCIe 4.0 x16 reaches ~20-25. The swap's time cost is stated at the slower figure.
PCIE_GB_PER_S = 12.0


def transformer_config(model: str) -> dict[str, Any]:
    """The transformer config of a known model name/id, a diffusers folder, or the built-in tiny base."""
    if model in ALIASES:
        return json.loads(data_files(MODEL_CONFIGS, ".json")[ALIASES[model]].read_text(encoding="utf-8"))
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


def encoder_params(model: str) -> tuple[dict[str, float], float]:
    """(text encoder parameter counts by name, VAE parameter count) of a model, without weights:
    public counts for SD3.5, safetensors headers for a local folder, the tiny base built in code."""
    if model in ALIASES and ALIASES[model].startswith("flux"):
        return dict(FLUX_ENCODER_PARAMS), FLUX_VAE_PARAMS
    if model in ALIASES and ALIASES[model].startswith("qwen"):
        return dict(QWEN_ENCODER_PARAMS), QWEN_VAE_PARAMS
    if model in ALIASES:
        return dict(SD35_ENCODER_PARAMS), SD35_VAE_PARAMS
    if model == BUILTIN:
        from soar_lite.toy.tiny_sd3 import build_tiny_components

        parts = build_tiny_components()
        counts = {
            name: float(sum(p.numel() for p in parts[name].parameters()))
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if parts.get(name) is not None
        }
        return counts, float(sum(p.numel() for p in parts["vae"].parameters()))
    folder = Path(model)
    subs = [sub for sub in sorted(folder.glob("text_encoder*")) if sub.is_dir()]
    counts = {sub.name: _safetensors_params(sub) for sub in subs}
    return {k: v for k, v in counts.items() if v}, _safetensors_params(folder / "vae")


def _safetensors_params(folder: Path) -> float:
    """Parameters stored in a folder's ``*.safetensors`` files, read from their JSON headers only."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for dim in entry["shape"]:
                    n *= dim
                total += n
    return float(total)


@dataclass
class CacheStagePlan:
    """The cache stage: where the text encoders go on this card, its GPU peak, its system RAM."""

    encoders_gb: dict[str, float]
    mode: str
    gpu_peak_gb: float
    ram_gb: float

    def render(self) -> str:
        sizes = ", ".join(f"{name} {gb:.2f}" for name, gb in self.encoders_gb.items())
        how = {
            "none": "all on the GPU",
            "model": "one encoder on the GPU at a time",
            "sequential": "layers streamed through the GPU",
        }[self.mode]
        return "\n".join([
            "cache stage (once per dataset; encoders freed before training)",
            f"  text encoders: {sizes}",
            f"  encoder_offload=auto -> {self.mode} ({how})",
            f"  {'GPU peak':38s} {self.gpu_peak_gb:7.2f}",
            f"  {'system RAM peak':38s} {self.ram_gb:7.2f}",
        ])  # fmt: skip


def plan_cache_stage(model: str, dtype: str, tier_gb: float | None) -> CacheStagePlan:
    """The cache stage of ``model`` at ``dtype`` on a ``tier_gb`` card (None: pick as for a CPU)."""
    from soar_lite import offload

    counts, vae_params = encoder_params(model)
    nbytes = DTYPE_BYTES[dtype]
    sizes = {name: n * nbytes for name, n in counts.items()}
    vae = vae_params * nbytes
    budget = None if tier_gb is None else tier_gb * GIB - vae
    mode = offload.choose(list(sizes.values()), budget)
    largest = max(sizes.values(), default=0.0)
    resident = {"none": sum(sizes.values()), "model": largest, "sequential": largest / STREAMED_LAYERS}[mode]
    return CacheStagePlan(
        {name: size / GIB for name, size in sizes.items()},
        mode,
        CUDA_CONTEXT_GB + (vae + resident) / GIB + ENCODE_WORKSPACE_GB,
        PROCESS_RAM_GB + sum(sizes.values()) / GIB,
    )


@dataclass
class SwapPlan:
    """``model.swap_blocks``: what leaves the GPU, what the RAM holds instead, what crosses PCIe."""

    blocks: int
    of: int
    swapped_gb: float  # the swapped blocks' weights (now in system RAM, pinned)
    in_flight_gb: float  # the swapped blocks on the GPU at once (running + prefetched)
    load_gb: float  # the GPU while loading block by block: context, resident blocks, one being quantized
    ram_gb: float  # system RAM while training
    load_ram_gb: float  # system RAM while loading: the swapped blocks plus the one being read
    copies_per_step: int  # block copies per optimizer step (upper bound: every pass copies each block)
    pcie_gb_per_step: float

    def render(self) -> str:
        seconds = self.pcie_gb_per_step * GIB / 1e9 / PCIE_GB_PER_S
        return "\n".join([
            f"block swap: {self.blocks} of {self.of} blocks in system RAM",
            f"  {'GPU while loading (block by block)':38s} {self.load_gb:7.2f}",
            f"  {'system RAM while loading':38s} {self.load_ram_gb:7.2f}",
            f"  {'system RAM while training':38s} {self.ram_gb:7.2f}",
            f"  PCIe traffic: {self.pcie_gb_per_step:.1f} GiB per optimizer step ({self.copies_per_step} "
            f"block copies), ~{seconds:.1f} s at {PCIE_GB_PER_S:g} GB/s if not hidden behind compute",
        ])  # fmt: skip


@dataclass
class Plan:
    """Estimated GiB per part of the training peak, the verdict for a tier, and the cache stage."""

    model: str
    parts: dict[str, float]
    tier_gb: float | None
    cache: CacheStagePlan | None = None
    swap: SwapPlan | None = None

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        if self.tier_gb is None:
            return None
        load = self.swap.load_gb if self.swap is not None else 0.0
        return max(self.total, load) <= self.tier_gb * 0.95

    def _ram_stages(self) -> list[tuple[float, str, str]]:
        """(GiB, stage, what to change where it does not fit) for each system-RAM figure of the plan."""
        stages = [(0.0, "", "")]
        if self.cache is not None:
            stages.append((self.cache.ram_gb, "the cache stage's text encoders", "cache elsewhere"))
        if self.swap is not None:
            stages.append(
                (self.swap.load_ram_gb, "loading the swapped blocks", "swap fewer blocks (swap_blocks=N)")
            )
        return stages

    def ram_verdict(self, total_gb: float) -> str:
        """One line: whether the plan's RAM peak fits a machine with ``total_gb`` of RAM (90 %: the
        desktop and the page cache keep some), and what to change where it does not."""
        peak, stage, advice = max(self._ram_stages())
        if peak <= total_gb * 0.9:
            return f"system RAM: peak ~{peak:.1f} GiB ({stage}) fits this machine's {total_gb:.1f} GiB"
        return (f"system RAM: peak ~{peak:.1f} GiB ({stage}) does NOT fit this machine's {total_gb:.1f} GiB: "
                f"{advice}, or add RAM / swap space")  # fmt: skip

    def render(self) -> str:
        lines = [f"memory plan for {self.model} (estimate, GiB)"]
        lines += [f"  {name:38s} {value:7.2f}" for name, value in self.parts.items()]
        lines.append(f"  {'total':38s} {self.total:7.2f}")
        if self.tier_gb is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} a {self.tier_gb:g} GB card (95 % usable)")
        if self.swap is not None:
            lines.append(self.swap.render())
        if self.cache is not None:
            lines.append(self.cache.render())
        return "\n".join(lines)


def _count(config: dict[str, Any], targets: list[str], rank: int) -> tuple[int, int, int]:
    """(params in linears, other params, LoRA params) of the transformer built on the meta device."""
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "SD3Transformer2DModel"))
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls(**kwargs)
    linear = other = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            if any(name == t or name.endswith("." + t) for t in targets):
                lora += rank * (module.in_features + module.out_features)
    other = sum(p.numel() for p in model.parameters()) - linear
    return linear, other, lora


def lycoris_counts(config: dict[str, Any], lora_cfg: LoraConfig) -> tuple[int, int, int]:
    """(adapter parameters, delta values saved for backward, the most one block saves) of a LoKr/LoHa
    adapter, counted by attaching peft's own adapter to the transformer built on the meta device.

    peft's LoKr/LoHa forward builds each adapted weight's full update ``delta`` and applies it with
    ``F.linear(x, delta)``; backward needs ``delta`` only where ``x`` needs a gradient, which is
    every adapted linear except the first block's projections of its (frozen) input. These deltas
    do not grow with batch or resolution; with gradient checkpointing one block's are alive at a
    time. (Measured with the saved-tensor meter; re-checked by the tests.)"""
    import diffusers

    from soar_lite.lora import add_lora

    cls = getattr(diffusers, config.get("_class_name", "SD3Transformer2DModel"))
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls(**kwargs)
        model.requires_grad_(False)
        params = sum(p.numel() for p in add_lora(model, lora_cfg))
    first_inputs = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    per_block: dict[str, int] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "get_base_layer") or not hasattr(module, "r"):
            continue
        block = name.split(".")[1] if name.startswith("transformer_blocks.") else name
        if block == "0" and name.endswith(first_inputs):
            continue
        per_block[block] = per_block.get(block, 0) + module.get_base_layer().weight.numel()
    return params, sum(per_block.values()), max(per_block.values(), default=0)


def activation_values(
    config: dict[str, Any], resolution: int, text_tokens: int, checkpointing: bool, dora: bool = False
) -> float:
    """Values (per sample) kept for backward by the transformer at ``resolution`` (see module doc).
    DoRA keeps the base and adapter outputs of every adapted linear apart: its blocks hold
    ``DORA_FACTOR`` times as much (measured like the other coefficients; re-checked by the tests)."""
    if is_flux(config):
        return _flux_activation_values(config, resolution, text_tokens, checkpointing, dora)
    if is_qwen(config):
        return _qwen_activation_values(config, resolution, text_tokens, checkpointing, dora)
    image_tokens = (resolution // 8 // config["patch_size"]) ** 2
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    layers, dual = config["num_layers"], len(config.get("dual_attention_layers") or ())
    tokens = image_tokens + text_tokens
    factor = DORA_FACTOR if dora else 1.0
    full_block = (TOKEN_COEF_JOINT * tokens + CONST_COEF) * hidden * factor
    dual_extra = TOKEN_COEF_DUAL_IMAGE * image_tokens * hidden * factor
    if checkpointing:
        return layers * tokens * hidden + full_block + dual_extra
    return layers * full_block + dual * dual_extra


def is_flux(config: dict[str, Any]) -> bool:
    return config.get("_class_name") == "FluxTransformer2DModel" or "num_single_layers" in config


def is_qwen(config: dict[str, Any]) -> bool:
    return config.get("_class_name") == "QwenImageTransformer2DModel"


def config_family(config: dict[str, Any]) -> str:
    """The family a transformer config belongs to (sd3, flux, qwen)."""
    return "flux" if is_flux(config) else "qwen" if is_qwen(config) else "sd3"


def _qwen_activation_values(
    config: dict[str, Any], resolution: int, text_tokens: int, checkpointing: bool, dora: bool
) -> float:
    """Qwen-Image: 2x2-packed image tokens (1/16 of the pixels per side) + text tokens through its
    dual-stream blocks (coefficient above); a checkpointed block keeps its input."""
    tokens = (resolution // 16) ** 2 + text_tokens
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    block = (TOKEN_COEF_QWEN * tokens + CONST_COEF) * hidden * (DORA_FACTOR if dora else 1.0)
    if checkpointing:
        return config["num_layers"] * tokens * hidden + block
    return config["num_layers"] * block


def _flux_activation_values(
    config: dict[str, Any], resolution: int, text_tokens: int, checkpointing: bool, dora: bool
) -> float:
    """FLUX.1: 2x2-packed image tokens (1/16 of the pixels per side) + T5 tokens through double- and
    single-stream blocks (coefficients above); a checkpointed block keeps its input."""
    image_tokens = (resolution // 16) ** 2
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    double, single = config["num_layers"], config["num_single_layers"]
    tokens = image_tokens + text_tokens
    factor = DORA_FACTOR if dora else 1.0
    double_block = (TOKEN_COEF_FLUX_DOUBLE * tokens + CONST_COEF) * hidden * factor
    single_block = (TOKEN_COEF_FLUX_SINGLE * tokens + CONST_COEF) * hidden * factor
    if checkpointing:
        return (double + single) * tokens * hidden + max(double_block, single_block)
    return double * double_block + single * single_block


def plan(cfg: TrainConfig, model: str, tier_gb: float | None = None) -> Plan:
    """The estimated peak of training ``cfg`` on ``model`` (a name, id or folder)."""
    config = transformer_config(model)
    targets = list(cfg.lora.targets)
    if config_family(config) != "sd3" and targets == LoraConfig().targets:  # the generic default is SD3's
        from soar_lite.families import family_class

        targets = list(family_class(config_family(config)).default_lora_targets)
    linear, other, lora = _count(config, targets, cfg.lora.rank)
    base_bytes = DTYPE_BYTES[cfg.model.dtype]
    per_linear = QUANT_BYTES[cfg.model.quant] or base_bytes
    # adafactor: factored, ~0; prodigy: exp_avg, exp_avg_sq, s and the initial weights p0
    optim_bytes = {"adamw8bit": 2, "adafactor": 1, "prodigy": 16}.get(cfg.optim.optimizer, 8)
    # FLUX: T5 only in the sequence (CLIP-L gives the pooled vector); 512 as the pipeline.
    # Qwen-Image: an upper bound (the velocity trims a batch to its longest prompt)
    if is_flux(config) or is_qwen(config):
        text_tokens = cfg.model.max_sequence_length or 512
    else:
        seq = cfg.model.max_sequence_length or 256
        text_tokens = 77 + seq if config.get("joint_attention_dim", 4096) >= 4096 else 10 + seq
    resolution = cfg.data.resolution or 1024
    act_elem = 2 if cfg.mixed_precision in ("bf16", "fp16") or cfg.model.dtype != "float32" else 4
    acts = activation_values(
        config, resolution, text_tokens, cfg.model.gradient_checkpointing, cfg.lora.use_dora
    )
    latents = cfg.batch_size * 16 * (resolution // 8) ** 2 * 4
    adapter = ADAPTER_NAMES[cfg.lora.type]
    deltas = 0.0
    if cfg.lora.type in ("lokr", "loha"):
        lora, every, one_block = lycoris_counts(config, cfg.lora)
        delta_bytes = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4  # autocast saves its bf16 copy
        deltas = (one_block if cfg.model.gradient_checkpointing else every) * delta_bytes / GIB
    parts = {
        f"base weights ({cfg.model.quant}, {cfg.model.dtype})": (linear * per_linear + other * base_bytes)
        / GIB,
        f"{adapter} r{cfg.lora.rank} + grads + {cfg.optim.optimizer} states": lora
        * (4 + 4 + optim_bytes)
        / GIB,
        f"activations (batch {cfg.batch_size}, {resolution}px, ckpt "
        f"{'on' if cfg.model.gradient_checkpointing else 'off'})": cfg.batch_size
        * acts
        * act_elem
        * ACTIVATION_MARGIN
        / GIB,
        "SOAR extras (per-term backward, any K)": 0.0 if cfg.effective_lambda_aux == 0 else 6 * latents / GIB,
        **({f"{adapter} full-size updates kept for backward (any batch)": deltas} if deltas else {}),
        "CUDA context + VAE decoder": CUDA_CONTEXT_GB + VAE_DECODER_GB,
    }
    swap = None
    if cfg.model.swap_blocks:
        base_gb = next(v for k, v in parts.items() if k.startswith("base weights"))
        swap = plan_swap(cfg, config, per_linear, base_bytes, base_gb)
        parts[f"block swap ({swap.blocks} in RAM, {min(swap.blocks, WINDOW)} in flight)"] = (
            swap.in_flight_gb - swap.swapped_gb
        )
    return Plan(model, parts, tier_gb, plan_cache_stage(model, cfg.model.dtype, tier_gb), swap)


def _meta_blocks(config: dict[str, Any]) -> list[torch.nn.Module]:
    """The transformer's blocks, built on the meta device from its config (no weights)."""
    import diffusers

    from soar_lite.swap import blocks_of

    cls = getattr(diffusers, config.get("_class_name", "SD3Transformer2DModel"))
    with torch.device("meta"):
        model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    return blocks_of(model)


def _split(blocks: list[torch.nn.Module]) -> list[tuple[int, int]]:
    """(parameters in linear layers, other parameters) of each block."""
    out = []
    for block in blocks:
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in linears)
        out.append((linear, sum(p.numel() for p in block.parameters()) - linear))
    return out


def rollout_passes(cfg: TrainConfig, config: dict[str, Any]) -> int:
    """No-grad forwards the rollout adds per micro-batch (SOAR.md "Families other than SD3")."""
    if cfg.effective_lambda_aux == 0:
        return 0
    if is_flux(config):
        guided = bool(config.get("guidance_embeds", False))
        return int(guided and abs(cfg.soar.rollout_guidance - cfg.flux.guidance) > 1e-9)
    return 1 if cfg.soar.reuse_main_pass else 2  # two-pass CFG: the unconditional half (+ conditional)


def plan_swap(
    cfg: TrainConfig, config: dict[str, Any], per_linear: float, base_bytes: int, base_gb: float
) -> SwapPlan:
    """The swap's effect: the last ``swap_blocks`` blocks leave the GPU but for the ones in flight;
    each trained pass copies every swapped block twice (forward, checkpointed recompute), each
    no-grad pass once (an upper bound: blocks still resident from the previous pass are not copied).

    Loading is block by block (:mod:`soar_lite.blockload`): a block is read into RAM in the base
    dtype and its linears quantized one at a time on their way to the GPU, so the GPU holds the
    resident blocks plus the largest linear's unquantized weight, and RAM the swapped blocks plus
    the largest block as read."""
    blocks = _meta_blocks(config)
    split = _split(blocks)
    sizes = [linear * per_linear + other * base_bytes for linear, other in split]
    dense = [(linear + other) * base_bytes for linear, other in split]  # as read, before quantizing
    largest = max(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    n = min(cfg.model.swap_blocks, len(sizes))
    swapped = sizes[len(sizes) - n :]
    quantizing = largest * max(base_bytes - per_linear, 0.0) if n < len(sizes) else 0.0
    in_flight = sum(sorted(swapped)[-WINDOW:]) if n else 0.0
    trained = 1
    if cfg.effective_lambda_aux:
        trained += (cfg.soar.aux_budget or cfg.soar.trajectory_length) * cfg.soar.num_rollout_paths
    passes = 2 * trained + rollout_passes(cfg, config)
    rounds = 0 if n <= WINDOW else passes * cfg.gradient_accumulation  # <= WINDOW: they stay resident
    return SwapPlan(
        blocks=n,
        of=len(sizes),
        swapped_gb=sum(swapped) / GIB,
        in_flight_gb=in_flight / GIB,
        load_gb=CUDA_CONTEXT_GB + base_gb - (sum(swapped) - quantizing) / GIB,
        ram_gb=PROCESS_RAM_GB + sum(swapped) / GIB,
        load_ram_gb=PROCESS_RAM_GB + (sum(swapped) + max(dense)) / GIB,
        copies_per_step=n * rounds,
        pcie_gb_per_step=sum(swapped) * rounds / GIB,
    )


def tier_of(preset: str) -> float | None:
    """``24gb`` / ``flux-24gb`` -> 24.0; presets without a VRAM tier in their name -> None."""
    name = Path(preset).stem.rpartition("-")[2]
    return float(name[:-2]) if name.endswith("gb") and name[:-2].isdigit() else None


def preset_family(preset: str) -> str:
    """``flux-16gb`` -> flux; the unprefixed tiers are SD3's."""
    stem = Path(preset).stem
    return stem.partition("-")[0] if "-" in stem and tier_of(stem) is not None else "sd3"


def model_family(model: str) -> str:
    """The family of a model name, id or folder, from its transformer config (offline)."""
    try:
        return config_family(transformer_config(model))
    except UserError:
        return "flux" if "flux" in model.lower() else "qwen" if "qwen" in model.lower() else "sd3"


# Changes tried, in order, when a plan does not fit: each keeps the ones before it. The order is
# what costs the least quality first (memory-only knobs), then resolution, then adapter size. Block
# swap costs time, not quality: it comes after quantization, with the fewest blocks that fit (all of
# them, kept for the later steps, when even that does not).
FIT_STEPS = (
    ("gradient_checkpointing", "true"),
    ("optimizer", "adamw8bit"),
    ("quant", "int8"),
    ("quant", "nf4"),
    ("swap_blocks", "fewest"),
    ("resolution", "768"),
    ("resolution", "512"),
    ("batch_size", "1"),
    ("rank", "8"),
)


def suggest(preset: str, overrides: list[str], model: str, tier_gb: float) -> tuple[list[str], Plan] | None:
    """The first cumulative set of ``FIT_STEPS`` overrides under which ``preset`` fits ``tier_gb``
    on ``model`` (with the plan it gives), or None if even all of them do not fit."""
    from soar_lite.config import load_config

    def build(changes: dict[str, str]) -> TrainConfig:
        return load_config(preset, [*overrides, *(f"{k}={v}" for k, v in changes.items())])

    chosen: dict[str, str] = {}
    for key, value in FIT_STEPS:
        if key == "swap_blocks":
            found = _fewest_swapped(build, chosen, model, tier_gb)
            if found is not None:
                return [f"{k}={v}" for k, v in found[0].items()], found[1]
            continue
        now = _knob(build(chosen), key)
        if now == _knob(build({**chosen, key: value}), key) or (key == "resolution" and now < int(value)):
            continue  # already there (or already smaller): nothing to change
        chosen[key] = value
        result = plan(build(chosen), model, tier_gb)
        if result.fits:
            return [f"{k}={v}" for k, v in chosen.items()], result
    return None


def _fewest_swapped(
    build: Any, chosen: dict[str, str], model: str, tier_gb: float
) -> tuple[dict[str, str], Plan] | None:
    """The fewest swapped blocks under which the plan fits (bisection: the peak falls with each
    block swapped); if none does, every block is swapped in ``chosen`` for the later steps."""
    total = len(_meta_blocks(transformer_config(model)))
    lo, hi = WINDOW + 1, total  # up to WINDOW swapped blocks stay resident: nothing saved
    if lo > hi:
        return None
    chosen.update(gradient_checkpointing="true", swap_blocks=str(hi))
    best = plan(build(chosen), model, tier_gb)
    if not best.fits:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        result = plan(build({**chosen, "swap_blocks": str(mid)}), model, tier_gb)
        if result.fits:
            hi, best = mid, result
        else:
            lo = mid + 1
    return {**chosen, "swap_blocks": str(hi)}, best


SWAP_AUTO = ("swap_blocks=auto", "model.swap_blocks=auto")


def resolve_swap_auto(
    preset: str, overrides: list[str], vram_gb: float | None, model: str | None = None
) -> tuple[list[str], list[str]]:
    """``swap_blocks=auto``: the fewest swapped blocks under which the planner says the run fits
    ``vram_gb`` (the visible GPU's memory when None), as a plain number; 0 when it fits without.

    Why the fewest: every swapped block is copied over PCIe twice a step (forward, recomputed
    backward), so each one costs time; the planner's peak falls block by block, so bisection finds
    the count. ``model`` is what to plan on (default: the config's ``model.path``). Returns
    (overrides with the number in place of ``auto``, lines to print); overrides without ``auto``
    come back unchanged. Raises UserError where there is nothing to plan for (no GPU and no
    ``--vram``), the planner cannot read the model offline, or even all blocks do not fit.
    """
    if not any(o.strip() in SWAP_AUTO for o in overrides):
        return overrides, []
    from soar_lite.config import load_config

    rest = [o for o in overrides if o.strip() not in SWAP_AUTO]
    if vram_gb is None:
        if not torch.cuda.is_available():
            raise UserError(
                "swap_blocks=auto sizes the swap to the GPU's memory and no CUDA GPU is visible: add "
                "--vram GB to plan for another card, or give a number (swap_blocks=N)"
            )
        vram_gb = detected_vram_gb()
    cfg = load_config(preset, [*rest, "swap_blocks=0"])
    model = model or cfg.model.path
    try:
        unswapped = plan(cfg, model, vram_gb)
    except UserError as exc:
        raise UserError(f"swap_blocks=auto needs the planner, and it cannot read {model}: {exc}") from None
    if unswapped.fits:
        note = f"swap_blocks=auto: fits {vram_gb:g} GB without swapping (~{unswapped.total:.1f} GiB) -> 0"
        return [*rest, "swap_blocks=0"], [note]

    def build(changes: dict[str, str]) -> TrainConfig:
        return load_config(preset, [*rest, *(f"{k}={v}" for k, v in changes.items())])

    found = _fewest_swapped(build, {}, model, vram_gb)
    if found is None:
        raise UserError(
            f"swap_blocks=auto: {model} with preset {preset} does not fit {vram_gb:g} GB even with every "
            f"block swapped (~{unswapped.total:.1f} GiB unswapped); see `soar-lite plan --preset {preset} "
            f"--vram {vram_gb:g}` for the other changes"
        )
    changes, fitted = found
    total = len(_meta_blocks(transformer_config(model)))
    note = (
        f"swap_blocks=auto: {changes['swap_blocks']} of {total} blocks swapped to fit {vram_gb:g} GB "
        f"(~{fitted.total:.1f} GiB, from ~{unswapped.total:.1f}; estimate)"
    )
    return [*rest, *(f"{k}={v}" for k, v in changes.items())], [note]


def _knob(cfg: TrainConfig, key: str) -> Any:
    return {
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "optimizer": cfg.optim.optimizer,
        "quant": cfg.model.quant,
        "resolution": cfg.data.resolution or 1024,
        "batch_size": cfg.batch_size,
        "rank": cfg.lora.rank,
        "swap_blocks": cfg.model.swap_blocks,
    }[key]


def detected_vram_gb() -> float:
    """The first CUDA GPU's memory in GB as cards are sold (a "12 GB" card reports ~11.7-12 GiB)."""
    if not torch.cuda.is_available():
        raise UserError(
            "--preset auto picks by the GPU's memory and no CUDA GPU is visible: use --preset cpu-tiny, "
            "or --vram GB to plan for another machine"
        )
    return float(round(torch.cuda.get_device_properties(0).total_memory / GIB))


def fit(preset: str, overrides: list[str], vram_gb: float | None) -> tuple[str, list[str], list[str]]:
    """``--preset auto`` and ``--vram``: the preset for this card (the largest tier not above it)
    and, if the planner says the run would not fit, the first :data:`FIT_STEPS` changes that do.

    Returns (preset, overrides, lines to print). A model the planner cannot read offline (a hub id
    it does not know) is trained as configured, with a note saying so.
    """
    from soar_lite.config import load_config, preset_names

    vram = detected_vram_gb() if vram_gb is None else vram_gb
    notes: list[str] = []
    if preset == "auto":
        model = next((o.partition("=")[2] for o in reversed(overrides) if o.startswith("model.path=")), "")
        family = model_family(model) if model else "sd3"
        tiers = sorted(
            (tier_of(name), name)
            for name in preset_names()
            if tier_of(name) is not None and preset_family(name) == family
        )
        below = [name for tier, name in tiers if tier <= vram]
        preset = below[-1] if below else tiers[0][1]
        notes.append(f"--preset auto: a {vram:g} GB GPU -> preset {preset}")
    cfg = load_config(preset, overrides)
    try:
        result = plan(cfg, cfg.model.path, vram)
    except UserError:
        notes.append(f"planner: no offline config for {cfg.model.path}: training as configured")
        return preset, overrides, notes
    if result.fits:
        notes.append(f"planner: ~{result.total:.1f} GiB peak: fits {vram:g} GB")
        return preset, overrides, notes
    found = suggest(preset, overrides, cfg.model.path, vram)
    if found is None:
        raise UserError(
            f"{cfg.model.path} with preset {preset} does not fit {vram:g} GB even with every change the "
            f"planner knows (see `soar-lite plan --preset {preset} --vram {vram:g}`)"
        )
    changes, fitted = found
    notes.append(
        f"planner: would not fit {vram:g} GB as set; using {' '.join(changes)} (~{fitted.total:.1f} GiB)"
    )
    return preset, [*overrides, *changes], notes


def fit_warning(cfg: TrainConfig, preset: str, overrides: list[str]) -> str | None:
    """Before a CUDA run that names no budget: a warning if the planner says it will not fit this
    GPU (so nobody waits through the cache stage for an out-of-memory at step 1), naming the fix."""
    if not torch.cuda.is_available():
        return None
    vram = detected_vram_gb()
    try:
        result = plan(cfg, cfg.model.path, vram)
    except UserError:
        return None  # a model the planner cannot read offline: the preflight step still guards
    if result.fits:
        return None
    found = suggest(preset, overrides, cfg.model.path, vram)
    fix = f"add --vram {vram:g} to apply {' '.join(found[0])}" if found else "use a smaller model"
    return (
        f"warning: the planner estimates ~{result.total:.1f} GiB for this run and this GPU has {vram:g} GB: "
        f"{fix} (estimate; the first step measures the real peak)"
    )
