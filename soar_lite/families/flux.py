"""FLUX.1-dev and FLUX.1-schnell as a :class:`~soar_lite.families.base.ModelFamily`.

What differs from SD3 lives here and nowhere else (shared/SOAR.md, "Families other than SD3"):

* text: CLIP-L's pooled output + T5's sequence, exactly as ``FluxPipeline.encode_prompt`` makes them
  (cached under the same two field names as SD3's, so the cache and the loop need no FLUX branch);
* latents: the objective sees (B, 16, H, W); the velocity packs 2x2 patches into FLUX's token
  sequence and unpacks the prediction, with the pipeline's own image ids;
* guidance: dev is guidance-distilled. The trained passes run at ``flux.guidance`` (1.0, as peers
  train, which keeps the distilled guidance intact); the rollout runs at ``soar.rollout_guidance``
  (3.5, the pipeline's default) in one extra no-grad pass, or reuses the main pass when the two are
  equal. schnell has no guidance embedding: the rollout is the main pass's output;
* grid: diffusers' FLUX LoRA script trains on the scheduler's own grid, which for FLUX.1's
  scheduler (``use_dynamic_shifting``) is unshifted at every resolution: ``flux.train_shift=scheduler``.
  ``resolution`` instead uses the sampler's grid for the bucket's token count (mu-shifted, as kohya's
  ``flux_shift``), one grid per bucket shape, for the main term, t1 and the aux points alike.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import Tensor

from soar_lite.families.common import FamilyLayout, load_pipeline, read_json, sequence_length
from soar_lite.objective import Cond, NoiseGrid, Rollout, Velocity

# diffusers' FLUX LoRA example (train_dreambooth_lora_flux.py) targets: attention in double and
# single blocks (``attn.to_q`` matches both), the double blocks' feed-forwards
LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
SCHNELL_STEPS = 4  # the steps schnell samples with (its pipeline card: 4, guidance 0)
DEV_STEPS = 28  # FluxPipeline's default


def pack(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches as tokens, in FluxPipeline's order."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack` for a (height, width) latent."""
    b, _, features = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, features // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rotary position ids of the packed latent tokens: (0, row, column), as the pipeline builds them."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_velocity(transformer: torch.nn.Module, guidance: float | None) -> Velocity:
    """A FLUX transformer as ``f(latents, timesteps, cond)`` on unpacked latents.

    ``timesteps`` are the grid's (0..1000] values; the transformer takes them / 1000, as the pipeline
    and diffusers' training script pass them. ``guidance`` is the embedded guidance (ignored, and
    must be, by a transformer without a guidance embedding: schnell)."""
    embeds_guidance = bool(getattr(transformer, "config", {}).get("guidance_embeds", False))
    if embeds_guidance is False and hasattr(transformer, "module"):  # DDP-wrapped
        embeds_guidance = bool(transformer.module.config.get("guidance_embeds", False))

    def f(latents: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = latents.shape
        text = cond["prompt_embeds"]
        g = None
        if embeds_guidance:
            g = torch.full((b,), float(guidance if guidance is not None else 1.0), device=latents.device)
        out = transformer(
            hidden_states=pack(latents),
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=g,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype),
            img_ids=image_ids(h, w, latents.device, latents.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    return f


def sampler_shift(scheduler_config: Any, tokens: int) -> float:
    """The sampler's mu for ``tokens`` packed image tokens (FluxPipeline's calculate_shift)."""
    base, top = (
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
    )
    lo, hi = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    slope = (hi - lo) / (top - base)
    return tokens * slope + lo - slope * base


class FluxFamily:
    """FLUX.1 parts on one device. Build with :meth:`load`; missing parts are ``None``."""

    name = "flux"
    default_lora_targets = LORA_TARGETS
    text_parts = TEXT_PARTS
    transformer_class = FluxTransformer2DModel
    native_resolution = 1024
    default_max_sequence_length = 512  # FluxPipeline's

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, max_sequence_length: int,
                 pipe: FluxPipeline, transformer: torch.nn.Module | None, options: Any) -> None:  # fmt: skip
        self.path, self.device, self.dtype = path, device, dtype
        self.max_sequence_length = max_sequence_length
        self.pipe = pipe
        self.transformer = transformer
        self.layout = self.read_layout(path)
        self.resolution_multiple = self.layout.multiple
        self.guidance_embeds = bool(self.layout.extra["guidance_embeds"])
        self.variant = "flux-dev" if self.guidance_embeds else "flux-schnell"
        self.train_guidance = float(getattr(options, "guidance", 1.0))
        self.train_shift = str(getattr(options, "train_shift", "scheduler"))

    # ------------------------------------------------------------------ without weights

    @staticmethod
    def read_layout(path: str | Path) -> FamilyLayout:
        """What the cache and the planner need from a folder's configs, with nothing loaded."""
        folder = Path(path)
        transformer = read_json(folder / "transformer" / "config.json")
        vae = read_json(folder / "vae" / "config.json")
        scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        return FamilyLayout(
            multiple=scale * 2 * int(transformer.get("patch_size", 1)),  # VAE x the 2x2 packing
            text_parts=TEXT_PARTS,
            text_extra=(),
            extra={"guidance_embeds": bool(transformer.get("guidance_embeds", False))},
        )

    @staticmethod
    def family_defaults(path: str | Path) -> dict[str, Any]:
        """Settings whose generic default is SD3's, as this variant's sampler uses them."""
        schnell = not FluxFamily.read_layout(path).extra["guidance_embeds"]
        steps = SCHNELL_STEPS if schnell else DEV_STEPS
        return {
            "soar.num_sampling_steps": steps,
            "validation.steps": steps,
            "validation.guidance_scale": 0.0 if schnell else 3.5,
            "lora.targets": list(LORA_TARGETS),
        }

    @classmethod
    def load(
        cls,
        path: str,
        *,
        device: torch.device | str = "cpu",
        dtype: str = "float32",
        quant: str = "none",
        max_sequence_length: int = 0,
        transformer: bool = True,
        text_encoders: bool = True,
        vae: bool = True,
        encoder_offload: str = "auto",
        swap_blocks: int = 0,
        options: Any = None,
    ) -> FluxFamily:
        """Load the parts asked for from a FluxPipeline folder (or hub id: needs network)."""
        seq = sequence_length(path, max_sequence_length, FluxFamily.default_max_sequence_length)
        pipe, model, torch_dtype = load_pipeline(
            FluxPipeline, FluxTransformer2DModel, path, TEXT_PARTS,
            device=device, dtype=dtype, quant=quant, transformer=transformer,
            text_encoders=text_encoders, vae=vae, encoder_offload=encoder_offload, swap_blocks=swap_blocks,
        )  # fmt: skip
        return cls(path, torch.device(device), torch_dtype, seq, pipe, model, options)

    # ------------------------------------------------------------------ cache stage

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """T5 sequence + CLIP-L pooled output, as FluxPipeline.encode_prompt feeds the transformer."""
        if self.pipe.text_encoder is None:
            raise RuntimeError("text encoders were not loaded (or were freed after caching)")
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> ``(mode - shift) * scale`` latents, unpacked (B, 16, H/8, W/8)."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return (dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor

    def free_encoders(self) -> None:
        """Drop text encoders; training then holds only the denoiser (and the VAE decoder)."""
        self.pipe.text_encoder = None
        self.pipe.text_encoder_2 = None
        if self.pipe.vae is not None:
            self.pipe.vae.encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ training and sampling

    @property
    def grid_note(self) -> str:
        """Which training grid the run uses (for the run record)."""
        if self.train_shift == "resolution":
            return "the sampler's mu-shifted grid per bucket shape (flux.train_shift=resolution)"
        return "the scheduler's training grid, as diffusers' FLUX LoRA script (flux.train_shift=scheduler)"

    @property
    def has_vae(self) -> bool:
        return self.pipe.vae is not None

    def velocity(self, transformer: torch.nn.Module, guidance: float | None = None) -> Velocity:
        """The transformer as ``f(latents, timesteps, cond)`` at ``guidance`` (default: training's)."""
        return flux_velocity(transformer, self.train_guidance if guidance is None else guidance)

    def rollout(self, transformer: torch.nn.Module, cfg: Any) -> Rollout:
        """dev: one pass at the sampler's guidance (or the main pass when it equals training's);
        schnell: the main pass's output (no guidance to apply)."""
        g_roll = float(cfg.soar.rollout_guidance)
        if not self.guidance_embeds or math.isclose(g_roll, self.train_guidance):
            return Rollout("single")
        return Rollout("single", velocity=self.velocity(transformer, g_roll))

    def noise_grid(self, latent_size: tuple[int, int] | None = None) -> NoiseGrid:
        """The scheduler's training grid, or (``train_shift=resolution``) the sampler's for this size."""
        base = NoiseGrid.from_scheduler(self.pipe.scheduler)
        if self.train_shift != "resolution" or latent_size is None:
            return base
        return _shifted_grid(dict(self.pipe.scheduler.config), latent_size[0] * latent_size[1] // 4)

    def sampling_pipeline(self, transformer: torch.nn.Module) -> FluxPipeline:
        """A diffusers pipeline around ``transformer`` sharing this family's VAE and scheduler config."""
        return FluxPipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config),
            vae=self.pipe.vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        )  # fmt: skip

    @torch.no_grad()
    def sample(
        self,
        transformer: torch.nn.Module,
        cond: Cond,
        uncond: Cond | None,
        *,
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        generator: torch.Generator,
    ) -> list[Any]:
        """PIL images from cached embeddings; ``guidance_scale`` is the embedded guidance (no negative
        prompt: FLUX.1 samples without CFG, so ``uncond`` is unused)."""
        if self.pipe.vae is None:
            raise RuntimeError("the VAE was not loaded: sampling needs it to decode")
        dtype = self.dtype  # the base's (the VAE's too): the fp32 adapter casts its own inputs
        pipe = self.sampling_pipeline(transformer)
        pipe.set_progress_bar_config(disable=True)
        embeds = cond["prompt_embeds"]
        packed = pipe(
            prompt_embeds=embeds.to(self.device, dtype),
            pooled_prompt_embeds=cond["pooled_prompt_embeds"].to(self.device, dtype),
            height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
            generator=generator, output_type="latent", max_sequence_length=embeds.shape[1],
        ).images  # fmt: skip
        # decoded here, cast to the VAE's dtype: FLUX's last norm can hand back fp32 latents
        vae = self.pipe.vae
        latents = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


@lru_cache(maxsize=32)
def _shifted_grid_cached(items: tuple, tokens: int) -> NoiseGrid:
    config = dict(items)
    mu = sampler_shift(config, tokens)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    n = scheduler.config.num_train_timesteps
    t = torch.linspace(1.0, n, n, dtype=torch.float32).flip(0) / n  # the unshifted training grid
    sigmas = (math.exp(mu) / (math.exp(mu) + (1 / t - 1))).float()
    return NoiseGrid(sigmas, sigmas * n, mu)


def _shifted_grid(config: dict[str, Any], tokens: int) -> NoiseGrid:
    items = tuple(sorted((k, v) for k, v in config.items() if not isinstance(v, (list, dict))))
    return _shifted_grid_cached(items, tokens)
