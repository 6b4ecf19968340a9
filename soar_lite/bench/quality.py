"""``soar-lite bench quality``: which exposure-bias objective helps, on the built-in toy, measured alike?

From the shipped tiny base (it draws the shapes its captions ask for: soar_lite/toy/pretrain.py)
LoRA fine-tunes are trained with every objective named (``--objectives sft,soar,scheduled,reflexflow``) from
the same base on the same data with the same seeds, steps and settings, plus an SFT arm given
SOAR's wall-clock time as extra steps (``sft_equal_time``). The built-in data teaches a colour the
base never saw (orange, two thirds of the images) next to its own world (one third), so there is
something to learn and something to keep. Every arm, and the base, then samples the same captions
from the same noise (a paired comparison) at few and at many sampler steps (exposure bias shows as
a gap between the two) and is scored on two eval sets, ``novel`` (the new colour's 27 captions)
and ``world`` (the base's 135), by:

* the rule-based checker (``toy/checker.py``): is the requested colour, shape and place right;
* distances between the generated set and held-out real images of the same captions: total
  variation of colour histograms and a Fréchet distance of 8x8-pooled pixels (both also given for
  a second real set, the floor an ideal model would reach at this sample size);
* trajectory drift at a few sampler step counts on the novel set: held-out (image, caption) pairs
  are noised with noise z1; from z1 the model runs its own CFG Euler sampler, and at each grid
  level s its conditional velocity is compared with SOAR's correction target (z - z0) / s, next to
  its error at the ideal state (1 - s) z0 + s z1 against z1 - z0. Note this is close to what SOAR
  trains on (one rollout step there, whole trajectories here), so it checks SOAR learned its
  objective; the checker and the distances are the independent measures.

Several training seeds; every number is reported per seed and as mean, std, and for every pair of
arms as a paired difference with a paired t-test over seeds whose p-values are Holm-corrected over
the comparisons of each metric (bench/stats.py), whatever it shows. Writes the JSON, a grid PNG and a
plot of checker accuracy against sampler steps per arm.
"""

from __future__ import annotations

import copy
import itertools
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from soar_lite.bench import stats
from soar_lite.toy import checker
from soar_lite.toy.shapes import all_captions, caption_attributes, draw_shape, novel_captions

EQUAL_TIME = "sft_equal_time"
EVAL_SETS = ("novel", "world")
ALPHA = 0.05
NOTES = [
    "All arms sample the same captions from the same noise per seed: differences are paired.",
    "Verdicts: paired t-test over seeds, two-sided, p-values Holm-corrected over all comparisons of "
    "the same metric; 'better' / 'worse' only where the corrected p < 0.05, else 'no clear difference'.",
    "Eval sets: novel = the colour the base never saw (the fine-tuning task), world = the base's own "
    "captions (what fine-tuning should keep). Keys read SET.METRIC@SAMPLER_STEPS.",
    "drift_ratio / trajectory_velocity_mse measure what SOAR trains on (the correction target on the "
    "model's own trajectory): a check that SOAR learned its objective, not independent evidence.",
    "acc_* (rule-based checker) and hist_tv / pixel_fd (distance to held-out real images; see "
    "real_vs_real_floor for the floor at this sample size) are the independent measures.",
    "sft_equal_time: SFT given SOAR's step cost as extra steps (ratio timed round-robin by bench step).",
]
METRICS = ("acc_all", "acc_color", "acc_shape", "acc_position", "hist_tv", "pixel_fd")


