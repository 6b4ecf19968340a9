"""Typed run configuration: defaults -> preset file -> ``key=value`` overrides -> validated dataclasses.

Every setting lives in one dataclass field, so a misspelt key fails loudly (with the valid choices)
instead of being silently ignored, and cross-field rules live in ``__post_init__``. This module
knows nothing of torch: the CLI can validate a run before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from soar_lite.errors import UserError
from soar_lite.resources import PRESETS, data_files
from soar_lite.run_folder import arm_names

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

BUILTIN = "builtin"
ADAPTER_TYPES = ("lora", "dora", "lokr", "loha")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
# one run each; a comma list of them (or both) trains arms
OBJECTIVES = ("sft", "soar", "scheduled", "reflexflow")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    # NaN compares false with everything: without the isfinite test, lr=nan passed as "positive"
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(
            f"{name}={value!r} must be {'' if math.isfinite(value) else 'a finite number '}{bound}"
        )


def _in_range(name: str, value: float, low: float, high: float, *, high_open: bool = True) -> None:
    """``low <= value < high`` (or ``<= high``), NaN and inf refused."""
    inside = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not inside:
        raise UserError(f"{name}={value!r} must be in [{low}, {high}{')' if high_open else ']'}")


def _check_objective(value: str) -> None:
    """One objective, or a comma list of distinct ones (one arm each); ``both`` = ``sft,soar``."""
    names = ["sft", "soar"] if value == "both" else value.split(",")
    for name in names:
        if name not in OBJECTIVES:
            raise UserError(
                f"objective={value!r} is not valid; choose one of: sft, soar, both, scheduled, reflexflow, "
                "or a comma list of them (sft,soar,scheduled,reflexflow)"
            )
    if len(set(names)) < len(names):
        raise UserError(f"objective={value!r} names an objective twice: one arm each")


def _check_finite(section: Any, prefix: str = "") -> None:
    """Every float setting, in every section, is a finite number (a NaN learning rate or an inf
    guidance scale would pass the range checks' comparisons and fail only after the model loads)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{prefix}{f.name}={value!r} must be a finite number")


@dataclass
class ModelConfig:
    """Which base model, and how it sits in memory (the frozen part of the run)."""

    path: str = BUILTIN  # diffusers SD3/SD3.5, FLUX.1 or Qwen-Image folder or hub id; "builtin" = tiny toy
    family: str = "auto"  # auto (from the folder's model_index.json) | sd3 | flux | qwen
    dtype: str = "float32"  # dtype of the frozen base weights
    quant: str = "none"
    gradient_checkpointing: bool = False
    max_sequence_length: int = 0  # T5 tokens; 0 = the model folder's soar_lite.json or 256
    # the last N transformer blocks' frozen weights in system RAM, copied in one block ahead (0 = off)
    swap_blocks: int = 0

    def __post_init__(self) -> None:
        _choice("model.family", self.family, ("auto", "sd3", "flux", "qwen"))
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.quant", self.quant, ("none", "nf4", "int8", "torchao-int8", "torchao-fp8"))
        _positive("model.max_sequence_length", self.max_sequence_length, allow_zero=True)
        _positive("model.swap_blocks", self.swap_blocks, allow_zero=True)
        if self.swap_blocks and not self.gradient_checkpointing:
            raise UserError(
                "model.swap_blocks needs model.gradient_checkpointing=true (without it the backward keeps "
                "every block's weights on the GPU)"
            )


@dataclass
class DataConfig:
    """Where the captioned images are and how they become cached training tensors."""

    # images + same-name .txt folder, an HF imagefolder (metadata.jsonl/.csv), a save_to_disk dataset
    # folder, or a SOAR reference .jsonl; "builtin" = toy shapes
    path: str = BUILTIN
    format: str = "auto"  # auto | folder | imagefolder | hf | soar_jsonl (auto: from what path holds)
    resolution: int = 0  # pixel budget = resolution**2; 0 = the model's native (tiny base 32, else 1024)
    buckets: bool = True  # aspect-ratio buckets; false = centre square crops
    bucket_max_aspect: float = 2.5  # widest bucket is 2.5:1 (and tallest 1:2.5)
    caption_ext: str = ".txt"  # folder format: caption file next to each image
    default_caption: str = ""  # for images whose caption is missing or empty (else they are skipped)
    trigger_word: str = ""  # put in front of every caption ("tok, a photo of ..."), once
    kohya_folders: bool = True  # folder format: "10_ohwx dog/" = 10 repeats, "ohwx dog" for uncaptioned
    caption_dropout: float = 0.0  # share of rows shown the empty prompt (drawn per batch, not cached)
    image_column: str = ""  # saved HF dataset: "" = "image"
    caption_column: str = ""  # "" = "text" (imagefolder, HF dataset) or "caption_en" (SOAR jsonl)
    split: str = "train"  # split of a saved HF DatasetDict / imagefolder subfolder
    image_dir: str = ""  # SOAR jsonl: folder of <md5>.jpg; "" = the jsonl's folder
    cache_dir: str = ""  # "" = the shared $SOAR_LITE_HOME/cache (content-addressed: safe to share)
    # text encoders while caching: auto | none (all on the GPU) | model (one at a time) | sequential
    # (layer by layer); auto picks by free GPU memory (SD3.5's encoders are ~11 GB in bf16)
    encoder_offload: str = "auto"
    # latents + embeddings: always in RAM, never (read per batch from the memory-mapped cache: any
    # dataset size), or auto (in RAM when they take under a quarter of the available memory)
    cache_in_ram: str = "auto"

    def __post_init__(self) -> None:
        _positive("data.resolution", self.resolution, allow_zero=True)
        _choice("data.format", self.format, ("auto", "folder", "imagefolder", "hf", "soar_jsonl"))
        _choice("data.encoder_offload", self.encoder_offload, ("auto", "none", "model", "sequential"))
        _choice("data.cache_in_ram", self.cache_in_ram, ("auto", "always", "never"))
        if not self.caption_ext.startswith("."):
            raise UserError(f"data.caption_ext={self.caption_ext!r} must start with '.'")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise UserError(f"data.caption_dropout={self.caption_dropout!r} must be in [0, 1]")
        if self.bucket_max_aspect < 1.0:
            raise UserError(f"data.bucket_max_aspect={self.bucket_max_aspect!r} must be >= 1 (e.g. 2.5)")
        if self.split and ("/" in self.split or "\\" in self.split):
            raise UserError(f"data.split={self.split!r} must be a split name such as train")


@dataclass
class LoraConfig:
    """The trainable adapter. alpha/rank is folded into the saved weights, so loaders agree."""

    # lora | dora | lokr | loha (peft's adapters). LoKr/LoHa files use LyCORIS keys: ComfyUI loads them,
    # diffusers' load_lora_weights does not (merge them with `soar-lite merge`); see README
    type: str = "lora"
    rank: int = 16  # LoHa's update has rank up to rank**2: rank 8 spans what LoRA rank 64 does
    alpha: float = 16.0
    dropout: float = 0.0  # > 0 makes the main-pass reuse inexact: see soar.reuse_main_pass
    use_dora: bool = False  # same as type=dora (DoRA loads in diffusers; no exact kohya/ComfyUI form)
    use_rslora: bool = False  # scale alpha/sqrt(rank) instead of alpha/rank (folded into the file)
    lokr_factor: int = -1  # LoKr: the Kronecker factor's size (-1 = near the square root of each dim)
    lokr_decompose_both: bool = False  # LoKr: low-rank the small factor too, not only the large one
    targets: list[str] = field(
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",  # image branch (and SD3.5's attn2)
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",  # context branch
        ]
    )

    def __post_init__(self) -> None:
        _choice("lora.type", self.type, ADAPTER_TYPES)
        if self.use_dora and self.type not in ("lora", "dora"):
            raise UserError(f"lora.use_dora=true is DoRA: it cannot be combined with lora.type={self.type}")
        if self.use_dora or self.type == "dora":  # one spelling for the rest of the code: both set
            self.type, self.use_dora = "dora", True
        if self.type in ("lokr", "loha"):
            if self.use_rslora:
                raise UserError(
                    f"lora.use_rslora scales LoRA by alpha/sqrt(rank); lora.type={self.type} has no such "
                    "rule in peft or ComfyUI: set lora.alpha instead"
                )
            if self.dropout > 0:
                raise UserError(
                    f"lora.dropout is LoRA's input dropout; peft's {self.type} has none: set lora.dropout=0"
                )
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise UserError(f"lora.lokr_factor={self.lokr_factor!r} must be -1 (auto) or a positive size")
        _positive("lora.rank", self.rank)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if not self.targets:
            raise UserError("lora.targets is empty: name at least one module, e.g. to_q")


