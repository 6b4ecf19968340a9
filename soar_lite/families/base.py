"""The shape every model family has, as the loop, the cache, sampling, planning and export see it.

A family is two things: a class whose static methods read a model folder's configs without loading
any weight (the cache's content ids and bucket multiple, the variant's defaults), and a loaded
instance (encoders for the cache stage, the denoiser for training and sampling). Callers get both
through :mod:`soar_lite.families` (``family_class`` / ``load_family``) and never import a concrete
family, so a new family is one new module here plus its tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from soar_lite.families.common import FamilyLayout
from soar_lite.objective import Cond, NoiseGrid, Rollout, Velocity


class ModelFamily(Protocol):
    """A loaded base model: encoders for the cache stage, the denoiser for training and sampling."""

    name: str  # the family (sd3, flux): model.family
    variant: str  # what the folder is within it (flux-dev, flux-schnell)
    transformer: torch.nn.Module | None
    default_lora_targets: Sequence[str]
    text_parts: Sequence[str]  # folders whose files decide the text embeddings
    resolution_multiple: int  # image sides must be multiples of this (VAE factor x patch/packing)
    grid_note: str  # which training grid, in words, for the run record
    transformer_class: type  # the diffusers denoiser class (merge loads and saves it)

    @staticmethod
    def read_layout(path: str | Path) -> FamilyLayout:
        """The folder as the cache sees it, from its JSON configs alone."""
        ...

    @staticmethod
    def family_defaults(path: str | Path) -> dict[str, Any]:
        """Settings (dotted keys) whose generic default is SD3's, as this variant's sampler uses them."""
        ...

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Text embeddings exactly as the family's pipeline would feed the denoiser (batch-first)."""
        ...

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) -> the scaled (B, C, h, w) latents the denoiser is trained on."""
        ...

    def free_encoders(self) -> None:
        """Drop the text encoders and the VAE encoder so training holds only the denoiser."""
        ...

    @property
    def has_vae(self) -> bool:
        """Whether the VAE (decoder) is loaded, so validation can sample."""
        ...

    def velocity(self, transformer: torch.nn.Module, guidance: float | None = None) -> Velocity:
        """``f(latents, timesteps, cond)`` on (B, C, h, w) latents (packing, if any, inside);
        ``guidance`` is the embedded guidance of guidance-distilled families (None: training's)."""
        ...

    def rollout(self, transformer: torch.nn.Module, cfg: Any) -> Rollout:
        """How SOAR's rollout imitates this family's sampler (two-pass CFG, embedded, none)."""
        ...

    def noise_grid(self, latent_size: tuple[int, int] | None = None) -> NoiseGrid:
        """The training grid for latents of ``latent_size`` (families that shift by token count)."""
        ...

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
    ) -> Any:
        """Images (PIL list) from cached embeddings, with the given (LoRA-carrying) transformer;
        ``guidance_scale`` is the CFG scale or the embedded guidance, as the family samples."""
        ...

    def sampling_pipeline(self, transformer: torch.nn.Module) -> Any:
        """The family's diffusers pipeline around ``transformer`` (no text encoders)."""
        ...