@dataclass(frozen=True)
class QualitySettings:
    """Every knob (``soar-lite bench quality key=value``); the defaults are what the README quotes."""

    model: str = "builtin"
    data: str = "builtin"
    preset: str = "cpu-tiny"
    objectives: tuple[str, ...] = ("sft", "soar", "scheduled", "reflexflow")  # one trained arm each
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # 3 were too few to separate the arms (see README)
    steps: int = 150  # the cpu-tiny preset's
    lr: float = 1e-3
    rank: int = 8
    batch_size: int = 8
    trajectory_length: int = 6  # SOAR's K (the reference's and the preset's)
    equal_time: bool = True  # also train SFT for SOAR's wall-clock time
    eval_per_caption: int = 1  # samples per caption and seed
    eval_captions: int = 0  # per eval set; 0 = all (27 novel, 135 world)
    sampler_steps: tuple[int, ...] = (8, 40)  # few and many: exposure bias is the gap
    guidance_scale: float = 4.5
    drift_steps: tuple[int, ...] = (4, 8, 16)
    drift_pairs: int = 32
    drift_min_sigma: float = 0.1  # velocity errors below this noise level blow up as 1/s: left out
    real_seed: int = 4321
    grid_captions: int = 4  # per eval set
    work_dir: str = ""  # "" = a temporary folder, removed afterwards
    # torch CPU threads (0 = torch's default). On a machine shared with other jobs, 1 avoids the
    # OpenMP barrier stalls of oversubscribed cores (seen here: 30 s SOAR steps instead of 0.3 s).
    threads: int = 1
    extra: tuple[str, ...] = field(default_factory=tuple)  # more key=value overrides for every arm

    def __post_init__(self) -> None:
        objectives = self.objectives
        if isinstance(objectives, str):
            objectives = ("sft", "soar") if objectives == "both" else objectives.split(",")
        objectives = tuple(str(o).strip() for o in _as_tuple(objectives) if str(o).strip())
        if not objectives or len(set(objectives)) != len(objectives) or EQUAL_TIME in objectives:
            raise ValueError(f"objectives={self.objectives!r}: name each objective once, e.g. sft,soar")
        object.__setattr__(self, "objectives", objectives)
        object.__setattr__(self, "seeds", tuple(int(s) for s in _as_tuple(self.seeds)))
        object.__setattr__(self, "sampler_steps", tuple(int(s) for s in _as_tuple(self.sampler_steps)))
        object.__setattr__(self, "drift_steps", tuple(int(s) for s in _as_tuple(self.drift_steps)))
        object.__setattr__(self, "extra", tuple(str(s) for s in _as_tuple(self.extra)))

    @property
    def wants_equal_time(self) -> bool:
        """An equal-time SFT arm needs both an SFT arm to extend and SOAR's cost to match."""
        return self.equal_time and "soar" in self.objectives and "sft" in self.objectives

    @property
    def arms(self) -> tuple[str, ...]:
        """Every scored arm in order: the base, each objective, then equal-time SFT."""
        return ("base", *self.objectives, *((EQUAL_TIME,) if self.wants_equal_time else ()))


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def comparisons(arms: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair of trained arms (the later one first, so ``soar - sft``), then each against base."""
    trained = [arm for arm in arms if arm != "base"]
    pairs = [(b, a) for a, b in itertools.combinations(trained, 2)]
    return pairs + [(arm, "base") for arm in trained] if "base" in arms else pairs


# ---------------------------------------------------------------- evaluation data


def eval_captions(settings: QualitySettings, name: str = "world") -> list[str]:
    """An eval set's captions, each ``eval_per_caption`` times (all of them, or an evenly spread subset)."""
    captions = novel_captions() if name == "novel" else all_captions()
    if settings.eval_captions and settings.eval_captions < len(captions):
        step = len(captions) / settings.eval_captions
        captions = [captions[int(i * step)] for i in range(settings.eval_captions)]
    return [c for c in captions for _ in range(settings.eval_per_caption)]


def real_images(captions: Sequence[str], seed: int, size: int) -> list[Image.Image]:
    """Held-out real images of exactly these captions, jittered as the dataset is (own RNG)."""
    rng = random.Random(seed)
    out = []
    for caption in captions:
        a = caption_attributes(caption)
        jitter = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(0.85, 1.15))
        out.append(draw_shape(a["color"], a["shape"], a["position"], size, jitter=jitter)[0])
    return out