@dataclass
class SoarConfig:
    """The SOAR objective (shared/SOAR.md). lambda_aux = 0 is plain flow-matching SFT."""

    lambda_aux: float = 1.0
    trajectory_length: int = 6  # K auxiliary points per rollout path
    num_rollout_paths: int = 1  # M: path 0 is the ODE step, 1..M-1 stochastic
    sde_rollout_type: str = "flow_sde"
    sde_noise_scale: float = 0.5
    cfg_scale_sampling: float = 4.5  # two-pass CFG families (SD3) in the rollout
    rollout_guidance: float = 3.5  # embedded-guidance families (FLUX.1-dev) in the rollout
    num_sampling_steps: int = 40  # FLUX.1: 28 (dev) / 4 (schnell) unless set
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    cond_dropout_rate: float = 0.0
    reuse_main_pass: bool = True  # exact while nothing random acts inside the forward
    aux_budget: int = 0  # > 0: train k of the K points per step, reweighted K/k (unbiased); 0 = all K
    lambda_warmup_steps: int = 0  # lambda_aux ramps linearly from 0 over the first N optimizer steps
    probability: float = 1.0  # each step is a SOAR step with this probability, else plain SFT

    def __post_init__(self) -> None:
        _positive("soar.lambda_aux", self.lambda_aux, allow_zero=True)
        _positive("soar.trajectory_length", self.trajectory_length)
        _positive("soar.num_rollout_paths", self.num_rollout_paths)
        _choice("soar.sde_rollout_type", self.sde_rollout_type, ("simple", "sde", "flow_sde", "cps"))
        _positive("soar.sde_noise_scale", self.sde_noise_scale, allow_zero=True)
        _positive("soar.num_sampling_steps", self.num_sampling_steps)
        _positive("soar.rollout_guidance", self.rollout_guidance, allow_zero=True)
        _positive("soar.cfg_scale_sampling", self.cfg_scale_sampling, allow_zero=True)
        _positive("soar.mode_scale", self.mode_scale, allow_zero=True)
        _choice("soar.weighting_scheme", self.weighting_scheme, ("logit_normal", "mode", "cosmap", "uniform"))
        _positive("soar.logit_std", self.logit_std)
        _positive("soar.aux_budget", self.aux_budget, allow_zero=True)
        if self.aux_budget > self.trajectory_length:
            raise UserError(
                f"soar.aux_budget={self.aux_budget} exceeds trajectory_length={self.trajectory_length}"
            )
        _positive("soar.lambda_warmup_steps", self.lambda_warmup_steps, allow_zero=True)
        if not 0.0 < self.probability <= 1.0:
            raise UserError(f"soar.probability={self.probability!r} must be in (0, 1]")
        if not 0.0 <= self.cond_dropout_rate <= 1.0:
            raise UserError(f"soar.cond_dropout_rate={self.cond_dropout_rate!r} must be in [0, 1]")


