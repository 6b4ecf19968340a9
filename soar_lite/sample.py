"""Sampling and side-by-side comparison: base model + LoRA(s) -> PNGs that say how they were made.

Why its own module: the CLI, the app and the end of an ``objective=both`` run all need the same two
things, images for given prompts and seeds, and one labelled grid that puts base, SFT and SOAR
next to each other. Each PNG carries its settings (prompt, seed, steps, cfg, size, model, LoRAs)
in its text metadata, so an image found weeks later can be reproduced.

Prompts are new text, so the text encoders are loaded, used once and freed before the denoiser
loads (the peak is the larger of the two, not their sum). LoRAs go through diffusers' own adapter
loader, so what is sampled here is what a diffusers user gets from the same file; each image has
its own seeded generator, so (prompt, seed) gives the same image whatever else is in the batch.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from soar_lite import families
from soar_lite.errors import UserError
from soar_lite.families.base import ModelFamily

DEFAULT_SIZE = 1024
DEFAULT_STEPS, DEFAULT_GUIDANCE = 28, 4.5  # SD3's; a family's own sampler defaults win (FLUX.1-schnell: 4, 0)
GRID_FILE = "grid.png"


@dataclass
class SampleResult:
    """One generated image and what made it (``path`` is None when nothing was written)."""

    image: Image.Image
    prompt: str
    seed: int
    path: Path | None


@dataclass
class CompareResult:
    """The labelled grid and, per arm, its single images (rows in prompt-major, seed-minor order)."""

    grid: Path
    images: dict[str, list[Path]]


@dataclass
class _Loaded:
    """A model ready to sample: denoiser on the device, prompts encoded, encoders already freed."""

    family: ModelFamily
    model_path: str
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    height: int
    width: int


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sampler_defaults(model_path: str, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """``steps`` and guidance as given, else the family's own sampler defaults (SD3: 28 and CFG 4.5;
    FLUX.1-dev: 28 and embedded guidance 3.5; schnell: 4 and 0)."""
    name = families.detect_family(model_path)
    defaults = families.family_class(name).family_defaults(model_path) if Path(model_path).exists() else {}
    steps = steps if steps is not None else int(defaults.get("validation.steps", DEFAULT_STEPS))
    guidance = (
        guidance
        if guidance is not None
        else float(defaults.get("validation.guidance_scale", DEFAULT_GUIDANCE))
    )
    return steps, guidance


def resolve_size(model_path: str, height: int | None, width: int | None) -> tuple[int, int]:
    """The model folder's own resolution (``soar_lite.json``: the tiny base's 32) unless given, else 1024."""
    side = families.native_resolution(model_path) if Path(model_path).exists() else DEFAULT_SIZE
    return height or side, width or side


def load_for_sampling(
    model: str,
    prompts: Sequence[str],
    *,
    device: str | None = None,
    dtype: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> _Loaded:
    """Encode ``prompts`` (and the empty prompt for CFG) with the encoders alone, free them, load the rest."""
    from soar_lite.base_model import resolve_model

    if not prompts:
        raise UserError("no prompts given: pass --prompt (repeatable) or --prompts-file")
    device = device or default_device()
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model_path = resolve_model(model)
    name = families.detect_family(model_path)
    encoders = families.load_family(
        name, model_path, device=device, dtype=dtype, transformer=False, vae=False
    )
    height, width = resolve_size(model_path, height, width)
    multiple = encoders.resolution_multiple
    if height % multiple or width % multiple:
        raise UserError(
            f"height and width must be multiples of {multiple} for this model, got {height}x{width}"
        )
    cond = encoders.encode_prompts(list(prompts))
    uncond = encoders.encode_prompts([""])
    encoders.free_encoders()
    del encoders
    family = families.load_family(name, model_path, device=device, dtype=dtype, text_encoders=False)
    return _Loaded(family, model_path, cond, uncond, height, width)


def read_loras(loras: Sequence[tuple[str, float]]) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Every LoRA file read (diffusers layout, kohya converted) before any model loads: fail fast."""
    from soar_lite.export import read_any_lora
    from soar_lite.lora import training_note

    for path, _ in loras:  # a LoRA learns to offset its base's quantization error (cog-flux#24)
        quant = training_note(path).get("base_quant", "none")
        if quant != "none":
            print(
                f"note: {path} was trained on a {quant} base; on an unquantized base its best strength "
                "may differ (try PATH:0.8 to PATH:1.2)",
                file=sys.stderr,
            )
    return [(read_any_lora(path), float(strength)) for path, strength in loras]


def attach_loras(
    transformer: torch.nn.Module,
    loras: Sequence[tuple[str | Path | dict[str, torch.Tensor], float]],
    prefix: str = "lora",
) -> list[str]:
    """Load each LoRA (file, run folder or tensors) as a named diffusers adapter; activate all at strength."""
    from soar_lite import adapters
    from soar_lite.export import read_any_lora

    names = []
    for i, (lora, _) in enumerate(loras):
        name = f"{prefix}{i}"
        state = lora if isinstance(lora, dict) else read_any_lora(lora)
        with warnings.catch_warnings():  # several adapters on one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            if adapters.kind_of(state):  # LoKr / LoHa: diffusers' loader reads only LoRA keys
                adapters.attach(transformer, state, name)
            else:
                transformer.load_lora_adapter(state, adapter_name=name, prefix="transformer")
        names.append(name)
    if names:
        transformer.set_adapters(names, [float(strength) for _, strength in loras])
    return names