@dataclass
class EvalSet:
    """What every arm is scored against: captions, their embeddings, real images, drift pairs."""

    name: str
    captions: list[str]
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    real: list[Image.Image]
    real_floor: list[Image.Image]
    drift_z0: torch.Tensor
    drift_cond: dict[str, torch.Tensor]
    resolution: int


def build_eval_set(family: Any, settings: QualitySettings, resolution: int, name: str = "world") -> EvalSet:
    """Encode the eval captions once and the held-out images of the drift pairs (encoders then freed)."""
    captions = eval_captions(settings, name)
    distinct = list(dict.fromkeys(captions))
    encoded = family.encode_prompts(distinct)
    rows = torch.tensor([distinct.index(c) for c in captions])
    cond = {k: v[rows].cpu() for k, v in encoded.items()}
    uncond = {k: v.cpu() for k, v in family.encode_prompts([""]).items()}
    offset = EVAL_SETS.index(name) if name in EVAL_SETS else 0
    real = real_images(captions, settings.real_seed + 10 * offset, resolution)
    floor = real_images(captions, settings.real_seed + 10 * offset + 1, resolution)
    pick = np.random.default_rng(settings.real_seed).permutation(len(captions))[: settings.drift_pairs]
    pixels = torch.stack([_to_tensor(real[i]) for i in pick])
    z0 = family.encode_images(pixels).float().cpu()
    drift_cond = {k: v[torch.from_numpy(pick)] for k, v in cond.items()}
    return EvalSet(name, captions, cond, uncond, real, floor, z0, drift_cond, resolution)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


# ---------------------------------------------------------------- training the arms


