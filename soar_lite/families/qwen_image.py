"""Qwen-Image as a :class:`~soar_lite.families.base.ModelFamily`.

What differs from SD3 and FLUX lives here and nowhere else (shared/SOAR.md, "Families other than SD3"):

* text: the last hidden state of Qwen2.5-VL over the pipeline's chat template, its first 34 tokens
  dropped, exactly as ``QwenImagePipeline.encode_prompt`` makes it. Prompts have their own lengths:
  the cache holds them padded with zeros to ``model.max_sequence_length`` (512, the pipeline's), and
  its second text field (``pooled_prompt_embeds`` for SD3 and FLUX) carries the attention mask
  (1 = token, 0 = padding) as floats: Qwen-Image has no pooled embedding. The velocity trims a batch
  to its longest prompt (padding is masked out of attention and moves no rotary position: exact);
* the empty prompt is the sampler's negative prompt, ``" "`` (diffusers' Qwen-Image examples), so
  the rollout's unconditional half and caption dropout use what sampling uses;
* latents: the VAE is a video VAE; the objective sees (B, 16, H, W) (its one frame dropped),
  normalised with the VAE's per-channel ``latents_mean`` / ``latents_std``; the velocity packs 2x2
  patches as FLUX does, with ``img_shapes`` for the rotary embedding;
* rollout: two-pass "true CFG" at ``soar.cfg_scale_sampling`` (4.0: the pipeline's
  ``true_cfg_scale``), and, as the pipeline does, the guided velocity rescaled per token to the
  conditional velocity's norm;
* grid: diffusers' Qwen-Image LoRA script trains on the scheduler's own grid, which for Qwen-Image's
  scheduler (``use_dynamic_shifting``) is unshifted at every resolution, as for FLUX.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from torch import Tensor

from soar_lite.families.common import FamilyLayout, load_pipeline, read_json, sequence_length
from soar_lite.families.flux import pack, unpack
from soar_lite.objective import Cond, NoiseGrid, Rollout, Velocity

# attention (image and text streams) and both streams' feed-forwards of every block: the FLUX
# double-block targets under Qwen-Image's names (diffusers' Qwen-Image LoRA script adapts attention)
LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)  # fmt: skip
TEXT_PARTS = ("text_encoder", "tokenizer")
NEGATIVE_PROMPT = " "  # what diffusers' Qwen-Image examples pass as negative_prompt
STEPS = 50  # QwenImagePipeline's default num_inference_steps
TRUE_CFG_SCALE = 4.0  # QwenImagePipeline's default true_cfg_scale
MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's default


def true_cfg(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """QwenImagePipeline's guidance on (B, C, H, W) velocities: CFG, then each packed token rescaled
    to the conditional prediction's norm over its 64 features (the pipeline's ``dim=-1``)."""
    h, w = v_cond.shape[-2:]
    cond, uncond = pack(v_cond), pack(v_uncond)
    combined = uncond + scale * (cond - uncond)
    ratio = torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)
    return unpack(combined * ratio, h, w)


def qwen_velocity(transformer: torch.nn.Module) -> Velocity:
    """A Qwen-Image transformer as ``f(latents, timesteps, cond)`` on unpacked latents.

    ``timesteps`` are the grid's (0..1000] values; the transformer takes them / 1000, as the pipeline
    and diffusers' training script pass them. ``cond["pooled_prompt_embeds"]`` is the text mask."""

    def f(latents: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = latents.shape
        mask = cond["pooled_prompt_embeds"] > 0.5
        keep = max(int(mask.sum(1).max()), 1)  # the batch's longest prompt: the rest is padding
        out = transformer(
            hidden_states=pack(latents),
            timestep=timesteps.to(latents.dtype) / 1000,
            encoder_hidden_states=cond["prompt_embeds"][:, :keep],
            encoder_hidden_states_mask=mask[:, :keep].long(),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    return f


class QwenImageFamily:
    """Qwen-Image parts on one device. Build with :meth:`load`; missing parts are ``None``."""

    name = "qwen"
    variant = "qwen-image"
    default_lora_targets = LORA_TARGETS
    text_parts = TEXT_PARTS
    transformer_class = QwenImageTransformer2DModel
    native_resolution = 1024  # QwenImagePipeline's default_sample_size 128 x its VAE factor 8
    default_max_sequence_length = MAX_SEQUENCE_LENGTH
    grid_note = "the scheduler's training grid, as diffusers' Qwen-Image LoRA script (unshifted)"

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, max_sequence_length: int,
                 pipe: QwenImagePipeline, transformer: torch.nn.Module | None) -> None:  # fmt: skip
        self.path, self.device, self.dtype = path, device, dtype
        self.max_sequence_length = max_sequence_length
        self.pipe = pipe
        self.transformer = transformer
        self.layout = self.read_layout(path)
        self.resolution_multiple = self.layout.multiple

    # ------------------------------------------------------------------ without weights

    @staticmethod
    def read_layout(path: str | Path) -> FamilyLayout:
        """What the cache and the planner need from a folder's configs, with nothing loaded."""
        folder = Path(path)
        transformer = read_json(folder / "transformer" / "config.json")
        vae = read_json(folder / "vae" / "config.json")
        scale = 2 ** len(vae.get("temperal_downsample", [False, True, True]))  # the pipeline's rule
        return FamilyLayout(
            multiple=scale * int(transformer.get("patch_size", 2)),  # VAE x the 2x2 packing
            text_parts=TEXT_PARTS,
            text_extra=(NEGATIVE_PROMPT,),
        )

    @staticmethod
    def family_defaults(path: str | Path) -> dict[str, Any]:
        """Settings whose generic default is SD3's, as Qwen-Image's sampler uses them."""
        return {
            "soar.num_sampling_steps": STEPS,
            "soar.cfg_scale_sampling": TRUE_CFG_SCALE,
            "validation.steps": STEPS,
            "validation.guidance_scale": TRUE_CFG_SCALE,
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
    ) -> QwenImageFamily:
        """Load the parts asked for from a QwenImagePipeline folder (or hub id: needs network)."""
        seq = sequence_length(path, max_sequence_length, QwenImageFamily.default_max_sequence_length)
        pipe, model, torch_dtype = load_pipeline(
            QwenImagePipeline, QwenImageTransformer2DModel, path, TEXT_PARTS,
            device=device, dtype=dtype, quant=quant, transformer=transformer,
            text_encoders=text_encoders, vae=vae, encoder_offload=encoder_offload, swap_blocks=swap_blocks,
        )  # fmt: skip
        return cls(path, torch.device(device), torch_dtype, seq, pipe, model)

    # ------------------------------------------------------------------ cache stage

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Qwen2.5-VL's template-wrapped hidden states, zero-padded to ``max_sequence_length``, and
        their mask (in the cache's second text field); the empty prompt is the negative prompt."""
        if self.pipe.text_encoder is None:
            raise RuntimeError("the text encoder was not loaded (or was freed after caching)")
        texts = [p if p.strip() else NEGATIVE_PROMPT for p in prompts]
        embeds, mask = self.pipe.encode_prompt(
            prompt=texts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - embeds.shape[1]
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": mask.to(embeds.dtype)}

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> ``(mode - mean) / std`` latents of the one frame, (B, 16, H/8, W/8)."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)[:, :, None]).latent_dist.mode()[:, :, 0]
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def free_encoders(self) -> None:
        """Drop the text encoder; training then holds only the denoiser (and the VAE decoder)."""
        self.pipe.text_encoder = None
        if self.pipe.vae is not None:
            self.pipe.vae.encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ training and sampling

    @property
    def has_vae(self) -> bool:
        return self.pipe.vae is not None

    def velocity(self, transformer: torch.nn.Module, guidance: float | None = None) -> Velocity:
        """The transformer as ``f(latents, timesteps, cond)`` (Qwen-Image has no guidance embedding)."""
        return qwen_velocity(transformer)

    def rollout(self, transformer: torch.nn.Module, cfg: Any) -> Rollout:
        """Two-pass true CFG with the negative prompt, rescaled as the pipeline does (SOAR.md step 4)."""
        return Rollout("cfg", cfg.soar.cfg_scale_sampling, combine=true_cfg)

    def noise_grid(self, latent_size: tuple[int, int] | None = None) -> NoiseGrid:
        """The scheduler's training grid (the same at every resolution)."""
        return NoiseGrid.from_scheduler(self.pipe.scheduler)

    def sampling_pipeline(self, transformer: torch.nn.Module) -> QwenImagePipeline:
        """A diffusers pipeline around ``transformer`` sharing this family's VAE and scheduler config."""
        return QwenImagePipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config),
            vae=self.pipe.vae, text_encoder=None, tokenizer=None,
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
        """PIL images from cached embeddings; ``guidance_scale`` is the pipeline's ``true_cfg_scale``
        and ``uncond`` the cached negative prompt."""
        if self.pipe.vae is None:
            raise RuntimeError("the VAE was not loaded: sampling needs it to decode")
        pipe = self.sampling_pipeline(transformer)
        pipe.set_progress_bar_config(disable=True)
        n = cond["prompt_embeds"].shape[0]
        embeds, mask = _trimmed(cond, n, self.device, self.dtype)
        extra: dict[str, Any] = {}
        if uncond is not None and guidance_scale > 1:
            neg, neg_mask = _trimmed(uncond, n, self.device, self.dtype)
            extra = {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}
        out = pipe(
            prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=guidance_scale,
            height=height, width=width, num_inference_steps=steps, generator=generator,
            max_sequence_length=embeds.shape[1], output_type="pil", **extra,
        )  # fmt: skip
        return out.images


def _trimmed(cond: Cond, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Cached (embeddings, mask) as the pipeline takes them: ``n`` rows, trimmed to the longest prompt."""
    mask = cond["pooled_prompt_embeds"] > 0.5
    keep = max(int(mask.sum(1).max()), 1)
    embeds = cond["prompt_embeds"][:, :keep].expand(n, -1, -1)
    return embeds.to(device, dtype), mask[:, :keep].expand(n, -1).long().to(device)
