"""``soar-lite bench step``: what one SOAR step costs next to SFT, and next to the reference's way.

Everything is measured inside one run, interleaving the variants round-robin so that a noisy
machine slows them alike, and reported as ratios: SOAR/SFT time next to the forward-unit floor
(3 + 1 + 3K) / 3 of SOAR.md, and peak activation memory of SOAR at K = 6 next to SFT.

The floor counts a backward as two forwards; a LoRA backward through a frozen base skips the base's
weight gradients and costs less, and the SFT step also carries fixed costs (optimizer, noise draws)
that SOAR does not repeat. So the run also times the two passes SOAR adds, alone: a rollout forward
under ``inference_mode`` and one training pass (forward + backward). ``sft + rollout + K x train_pass``
is the cost of SOAR's passes with nothing else; ``time_over_passes`` near 1.0 says the step adds no
overhead of its own.

Memory on CPU is the peak of bytes held by autograd's saved tensors (parameters excluded), counted
with ``torch.autograd.graph.saved_tensors_hooks``: the activation memory a GPU would have to hold
for backward. On CUDA the allocator's ``max_memory_allocated`` is reported as well.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from soar_lite.config import LoraConfig, SoarConfig
from soar_lite.families.sd3 import sd3_velocity
from soar_lite.objective import Draws, NoiseGrid, _bcast, _weighted_sq_error, next_times, soar_loss


class SavedTensorMeter:
    """Live and peak bytes of storages autograd saves for backward (parameters are not activations).

    Counted per storage, not per save: a tensor saved by two ops (a layer's input feeding both the
    base linear and its LoRA) is memory once.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}  # pass all of them, frozen ones too
        self.refs: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _pack(self, t: Tensor) -> Any:
        if t.untyped_storage().data_ptr() in self.skip:
            return t
        return _Saved(t, self)

    def acquire(self, ptr: int, size: int) -> None:
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        if self.refs[ptr] == 1:
            self.live += size
            self.peak = max(self.peak, self.live)

    def release(self, ptr: int, size: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= size

    @staticmethod
    def _unpack(saved: Any) -> Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class _Saved:
    __slots__ = ("meter", "ptr", "size", "tensor")

    def __init__(self, tensor: Tensor, meter: SavedTensorMeter) -> None:
        storage = tensor.untyped_storage()
        self.tensor, self.meter, self.ptr, self.size = tensor, meter, storage.data_ptr(), storage.nbytes()
        meter.acquire(self.ptr, self.size)

    def __del__(self) -> None:
        self.meter.release(self.ptr, self.size)


def build_model(layers: int, seed: int = 0) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A tiny SD3 transformer (the toy's block sizes) with a rank-8 LoRA on the default targets."""
    from soar_lite.lora import add_lora
    from soar_lite.toy.tiny_sd3 import tiny_sd3_transformer

    model = tiny_sd3_transformer(seed, num_layers=layers)
    model.requires_grad_(False)
    return model, add_lora(model, LoraConfig(rank=8, alpha=8.0))


def reference_style_loss(
    velocity: Callable, z0: Tensor, cond: dict, uncond: dict, grid: NoiseGrid, cfg: SoarConfig, draws: Draws
) -> Tensor:
    """The step as the reference writes it (ODE path): rollout with graph, separate conditional pass,
    all 1 + K graphs alive until one joint backward. Same value as :func:`soar_loss`."""
    sigmas, timesteps = grid.sigmas, grid.timesteps
    i0 = grid.index_of_time(draws.t0)
    s0 = sigmas[i0]
    zs0 = (1 - _bcast(s0, z0)) * z0 + _bcast(s0, z0) * draws.z1
    main = _weighted_sq_error(velocity(zs0, timesteps[i0], cond), draws.z1 - z0, torch.ones_like(s0))
    v_cfg = velocity(zs0, timesteps[i0], uncond)
    v_cfg = v_cfg + cfg.cfg_scale_sampling * (velocity(zs0, timesteps[i0], cond) - v_cfg)  # graph kept
    s1 = sigmas[grid.index_of_time(next_times(draws.t0, cfg))]
    z1p = zs0 + v_cfg * _bcast(s1 - s0, z0)
    total = main
    for k in range(cfg.trajectory_length):
        s_aux = s1 + draws.paths[0].u[k] * (1 - s1)
        a = _bcast((s_aux - s1) / (1 - s1), z0)
        z_aux = (1 - a) * z1p.detach() + a * draws.z1
        pred = velocity(z_aux, timesteps[grid.index_of_sigma(s_aux)], cond)
        total = total + cfg.lambda_aux * _weighted_sq_error(
            pred, (z_aux - z0) / _bcast(s_aux, z0), torch.ones_like(s_aux)
        )
    n = z0.shape[0]
    return total / max(n + cfg.lambda_aux * cfg.trajectory_length * n, 1)


def _variants(ks: list[int]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"sft": {"lambda_aux": 0.0, "k": 0, "style": "soar-lite"}}
    for k in ks:
        out[f"soar_k{k}"] = {"lambda_aux": 1.0, "k": k, "style": "soar-lite"}
    out[f"reference_k{max(ks)}"] = {"lambda_aux": 1.0, "k": max(ks), "style": "reference"}
    return out


def _one_step(model, params, opt, batch, grid, spec, gen, meter: SavedTensorMeter | None) -> None:
    z0, cond, uncond = batch
    cfg = SoarConfig(lambda_aux=spec["lambda_aux"], trajectory_length=max(spec["k"], 1))
    draws = Draws.sample(z0, cfg, grid, gen)
    velocity = sd3_velocity(model)
    ctx = meter.hooks() if meter else _null()
    with ctx:
        if spec["style"] == "reference":
            reference_style_loss(velocity, z0, cond, uncond, grid, cfg, draws).backward()
        else:
            soar_loss(
                velocity, z0, cond, uncond, grid, cfg, draws=draws, backward=lambda t, last: t.backward()
            )
    opt.step()
    opt.zero_grad(set_to_none=True)


def _rollout_pass(model, batch, grid) -> None:
    z0, _, uncond = batch
    with torch.inference_mode():
        sd3_velocity(model)(z0, grid.timesteps[:1].expand(z0.shape[0]), uncond)


def _train_pass(model, batch, grid) -> None:
    z0, cond, _ = batch
    pred = sd3_velocity(model)(z0, grid.timesteps[:1].expand(z0.shape[0]), cond)
    pred.float().pow(2).mean().backward()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run_bench(
    *,
    layers: int = 2,
    batch: int = 8,
    text_tokens: int = 14,
    ks: tuple[int, ...] = (1, 2, 6),
    repeats: int = 5,
    warmup: int = 1,
    device: str | None = None,
) -> dict[str, Any]:
    """Time and memory of every variant on one tiny model and batch; returns the JSON record."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, params = build_model(layers)
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
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    variants = _variants(list(ks))
    passes = {"rollout_forward": _rollout_pass, "train_pass": _train_pass}
    times: dict[str, list[float]] = {name: [] for name in [*variants, *passes]}
    memory: dict[str, dict[str, float]] = {}
    for name, spec in variants.items():  # memory pass (hooks slow the step: not timed)
        meter = SavedTensorMeter(model.parameters())
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        _one_step(model, params, opt, (z0, cond, uncond), grid, spec, g, meter)
        memory[name] = {"saved_activation_peak_mb": meter.peak / 2**20}
        if on_cuda:
            memory[name]["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    for rep in range(warmup + repeats):  # timing passes, round-robin
        for name, spec in variants.items():
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            _one_step(model, params, opt, (z0, cond, uncond), grid, spec, g, None)
            if on_cuda:
                torch.cuda.synchronize()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
        for name, one_pass in passes.items():
            start = time.perf_counter()
            one_pass(model, (z0, cond, uncond), grid)
            if on_cuda:
                torch.cuda.synchronize()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
        opt.zero_grad(set_to_none=True)
    return _report(
        variants,
        times,
        memory,
        dict(layers=layers, batch=batch, text_tokens=text_tokens, repeats=repeats, device=device),
    )


def _report(variants: dict, times: dict, memory: dict, setup: dict) -> dict[str, Any]:
    median = {name: statistics.median(ts) for name, ts in times.items()}
    sft = median["sft"]
    rollout, train_pass = median["rollout_forward"], median["train_pass"]
    sft_memory = memory["sft"]["saved_activation_peak_mb"]
    rows = {}
    for name, spec in variants.items():
        k = spec["k"]
        floor = (3 + 1 + 3 * k) / 3 if spec["style"] == "soar-lite" and k else None
        if spec["style"] == "reference":
            floor = (3 + 2 + 3 * k) / 3
        passes = (sft + rollout + k * train_pass) / sft if spec["style"] == "soar-lite" and k else None
        rows[name] = {
            "k": k,
            "style": spec["style"],
            "median_step_s": median[name],
            "spread_s": [min(times[name]), max(times[name])],
            "ratio_to_sft": median[name] / sft,
            "flop_floor_ratio": floor,
            "passes_ratio": passes,
            "time_over_passes": median[name] / sft / passes if passes else None,
            **memory[name],
            "memory_ratio_to_sft": memory[name]["saved_activation_peak_mb"] / sft_memory,
        }
    kmax = max(v["k"] for v in variants.values())
    ours, ref = rows[f"soar_k{kmax}"], rows[f"reference_k{kmax}"]
    return {
        "benchmark": "step",
        "setup": setup,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "memory_method": "peak bytes of autograd saved tensors, parameters excluded (saved_tensors_hooks)",
        "pass_costs_s": {
            "rollout_forward": rollout,
            "train_pass": train_pass,
            "rollout_over_train_pass": rollout / train_pass,
        },
        "variants": rows,
        "summary": {
            f"soar_k{kmax}_time_over_floor": ours["ratio_to_sft"] / ours["flop_floor_ratio"],
            f"soar_k{kmax}_time_over_passes": ours["time_over_passes"],
            f"soar_k{kmax}_memory_over_sft": ours["memory_ratio_to_sft"],
            f"speedup_over_reference_k{kmax}": ref["median_step_s"] / ours["median_step_s"],
            f"memory_saving_over_reference_k{kmax}": ref["saved_activation_peak_mb"]
            / ours["saved_activation_peak_mb"],
        },
    }


def main(output: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run the benchmark and write its JSON to ``output``."""
    result = run_bench(**kwargs)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
