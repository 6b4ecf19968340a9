"""The training loop: cached batch -> SOAR objective (per-term backward) -> optimizer -> checkpoint.

``train()`` reads as the recipe; each stage is a small builder below it. The loop only sees the
model family through :class:`~soar_lite.families.base.ModelFamily` and the objective through
:func:`~soar_lite.objective.soar_loss`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm

from soar_lite import cache, checkpoint, families, lora, run_folder, swap
from soar_lite.base_model import check_resolution, resolve_model, resolve_resolution
from soar_lite.config import SoarConfig, TrainConfig, config_to_dict, with_family_defaults
from soar_lite.data import load_items
from soar_lite.ema import LoraEMA
from soar_lite.errors import Interrupted, UserError
from soar_lite.families.base import ModelFamily
from soar_lite.objective import Draws, LossReport, Rollout, soar_loss
from soar_lite.objectives import ScheduledDraws, reflexflow_loss, scheduled_loss
from soar_lite.paths import write_text_atomic
from soar_lite.run_folder import EMA_FILE, METRICS, RUN_CONFIG, RUN_RECORD

ROLLOUT_OBJECTIVES = ("scheduled", "reflexflow")  # objectives trained on scheduled sampling's drifted states

__all__ = ["METRICS", "RUN_CONFIG", "RUN_RECORD", "resolve_model", "resolve_resolution", "train"]


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


def finished(output: Path, cfg: TrainConfig) -> bool:
    """A run in ``output`` that completed ``cfg.steps`` steps and wrote its LoRA file."""
    return run_folder.finished(output, cfg.steps)


def prepare_output(output: Path, resume: str | None, overwrite: bool, progress: bool = False) -> None:
    """Refuse to silently overwrite an earlier run; ``--resume`` continues it, ``--overwrite`` replaces it.

    A run killed before its first complete checkpoint left nothing to keep: it starts again."""
    if run_folder.holds_run(output) and not resume:
        if run_folder.has_results(output) and not overwrite:
            raise UserError(
                f"{output} already holds a run: pass --resume latest to continue it, "
                "--overwrite to replace it, or another --output"
            )
        if progress and not overwrite:
            print(f"note: {output} holds a run stopped before its first checkpoint: starting it again")
        run_folder.clear(output)
    output.mkdir(parents=True, exist_ok=True)


def resume_point(output: Path, resume: str | None) -> str | None:
    """``--resume latest`` on a run stopped before its first complete checkpoint starts it from
    step 0 (None); a folder with results but no checkpoint, or no run at all, is an error."""
    if resume != "latest" or run_folder.checkpoints(output / run_folder.CHECKPOINTS):
        return resume
    if run_folder.holds_run(output) and not run_folder.has_results(output):
        return None
    raise UserError(f"--resume latest: no complete checkpoint under {output / run_folder.CHECKPOINTS}")


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
        seq = cfg.model.max_sequence_length or families.text_length(cache.local_model_folder(model_path))
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
        swap_blocks=cfg.model.swap_blocks,  # loaded straight into system RAM, block by block
    )
    torch.manual_seed(cfg.seed)  # the adapter's initial weights
    params = lora.add_lora(family.transformer, cfg.lora)
    for p in params:  # peft puts an adapter beside its base weight: a swapped block's is in RAM
        if p.device != accelerator.device:
            p.data = p.data.to(accelerator.device)
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
    # the loader placed every tensor (swapped blocks in RAM): prepare must not move the model whole
    model, optimizer = accelerator.prepare(family.transformer, optimizer, device_placement=[False, None])
    swap.install(family.transformer, cfg.model.swap_blocks, accelerator.device)
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
        if cfg.objective in ROLLOUT_OBJECTIVES:
            draws: Any = ScheduledDraws.sample(z0_all, soar_cfg, cfg.scheduled, run.generator).select(mine)
        else:
            draws = Draws.sample(z0_all, soar_cfg, grid, run.generator).select(mine, soar_cfg)
        z0, cond, uncond = run.data.batch(rows[mine], acc.device, drops[mine])
        common = {
            "rollout": rollout,
            "draws": draws.to(acc.device),
            "backward": lambda term, is_last: acc.backward(term / accum),
            "reduce_sum": reduce_sum,
            "world_size": world,
        }
        # DDP decides at *forward* time whether a backward all-reduces, and processes may run different
        # numbers of terms (SDE paths keep a process-local number of samples): every forward and
        # backward runs unsynchronised, and the gradients are averaged once below.
        with acc.no_sync(run.model):
            if cfg.objective == "scheduled":
                report = scheduled_loss(velocity, z0, cond, uncond, grid, soar_cfg, cfg.scheduled, **common)
            elif cfg.objective == "reflexflow":
                report = reflexflow_loss(
                    velocity, z0, cond, uncond, grid, soar_cfg, cfg.scheduled, cfg.reflexflow, **common
                )
            else:
                report = soar_loss(velocity, z0, cond, uncond, grid, soar_cfg, **common)
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


def _describe_rollout(cfg: TrainConfig, rollout: Rollout) -> str:
    """The run record's line on what the objective's rollout ran (none for SFT)."""
    if cfg.objective in ROLLOUT_OBJECTIVES:
        steps, p = cfg.scheduled.rollout_steps, cfg.scheduled.rollout_probability
        passes = rollout.describe(replace(cfg.soar, reuse_main_pass=False))  # no main pass to reuse
        line = f"scheduled sampling: up to {steps} Euler steps (p={p:g}), {passes}"
        if cfg.objective == "reflexflow":
            r = cfg.reflexflow
            line += (
                f"; reflexflow fc_alpha={r.fc_alpha:g} adr_weight={r.adr_weight:g} fc_weight={r.fc_weight:g}"
            )
            line += ", +1 no-grad clean pass"
        return line
    return rollout.describe(cfg.soar) if cfg.effective_lambda_aux else "none (sft)"


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
    folder = run_folder.sample_folder(output, step)
    paths = []
    with run_folder.guard_write(folder):
        folder.mkdir(parents=True, exist_ok=True)
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
    """Train one run (or one arm per objective of a list, ``both`` = ``sft,soar``); returns the folder
    holding the LoRA file (the run folder holding the arms' folders for a list).

    The output folder is locked for the whole run (a second run into it refuses, naming the
    holder); leftovers of killed writes are removed first; any error ends with the record saying
    ``failed`` (or ``stopped`` after Ctrl-C) and why."""
    output = Path(output)
    main = _global_rank() == 0
    lock = run_folder.RunLock(output) if main else None
    if lock is not None:
        lock.acquire()
        if lock.took_over and progress:
            gone = lock.took_over.get("pid")
            print(f"note: took over the lock of {output} from a run that is gone (pid {gone})")
        run_folder.remove_stale_temp(output)
    try:
        return _train(cfg, output, resume=resume, overwrite=overwrite, progress=progress)
    except BaseException as exc:
        if main:
            stopped = isinstance(exc, (Interrupted, KeyboardInterrupt))
            error = run_folder.write_error(exc, output) if not isinstance(exc, UserError) else None
            reason = str(error or exc) or type(exc).__name__
            run_folder.mark_ended(output, "stopped" if stopped else "failed", reason)
            if error is not None:
                raise error from None
        raise
    finally:
        if lock is not None:
            lock.release()


def _global_rank() -> int:
    """This process's rank from the launcher's environment: known before any process group exists
    (on a CPU-only machine accelerate forms the group only when the Accelerator is built)."""
    return int(os.environ.get("RANK", "0"))


def _train(cfg: TrainConfig, output: Path, *, resume: str | None, overwrite: bool, progress: bool) -> Path:
    if cfg.arms:  # objective=both or a comma list: one arm each, same data/seeds/steps
        refused = not resume and not overwrite and run_folder.has_results(output)  # the first arm says so
        if PartialState().is_main_process and not refused:
            _write_run_config(output, cfg)
        for arm in cfg.arms:
            arm_out = output / arm
            started = (arm_out / RUN_RECORD).exists() or (arm_out / "checkpoints").exists()
            # resuming a run stopped during an earlier arm: a later arm has not started, it starts now
            arm_resume = resume if started else None
            train(cfg.arm(arm), arm_out, resume=arm_resume, overwrite=overwrite, progress=progress)
            gc.collect()  # accelerate's mixed-precision forward wrapper is a cycle: free the arm now
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if PartialState().is_main_process:  # base and every arm side by side in OUTPUT/compare
            from soar_lite.sample import compare_arms

            compare_arms(cfg, output)
        return output
    if resume and finished(output, cfg):
        if progress and PartialState().is_main_process:
            print(f"{output}: already complete ({cfg.steps} steps), nothing to resume")
        return output
    start = resume_point(output, resume)
    if resume and start is None and progress and _global_rank() == 0:
        print(f"note: no complete checkpoint in {output} yet: the run starts again from step 0")
    acc = make_accelerator(cfg)
    if acc.is_main_process:
        prepare_output(output, start, overwrite, progress and not overwrite and not resume)
    resume = start
    acc.wait_for_everyone()
    model_path = resolve_model(cfg.model.path) if acc.is_main_process else None
    model_path = _broadcast_str(acc, model_path)
    data = prepare_data(cfg, model_path, output, acc, progress)
    _, cfg, family_defaults = resolve_family(cfg, model_path)  # after the data checks: their errors first
    if len(data) < cfg.batch_size:
        _warn_small(acc, len(data), cfg.batch_size)
    run = build_run(cfg, model_path, data, acc)
    resolution = resolve_resolution(cfg, model_path)
    check_resolution(resolution, run.family.resolution_multiple)  # before a step, not after them all
    state = checkpoint.TrainState()
    if resume:
        found = checkpoint.resolve(output / "checkpoints", resume)
        state = checkpoint.load(
            found, acc.unwrap_model(run.model), run.optimizer, run.scheduler, run.generator, run.ema
        )
    if resume and acc.is_main_process:
        trim_metrics(output / METRICS, state.step)
    logger = Logger(output, acc.is_main_process)
    rollout = run.family.rollout(run.model, cfg)
    notes = {"family": run.family.name, "variant": run.family.variant, "family_defaults": family_defaults,
             "rollout": _describe_rollout(cfg, rollout),
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
        raise Interrupted(
            f"interrupted at step {state.step}: checkpoint saved; continue with --resume latest"
        ) from None
    finally:
        bar.close()
        logger.close()
    acc.wait_for_everyone()
    if acc.is_main_process:  # "done" only once the LoRA file and the final samples are on disk
        note = {
            "objective": cfg.objective,
            "family": run.family.name,
            "base_model": model_path,
            "base_quant": cfg.model.quant,  # a LoRA trained on a quantized base may want another strength
            "base_dtype": cfg.model.dtype,
        }
        size = _adapter_bytes(run)
        with run_folder.guard_write(output / run_folder.LORA_FILE, size):
            lora.save_lora(acc.unwrap_model(run.model), cfg.lora, output, note)
        if run.ema is not None:
            with run.ema.swapped_in(run.params), run_folder.guard_write(output / EMA_FILE, size):
                note = {**note, "ema_decay": cfg.optim.ema_decay}
                lora.save_lora(acc.unwrap_model(run.model), cfg.lora, output, note, name=EMA_FILE)
        if not cfg.validation.every or cfg.steps % cfg.validation.every:
            final = Logger(output, enabled=True, metrics=False)
            final.images(state.step, validate(run, cfg, output, state.step, resolution))
            final.close()
        _write_record(output, cfg, model_path, state, "done", acc, notes)
    acc.wait_for_everyone()
    return output


def _adapter_bytes(run: Run) -> int:
    """The size of the adapter's tensors: what a LoRA file needs on disk."""
    return sum(p.numel() * p.element_size() for p in run.params)


def _save_checkpoint(run: Run, cfg: TrainConfig, output: Path, state: checkpoint.TrainState) -> None:
    # adapter + two AdamW moments (+ EMA), in fp32: what one checkpoint needs on disk, about
    needed = _adapter_bytes(run) * (4 if run.ema is not None else 3)
    path = run_folder.checkpoint_folder(output, state.step)
    if run.accelerator.is_main_process:
        with run_folder.guard_write(path, needed):
            _write_checkpoint(run, cfg, output, state)
    run.accelerator.wait_for_everyone()


def _write_checkpoint(run: Run, cfg: TrainConfig, output: Path, state: checkpoint.TrainState) -> None:
    checkpoint.save(
        output / run_folder.CHECKPOINTS,
        state,
        run.accelerator.unwrap_model(run.model),
        run.optimizer,
        run.scheduler,
        run.generator,
        cfg.keep_checkpoints,
        run.ema,
    )


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
        run_folder.write_record(output, record)
        if status == "running":
            _write_run_config(output, cfg)
    return record


def _write_run_config(output: Path, cfg: TrainConfig) -> None:
    """``config.yaml``: every setting, resolved, so the folder is a preset that repeats the run (a
    multi-arm run's folder gets one too: it names the arms, which the arms' own records cannot)."""
    header = (
        f"# The settings of the run in {output.name}/ (every key, resolved). Rerun or vary them:\n"
        f"#   soar-lite train --preset {output} --output NEW_FOLDER [key=value ...]\n"
    )
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / RUN_CONFIG).write_text(header + body, encoding="utf-8")
