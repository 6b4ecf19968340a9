"""The training loop: cached batch -> SOAR objective (per-term backward) -> optimizer -> checkpoint.

``train()`` reads as the recipe; each stage is a small builder below it. The loop only sees the
model family through :class:`~soar_lite.families.base.ModelFamily` and the objective through
:func:`~soar_lite.objective.soar_loss`.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm

from soar_lite import cache, checkpoint, families, lora, swap
from soar_lite.config import BUILTIN, SoarConfig, TrainConfig, config_to_dict, with_family_defaults
from soar_lite.data import load_items
from soar_lite.ema import EMA_FILE, LoraEMA
from soar_lite.errors import UserError
from soar_lite.families.base import ModelFamily
from soar_lite.families.common import model_settings
from soar_lite.objective import Draws, LossReport, Rollout, soar_loss
from soar_lite.paths import write_text_atomic

RUN_RECORD = "soar_lite_run.json"
RUN_CONFIG = "config.yaml"  # the resolved settings: ``--preset RUN_FOLDER`` reruns them
METRICS = "metrics.jsonl"


@dataclass
class Run:
    """What the step needs besides the config: the live objects of one training run."""

    accelerator: Accelerator
    family: ModelFamily
    model: torch.nn.Module  # the (possibly DDP-wrapped) LoRA transformer
    data: cache.CachedData
    optimizer: Any
    scheduler: Any
    generator: torch.Generator
    params: list[torch.nn.Parameter]
    ema: LoraEMA | None = None


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """A fresh Accelerator per run: one process may run several (both arms, the app, tests) with
    different precision. Only the per-run state is reset; the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())


def resolve_model(path: str) -> str:
    """``builtin`` -> the tiny trained toy base (built once, cached); anything else as given."""
    if path != BUILTIN:
        return path
    from soar_lite.toy import ensure_tiny_base

    return str(ensure_tiny_base())


def resolve_family(cfg: TrainConfig, model_path: str) -> tuple[str, TrainConfig, dict[str, Any]]:
    """The run's family (``model.family``, auto-detected from the folder) and ``cfg`` with the
    family's defaults in place of generic (SD3) defaults left unchanged; what was replaced."""
    folder = cache.local_model_folder(model_path)
    name = families.resolve_family(cfg.model.family, folder)
    cfg, applied = with_family_defaults(cfg, families.family_class(name).family_defaults(folder))
    return name, replace(cfg, model=replace(cfg.model, family=name)), applied


def family_name(cfg: TrainConfig, model_path: str) -> str:
    """``model.family`` with ``auto`` resolved from the folder (callers may pass an unresolved cfg)."""
    if cfg.model.family != "auto":
        return cfg.model.family
    return families.resolve_family("auto", cache.local_model_folder(model_path))


def resolve_resolution(cfg: TrainConfig, model_path: str) -> int:
    """The preset's resolution, else the model folder's own (the tiny default's 32), else 512."""
    return cfg.data.resolution or int(model_settings(model_path).get("resolution", 512))


