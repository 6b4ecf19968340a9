"""Build, once, the trained tiny SD3 base that soar-lite uses when no ``--model`` is given.

Why train it at all: fine-tuning a random network teaches nothing about SFT versus SOAR. Half an
hour on a CPU turns the tiny pipeline of ``tiny_sd3`` into a model that draws the requested colour
and shape at the requested place on the toy shapes set (the quality benchmark's own world), so that a
LoRA fine-tune has a base worth correcting. The default recipe's build ships with the package
(``shipped.py``): users unpack it, only a changed recipe trains here. The result is cached under
the soar-lite home, in a folder named by a hash of every setting that shapes it, and is built in a
temporary sibling that is renamed only when complete: an interrupted build is never mistaken for a
finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from tqdm.auto import tqdm

from soar_lite.config import SoarConfig
from soar_lite.objective import NoiseGrid, soar_loss
from soar_lite.paths import home_dir
from soar_lite.toy import shipped
from soar_lite.toy.shapes import shapes_dataset
from soar_lite.toy.tiny_sd3 import MAX_SEQUENCE_LENGTH, TOY_SETTINGS, build_tiny_pipeline, save_tiny_pipeline

COMPLETE_MARKER = ".soar_lite_complete"
# Measured on the 2-core dev box (1 thread, shared with other jobs), checker on all 135 captions:
# * VAE 600 x 8 (~60 s) reconstructs held-out shapes with shape accuracy 0.87; 1200 x 8 0.97, 2400 x 8
#   0.96 (MSE 1e-4, ~4 min): the shapes survive the VAE.
# * v1's transformer (2 layers, shift 3, 1500 x 16) drew blobs: shape accuracy 0.34 (chance). At
#   shift 3 most training lands at high noise, where only colour and place are decided; shift 1
#   with 2 layers still 0.38 after 3000 steps; 4 layers at shift 1 reached 0.56 / 0.60 (8 / 40
#   sampler steps) after 3000 steps, 0.44 / 0.50 after 2000: depth and steps are what shape needs.
# * 4 layers, 6000 steps (~22 min): 0.56 / 0.59, under issue 15's 0.6 at 8 steps whatever the
#   sampler's shift or guidance; 10000 steps (~38 min): 0.81 at 8 steps (3 noise seeds, each 0.81)
#   and 0.78-0.86 at 40. Steps, not sampler settings, close the gap, so the default is 10000.
# The built base ships with the package (toy/base/), so this cost is paid once, by whoever rebuilds it.
DEFAULT_VAE_STEPS = 2400
DEFAULT_TRANSFORMER_STEPS = 10000
DEFAULT_NUM_IMAGES = 4096


@dataclass(frozen=True)
class ToyRecipe:
    """Every setting that changes the trained base; its hash names the cache folder."""

    vae_steps: int = DEFAULT_VAE_STEPS
    transformer_steps: int = DEFAULT_TRANSFORMER_STEPS
    seed: int = 0
    num_images: int = DEFAULT_NUM_IMAGES
    resolution: int = TOY_SETTINGS["resolution"]
    vae_batch: int = 8  # many small steps beat few large ones: 600 x 8 reaches MSE ~0.002, 200 x 32 0.017
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-6  # per pixel, as SD's VAEs: keeps the posterior a distribution
    transformer_batch: int = 16  # 2000 x 16 beat 1000 x 32 at the same cost (colour at place 0.99 vs 0.93)
    transformer_lr: float = 1e-3
    caption_dropout: float = 0.1  # so classifier-free guidance works with the empty prompt
    transformer_layers: int = 4  # 2 drew blobs (shape at chance); see the measurements above
    shift: float = 1.0  # the scheduler's: SD3's 3.0 trains a 32 px model almost only at high noise
    toy: str = TOY_SETTINGS["toy"]

    def key(self) -> str:
        """A short stable hash of the recipe: a changed setting is a different base."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def tiny_base_folder(home: Path, recipe: ToyRecipe) -> Path:
    """Where the base of ``recipe`` lives under ``home`` (it may not exist yet)."""
    return Path(home) / "toy" / f"tiny-sd3-{recipe.toy}-{recipe.key()}"