@dataclass
class ScheduledConfig:
    """Scheduled sampling (``objective=scheduled``, soar_lite/objectives.py): train the flow target on
    the state the model itself drifts to over a few no-grad sampler steps above the target level.
    Its sampler (steps, CFG or embedded guidance) is SOAR's rollout settings in ``soar.*``."""

    rollout_steps: int = 4  # at most this many Euler steps of the sampler, uniform in 0..N per sample
    rollout_probability: float = 1.0  # chance that a sample is rolled out at all; 0 = plain SFT, bit for bit

    def __post_init__(self) -> None:
        _positive("scheduled.rollout_steps", self.rollout_steps, allow_zero=True)
        _in_range("scheduled.rollout_probability", self.rollout_probability, 0.0, 1.0, high_open=False)


@dataclass
class ReflexFlowConfig:
    """ReflexFlow as SimpleTuner ships it (``objective=reflexflow``, soar_lite/objectives.py R1-R3), on
    scheduled sampling's rollout (``scheduled.*``). Defaults are SimpleTuner's documented ones."""

    # SimpleTuner's alpha / beta1 / beta2 (renamed: alpha, beta1, beta2 already name LoRA and Adam knobs)
    fc_alpha: float = 1.0  # frequency-compensation weights: W = 1 + fc_alpha * exposure / sum|exposure|
    adr_weight: float = 10.0  # the anti-drift (direction) term's weight (beta1)
    fc_weight: float = 1.0  # the frequency-compensated flow loss's weight (beta2)

    def __post_init__(self) -> None:
        _positive("reflexflow.fc_alpha", self.fc_alpha, allow_zero=True)
        _positive("reflexflow.adr_weight", self.adr_weight, allow_zero=True)
        _positive("reflexflow.fc_weight", self.fc_weight, allow_zero=True)