def finished(output: Path, cfg: TrainConfig) -> bool:
    """A run in ``output`` that completed ``cfg.steps`` steps and wrote its LoRA file."""
    try:
        record = json.loads((output / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    done = record.get("status") == "done" and record.get("steps_done", 0) >= cfg.steps
    return done and (output / lora.LORA_FILE).is_file()


def prepare_output(output: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to silently overwrite an earlier run; ``--resume`` continues it, ``--overwrite`` replaces it."""
    earlier = (output / RUN_RECORD).exists() or (output / "checkpoints").exists()
    if earlier and not resume:
        if not overwrite:
            raise UserError(
                f"{output} already holds a run: pass --resume latest to continue it, "
                "--overwrite to replace it, or another --output"
            )
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def prepare_data(
    cfg: TrainConfig, model_path: str, output: Path, accelerator: Accelerator, progress: bool
) -> cache.CachedData:
    """Cache stage, on the main process: checked items; whatever is not cached yet is encoded once
    (encoders loaded only then, only the side needed, and freed after). Every process then reads
    the same manifest. The cache is content-addressed and shared (``data.cache_dir``), not per
    ``output``, so other runs on the same data reuse it."""
    manifest = None
    if accelerator.is_main_process:
        report = load_items(cfg.data)
        captions = list(dict.fromkeys(it.caption for it in report.items))
        prompts = cfg.validation.prompts or captions[: cfg.validation.num_prompts]
        seq = cfg.model.max_sequence_length or int(model_settings(model_path).get("max_sequence_length", 256))
        resolution = resolve_resolution(cfg, model_path)
        spec = cache.CacheSpec(
            model_path, cfg.model.dtype, seq, resolution, cfg.data.buckets, cfg.data.bucket_max_aspect,
            family_name(cfg, model_path),
        )  # fmt: skip

        def load_encoders(images: bool, texts: bool) -> ModelFamily:
            return families.load_family(
                spec.family,
                model_path,
                device=accelerator.device,
                dtype=cfg.model.dtype,
                max_sequence_length=seq,
                transformer=False,
                text_encoders=texts,
                vae=images,
                encoder_offload=cfg.data.encoder_offload,
            )

        root = cache.cache_root(cfg.data.cache_dir)
        result = cache.prepare(report.items, prompts, spec, root, load_encoders, progress=progress)
        if progress:
            print(result.summary() if report.skips else f"{report.summary()}\n{result.summary()}")
        manifest = str(result.manifest)
    manifest = _broadcast_str(accelerator, manifest)
    return cache.load_cache(manifest, caption_dropout=cfg.data.caption_dropout, in_ram=cfg.data.cache_in_ram)


def param_groups(transformer: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The adapter's parameters as optimizer groups: one, or with LoRA+ (``optim.loraplus_ratio``)
    the ``lora_B`` matrices apart at ratio x lr (the schedule scales each group's lr alike).

    The order of parameters is that of ``transformer.parameters()`` within each group, so the
    optimizer's state lines up again on resume."""
    named = [(name, p) for name, p in transformer.named_parameters() if p.requires_grad]
    ratio = cfg.optim.loraplus_ratio
    if not ratio:
        return [{"params": [p for _, p in named]}]
    b = [p for name, p in named if ".lora_B." in name]
    rest = [p for name, p in named if ".lora_B." not in name]
    return [{"params": rest}, {"params": b, "lr": cfg.optim.lr * ratio}]


def build_optimizer(params: list[torch.nn.Parameter] | list[dict[str, Any]], cfg: TrainConfig) -> Any:
    """AdamW, bitsandbytes' 8-bit AdamW (runs on CPU too with bitsandbytes >= 0.45), Adafactor
    (factored second moments: the smallest optimizer state, at a fixed learning rate), or Prodigy
    (estimates its own step size: lr 1.0, with the safeguard warm-up and bias correction its
    authors recommend for diffusion LoRAs; four fp32 states per parameter)."""
    o = cfg.optim
    if o.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps,
                       decouple=True, use_bias_correction=True, safeguard_warmup=True)  # fmt: skip
    if o.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=o.lr, weight_decay=o.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)  # fmt: skip
    kwargs = {"lr": o.lr, "betas": (o.beta1, o.beta2), "weight_decay": o.weight_decay, "eps": o.eps}
    if o.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(optimizer: Any, cfg: TrainConfig) -> Any:
    """diffusers' LR schedules, counted in optimizer steps (never stepped once per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.optim.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.steps,
    )


def build_run(cfg: TrainConfig, model_path: str, data: cache.CachedData, accelerator: Accelerator) -> Run:
    """Transformer + LoRA + optimizer + schedule, prepared by accelerate (the schedule is ours to step)."""
    family = families.load_family(
        family_name(cfg, model_path),
        model_path,
        device=accelerator.device,
        dtype=cfg.model.dtype,
        quant=cfg.model.quant,
        max_sequence_length=cfg.model.max_sequence_length,
        text_encoders=False,
        vae=accelerator.is_main_process,
        options=cfg.flux,
    )
    torch.manual_seed(cfg.seed)  # the adapter's initial weights
    params = lora.add_lora(family.transformer, cfg.lora)
    if cfg.model.gradient_checkpointing:
        family.transformer.enable_gradient_checkpointing()
    optimizer = build_optimizer(param_groups(family.transformer, cfg), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    if accelerator.num_processes > 1:
        # DDP broadcasts every parameter and buffer at wrap time: not the frozen (maybe quantized:
        # torchao tensors cannot even be flattened) base, only the adapter, which is what it syncs
        from torch.nn.parallel import DistributedDataParallel

        transformer = family.transformer
        frozen = [name for name, p in transformer.named_parameters() if not p.requires_grad]
        buffers = [name for name, _ in transformer.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, frozen + buffers)
    model, optimizer = accelerator.prepare(family.transformer, optimizer)
    swap.install(family.transformer, cfg.model.swap_blocks, accelerator.device)  # after prepare's .to()
    # Every draw is made on the CPU and moved: CUDA random kernels depend on the GPU model (SM count),
    # so a CPU generator gives every process, card and machine the same global draws.
    generator = torch.Generator().manual_seed(cfg.seed)
    ema = LoraEMA(params, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    return Run(accelerator, family, model, data, optimizer, scheduler, generator, params, ema)


def train_step(run: Run, cfg: TrainConfig, state: checkpoint.TrainState) -> LossReport:
    """One optimizer step over ``gradient_accumulation`` micro-batches, each term back-propagated alone."""
    acc, world, accum = run.accelerator, run.accelerator.num_processes, cfg.gradient_accumulation
    soar_cfg = step_objective(cfg, state.step, run.generator)
    velocity = _autocast(acc, run.family.velocity(run.model))
    rollout = _rollout(acc, run.family.rollout(run.model, cfg))
    reduce_sum = (lambda t: acc.reduce(t, reduction="sum")) if world > 1 else None
    totals = LossReport(torch.zeros(()), 0.0, 0.0, 0, 0, 0, 0)
    for _ in range(accum):
        rows = run.data.rows(state.batches, cfg.batch_size * world, cfg.seed)
        drops = run.data.caption_drops(state.batches, cfg.batch_size * world, cfg.seed)
        mine = slice(acc.process_index * cfg.batch_size, (acc.process_index + 1) * cfg.batch_size)
        z0_all = run.data.latents_of(rows)
        grid = run.family.noise_grid(tuple(z0_all.shape[-2:]))  # a batch is one bucket: one grid
        draws = Draws.sample(z0_all, soar_cfg, grid, run.generator).select(mine, soar_cfg).to(acc.device)
        z0, cond, uncond = run.data.batch(rows[mine], acc.device, drops[mine])
        # DDP decides at *forward* time whether a backward all-reduces, and processes may run different
        # numbers of terms (SDE paths keep a process-local number of samples): every forward and
        # backward runs unsynchronised, and the gradients are averaged once below.
        with acc.no_sync(run.model):
            report = soar_loss(
                velocity,
                z0,
                cond,
                uncond,
                grid,
                soar_cfg,
                rollout=rollout,
                draws=draws,
                backward=lambda term, is_last: acc.backward(term / accum),
                reduce_sum=reduce_sum,
                world_size=world,
            )
        _accumulate(totals, report)
        state.batches += 1
    if world > 1:
        _average_gradients(acc, run.params)
    if cfg.optim.max_grad_norm > 0:
        acc.clip_grad_norm_(run.params, cfg.optim.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.params)
    state.step += 1
    return totals


def _average_gradients(acc: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """One all-reduce (mean, as DDP would) of every adapter gradient for the optimizer step."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    averaged = acc.reduce(_flatten_dense_tensors(grads), reduction="mean")
    for p, g in zip(params, _unflatten_dense_tensors(averaged, grads), strict=True):
        p.grad = g


def step_objective(cfg: TrainConfig, step: int, generator: torch.Generator) -> SoarConfig:
    """The objective of optimizer step ``step``: lambda after warm-up, or SFT on a skipped SOAR step.

    The skip draw comes from the run's generator (same on every process, restored on resume).
    """
    lam = cfg.effective_lambda_aux
    if lam and cfg.soar.lambda_warmup_steps:
        lam *= min(1.0, (step + 1) / cfg.soar.lambda_warmup_steps)
    if lam and cfg.soar.probability < 1.0:
        draw = torch.rand((), generator=generator, device=generator.device)
        lam = lam if float(draw) < cfg.soar.probability else 0.0
    return replace(cfg.soar, lambda_aux=lam)


def _rollout(acc: Accelerator, rollout: Rollout) -> Rollout:
    """The family's rollout with its own velocity (if any) under the run's autocast too."""
    if rollout.velocity is None:
        return rollout
    return replace(rollout, velocity=_autocast(acc, rollout.velocity))


def _autocast(acc: Accelerator, velocity: Any) -> Any:
    def f(latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        with acc.autocast():
            return velocity(latents, timesteps, cond)

    return f


def _accumulate(total: LossReport, report: LossReport) -> None:
    total.loss = total.loss + report.loss.detach().cpu()
    total.sum_main += report.sum_main
    total.sum_aux += report.sum_aux
    total.n_main += report.n_main
    total.n_aux += report.n_aux
    total.grad_forwards += report.grad_forwards
    total.nograd_forwards += report.nograd_forwards


def validate(run: Run, cfg: TrainConfig, output: Path, step: int, resolution: int) -> list[Path]:
    """Sample the fixed validation prompts at the fixed seed with the current adapter."""
    data = run.data
    if not data.validation_prompts or not run.family.has_vae:
        return []
    model = run.accelerator.unwrap_model(run.model)
    gen = torch.Generator(device=run.accelerator.device).manual_seed(cfg.validation.seed)
    empty = {k: v for k, v in data.empty.items()}
    images = run.family.sample(
        model,
        data.validation,
        empty,
        height=resolution,
        width=resolution,
        steps=cfg.validation.steps,
        guidance_scale=cfg.validation.guidance_scale,
        generator=gen,
    )
    folder = output / "samples" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, prompt) in enumerate(zip(images, data.validation_prompts, strict=True)):
        path = folder / f"{i:02d}.png"
        image.save(path)
        paths.append(path)
        (folder / f"{i:02d}.txt").write_text(prompt, encoding="utf-8")
    return paths


def trim_metrics(path: Path, step: int) -> None:
    """Drop logged rows past ``step``: a run resumed from an older checkpoint (after a hard kill)
    logs those steps again, and a chart must not show them twice."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


class Logger:
    """metrics.jsonl (read by the app) + TensorBoard, main process only."""

    def __init__(self, output: Path, enabled: bool, metrics: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self.file = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / "logs"))
            if metrics:
                self.file = (output / METRICS).open("a", encoding="utf-8")

    def images(self, step: int, paths: list[Path]) -> None:
        """Validation samples into TensorBoard too (tag = the prompt's index and its first words),
        so they sit next to the loss curves, not only as PNG files."""
        if not self.enabled or not paths:
            return
        import numpy as np
        from PIL import Image

        for path in paths:
            prompt = path.with_suffix(".txt").read_text(encoding="utf-8")
            pixels = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(f"samples/{path.stem} {prompt[:40]}", pixels, step, dataformats="HWC")
        self.writer.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            if self.file is not None:
                self.file.close()


def step_metrics(report: LossReport, run: Run, seconds: float, world: int) -> dict[str, float]:
    """The logged numbers of one step (loss is the normalised objective the optimizer saw)."""
    return {
        "loss": float(report.loss),
        "loss_main": report.loss_main,
        "loss_aux": report.loss_aux,
        "aux_per_sample": report.aux_per_sample,
        "lr": run.scheduler.get_last_lr()[0],
        "step_time": seconds,
        "world_size": world,
    }


def train(
    cfg: TrainConfig,
    output: str | Path,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train one run (or both arms for ``objective=both``); returns the folder holding the LoRA file."""
    output = Path(output)
    if cfg.objective == "both":
        for arm in ("sft", "soar"):
            arm_out = output / arm
            started = (arm_out / RUN_RECORD).exists() or (arm_out / "checkpoints").exists()
            # resuming a run stopped during the SFT arm: the SOAR arm has not started, it starts now
            arm_resume = resume if started else None
            train(cfg.arm(arm), arm_out, resume=arm_resume, overwrite=overwrite, progress=progress)
            gc.collect()  # accelerate's mixed-precision forward wrapper is a cycle: free the arm now
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if PartialState().is_main_process:  # base / SFT / SOAR side by side in OUTPUT/compare
            from soar_lite.sample import compare_arms

            compare_arms(cfg, output)
        return output
    if resume and finished(output, cfg):
        if progress and PartialState().is_main_process:
            print(f"{output}: already complete ({cfg.steps} steps), nothing to resume")
        return output
    acc = make_accelerator(cfg)
    if acc.is_main_process:
        prepare_output(output, resume, overwrite)
    acc.wait_for_everyone()
    model_path = resolve_model(cfg.model.path) if acc.is_main_process else None
    model_path = _broadcast_str(acc, model_path)
    data = prepare_data(cfg, model_path, output, acc, progress)
    _, cfg, family_defaults = resolve_family(cfg, model_path)  # after the data checks: their errors first
    if len(data) < cfg.batch_size:
        _warn_small(acc, len(data), cfg.batch_size)
    run = build_run(cfg, model_path, data, acc)
    state = checkpoint.TrainState()
    if resume:
        found = checkpoint.resolve(output / "checkpoints", resume)
        state = checkpoint.load(
            found, acc.unwrap_model(run.model), run.optimizer, run.scheduler, run.generator, run.ema
        )
    resolution = resolve_resolution(cfg, model_path)
    if resume and acc.is_main_process:
        trim_metrics(output / METRICS, state.step)
    logger = Logger(output, acc.is_main_process)
    rollout = run.family.rollout(run.model, cfg)
    notes = {"family": run.family.name, "variant": run.family.variant, "family_defaults": family_defaults,
             "rollout": rollout.describe(cfg.soar) if cfg.effective_lambda_aux else "none (sft)",
             "training_grid": run.family.grid_note}  # fmt: skip
    _write_record(output, cfg, model_path, state, "running", acc, notes)
    bar = tqdm(
        total=cfg.steps,
        initial=state.step,
        desc=f"train {cfg.objective}",
        unit="step",
        disable=not (progress and acc.is_main_process),
        dynamic_ncols=True,
    )
    try:
        first = True  # the preflight: the first step of this process, also after a resume
        while state.step < cfg.steps:
            start = time.perf_counter()
            if acc.device.type == "cuda":  # the step's own peak, not the cache stage's or validation's
                torch.cuda.reset_peak_memory_stats(acc.device)
            report = _guarded_step(run, cfg, state)
            metrics = step_metrics(report, run, time.perf_counter() - start, acc.num_processes)
            if acc.device.type == "cuda":
                metrics["gpu_peak_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
                if first:
                    _check_headroom(metrics["gpu_peak_gb"], acc.device)
            first = False
            _check_finite(metrics, state.step)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                logger.log(state.step, metrics)
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", aux=f"{metrics['loss_aux']:.3f}", lr=f"{metrics['lr']:.2e}"
            )
            bar.update(1)
            # the last step too: `--resume latest steps=MORE` then extends a finished run
            if cfg.checkpoint_every and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps):
                _save_checkpoint(run, cfg, output, state)
            if cfg.validation.every and state.step % cfg.validation.every == 0 and acc.is_main_process:
                logger.images(state.step, validate(run, cfg, output, state.step, resolution))
    except KeyboardInterrupt:
        _save_checkpoint(run, cfg, output, state)
        raise UserError(
            f"interrupted at step {state.step}: checkpoint saved; continue with --resume latest"
        ) from None
    finally:
        bar.close()
        logger.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        record = _write_record(output, cfg, model_path, state, "done", acc, notes)
        note = {
            "objective": cfg.objective,
            "family": run.family.name,
            "base_model": record["base_model"],
            "base_quant": cfg.model.quant,  # a LoRA trained on a quantized base may want another strength
            "base_dtype": cfg.model.dtype,
        }
        lora.save_lora(acc.unwrap_model(run.model), cfg.lora, output, note)
        if run.ema is not None:
            with run.ema.swapped_in(run.params):
                note = {**note, "ema_decay": cfg.optim.ema_decay}
                lora.save_lora(acc.unwrap_model(run.model), cfg.lora, output, note, name=EMA_FILE)
        if not cfg.validation.every or cfg.steps % cfg.validation.every:
            final = Logger(output, enabled=True, metrics=False)
            final.images(state.step, validate(run, cfg, output, state.step, resolution))
            final.close()
    acc.wait_for_everyone()
    return output


def _save_checkpoint(run: Run, cfg: TrainConfig, output: Path, state: checkpoint.TrainState) -> None:
    if run.accelerator.is_main_process:
        checkpoint.save(
            output / "checkpoints",
            state,
            run.accelerator.unwrap_model(run.model),
            run.optimizer,
            run.scheduler,
            run.generator,
            cfg.keep_checkpoints,
            run.ema,
        )
    run.accelerator.wait_for_everyone()


def _guarded_step(run: Run, cfg: TrainConfig, state: checkpoint.TrainState) -> LossReport:
    """The first step is the preflight: if it runs out of GPU memory, stop with what to change."""
    try:
        return train_step(run, cfg, state)
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory at step {state.step + 1}; try, in this order: quant=nf4, "
            "gradient_checkpointing=true, soar.aux_budget=2, a smaller resolution or batch_size, "
            "optimizer=adamw8bit (see `soar-lite plan` for the estimate)"
        ) from None