def _train_arm(
    settings: QualitySettings, work: Path, seed: int, objective: str, steps: int
) -> dict[str, Any]:
    """One LoRA fine-tune through the normal trainer; returns its folder, wall time and step time."""
    from soar_lite.config import load_config
    from soar_lite.train import METRICS as METRICS_FILE
    from soar_lite.train import train

    overrides = [
        f"model.path={settings.model}",
        f"data.path={settings.data}",
        f"data.cache_dir={work / 'cache'}",
        f"objective={objective}",
        f"steps={steps}",
        f"seed={seed}",
        f"lr={settings.lr}",
        f"rank={settings.rank}",
        f"alpha={float(settings.rank)}",
        f"batch_size={settings.batch_size}",
        f"trajectory_length={settings.trajectory_length}",
        "validation.num_prompts=0",
        *settings.extra,
    ]
    cfg = load_config(settings.preset, overrides)
    folder = work / f"seed{seed}" / f"{objective}-{steps}"
    start = time.perf_counter()
    train(cfg, folder, overwrite=True, progress=False)
    wall = time.perf_counter() - start
    lines = (folder / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    times = np.asarray([json.loads(line)["step_time"] for line in lines])
    return {
        "folder": str(folder),
        "steps": steps,
        "wall_s": wall,
        "median_step_s": float(np.median(times)),
        # On a shared machine the slow steps are other people's load; the fast ones are the cost.
        "p10_step_s": float(np.percentile(times, 10)),
    }


def step_time_ratio(settings: QualitySettings) -> dict[str, float]:
    """SOAR / SFT step time on the toy's architecture and batch, timed round-robin in one process.

    Why not the training runs' own clocks: on a shared machine other people's load lands on one run
    and not the other (seen here: the same 150 SFT steps took 6 s in one run and 64 s in another).
    Interleaving the two step kinds makes load hit both alike; ``bench step`` does exactly that.
    """
    from soar_lite.bench.step import run_bench

    k = settings.trajectory_length
    record = run_bench(batch=settings.batch_size, ks=(k,), repeats=7, warmup=2)
    row = record["variants"][f"soar_k{k}"]
    return {"ratio": row["ratio_to_sft"], "forward_unit_ratio": row["flop_floor_ratio"]}


def train_arms(settings: QualitySettings, work: Path, seed: int, sft_equal_steps: int) -> dict[str, dict]:
    """Every objective at ``steps``; SFT again at ``sft_equal_steps`` (SOAR's time) when asked."""
    runs = {name: _train_arm(settings, work, seed, name, settings.steps) for name in settings.objectives}
    if settings.wants_equal_time:
        runs[EQUAL_TIME] = _train_arm(settings, work, seed, "sft", sft_equal_steps)
    return runs


# ---------------------------------------------------------------- sampling and scoring


def arm_transformer(base: torch.nn.Module, lora_folder: str | None) -> torch.nn.Module:
    """The base, or a copy with the LoRA merged in (exactly the LoRA'd model: tests/test_export.py)."""
    if lora_folder is None:
        return base
    from soar_lite.export import merge_into, read_any_lora

    model = copy.deepcopy(base)
    merge_into(model, read_any_lora(lora_folder), 1.0)
    return model


def generate(
    family: Any, transformer: torch.nn.Module, ev: EvalSet, settings: QualitySettings, noise: int, steps: int
) -> list:
    """One image per eval caption; image i's start noise comes from seed (noise, i) in every arm."""
    images: list[Image.Image] = []
    chunk = 135
    for start in range(0, len(ev.captions), chunk):
        rows = slice(start, start + chunk)
        cond = {k: v[rows] for k, v in ev.cond.items()}
        n = cond["prompt_embeds"].shape[0]
        generators = [torch.Generator().manual_seed(noise * 1_000_003 + start + i) for i in range(n)]
        images += family.sample(
            transformer,
            cond,
            ev.uncond,
            height=ev.resolution,
            width=ev.resolution,
            steps=steps,
            guidance_scale=settings.guidance_scale,
            generator=generators,
        )
    return images


def image_metrics(images: Sequence[Image.Image], ev: EvalSet) -> dict[str, float]:
    """Checker accuracy per attribute and the two distances to the held-out real images."""
    acc = checker.accuracy(images, ev.captions)
    return {
        "acc_all": acc["all"],
        "acc_color": acc["color"],
        "acc_shape": acc["shape"],
        "acc_position": acc["position"],
        "hist_tv": checker.histogram_distance(images, ev.real),
        "pixel_fd": checker.pixel_fd(images, ev.real),
    }


@torch.no_grad()
def trajectory_drift(
    family: Any,
    transformer: torch.nn.Module,
    ev: EvalSet,
    settings: QualitySettings,
    n_steps: int,
    noise: int,
) -> dict[str, float]:
    """Velocity error on the model's own N-step CFG trajectory vs on the ideal states (module doc)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    velocity = family.velocity(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(family.pipe.scheduler.config)
    scheduler.set_timesteps(n_steps)
    sigmas, timesteps = scheduler.sigmas.float(), scheduler.timesteps.float()
    z0 = ev.drift_z0
    z1 = torch.randn(z0.shape, generator=torch.Generator().manual_seed(noise))
    n = z0.shape[0]
    uncond = {k: v.expand(n, *v.shape[1:]) for k, v in ev.uncond.items()}
    z, traj, ideal, traj_x0, ideal_x0 = z1.clone(), [], [], [], []
    for k in range(n_steps):
        s, t = sigmas[k], timesteps[k].expand(n)
        v_cond, v_uncond = velocity(z, t, ev.drift_cond), velocity(z, t, uncond)
        v_ideal = velocity((1 - s) * z0 + s * z1, t, ev.drift_cond)
        if k >= 1:  # k = 0: both start at z1, identical by construction
            e_traj = float(((v_cond - (z - z0) / s) ** 2).mean())
            e_ideal = float(((v_ideal - (z1 - z0)) ** 2).mean())
            traj_x0.append(e_traj * float(s) ** 2)
            ideal_x0.append(e_ideal * float(s) ** 2)
            if s >= settings.drift_min_sigma:
                traj.append(e_traj)
                ideal.append(e_ideal)
        z = z + (sigmas[k + 1] - s) * (v_uncond + settings.guidance_scale * (v_cond - v_uncond))
    mean = statistics.fmean
    return {
        "trajectory_velocity_mse": mean(traj) if traj else float("nan"),
        "ideal_velocity_mse": mean(ideal) if ideal else float("nan"),
        "drift_ratio": mean(traj) / mean(ideal) if traj else float("nan"),
        "trajectory_x0_mse": mean(traj_x0),
        "ideal_x0_mse": mean(ideal_x0),
        "points": len(traj),
    }


def evaluate_arm(
    family: Any, transformer: torch.nn.Module, evs: Sequence[EvalSet], settings: QualitySettings, seed: int
) -> dict:
    """All metrics of one arm at one seed; the images come back too (for the grid), by (set, steps).

    Drift is measured on the first eval set (the novel one: the task the LoRA learns).
    """
    start = time.perf_counter()
    metrics: dict[str, Any] = {}
    images: dict[tuple[str, int], list] = {}
    for ev in evs:
        for n in settings.sampler_steps:
            images[ev.name, n] = generate(family, transformer, ev, settings, noise=seed, steps=n)
            metrics[f"{ev.name}@{n}"] = image_metrics(images[ev.name, n], ev)
    metrics["drift"] = {
        str(n): trajectory_drift(family, transformer, evs[0], settings, n, noise=seed)
        for n in settings.drift_steps
    }
    metrics["score_s"] = time.perf_counter() - start
    return {"metrics": metrics, "images": images}


# ---------------------------------------------------------------- summary


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    """One level: ``novel.acc_all@8``, ``world.pixel_fd@40``, ``drift_ratio@4``, ..."""
    out = {}
    for key, values in metrics.items():
        if "@" in key:
            name, n = key.split("@")
            out.update({f"{name}.{m}@{n}": values[m] for m in METRICS})
    for n, drift in metrics["drift"].items():
        out[f"drift_ratio@{n}"] = drift["drift_ratio"]
        out[f"trajectory_velocity_mse@{n}"] = drift["trajectory_velocity_mse"]
    return out


def _spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (n - 1), min, max over seeds."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "min": float(array.min()), "max": float(array.max())}


LOWER_IS_BETTER = ("hist_tv", "pixel_fd", "drift_ratio", "trajectory_velocity_mse")


def _lower_is_better(key: str) -> bool:
    return key.split(".")[-1].startswith(LOWER_IS_BETTER)


def summarise(per_seed: dict[str, dict[str, dict]], arms: Sequence[str] | None = None) -> dict[str, Any]:
    """Mean / std / min / max over seeds per arm and metric; paired tests, Holm-corrected per metric."""
    seeds = list(per_seed.values())
    order = arms if arms is not None else list(seeds[0])
    arms = [arm for arm in order if all(arm in runs for runs in seeds)]
    flat = {seed: {arm: _flat(runs[arm]) for arm in arms} for seed, runs in per_seed.items()}
    keys = list(next(iter(next(iter(flat.values())).values())))
    table = {arm: {k: _spread([flat[s][arm][k] for s in flat]) for k in keys} for arm in arms}
    pairs = comparisons(arms)
    paired: dict[str, dict] = {f"{a}-{b}": {} for a, b in pairs}
    for key in keys:
        tests = []
        for a, b in pairs:
            diffs = [flat[s][a][key] - flat[s][b][key] for s in flat]
            tests.append({**_spread(diffs), **stats.paired_test(diffs), "seeds_a_better": _wins(key, diffs)})
        for test, p_holm in zip(tests, stats.holm([t["p"] for t in tests]), strict=True):
            test["p_holm"] = p_holm
        for (a, b), test in zip(pairs, tests, strict=True):
            paired[f"{a}-{b}"][key] = test
    verdicts = {f"{a} vs {b}": verdict(paired[f"{a}-{b}"], len(flat), a, b) for a, b in pairs}
    return {"arms": table, "paired_differences": paired, "verdict": verdicts, "alpha": ALPHA}


def _wins(key: str, diffs: Sequence[float]) -> int:
    """In how many seeds the first arm of the pair was better on ``key``."""
    lower = _lower_is_better(key)
    return int(sum((d < 0) if lower else (d > 0) for d in diffs))


def verdict(
    diff: dict[str, dict[str, float]], n_seeds: int, a: str = "soar", b: str = "sft"
) -> dict[str, str]:
    """Per metric, plain words from the Holm-corrected paired test of ``a - b`` over seeds."""
    words = {}
    for key, d in diff.items():
        p = d.get("p_holm", float("nan"))
        numbers = (
            f"{a} - {b} = {d['mean']:+.3g} +/- {d['se']:.2g} s.e., Holm p = {p:.2g}, "
            f"{a} better in {d['seeds_a_better']}/{n_seeds} seeds"
        )
        if n_seeds < 2 or not np.isfinite(p) or p >= ALPHA:
            words[key] = f"no clear difference ({numbers})"
            continue
        good = (d["mean"] < 0) == _lower_is_better(key)
        words[key] = f"{a} {'better' if good else 'worse'} ({numbers})"
    return words


# ---------------------------------------------------------------- grid, plot, run, main


def quality_grid(
    evs: Sequence[EvalSet], images: dict[str, dict[tuple[str, int], list]], count: int
) -> Image.Image:
    """Rows: ``count`` captions per eval set at each sampler step count; columns: real, then each arm."""
    from soar_lite.sample import make_grid

    cells, labels = [], []
    for ev in evs:
        first = list({caption: i for i, caption in reversed(list(enumerate(ev.captions)))}.values())[::-1]
        rows = [first[int(j * len(first) / count)] for j in range(min(count, len(first)))]
        steps = sorted({n for arm in images.values() for name, n in arm if name == ev.name})
        for n in steps:
            for i in rows:
                cells.append([ev.real[i], *(images[arm][ev.name, n][i] for arm in images)])
                labels.append(f"{ev.captions[i]} ({n} steps)")
    return make_grid(cells, labels, ["real (held out)", *images])


def steps_plot(record: dict[str, Any], metric: str = "acc_all") -> Image.Image:
    """Checker accuracy (mean +/- std over seeds) against sampler steps, a panel per eval set."""
    from soar_lite.bench.plot import metric_vs_steps

    table = record["summary"]["arms"]
    settings = record["settings"]
    panels = {
        name: {
            arm: {
                n: (table[arm][f"{name}.{metric}@{n}"]["mean"], table[arm][f"{name}.{metric}@{n}"]["std"])
                for n in settings["sampler_steps"]
            }
            for arm in table
        }
        for name in settings["eval_sets"]
    }
    return metric_vs_steps(panels, ylabel=f"{metric} (checker)")


def score_seed(
    family: Any,
    evs: Sequence[EvalSet],
    settings: QualitySettings,
    seed: int,
    runs: dict[str, dict],
    progress: bool,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every arm of one seed (the base too) sampled from the same noise and scored."""
    metrics, images = {}, {}
    for arm in settings.arms:
        if arm != "base" and arm not in runs:
            continue
        _say(progress, f"seed {seed}: scoring {arm}")
        folder = None if arm == "base" else runs[arm]["folder"]
        result = evaluate_arm(family, arm_transformer(family.transformer, folder), evs, settings, seed)
        metrics[arm], images[arm] = result["metrics"], result["images"]
    return metrics, images


def run_quality(
    settings: QualitySettings, work: Path, progress: bool = True
) -> tuple[dict[str, Any], Image.Image]:
    """Train every arm for every seed, score them all; returns the JSON record and the grid image."""
    from soar_lite import families
    from soar_lite.train import resolve_model

    if settings.threads:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    settings = replace(settings, model=resolve_model(settings.model))
    base_ready = time.perf_counter() - start
    family = families.load_family(families.detect_family(settings.model), settings.model, device="cpu")
    resolution = families.native_resolution(settings.model)
    evs = [build_eval_set(family, settings, resolution, name) for name in EVAL_SETS]
    family.free_encoders()
    cost = step_time_ratio(settings) if settings.wants_equal_time else {}
    sft_equal_steps = max(settings.steps, round(settings.steps * cost.get("ratio", 1.0)))
    per_seed: dict[str, dict] = {}
    runs: dict[str, dict] = {}
    grid_images: dict[str, dict] = {}
    for seed in settings.seeds:
        extra = f", sft for {sft_equal_steps} steps" if cost else ""
        _say(progress, f"seed {seed}: training {', '.join(settings.objectives)}{extra}")
        runs[str(seed)] = train_arms(settings, work, seed, sft_equal_steps)
        per_seed[str(seed)], images = score_seed(family, evs, settings, seed, runs[str(seed)], progress)
        grid_images = grid_images or images
    equal_time = {"sft_steps": sft_equal_steps if cost else None, **cost}
    timing = {"base_ready": base_ready, "total": time.perf_counter() - start}
    record = _record(settings, evs, per_seed, runs, equal_time, timing)
    return record, quality_grid(evs, grid_images, settings.grid_captions)


def _record(
    settings: QualitySettings,
    evs: Sequence[EvalSet],
    per_seed: dict,
    runs: dict,
    equal_time: dict,
    timing: dict,
) -> dict[str, Any]:
    from soar_lite.families.common import model_settings

    floor = {
        ev.name: {
            "hist_tv": checker.histogram_distance(ev.real_floor, ev.real),
            "pixel_fd": checker.pixel_fd(ev.real_floor, ev.real),
        }
        for ev in evs
    }
    for arms in runs.values():
        for run in arms.values():
            run.pop("folder", None)  # a temporary path: meaningless in a committed file
    return {
        "benchmark": "quality",
        "settings": {**asdict(settings), "eval_sets": [ev.name for ev in evs]},
        "base_model_settings": model_settings(settings.model),
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "samples_per_arm_and_seed": {ev.name: len(ev.captions) for ev in evs},
        "real_vs_real_floor": floor,
        "real_checker_accuracy": {ev.name: checker.accuracy(ev.real, ev.captions) for ev in evs},
        "equal_time": equal_time,
        "training": runs,
        "per_seed": per_seed,
        "summary": summarise(per_seed, settings.arms),
        "wall_time_s": timing,
        "notes": NOTES,
    }


def _finite(value: Any) -> Any:
    """NaN (a metric with no points, e.g. drift at very few steps) as JSON null, not invalid ``NaN``."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[bench quality] {text}", flush=True)


def main(output: str | Path, **knobs: Any) -> dict[str, Any]:
    """Run the benchmark; write ``output`` (JSON), ``<stem>_grid.png`` and ``<stem>_steps.png``."""
    settings = QualitySettings(**knobs)
    output = Path(output)
    if settings.work_dir:
        record, grid = run_quality(settings, Path(settings.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="soar-lite-quality-") as work:
            record, grid = run_quality(settings, Path(work))
    output.parent.mkdir(parents=True, exist_ok=True)
    grid_path = output.with_name(f"{output.stem}_grid.png")
    grid.save(grid_path)
    plot_path = output.with_name(f"{output.stem}_steps.png")
    steps_plot(record).save(plot_path)
    record["grid"], record["steps_plot"] = grid_path.name, plot_path.name
    output.write_text(json.dumps(_finite(record), indent=2), encoding="utf-8")
    return record
