"""The shape every model family has, as the training loop sees it.

The loop, the cache and the objective only talk to this Protocol, so adding FLUX (or another
rectified-flow family) is a new module here, not a change to ``train.py`` or ``objective.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from soar_lite.objective import Cond, NoiseGrid, Velocity


class ModelFamily(Protocol):
    """A loaded base model: encoders for the cache stage, the denoiser for training and sampling."""

    name: str
    transformer: torch.nn.Module | None
    default_lora_targets: Sequence[str]
    resolution_multiple: int  # image sides must be multiples of this (VAE factor x patch size)

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Text embeddings exactly as the family's pipeline would feed the denoiser (batch-first)."""
        ...

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) -> the scaled latents the denoiser is trained on."""
        ...

    def velocity(self, transformer: torch.nn.Module) -> Velocity:
        """The callable ``f(latents, timesteps, cond)`` the objective trains."""
        ...

    def noise_grid(self) -> NoiseGrid:
        """The scheduler's training grid."""
        ...

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
    ) -> Any:
        """Images (PIL list) from cached embeddings, with the given (LoRA-carrying) transformer."""
        ...

    def free_encoders(self) -> None:
        """Drop the text encoders and the VAE encoder so training holds only the denoiser."""
        ...