@dataclass
class FluxConfig:
    """FLUX.1 only (ignored by other families)."""

    guidance: float = 1.0  # embedded guidance of the trained passes (dev); 1.0 keeps the distillation
    # training grid: scheduler = diffusers' FLUX LoRA script (FLUX.1's scheduler grid, unshifted at
    # every size); resolution = the sampler's mu-shifted grid for each bucket's token count
    train_shift: str = "scheduler"

    def __post_init__(self) -> None:
        _positive("flux.guidance", self.guidance, allow_zero=True)
        _choice("flux.train_shift", self.train_shift, ("scheduler", "resolution"))


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    ema_decay: float = 0.0  # > 0 (e.g. 0.999): also write an EMA of the LoRA (..._ema.safetensors)
    # LoRA+: lora_B matrices train at loraplus_ratio x lr (its authors suggest 16); 0 = off
    loraplus_ratio: float = 0.0

    def __post_init__(self) -> None:
        _choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        _positive("optim.lr", self.lr)
        if self.optimizer == "prodigy" and self.lr < 0.1:
            raise UserError(
                f"optimizer=prodigy estimates the step size itself and lr={self.lr:g} only scales it: "
                "set lr=1.0 (its authors' setting)"
            )
        if self.loraplus_ratio != 0 and self.loraplus_ratio < 1:
            raise UserError(f"optim.loraplus_ratio={self.loraplus_ratio!r} must be 0 (off) or >= 1 (e.g. 16)")
        if self.loraplus_ratio and self.optimizer == "prodigy":
            raise UserError(
                "optim.loraplus_ratio needs a second learning rate and Prodigy takes one for all parameters "
                "(it raises otherwise): use optimizer=adamw or loraplus_ratio=0"
            )
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.max_grad_norm", self.max_grad_norm, allow_zero=True)
        _choice(
            "optim.lr_scheduler",
            self.lr_scheduler,
            ("constant", "constant_with_warmup", "linear", "cosine"),
        )
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _in_range("optim.beta1", self.beta1, 0, 1)
        _in_range("optim.beta2", self.beta2, 0, 1)
        _positive("optim.eps", self.eps)
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"optim.ema_decay={self.ema_decay!r} must be in [0, 1) (0 = no EMA; e.g. 0.999)")


@dataclass
class ValidationConfig:
    """Fixed prompts and seeds sampled every ``every`` steps, so runs can be compared by eye."""

    every: int = 0  # 0 = only at the end
    prompts: list[str] = field(default_factory=list)  # empty = the first captions of the dataset
    num_prompts: int = 4
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 4.5

    def __post_init__(self) -> None:
        _positive("validation.every", self.every, allow_zero=True)
        _positive("validation.num_prompts", self.num_prompts, allow_zero=True)
        _positive("validation.steps", self.steps)
        _positive("validation.guidance_scale", self.guidance_scale, allow_zero=True)
        _in_range("validation.seed", self.seed, 0, 2**32)


