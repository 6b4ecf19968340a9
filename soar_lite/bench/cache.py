"""``soar-lite bench cache``: what the cache stage buys, measured in one run on the tiny pipeline.

1. **Step time**: a training step from cached latents and embeddings, next to the same step when
   the batch is decoded, VAE-encoded and text-encoded every step (a trainer without a cache).
   Both run on one model with the same random draws, interleaved round-robin so a noisy machine
   slows them alike, and are reported as ratios, for SFT and for SOAR.
2. **Peak process memory** (peak RSS, ``VmHWM``, each run in a fresh subprocess) of a short
   training run from a complete cache, where no text encoder is ever loaded, next to the same run
   with the text encoders and VAE kept resident, as trainers without a cache keep them. The tiny
   pipeline's text encoders weigh ~0.2 MB, far below the ~600 MB an interpreter with torch holds,
   so the memory pair also runs with text encoders inflated to ``heavy_text_mb`` (wider MLPs,
   same tokens in and embeddings out): that pair shows what resident encoders cost in RSS.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHILD = r"""
import json, resource, sys
from soar_lite import config, train
from soar_lite.families.sd3 import SD3Family

mode, model, data, cache_dir, out, steps, batch = sys.argv[1:8]
loads = []
real_load = SD3Family.load

def load(*args, **kwargs):
    loads.append(bool(kwargs.get("text_encoders", True)))
    return real_load(*args, **kwargs)

SD3Family.load = load
overrides = [f"model.path={model}", f"data.path={data}", f"data.cache_dir={cache_dir}", f"steps={steps}",
             f"batch_size={batch}", "validation.num_prompts=0", "trajectory_length=2", "warmup_steps=0"]
cfg = config.load_config("cpu-tiny", overrides)
resident = None
if mode == "resident":  # loaded and used once, as a trainer that encodes on the fly uses them every step
    import torch
    resident = SD3Family.load(model, transformer=False)
    resident.encode_prompts(["a red circle at the top left"])
    resident.encode_images(torch.zeros(1, 3, 32, 32))
train.train(cfg, out, progress=False)
try:  # VmHWM: this process image's own peak (ru_maxrss also counts the forking parent's RSS)
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
except (OSError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"peak_rss_mb": peak / 2**20, "text_encoder_loads": sum(loads)}))
"""


def build_workspace(folder: Path, items: int, heavy_text_mb: float = 0.0) -> tuple[Path, Path]:
    """A tiny SD3 pipeline folder (text encoders inflated to ``heavy_text_mb`` if > 0) and a shapes set."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from soar_lite.toy.shapes import write_shapes_folder
    from soar_lite.toy.tiny_sd3 import build_tiny_components, save_tiny_pipeline

    parts = build_tiny_components(0)
    if heavy_text_mb > 0:
        for name in ("text_encoder", "text_encoder_2"):
            config = copy.deepcopy(parts[name].config)
            per_layer = heavy_text_mb / 2 * 2**20 / 4 / config.num_hidden_layers  # fp32 bytes -> params
            config.intermediate_size = int(per_layer / (2 * config.hidden_size))
            torch.manual_seed(0)
            parts[name] = CLIPTextModelWithProjection(config).eval()
    model = save_tiny_pipeline(StableDiffusion3Pipeline(**parts), folder / f"model-{heavy_text_mb:g}")
    return model, write_shapes_folder(folder / "data", items, seed=0)


def _warm_cache(model: Path, data: Path, cache_dir: Path) -> Any:
    """Fill the cache for ``data`` (so that training from it never needs an encoder); (data, items)."""
    from soar_lite import cache
    from soar_lite.config import DataConfig
    from soar_lite.data import load_items
    from soar_lite.families.common import model_settings
    from soar_lite.families.sd3 import SD3Family  # the benchmark measures the SD3 cache stage

    settings = model_settings(str(model))
    spec = cache.CacheSpec(str(model), "float32", settings["max_sequence_length"], settings["resolution"])

    def loader(images: bool, texts: bool) -> SD3Family:
        return SD3Family.load(str(model), transformer=False, max_sequence_length=spec.max_sequence_length)

    items = load_items(DataConfig(path=str(data))).items
    result = cache.prepare(items, [], spec, cache_dir, loader, progress=False)
    return cache.load_cache(result.manifest), items