def is_complete(folder: Path) -> bool:
    """A base folder is trusted only with the marker written as the last step of a build."""
    return (folder / COMPLETE_MARKER).is_file() and (folder / "model_index.json").is_file()


def ensure_tiny_base(
    home: Path | str | None = None,
    *,
    vae_steps: int = DEFAULT_VAE_STEPS,
    transformer_steps: int = DEFAULT_TRANSFORMER_STEPS,
    seed: int = 0,
    num_images: int = DEFAULT_NUM_IMAGES,
    progress: bool = True,
) -> Path:
    """The folder of the trained tiny base pipeline for these settings, built on first use only.

    The default recipe's build ships with the package (``toy/shipped.py``) and is unpacked in
    seconds; any other recipe is trained here (minutes to half an hour on a CPU).

    Concurrent callers (the CLI and the app, parallel tests) wait for one build instead of
    training the same base twice; the build happens in a temporary sibling renamed at the end.
    """
    recipe = ToyRecipe(
        vae_steps=vae_steps, transformer_steps=transformer_steps, seed=seed, num_images=num_images
    )
    folder = tiny_base_folder(Path(home) if home is not None else home_dir(), recipe)
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder, progress) as exclusive:
        if is_complete(folder):  # another process finished it while we waited
            return folder
        if exclusive:
            _remove_leftovers(folder)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            started = time.perf_counter()
            if shipped.shipped_for(recipe.key()):  # the package's build of this recipe: seconds
                stats = shipped.unpack_base(tmp)
            else:
                stats = build_tiny_base(tmp, recipe, progress=progress)
                stats["build_seconds"] = round(time.perf_counter() - started, 1)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(stats, sort_keys=True) + "\n", encoding="utf-8")
            _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _build_lock(folder: Path, progress: bool) -> Iterator[bool]:
    """An exclusive file lock per base where ``fcntl`` exists; yields whether it is held.

    Without it (Windows) builds may run twice, but the rename still never exposes a half build.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                tqdm.write(f"waiting for another process building the tiny base {folder.name} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished build into place; a concurrent builder that finished first wins."""
    if folder.exists() and not is_complete(folder):
        shutil.rmtree(folder)  # a folder without marker was never finished: not to be trusted
    try:
        os.replace(tmp, folder)
    except OSError:
        if not is_complete(folder):
            raise


def _remove_leftovers(folder: Path) -> None:
    """Delete temporary folders of interrupted builds (called only while holding the build lock)."""
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_base(folder: Path, recipe: ToyRecipe, *, progress: bool = True) -> dict[str, Any]:
    """Train the tiny pipeline on the shapes set and save it to ``folder``; returns training stats."""
    pipe = build_tiny_pipeline(recipe.seed, layers=recipe.transformer_layers, shift=recipe.shift)
    data = shapes_dataset(recipe.num_images, recipe.seed, recipe.resolution)
    pixels = _to_pixels([image for image, _, _ in data])
    captions = [caption for _, caption, _ in data]
    total = recipe.vae_steps + recipe.transformer_steps
    with _flush_denormals(), _progress_bar(total, progress) as bar:
        generator = torch.Generator().manual_seed(recipe.seed)
        bar.set_description("tiny base: vae")
        vae_mse = train_vae(pipe, pixels, recipe, generator, bar)
        bar.set_description("tiny base: encode")
        latents = encode_latents(pipe, pixels)
        texts, text_index = encode_captions(pipe, captions)
        bar.set_description("tiny base: transformer")
        fm_loss = train_transformer(pipe, latents, texts, text_index, recipe, generator, bar)
        bar.set_description("tiny base: save")
        stats = {"vae_mse": vae_mse, "flow_matching_loss": fm_loss, "recipe": asdict(recipe)}
        save_tiny_pipeline(pipe, folder, {"recipe": asdict(recipe), "recipe_key": recipe.key()})
    return stats