@dataclass
class TrainConfig:
    """One training run. Sub-sections are YAML mappings in presets; knobs are ``key=value`` on the CLI."""

    # sft | soar | scheduled | reflexflow, or a comma list (sft,soar,reflexflow): one arm each into
    # OUTPUT/<arm>, same data/seeds/steps; both = sft,soar
    objective: str = "soar"
    steps: int = 100
    batch_size: int = 4
    gradient_accumulation: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 0  # 0 = no intermediate checkpoints
    keep_checkpoints: int = 2
    log_every: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    soar: SoarConfig = field(default_factory=SoarConfig)
    scheduled: ScheduledConfig = field(default_factory=ScheduledConfig)
    reflexflow: ReflexFlowConfig = field(default_factory=ReflexFlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    flux: FluxConfig = field(default_factory=FluxConfig)

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_objective(self.objective)
        _in_range("seed", self.seed, 0, 2**32)
        _positive("steps", self.steps)
        _positive("batch_size", self.batch_size)
        _positive("gradient_accumulation", self.gradient_accumulation)
        _choice("mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _positive("checkpoint_every", self.checkpoint_every, allow_zero=True)
        _positive("keep_checkpoints", self.keep_checkpoints)
        _positive("log_every", self.log_every)
        if self.model.quant == "nf4" and self.lora.type in ("lokr", "loha"):
            raise UserError(
                f"lora.type={self.lora.type} cannot train on an NF4 base: peft's {self.lora.type} reshapes "
                "the base weight, which bitsandbytes stores packed; use quant=int8, torchao-int8 or none, "
                "or lora.type=lora"
            )
        if self.optim.loraplus_ratio and self.lora.type in ("lokr", "loha"):
            raise UserError(
                f"optim.loraplus_ratio speeds up LoRA's B matrices; lora.type={self.lora.type} has none: "
                "use lora.type=lora or dora, or optim.loraplus_ratio=0"
            )
        if self.soar.reuse_main_pass and self.lora.dropout > 0 and "soar" in self.objectives:
            raise UserError(
                "lora.dropout > 0 makes soar.reuse_main_pass inexact: set soar.reuse_main_pass=false "
                "or lora.dropout=0"
            )

    def arm(self, objective: str) -> TrainConfig:
        """This config for one arm of a multi-arm run (``sft`` sets lambda_aux to 0)."""
        return dataclasses.replace(self, objective=objective)

    @property
    def objectives(self) -> tuple[str, ...]:
        """The objectives this config names, in order: ``both`` is ``sft, soar``."""
        return ("sft", "soar") if self.objective == "both" else tuple(self.objective.split(","))

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms of a multi-arm run (one sub-folder each, in training order); () for a single run."""
        return arm_names(self.objective)

    @property
    def effective_lambda_aux(self) -> float:
        """``lambda_aux`` as the objective sees it: SFT is SOAR with lambda 0, bit for bit; scheduled
        sampling has no SOAR auxiliary term."""
        return self.soar.lambda_aux if "soar" in self.objectives else 0.0


def with_family_defaults(cfg: TrainConfig, defaults: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """``cfg`` with a family's defaults (dotted keys) in place of generic defaults left unchanged.

    The generic defaults are SD3's; a family whose sampler differs (FLUX.1-schnell samples in 4 steps)
    replaces only values still equal to the generic default, so anything a preset or the user set
    stays. Returns the new config and what was replaced (for the run record)."""
    fresh = config_to_dict(TrainConfig())
    current = config_to_dict(cfg)
    values: dict[str, Any] = {}
    applied: dict[str, Any] = {}
    for path in LEAVES:
        section, _, name = path.rpartition(".")
        now = current[section][name] if section else current[name]
        values[path] = now
        base = fresh[section][name] if section else fresh[name]
        if path in defaults and now == base and defaults[path] != base:
            values[path] = defaults[path]
            applied[path] = defaults[path]
    return _build(TrainConfig, values) if applied else cfg, applied


# ---------------------------------------------------------------- flattening and overrides


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _leaf_paths(cls: type = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every settable key as ``section.name`` -> its annotated type."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for name in _fields(cls):
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            out.update(_leaf_paths(hint, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


LEAVES = _leaf_paths()


def resolve_key(key: str) -> str:
    """Map a user key to its full dotted path: ``lr`` -> ``optim.lr``, ``optim.lr`` -> itself.

    A bare name resolves when exactly one setting has it, whatever the nesting, so the common
    knobs (steps, seed, lr, rank, lambda_aux, trajectory_length, resolution, ...) stay short.
    """
    if key in LEAVES:
        return key
    matches = [path for path in LEAVES if path.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"{key!r} is ambiguous; write one of: {', '.join(matches)}")
    close = difflib.get_close_matches(key, list(LEAVES) + [p.rsplit(".", 1)[-1] for p in LEAVES], n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise UserError(f"unknown setting {key!r}{hint}; `soar-lite presets --keys` lists them all")


def _convert(path: str, raw: Any, hint: Any) -> Any:
    """Coerce a preset value or a ``key=value`` string to the field's type, or raise UserError."""
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if path == "model.swap_blocks" and str(raw).strip() == "auto":
                raise UserError(
                    "swap_blocks=auto is chosen by the planner when a run starts (`soar-lite train` or "
                    "`soar-lite plan` on the command line); in a preset file give a number"
                )
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(float(raw)) if isinstance(raw, str) and "e" in raw.lower() else int(raw)
        if hint is float:
            if isinstance(raw, bool) or not math.isfinite(float(raw)):
                raise ValueError
            return float(raw)
        if hint is str:
            if isinstance(raw, (dict, list)):
                raise ValueError
            return str(raw)
        if origin is list:
            if isinstance(raw, str):
                return [item.strip() for item in raw.split(",") if item.strip()]
            if isinstance(raw, list):
                return [str(item) for item in raw]
            raise ValueError
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unhandled type {hint} for {path}")
    kind = getattr(hint, "__name__", str(hint))
    kind = "finite number" if hint is float else kind
    raise UserError(f"{path}={raw!r} is not a valid {kind}")


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and any(leaf.startswith(path + ".") for leaf in LEAVES):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name in _fields(cls):
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, values, f"{prefix}{name}.")
        elif f"{prefix}{name}" in values:
            kwargs[name] = values[f"{prefix}{name}"]
    return cls(**kwargs)


def build_config(
    preset_values: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Defaults, then a preset's (nested) values, then ``key=value`` overrides; validated."""
    values: dict[str, Any] = {}
    for key, raw in _flatten(preset_values or {}).items():
        path = resolve_key(key) if key in LEAVES else _strict_preset_key(key)
        values[path] = _convert(path, raw, LEAVES[path])
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} is not key=value (e.g. steps=200)")
        path = resolve_key(key.strip())
        values[path] = _convert(path, raw.strip(), LEAVES[path])
    return _build(TrainConfig, values)


def _strict_preset_key(key: str) -> str:
    """Preset files must use full paths (they are documentation); only the CLI takes short names."""
    resolve_key(key)  # raises with suggestions when unknown
    raise UserError(f"preset key {key!r} must be written in full, as {resolve_key(key)!r}")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """A plain nested dict (for JSON run records and for showing a preset)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- presets


def preset_names() -> list[str]:
    """The shipped presets (package data, see :mod:`soar_lite.resources`), by file stem."""
    return list(data_files(PRESETS, ".yaml"))


def preset_path(name: str) -> Path | Traversable:
    """The YAML file of a preset name, a path to a user's own preset file, or an earlier run's
    folder (its ``config.yaml``: every setting of that run, so a run can be repeated or varied)."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    if candidate.is_dir():
        if (candidate / "config.yaml").is_file():
            return candidate / "config.yaml"
        raise UserError(f"{name} is a folder without config.yaml: not a soar-lite run folder")
    shipped = data_files(PRESETS, ".yaml")
    if name not in shipped:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(shipped)}")
    return shipped[name]


def saved_objective(folder: str | Path) -> str | None:
    """The objective a run folder's ``config.yaml`` names: a multi-arm run writes one above its arms
    (each arm's own record names only that arm). None where there is no readable one."""
    path = Path(folder) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    value = data.get("objective") if isinstance(data, dict) else None
    return str(value) if value else None


def load_preset(name: str) -> dict[str, Any]:
    """The raw nested values of a preset (data only, validated when built)."""
    path = preset_path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"preset {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"preset {path} must be a mapping of settings")
    return data


def preset_header(name: str) -> str:
    """The comment block that opens a preset: the command that runs it and the hardware it assumes."""
    lines = []
    for line in preset_path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return "\n".join(lines)


def load_config(preset: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """The validated config of a run: ``preset`` (default ``cpu-tiny``) plus ``key=value`` overrides."""
    return build_config(load_preset(preset or "cpu-tiny"), overrides)