def render(
    loaded: _Loaded,
    jobs: Sequence[tuple[int, int]],
    *,
    steps: int,
    guidance_scale: float,
    batch_size: int = 1,
) -> list[Image.Image]:
    """Images for ``jobs`` = (prompt row, seed) pairs, ``batch_size`` at a time, one generator per image."""
    family, images = loaded.family, []
    for start in range(0, len(jobs), max(batch_size, 1)):
        chunk = jobs[start : start + max(batch_size, 1)]
        rows = torch.tensor([row for row, _ in chunk])
        cond = {key: value[rows.to(value.device)] for key, value in loaded.cond.items()}
        # A list of generators: diffusers draws each image's start noise from its own seed.
        generators = [torch.Generator(device=family.device).manual_seed(seed) for _, seed in chunk]
        images += family.sample(
            family.transformer,
            cond,
            loaded.uncond,
            height=loaded.height,
            width=loaded.width,
            steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,  # type: ignore[arg-type]
        )
    return images


def png_metadata(settings: dict[str, Any]) -> PngInfo:
    """Text chunks: one per setting, a ``soar_lite`` JSON of all, and A1111-style ``parameters``."""
    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("soar_lite", json.dumps(settings))
    loras = ", ".join(f"{Path(p).name}:{s}" for p, s in settings.get("loras", [])) or "none"
    info.add_text(
        "parameters",
        f"{settings['prompt']}\nSteps: {settings['steps']}, Sampler: Euler (flow match), "
        f"CFG scale: {settings['cfg']}, Seed: {settings['seed']}, Size: {settings['size']}, "
        f"Model: {settings['model']}, LoRA: {loras}",
    )
    return info


def _save_png(image: Image.Image, path: Path, settings: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=png_metadata(settings))
    return path


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:02d}-s{seed}.png"


def _jobs(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, int]]:
    if not seeds:
        raise UserError("no seeds given")
    return [(p, int(s)) for p in range(len(prompts)) for s in seeds]


def sample(
    model: str,
    prompts: list[str],
    *,
    loras: Sequence[tuple[str, float]] = (),
    seeds: Sequence[int] = (0,),
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    output: Path | None = None,
    device: str | None = None,
    batch_size: int = 1,
) -> list[SampleResult]:
    """Every prompt at every seed, with the LoRAs applied at their strengths; PNGs in ``output`` if given.

    ``steps`` / ``guidance_scale`` default to the family's sampler (see :func:`sampler_defaults`)."""
    jobs = _jobs(prompts, seeds)
    states = read_loras(loras)
    loaded = load_for_sampling(model, prompts, device=device, height=height, width=width)
    steps, guidance_scale = sampler_defaults(loaded.model_path, steps, guidance_scale)
    attach_loras(loaded.family.transformer, states)
    images = render(loaded, jobs, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size)
    results = []
    for (row, seed), image in zip(jobs, images, strict=True):
        path = None
        if output is not None:
            settings = _settings(loaded, prompts[row], seed, steps, guidance_scale, loras)
            path = _save_png(image, Path(output) / image_name(row, seed), settings)
        results.append(SampleResult(image, prompts[row], seed, path))
    return results


def _settings(
    loaded: _Loaded, prompt: str, seed: int, steps: int, cfg: float, loras: Sequence[tuple[str, float]]
) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "cfg": cfg,
        "size": f"{loaded.width}x{loaded.height}",
        "model": loaded.model_path,
        "loras": [[str(path), float(strength)] for path, strength in loras],
    }


def compare(
    model: str,
    arms: dict[str, str | None],
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    output: Path,
    device: str | None = None,
    batch_size: int = 1,
) -> CompareResult:
    """The same prompts and seeds through each arm (``None`` = the base alone, else a LoRA at strength 1).

    The model is loaded once and every LoRA becomes a named adapter switched per arm, so arms differ
    only in their adapter. Writes ``output/<arm>/p00-s0.png``... and ``output/grid.png``.
    """
    if not arms:
        raise UserError("compare needs at least one arm, e.g. base (no LoRA) and a LoRA file")
    jobs = _jobs(prompts, seeds)
    with_lora = {name: path for name, path in arms.items() if path is not None}
    states = read_loras([(path, 1.0) for path in with_lora.values()])
    loaded = load_for_sampling(model, prompts, device=device, height=height, width=width)
    steps, guidance_scale = sampler_defaults(loaded.model_path, steps, guidance_scale)
    transformer = loaded.family.transformer
    adapters = dict(zip(with_lora, attach_loras(transformer, states), strict=True))
    output = Path(output)
    images: dict[str, list[Path]] = {}
    columns: list[list[Image.Image]] = []
    for arm, path in arms.items():
        if path is None:
            if adapters:
                transformer.disable_lora()
        else:
            transformer.enable_lora()
            transformer.set_adapters([adapters[arm]], [1.0])
        column = render(loaded, jobs, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size)
        loras = [] if path is None else [(str(path), 1.0)]
        images[arm] = [
            _save_png(
                image,
                output / _safe(arm) / image_name(row, seed),
                _settings(loaded, prompts[row], seed, steps, guidance_scale, loras),
            )
            for (row, seed), image in zip(jobs, column, strict=True)
        ]
        columns.append(column)
    rows = [[column[i] for column in columns] for i in range(len(jobs))]
    labels = [f"{prompts[row]} (seed {seed})" for row, seed in jobs]
    grid = make_grid(rows, labels, list(arms))
    output.mkdir(parents=True, exist_ok=True)
    grid.save(output / GRID_FILE)
    return CompareResult(output / GRID_FILE, images)