def _step_fns(trainer: Any, k: int) -> dict[str, Callable[..., None]]:
    """One optimizer step of SFT and of SOAR with K=k, on one LoRA of the tiny transformer; the
    draws come from ``seed``, so a cached and an encoded step of one round do the same work."""
    from soar_lite.config import LoraConfig, SoarConfig
    from soar_lite.lora import add_lora
    from soar_lite.objective import Draws, soar_loss

    params = add_lora(trainer.transformer, LoraConfig(rank=8, alpha=8.0))
    opt = torch.optim.AdamW(params, lr=1e-4)
    velocity, grid = trainer.velocity(trainer.transformer), trainer.noise_grid()
    gen = torch.Generator()

    def make(cfg: SoarConfig) -> Callable[..., None]:
        def step(z0: Any, cond: Any, uncond: Any, seed: int) -> None:
            draws = Draws.sample(z0, cfg, grid, gen.manual_seed(seed))
            soar_loss(
                velocity, z0, cond, uncond, grid, cfg, draws=draws, backward=lambda t, last: t.backward()
            )
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return {"sft": make(SoarConfig(lambda_aux=0.0)), f"soar_k{k}": make(SoarConfig(trajectory_length=k))}


def measure_step_time(model: Path, data: Path, cache_dir: Path, *, batch: int, k: int, repeats: int) -> dict:
    """Step time from the cache vs encoding the batch every step, interleaved round-robin (CPU)."""
    from soar_lite.data import load_pixels, read_image_bytes
    from soar_lite.families.common import model_settings
    from soar_lite.families.sd3 import SD3Family  # the benchmark measures the SD3 cache stage

    cached, items = _warm_cache(model, data, cache_dir)
    settings = model_settings(str(model))
    encoders = SD3Family.load(
        str(model), transformer=False, max_sequence_length=settings["max_sequence_length"]
    )
    trainer = SD3Family.load(str(model), text_encoders=False, vae=False)
    side = settings["resolution"]
    steps = _step_fns(trainer, k)

    def from_cache(number: int) -> tuple:
        return cached.batch(cached.rows(number, batch, 0), torch.device("cpu"))

    def encode_now(number: int) -> tuple:
        rows = cached.rows(number, batch, 0).tolist()
        pixels = torch.stack([load_pixels(read_image_bytes(items[r]), side) for r in rows])
        cond = encoders.encode_prompts([items[r].caption for r in rows])
        uncond = {name: v.expand(batch, *v.shape[1:]) for name, v in encoders.encode_prompts([""]).items()}
        return encoders.encode_images(pixels).float(), cond, uncond

    variants = {f"{obj}/{src}": (steps[obj], fetch) for obj in steps
                for src, fetch in (("cached", from_cache), ("encode_every_step", encode_now))}  # fmt: skip
    total: dict[str, list[float]] = {name: [] for name in variants}
    inputs: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats + 1):  # the first round warms up and is not timed
        for name, (step, fetch) in variants.items():
            start = time.perf_counter()
            batch_ = fetch(rep)
            fetched = time.perf_counter()
            step(*batch_, seed=rep)
            if rep:
                total[name].append(time.perf_counter() - start)
                inputs[name].append(fetched - start)
    return {obj: _ratios(total, inputs, obj) for obj in steps}


def _ratios(total: dict[str, list[float]], inputs: dict[str, list[float]], obj: str) -> dict[str, Any]:
    """Medians, minimums (the least disturbed step on a shared machine) and their ratios."""
    c, e = total[f"{obj}/cached"], total[f"{obj}/encode_every_step"]
    ic, ie = inputs[f"{obj}/cached"], inputs[f"{obj}/encode_every_step"]
    med = statistics.median
    return {
        "cached_median_s": med(c),
        "encode_every_step_median_s": med(e),
        "cached_min_s": min(c),
        "encode_every_step_min_s": min(e),
        "inputs_cached_median_s": med(ic),
        "inputs_encode_every_step_median_s": med(ie),
        "ratio_inputs_encode_over_cached_median": med(ie) / med(ic),
        "ratio_encode_over_cached_median": med(e) / med(c),
        "ratio_encode_over_cached_min": min(e) / min(c),
    }


