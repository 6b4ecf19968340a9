"""SD3 / SD3.5 (Medium, Large) as a :class:`~soar_lite.families.base.ModelFamily`.

Parts are loaded one by one so each stage holds only what it needs: the cache stage loads the
text encoders and the VAE (no transformer: its config alone tells the zero-T5 width), training
loads the transformer (and the VAE decoder only for validation images). Prompts are encoded by
the pipeline's own ``encode_prompt``, so cached embeddings are exactly what sampling would feed.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import logging as diffusers_logging
from torch import Tensor
from transformers.utils import logging as transformers_logging

from soar_lite.families.common import FamilyLayout, load_pipeline, read_json, sequence_length
from soar_lite.objective import Cond, NoiseGrid, Rollout, Velocity

diffusers_logging.set_verbosity_error()  # loading bars per part drown the one bar that matters
diffusers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

__all__ = ["SD3Family", "sd3_velocity"]
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class _ConfigOnly(torch.nn.Module):
    """Stands in for the transformer while encoding prompts: the pipeline reads only its config."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config


def sd3_velocity(transformer: torch.nn.Module) -> Velocity:
    """An SD3 transformer as the objective's ``f(latents, timesteps, cond)`` (one definition for
    training, the tiny base's pretraining and the benchmarks)."""

    def f(latents: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        return transformer(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    return f


class SD3Family:
    """SD3/SD3.5 parts on one device. Build with :meth:`load`; missing parts are ``None``."""

    name = "sd3"
    variant = "sd3"
    default_lora_targets = LORA_TARGETS
    text_parts = TEXT_PARTS
    transformer_class = SD3Transformer2DModel
    native_resolution = 1024
    default_max_sequence_length = 256  # StableDiffusion3Pipeline's
    grid_note = "the scheduler's static-shift grid (the same at every resolution)"

    def __init__(
        self,
        path: str,
        device: torch.device,
        dtype: torch.dtype,
        max_sequence_length: int,
        pipe: StableDiffusion3Pipeline,
        transformer: torch.nn.Module | None,
    ) -> None:
        self.path, self.device, self.dtype = path, device, dtype
        self.max_sequence_length = max_sequence_length
        self.pipe = pipe
        self.transformer = transformer
        self.resolution_multiple = pipe.vae_scale_factor * pipe.patch_size

    # ------------------------------------------------------------------ without weights

    @staticmethod
    def read_layout(path: str | Path) -> FamilyLayout:
        """What the cache and the planner need from a folder's configs, with nothing loaded."""
        folder = Path(path)
        index = read_json(folder / "model_index.json")
        transformer = read_json(folder / "transformer" / "config.json")
        vae = read_json(folder / "vae" / "config.json")
        present = tuple(p for p in TEXT_PARTS if (index.get(p) or [None])[0] is not None)
        scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        return FamilyLayout(
            multiple=scale * int(transformer.get("patch_size", 2)),
            text_parts=present,
            text_extra=(transformer.get("joint_attention_dim"),),  # width of the zero "T5" tokens
        )

    @staticmethod
    def family_defaults(path: str | Path) -> dict[str, Any]:
        """The generic defaults are SD3's own: nothing to change."""
        return {}

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
    ) -> SD3Family:
        """Load the parts asked for from a pipeline folder or hub id (hub needs network).

        ``encoder_offload`` places the text encoders (see :mod:`soar_lite.offload`): ``auto``
        keeps them all on the GPU only if they fit its free memory. ``options``: no SD3 settings."""
        seq = sequence_length(path, max_sequence_length, SD3Family.default_max_sequence_length)

        def absent() -> dict[str, None]:  # no T5 in the folder: the pipeline pads zero tokens
            index = StableDiffusion3Pipeline.load_config(path)
            has_t5 = index.get("text_encoder_3", [None])[0] is not None
            return {} if has_t5 else {"text_encoder_3": None, "tokenizer_3": None}

        pipe, model, torch_dtype = load_pipeline(
            StableDiffusion3Pipeline, SD3Transformer2DModel, path, TEXT_PARTS,
            device=device, dtype=dtype, quant=quant, transformer=transformer,
            text_encoders=text_encoders, vae=vae, encoder_offload=encoder_offload, absent=absent,
            swap_blocks=swap_blocks,
        )  # fmt: skip
        stub = _ConfigOnly(FrozenDict(SD3Transformer2DModel.load_config(path, subfolder="transformer")))
        pipe.transformer = stub
        pipe.patch_size = stub.config["patch_size"]
        return cls(path, torch.device(device), torch_dtype, seq, pipe, model)

    # ------------------------------------------------------------------ cache stage

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """CLIP-L + CLIP-G (+ T5 or the pipeline's zero tokens), as StableDiffusion3Pipeline does."""
        if self.pipe.text_encoder is None:
            raise RuntimeError("text encoders were not loaded (or were freed after caching)")
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> ``(mode - shift) * scale`` latents (the distribution's mode: cached once)."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return (dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor

    def free_encoders(self) -> None:
        """Drop text encoders and tokenizers; training then holds only the denoiser (and VAE decoder)."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            setattr(self.pipe, name, None)
        if self.pipe.vae is not None:
            self.pipe.vae.encoder = None
        gc.collect()  # an offload hook and its encoder hold each other: collect, or T5 stays on the GPU
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ training and sampling

    @property
    def has_vae(self) -> bool:
        return self.pipe.vae is not None

    def velocity(self, transformer: torch.nn.Module, guidance: float | None = None) -> Velocity:
        """The transformer as ``f(latents, timesteps, cond)`` (SD3 has no guidance embedding)."""
        return sd3_velocity(transformer)

    def rollout(self, transformer: torch.nn.Module, cfg: Any) -> Rollout:
        """Two-pass CFG with the empty prompt at ``soar.cfg_scale_sampling`` (SOAR.md step 4)."""
        return Rollout("cfg", cfg.soar.cfg_scale_sampling)

    def noise_grid(self, latent_size: tuple[int, int] | None = None) -> NoiseGrid:
        """The scheduler's static-shift grid (the same at every resolution)."""
        return NoiseGrid.from_scheduler(self.pipe.scheduler)

    def sampling_pipeline(self, transformer: torch.nn.Module) -> StableDiffusion3Pipeline:
        """A diffusers pipeline around ``transformer`` sharing this family's VAE and scheduler config."""
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config),
            vae=self.pipe.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )

    @torch.no_grad()
    def sample(
        self,
        transformer: torch.nn.Module,
        cond: Cond,
        uncond: Cond,
        *,
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        generator: torch.Generator,
    ) -> list[Any]:
        """PIL images from cached embeddings (no text encoder needed), one per row of ``cond``."""
        if self.pipe.vae is None:
            raise RuntimeError("the VAE was not loaded: sampling needs it to decode")
        n = cond["prompt_embeds"].shape[0]
        dtype = next(p.dtype for p in transformer.parameters() if p.is_floating_point())
        pipe = self.sampling_pipeline(transformer)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            prompt_embeds=cond["prompt_embeds"].to(self.device, dtype),
            pooled_prompt_embeds=cond["pooled_prompt_embeds"].to(self.device, dtype),
            negative_prompt_embeds=uncond["prompt_embeds"].expand(n, -1, -1).to(self.device, dtype),
            negative_pooled_prompt_embeds=uncond["pooled_prompt_embeds"].expand(n, -1).to(self.device, dtype),
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pil",
        )
        return out.images