def _check_headroom(peak_gb: float, device: torch.device) -> None:
    """Windows drivers spill into shared memory near the limit and training crawls instead of failing."""
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    if peak_gb > 0.9 * total:
        print(
            f"warning: the first step peaked at {peak_gb:.1f} of {total:.1f} GiB; near the limit some "
            "drivers spill into system memory and slow down: consider quant=nf4 or a smaller resolution"
        )


def _check_finite(metrics: dict[str, float], step: int) -> None:
    if not math.isfinite(metrics["loss"]):
        raise UserError(
            f"loss became {metrics['loss']} at step {step}: lower lr, or use mixed_precision=bf16 "
            "instead of fp16; earlier checkpoints are intact"
        )


def _warn_small(acc: Accelerator, n: int, batch: int) -> None:
    if acc.is_main_process:
        print(f"note: the dataset has {n} items, fewer than batch_size={batch}: batches repeat items")


def _broadcast_str(acc: Accelerator, value: str | None) -> str:
    if acc.num_processes == 1:
        return value  # type: ignore[return-value]
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _write_record(
    output: Path,
    cfg: TrainConfig,
    model_path: str,
    state: checkpoint.TrainState,
    status: str,
    acc: Accelerator,
    notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON record next to the LoRA: config, base model, objective, steps, exactness notes."""
    import soar_lite

    record = {
        "status": status,
        "soar_lite_version": soar_lite.__version__,
        "base_model": model_path,
        "model_arg": cfg.model.path,
        "objective": cfg.objective,
        "steps_done": state.step,
        "steps": cfg.steps,
        "world_size": acc.num_processes,
        "rollout_conditional_half": "reused main pass" if cfg.soar.reuse_main_pass else "separate pass",
        **(notes or {}),
        "lora_file": lora.LORA_FILE if status == "done" else None,
        "config": config_to_dict(cfg),
    }
    if acc.is_main_process:
        (output / RUN_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        if status == "running":
            header = (
                f"# The settings of the run in {output.name}/ (every key, resolved). Rerun or vary them:\n"
                f"#   soar-lite train --preset {output} --output NEW_FOLDER [key=value ...]\n"
            )
            body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
            (output / RUN_CONFIG).write_text(header + body, encoding="utf-8")
    return record