def measure_peak_rss(model: Path, data: Path, cache_dir: Path, work: Path, *, steps: int, batch: int) -> dict:
    """Peak RSS of a short training run from a warm cache, without and with resident encoders."""
    from soar_lite.families.sd3 import SD3Family

    _warm_cache(model, data, cache_dir)
    family = SD3Family.load(str(model), transformer=False)
    text_mb = sum(
        p.numel() * p.element_size() for enc in (family.pipe.text_encoder, family.pipe.text_encoder_2)
        for p in enc.parameters()
    ) / 2**20  # fmt: skip
    del family
    out: dict[str, Any] = {"text_encoders_mb": text_mb}
    for mode in ("cached", "resident"):
        args = [
            mode,
            str(model),
            str(data),
            str(cache_dir),
            str(work / f"run-{model.name}-{mode}"),
            str(steps),
        ]
        done = subprocess.run(
            [sys.executable, "-c", CHILD, *args, str(batch)], capture_output=True, text=True, timeout=1800
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory run {mode} failed: {done.stderr[-2000:]}")
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    out["resident_minus_cached_mb"] = out["resident"]["peak_rss_mb"] - out["cached"]["peak_rss_mb"]
    out["ratio_resident_over_cached"] = out["resident"]["peak_rss_mb"] / out["cached"]["peak_rss_mb"]
    return out


def run_bench(
    *,
    items: int = 32,
    batch: int = 8,
    k: int = 6,
    repeats: int = 20,
    memory_steps: int = 4,
    heavy_text_mb: float = 1024.0,
    threads: int = 1,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Step-time ratios and peak-RSS pairs on the tiny pipeline; returns the JSON record.

    ``threads`` caps torch's intra-op threads for the timing: on a shared machine one thread per
    step is disturbed least by other processes (the ratio, not the absolute time, is the result).
    """
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="soar-lite-bench-cache-") as tmp:
        work = Path(workdir or tmp)
        model, data = build_workspace(work, items)
        step_time = measure_step_time(model, data, work / "cache", batch=batch, k=k, repeats=repeats)
        memory = {
            "tiny": measure_peak_rss(model, data, work / "cache", work, steps=memory_steps, batch=batch)
        }
        if heavy_text_mb > 0:
            heavy, _ = build_workspace(work, items, heavy_text_mb)
            memory["tiny_heavy_text"] = measure_peak_rss(
                heavy, data, work / "cache", work, steps=memory_steps, batch=batch
            )
    setup = dict(items=items, batch=batch, k=k, repeats=repeats, memory_steps=memory_steps,
                 heavy_text_mb=heavy_text_mb, threads=threads, device="cpu", resolution=32)  # fmt: skip
    return {
        "benchmark": "cache",
        "setup": setup,
        "torch": torch.__version__,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "python": sys.version.split()[0],
        },
        "step_time": step_time,
        "memory": memory,
        "memory_method": "peak RSS (/proc VmHWM) of a fresh subprocess running soar_lite.train.train",
        "summary": _summary(step_time, memory),
    }


def _summary(step_time: dict[str, Any], memory: dict[str, Any]) -> dict[str, float]:
    summary: dict[str, float] = {}
    for obj, row in step_time.items():
        summary[f"inputs_time_ratio_encode_over_cached_{obj}"] = row["ratio_inputs_encode_over_cached_median"]
        summary[f"step_time_ratio_encode_over_cached_{obj}_median"] = row["ratio_encode_over_cached_median"]
        summary[f"step_time_ratio_encode_over_cached_{obj}_min"] = row["ratio_encode_over_cached_min"]
    for name, row in memory.items():
        summary[f"peak_rss_mb_{name}_cached"] = row["cached"]["peak_rss_mb"]
        summary[f"peak_rss_mb_{name}_resident"] = row["resident"]["peak_rss_mb"]
        summary[f"text_encoders_mb_{name}"] = row["text_encoders_mb"]
        summary[f"text_encoder_loads_{name}_cached_run"] = row["cached"]["text_encoder_loads"]
    return summary


def main(output: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run the benchmark and write its JSON to ``output``."""
    result = run_bench(**kwargs)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
