"""``soar-lite bench swap``: what block swap costs in step time and saves in memory, in one run.

One tiny SD3 transformer with a LoRA and gradient checkpointing takes full SOAR steps (per-term
backward, a CFG rollout, K auxiliary points) with none, half and all of its blocks swapped; the
variants are interleaved round-robin so that a noisy machine slows them alike, and reported as
ratios to no swap. Swap is installed before and removed after each of its steps (not timed).

Memory: the peak of base-weight bytes on the compute device, from the swap's own accounting
(the unswapped blocks and embedders, plus the swapped blocks in flight), on any device; on CUDA
``max_memory_allocated`` too. On a CPU the "device copy" is a clone, so the time ratio measures the
swap's bookkeeping and copies without PCIe or overlap; on a GPU it measures the real thing (pinned
copies on a side stream against compute). The measured block copies per step are checked against
the planner's count (``soar_lite.plan.plan_swap``: an upper bound).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from soar_lite.config import SoarConfig
from soar_lite.families.sd3 import sd3_velocity
from soar_lite.objective import Draws, NoiseGrid, Rollout, soar_loss
from soar_lite.swap import WINDOW, BlockSwap, blocks_of, frozen_bytes, swap_counts


def _step(model, params, opt, batch, grid, cfg, gen) -> None:
    z0, cond, uncond = batch
    draws = Draws.sample(z0, cfg, grid, gen)
    rollout = Rollout("cfg", cfg.cfg_scale_sampling)
    soar_loss(sd3_velocity(model), z0, cond, uncond, grid, cfg, rollout=rollout, draws=draws,
              backward=lambda t, last: t.backward())  # fmt: skip
    opt.step()
    opt.zero_grad(set_to_none=True)


def planned_copies(count: int, k: int) -> int:
    """Block copies per step by the planner's rule: main + K aux passes copy each swapped block twice
    (forward, recompute), the CFG rollout's unconditional pass once; none if all fit in flight."""
    return 0 if count <= WINDOW else count * (2 * (1 + k) + 1)


def run_bench(
    *,
    layers: int = 6,
    batch: int = 4,
    text_tokens: int = 8,
    k: int = 2,
    repeats: int = 3,
    warmup: int = 1,
    device: str | None = None,
) -> dict[str, Any]:
    """Time and memory of SOAR steps with 0, half and all blocks swapped; returns the JSON record."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from soar_lite.bench.step import build_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    model, params = build_model(layers)
    model.enable_gradient_checkpointing()
    model.to(device)
    opt = torch.optim.AdamW(params, lr=1e-4)
    grid = NoiseGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    grid = replace(grid, sigmas=grid.sigmas.to(device), timesteps=grid.timesteps.to(device))
    g = torch.Generator(device=device).manual_seed(0)
    z0 = torch.randn(batch, 16, 16, 16, generator=g, device=device)
    cond = {
        "prompt_embeds": torch.randn(batch, text_tokens, 64, generator=g, device=device),
        "pooled_prompt_embeds": torch.randn(batch, 64, generator=g, device=device),
    }
    uncond = {key: torch.zeros_like(v) for key, v in cond.items()}
    cfg = SoarConfig(lambda_aux=1.0, trajectory_length=k, cfg_scale_sampling=4.5)
    counts = swap_counts(len(blocks_of(model)))
    base_bytes = frozen_bytes(model)
    times: dict[int, list[float]] = {n: [] for n in counts}
    stats: dict[int, dict[str, float]] = {}
    for rep in range(warmup + repeats):
        for n in counts:
            swap = BlockSwap(model, n, device) if n else None
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            _step(model, params, opt, (z0, cond, uncond), grid, cfg, g)
            if on_cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[n].append(elapsed)
            swapped = swap.swapped_bytes if swap else 0
            stats[n] = {
                "base_weights_on_device_peak_mb": (
                    base_bytes - swapped + (swap.peak_resident_bytes if swap else 0)
                )
                / 2**20,
                "block_copies_per_step": swap.copies if swap else 0,
                "copied_mb_per_step": (swap.copied_bytes if swap else 0) / 2**20,
                "planned_block_copies_per_step": planned_copies(n, k),
                **({"cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20} if on_cuda else {}),
            }
            if swap is not None:
                swap.remove()
    return _report(times, stats, dict(layers=layers, batch=batch, text_tokens=text_tokens, k=k,
                                      repeats=repeats, device=device))  # fmt: skip


def _report(times: dict[int, list[float]], stats: dict[int, dict[str, float]], setup: dict) -> dict[str, Any]:
    median = {n: statistics.median(ts) for n, ts in times.items()}
    none = min(times)
    rows = {}
    for n in times:
        rows[f"swap_{n}"] = {
            "swap_blocks": n,
            "median_step_s": median[n],
            "spread_s": [min(times[n]), max(times[n])],
            "time_ratio_to_no_swap": median[n] / median[none],
            **stats[n],
            "memory_ratio_to_no_swap": stats[n]["base_weights_on_device_peak_mb"]
            / stats[none]["base_weights_on_device_peak_mb"],
        }
    half, full = sorted(times)[1], max(times)
    return {
        "benchmark": "swap",
        "setup": setup,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "memory_method": "base-weight bytes on the compute device at peak (the swap's accounting)"
        + ("; cuda max_memory_allocated" if setup["device"].startswith("cuda") else ""),
        "variants": rows,
        "summary": {
            "half_time_ratio": rows[f"swap_{half}"]["time_ratio_to_no_swap"],
            "all_time_ratio": rows[f"swap_{full}"]["time_ratio_to_no_swap"],
            "half_memory_ratio": rows[f"swap_{half}"]["memory_ratio_to_no_swap"],
            "all_memory_ratio": rows[f"swap_{full}"]["memory_ratio_to_no_swap"],
        },
    }


def main(output: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run the benchmark and write its JSON to ``output``."""
    result = run_bench(**kwargs)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