def _safe(name: str) -> str:
    """An arm name as a folder name (arm names come from the user)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "arm"


# ---------------------------------------------------------------- grid


def _cell_scale(image: Image.Image, small: int = 128, large: int = 512) -> Image.Image:
    """Tiny images are enlarged by a whole factor (crisp pixels), big ones shrunk (a readable grid)."""
    side = max(image.size)
    if side < small:
        factor = math.ceil(small / side)
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    if side > large:
        ratio = large / side
        return image.resize(
            (round(image.width * ratio), round(image.height * ratio)), Image.Resampling.LANCZOS
        )
    return image


def make_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    label_width: int = 180,
) -> Image.Image:
    """One image: a header row of column labels, then per row a wrapped label and its images."""
    if not rows:
        raise UserError("nothing to put in a grid")
    cells = [[_cell_scale(image.convert("RGB")) for image in row] for row in rows]
    cell_w = max(image.width for row in cells for image in row)
    cell_h = max(image.height for row in cells for image in row)
    font = ImageFont.load_default()
    line_h = _text_height(font) + 3
    chars = max(8, int(label_width / max(font.getlength("n"), 1)) - 1)
    header = line_h + 6
    pad = 4
    width = label_width + len(column_labels) * (cell_w + pad) + pad
    height = header + len(cells) * (cell_h + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(column_labels):
        draw.text((label_width + pad + j * (cell_w + pad), 3), str(label), fill=(0, 0, 0), font=font)
    for i, (row, label) in enumerate(zip(cells, row_labels, strict=True)):
        top = header + i * (cell_h + pad)
        lines = textwrap.wrap(label, chars)[: max(cell_h // line_h, 1)]
        for k, line in enumerate(lines):
            draw.text((pad, top + k * line_h), line, fill=(0, 0, 0), font=font)
        for j, image in enumerate(row):
            grid.paste(image, (label_width + pad + j * (cell_w + pad), top))
    return grid


def _text_height(font: Any) -> int:
    _, top, _, bottom = font.getbbox("Ag")
    return int(bottom - top) + 2


# ---------------------------------------------------------------- after a multi-arm run


def run_prompts(cfg: Any) -> list[str]:
    """The validation prompts of a run: as set, else the first distinct captions of its data."""
    from soar_lite.config import BUILTIN
    from soar_lite.data import builtin_data_folder, list_items

    if cfg.validation.prompts:
        return list(cfg.validation.prompts)
    if cfg.validation.num_prompts == 0:
        return []
    folder = builtin_data_folder() if cfg.data.path == BUILTIN else Path(cfg.data.path)
    items = list_items(folder, cfg.data.caption_ext, cfg.data.default_caption)
    return list(dict.fromkeys(it.caption for it in items))[: cfg.validation.num_prompts]


def compare_arms(cfg: Any, output: Path, *, seeds: Sequence[int] | None = None) -> CompareResult | None:
    """The grid of base and every arm of a multi-arm run (``objective=both`` or a list such as
    ``sft,soar,scheduled``), in training order, into ``output/compare`` (validation settings).

    Returns None (and writes nothing) when the run has no validation prompts (``validation.num_prompts=0``).
    """
    from soar_lite.base_model import resolve_resolution
    from soar_lite.config import with_family_defaults
    from soar_lite.run_folder import read_record

    prompts = run_prompts(cfg)
    if not prompts:
        return None
    model_path = (read_record(output / cfg.arms[0]) or {})["base_model"]
    if Path(model_path).exists():
        defaults = families.family_class(families.detect_family(model_path)).family_defaults(model_path)
        cfg, _ = with_family_defaults(cfg, defaults)

    side = resolve_resolution(cfg, model_path)
    return compare(
        model_path,
        {"base": None, **{arm: str(output / arm) for arm in cfg.arms}},
        prompts,
        list(seeds) if seeds is not None else [cfg.validation.seed],
        steps=cfg.validation.steps,
        guidance_scale=cfg.validation.guidance_scale,
        height=side,
        width=side,
        output=output / "compare",
        batch_size=8,
    )