@contextlib.contextmanager
def _flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero while training, then restore the default (off).

    Tiny gradients, squared in AdamW's second moment, fall into the denormal range, which x86 CPUs
    compute many times slower (a step measured here went from 0.28 s to 1.3 s); values below 1e-38
    change nothing that matters to this model.
    """
    enabled = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[tqdm]:
    bar = tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def _to_pixels(images: list[Any]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def _cosine_schedule(
    optimizer: torch.optim.Optimizer, steps: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 10%: a short run still ends on small, careful steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.45 * (1 + float(np.cos(np.pi * min(progress, 1.0))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_vae(
    pipe: StableDiffusion3Pipeline,
    pixels: torch.Tensor,
    recipe: ToyRecipe,
    generator: torch.Generator,
    bar: tqdm,
) -> float:
    """Train the VAE as an autoencoder (MSE + small KL) on the shapes images.

    The decoder sees sampled latents, so it also learns to decode slightly-off latents: the
    transformer's outputs are never exact. Returns the last reconstruction MSE (pixels in [-1, 1]).
    """
    vae = pipe.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = _cosine_schedule(optimizer, recipe.vae_steps, warmup=max(recipe.vae_steps // 20, 1))
    mse = float("nan")
    for _ in range(recipe.vae_steps):
        batch = pixels[torch.randint(0, len(pixels), (recipe.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss_mse = torch.nn.functional.mse_loss(recon, batch)
        loss = loss_mse + recipe.vae_kl_weight * posterior.kl().mean() / batch[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        mse = float(loss_mse.detach())
        bar.update(1)
        bar.set_postfix(mse=f"{mse:.4f}")
    vae.eval().requires_grad_(False)
    return mse


@torch.no_grad()
def encode_latents(pipe: StableDiffusion3Pipeline, pixels: torch.Tensor) -> torch.Tensor:
    """Encode all images once, register the VAE's shift/scale from them, return the scaled latents.

    ``(mode - shift) * scale`` then has zero mean and unit std, as the flow-matching noise does;
    the factors go into the VAE config so the saved pipeline decodes with the same ones.
    """
    vae = pipe.vae
    modes = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(256)])
    vae.register_to_config(shift_factor=float(modes.mean()), scaling_factor=float(1.0 / modes.std()))
    return (modes - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def encode_captions(
    pipe: StableDiffusion3Pipeline, captions: list[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each distinct caption (and the empty prompt, at index 0) once, as the pipeline itself encodes.

    Returns the embeddings of the distinct prompts and, per sample, the row of its caption.
    """
    prompts = ["", *sorted(set(captions))]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=prompts,
        prompt_3=prompts,
        device="cpu",
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    row = {prompt: i for i, prompt in enumerate(prompts)}
    index = torch.tensor([row[caption] for caption in captions])
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, index


def train_transformer(
    pipe: StableDiffusion3Pipeline,
    latents: torch.Tensor,
    texts: dict[str, torch.Tensor],
    text_index: torch.Tensor,
    recipe: ToyRecipe,
    generator: torch.Generator,
    bar: tqdm,
) -> float:
    """Full fine-tune of the transformer with plain flow matching (soar_loss with lambda_aux = 0).

    Captions are dropped to the empty prompt per sample with ``recipe.caption_dropout``, so the
    model also learns the unconditional velocity that classifier-free guidance needs.
    Returns a running mean of the loss over the last steps.
    """
    transformer = pipe.transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=recipe.transformer_lr, weight_decay=1e-2)
    steps = recipe.transformer_steps
    schedule = _cosine_schedule(optimizer, steps, warmup=max(steps // 20, 1))
    grid, objective = NoiseGrid.from_scheduler(pipe.scheduler), SoarConfig(lambda_aux=0.0)

    from soar_lite.families.sd3 import sd3_velocity

    velocity = sd3_velocity(transformer)

    running = float("nan")
    for step in range(steps):
        rows = torch.randint(0, len(latents), (recipe.transformer_batch,), generator=generator)
        text_rows = text_index[rows]
        drop = torch.rand(len(rows), generator=generator) < recipe.caption_dropout
        text_rows = torch.where(drop, torch.zeros_like(text_rows), text_rows)  # row 0 is the empty prompt
        cond = {key: value[text_rows] for key, value in texts.items()}
        uncond = {key: value[torch.zeros_like(text_rows)] for key, value in texts.items()}
        report = soar_loss(velocity, latents[rows], cond, uncond, grid, objective, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        report.loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss = float(report.loss.detach())
        running = loss if step == 0 else 0.98 * running + 0.02 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
    transformer.eval().requires_grad_(False)
    return running
